"""What several stages' settings share: the strict base model, seeds, the energy grid, MLflow names.

Each stage's settings live in the module named after it (`acquire.py`, `train.py`, ...), so a stage's code
identity follows its own settings and this file, not every other stage's (tasks/stage.py `code_modules`).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no .inf or .nan knob


@functools.cache
def _grid_countries() -> frozenset[str]:
    """The countries codecarbon has an energy mix for, read from its data file without importing it (2-3 s);
    empty where codecarbon or the file is missing, and then any code is accepted."""
    spec = importlib.util.find_spec("codecarbon")
    if spec is None or not spec.origin:
        return frozenset()
    try:
        mix = Path(spec.origin).parent / "data" / "private_infra" / "global_energy_mix.json"
        return frozenset(json.loads(mix.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return frozenset()


def _country_code(value: str) -> str:
    """An ISO 3166-1 alpha-3 code, upper-cased; one codecarbon does not know would be costed at the world average
    after only a log line, so it is refused here."""
    code = value.strip().upper()
    known = _grid_countries()
    if (known and code not in known) or not re.fullmatch("[A-Z]{3}", code):
        raise ValueError(f"'{value}' is not a country codecarbon has a grid for: an ISO 3166-1 alpha-3 code such "
                         "as FRA, DEU, USA")
    return code


CountryCode = Annotated[str, AfterValidator(_country_code)]


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

# What both torch.manual_seed (64 bits, plus a DDP rank) and numpy's generators (no negatives) take.
Seed = Annotated[int, Field(ge=0, lt=2**63)]


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
