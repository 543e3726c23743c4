"""A stage's wall-clock time and energy, measured around it and recorded in its manifest as `compute`.

Energy comes from codecarbon's offline tracker (`tasks/training/emissions.py`), around the stages that burn compute:
synthesize, tokenizer, shard, evaluate, export. Train measures its own loop (`train.track_emissions`, so the figure
excludes loading the shards) and reports `energy_kwh` itself; acquire and register wait on disks and networks. The
tracker costs 2-4 s to start, which is why `report.track_energy` can turn it off; the time is always measured.

The `compute` section sits beside the manifest's fingerprinted content (not in it): two runs that write the same
bytes in different times are the same artifact.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

ENERGY_STAGES = frozenset({"synthesize", "tokenizer", "shard", "evaluate", "export"})


@dataclass
class Compute:
    """Filled in when the measured block ends."""

    seconds: float | None = None
    energy_kwh: float | None = None
    emissions_kg_co2eq: float | None = None

    def figures(self, fields: dict[str, Any]) -> dict[str, float | None]:
        """The manifest's `compute` section: this measurement, or the energy the stage reported itself (train)."""
        energy = self.energy_kwh if self.energy_kwh is not None else fields.get("energy_kwh")
        emissions = self.emissions_kg_co2eq if self.emissions_kg_co2eq is not None else \
            fields.get("emissions_kg_co2eq")
        return {"seconds": self.seconds, "energy_kwh": energy, "emissions_kg_co2eq": emissions}


def _tracker(country_iso_code: str, out_dir: Path, log: logging.Logger) -> Any:
    from tasks.training.emissions import emissions_tracker

    try:
        tracker = emissions_tracker(True, country_iso_code, out_dir)
        tracker.start()
        return tracker
    except Exception as exc:  # no power readings on this machine, a broken install: time is still measured
        log.warning("energy not measured (%s: %s)", type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc)
                    else "")
        return None


@contextlib.contextmanager
def measured(stage: str, out_dir: Path, settings: Any, log: logging.Logger) -> Iterator[Compute]:
    """Time the block, and track its energy when `settings` (a `ReportConfig`, or None: time only) asks for it and
    the stage is one that burns compute."""
    compute = Compute()
    tracker = None
    if settings is not None and settings.track_energy and stage in ENERGY_STAGES:
        tracker = _tracker(settings.country_iso_code, out_dir, log)
    started = time.perf_counter()
    try:
        yield compute
    finally:
        compute.seconds = time.perf_counter() - started
        if tracker is not None:
            with contextlib.suppress(Exception):
                compute.emissions_kg_co2eq = tracker.stop()
                compute.energy_kwh = tracker.final_emissions_data.energy_consumed
