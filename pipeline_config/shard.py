"""The shard stage's settings: shard size, the held-out share, and where its mapped work runs."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline_config.section import Section


class RunnerConfig(Section):
    """Where a stage's mapped Prefect tasks run: threads here, or a Dask cluster (prefect-dask's DaskTaskRunner)."""

    kind: Literal["local", "dask"] = "local"
    address: str | None = Field(None, description="kind=dask: the scheduler of an existing cluster, e.g. "
                                "tcp://10.0.0.5:8786 (its workers must see the artifacts directory at the same path); "
                                "None starts a local cluster of `num_workers` processes")


class ShardConfig(Section):
    tokens_per_shard: int = Field(10_000_000, ge=1, description="every shard but a stream's last holds exactly this "
                                  "many tokens")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of each language's documents (by content hash) "
                                "held out")
    num_workers: int = Field(2, ge=1, description="chunks tokenized at once (threads, or local Dask processes)")
    compression_level: int = Field(3, ge=1, le=22, description="zstd level")
    # Where the work runs never changes a byte of the shards (tested), so it is left out of the cache key.
    runner: RunnerConfig = Field(default_factory=RunnerConfig, exclude=True)
