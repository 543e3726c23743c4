"""The register stage's settings: the MLflow store, experiment and model name, and the champion gate."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from pipeline_config.registry import Alias, ModelName
from pipeline_config.section import Section


class RegisterConfig(Section):
    tracking_uri: str | None = Field(None, description="None: SQLite store under <artifacts_dir>/mlflow")
    experiment: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)] = "scriptorium"
    model_name: ModelName = "scriptorium-lm"
    champion_alias: Alias = "champion"
    champion_metric: str = Field(
        "val_bpb", pattern=r"^val_(bpb|loss|perplexity)(\.[A-Za-z0-9_-]+)?$",
        description="lower is better: val_bpb, val_loss or val_perplexity, or one language's, e.g. val_bpb.fr")
