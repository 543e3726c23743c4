"""Prefect flows: `build_model` is the pipeline."""
