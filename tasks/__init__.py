"""The pipeline's stages, one module each: a plain function plus a thin Prefect task (see `tasks/stage.py`)."""
