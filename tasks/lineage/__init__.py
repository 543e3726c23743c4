"""Lineage between registered models: which version a run starts from (`registry.py`) and how a new version is
compared with the champion on the same validation text (`gate.py`)."""
