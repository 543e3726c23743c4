"""The evaluate stage's settings: how much validation text is scored, and the prompts it continues."""
from __future__ import annotations

from pydantic import Field

from pipeline_config.section import Section, Seed


class EvaluateConfig(Section):
    batch_size: int = Field(16, ge=1)
    max_batches: int = Field(50, ge=1, description="per language in the validation split")
    prompts: list[str] = Field(default_factory=lambda: ["Once upon a time", "The little dog"], min_length=1,
                               description="continued greedily and sampled after training (at least one)")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: int | None = Field(50, ge=1)
    top_p: float | None = Field(0.95, gt=0, le=1)
    seed: Seed = 0
