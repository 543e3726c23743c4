"""Pipeline configuration: a pydantic module per stage's settings, composed in `schema.py`; YAML presets (`presets/`)
and the loader."""
from pipeline_config.loader import ConfigError, load_config, preset_path
from pipeline_config.schema import PipelineConfig

__all__ = ["ConfigError", "PipelineConfig", "load_config", "preset_path"]
