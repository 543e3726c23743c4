"""MLflow names in the settings: a registered model's name, an alias, and `models:/` references to a version."""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from pipeline_config.section import Section


# What MLflow registers (no '/' or ':') and a `models:/NAME@ALIAS` URI can carry back (no '@', no spaces).
MODEL_NAME = r"[^/:@\s]+"
ALIAS = r"[A-Za-z0-9_-]+"  # what MLflow sets as an alias (it also reserves 'latest' and v<N>: _alias)


def _model_name(value: str) -> str:
    """A MODEL_NAME that is not a path MLflow refuses ('.', '..')."""
    if not re.fullmatch(MODEL_NAME, value) or value in (".", ".."):
        raise ValueError(f"'{value}' is not a name MLflow can register: use letters, digits, '-', '_' or '.', without "
                         "'/', ':', '@' or spaces")
    return value


def _alias(value: str) -> str:
    """What MLflow sets as an alias: letters, digits, '_' and '-'; 'latest' and 'v<N>' (its version aliases) are
    reserved."""
    reserved = value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value)
    if not re.fullmatch(ALIAS, value) or len(value) > 255 or reserved:
        raise ValueError(f"'{value}' is not an alias MLflow can set: letters, digits, '_' or '-', and not 'latest' "
                         "or v<N> (reserved)")
    return value


ModelName = Annotated[str, AfterValidator(_model_name)]
Alias = Annotated[str, AfterValidator(_alias)]


# A registered version: models:/NAME/VERSION or models:/NAME@ALIAS (groups: name, version, alias).
REGISTRY_URI = rf"models:/({MODEL_NAME})(?:/([0-9]+)|@({ALIAS}))"
# `init_from` / `tokenizer.from_model`: a registered model of the pipeline's MLflow store (see tasks/lineage/).
MODEL_REF = rf"^(champion|{REGISTRY_URI})$"


class RegistryRef(Section):
    """The MLflow store and model `init_from: champion` (and `tokenizer.from_model`) read. The pipeline fills it in
    from `register` and `artifacts_dir`; set it only to run a stage on its own (torchrun). Not in any cache key: the
    *resolved* version and its weights' digest are."""

    tracking_uri: str
    model_name: str
    alias: str = "champion"
