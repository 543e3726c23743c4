"""Energy and CO2 of a stage's compute, from codecarbon's offline tracker (no network: the country is explicit,
otherwise it would look the location up online or assume Canada)."""
from __future__ import annotations

import logging
from pathlib import Path


def emissions_tracker(enabled: bool, country_iso_code: str, out_dir: Path):
    """A started-on-demand `OfflineEmissionsTracker` writing its CSV into `out_dir`, or None when disabled."""
    if not enabled:
        return None
    from codecarbon import OfflineEmissionsTracker
    from codecarbon.output_methods.base_output import OutputMethod

    # codecarbon sets log_level only after its first lines (an INFO and a WARNING that several trackers may run at
    # once), which would land in every stage's log
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    return OfflineEmissionsTracker(
        country_iso_code=country_iso_code, output_dir=str(out_dir), log_level="error",
        output_methods=[OutputMethod.CSV],
    )
