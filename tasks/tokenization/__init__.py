"""What the tokenizer stage needs besides training a vocabulary: the side-by-side comparison of several candidate
vocabularies (`comparison`). Nothing here is a stage; `tasks/tokenizer.py` is."""
