"""The generation knobs and their ranges: one table for every way of asking, so that what `scriptorium generate`
refuses (its flags and REPL commands, flows/cli.py) the served model refuses too (model/serving.py's params).

Torch-free: the command line parses its flags before it loads a model.
"""
from __future__ import annotations

import math

# name: (type, lowest, highest, lowest excluded); None: no bound
RANGES: dict[str, tuple[type, float | None, float | None, bool]] = {
    "max_new_tokens": (int, 1, None, False),
    "temperature": (float, 0, None, False),  # 0 is greedy; below it the distribution is turned upside down
    "top_k": (int, 0, None, False),  # 0: all tokens
    "top_p": (float, 0, 1, True),
    "seed": (int, -2**63, 2**64 - 1, False),  # what torch.manual_seed takes
}


def bounds(name: str) -> str:
    """What `name` takes, in words: `>= 0`, `in (0, 1]`, `(int)`."""
    kind, low, high, above = RANGES[name]
    if low is None:
        return f"({kind.__name__})"
    if high is None:
        return f">= {low}"
    return f"in {'(' if above else '['}{low}, {high}]"


def fits(name: str, value: float) -> bool:
    """Whether `value` is in range for `name`; nan and inf never are (a nan temperature samples garbage)."""
    _, low, high, above = RANGES[name]
    return math.isfinite(value) and (low is None or value > low or (value == low and not above)) and \
        (high is None or value <= high)


def checked(params: dict[str, float]) -> dict[str, float]:
    """`params` when each known knob in it is in range, else ValueError naming the first that is not."""
    for name, value in params.items():
        if name in RANGES and not fits(name, value):
            raise ValueError(f"{name} needs a number {bounds(name)}, not {value!r}")
    return params
