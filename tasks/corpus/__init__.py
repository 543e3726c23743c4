"""The training corpus's plumbing, shared by the data stages: file formats (`formats`), downloads over HTTP and the
Hugging Face hub (`download`), and the reader that gives tokenizer and shard the documents and stories upstream
stages wrote (`reader`). Nothing here is a stage; `tasks/acquire.py` and friends are."""
