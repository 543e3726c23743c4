"""The base every stage's settings derive from, and the field types several stages share (seeds, the energy grid).

Each stage's settings live in the module named after it (`acquire.py`, `train.py`, ...), so a stage's code identity
follows its own settings and what they import, not every other stage's (tasks/stage.py `code_modules`).
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


# What both torch.manual_seed (64 bits, plus a DDP rank) and numpy's generators (no negatives) take.
Seed = Annotated[int, Field(ge=0, lt=2**63)]
