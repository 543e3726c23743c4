"""Every knob of the pipeline: `PipelineConfig`, one section per stage.

This package is the single source of truth for configuration: presets are YAML data validated against these models,
and each stage receives only its own slice, which is also what its cache key hashes. Each stage's section is defined
in the module named after it (`acquire.py`, `train.py`, ...; what several share in `section.py` and `registry.py`),
so that a stage's code identity follows its own settings and not every other stage's. `extra="forbid"` everywhere,
so a misspelt key is an error that names the key rather than a silently ignored setting.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from model.config import ModelSection
from pipeline_config.acquire import AcquireConfig, SourceConfig
from pipeline_config.registry import ALIAS, MODEL_NAME, MODEL_REF, REGISTRY_URI, RegistryRef
from pipeline_config.section import CountryCode, Section, Seed
from pipeline_config.evaluate import EvaluateConfig
from pipeline_config.export import ExportConfig
from pipeline_config.register import RegisterConfig
from pipeline_config.shard import RunnerConfig, ShardConfig
from pipeline_config.synthesize import SynthesizeConfig
from pipeline_config.tokenizer import TokenizerCandidate, TokenizerConfig
from pipeline_config.train import CheckpointSamplesConfig, LoraConfig, TrainConfig

__all__ = ["ALIAS", "MODEL_NAME", "MODEL_REF", "REGISTRY_URI", "AcquireConfig", "CheckpointSamplesConfig",
           "EvaluateConfig", "ExportConfig", "LoraConfig", "ModelSection", "PipelineConfig", "RegisterConfig",
           "RegistryRef", "ReportConfig", "RunnerConfig", "Section", "Seed", "ShardConfig", "SourceConfig",
           "SynthesizeConfig", "TokenizerCandidate", "TokenizerConfig", "TrainConfig"]


class ReportConfig(Section):
    """What a person sees while and after a run: Prefect artifacts and each stage's time and energy. None of it
    changes what a stage writes, so this section is in no stage's cache key: switching it re-runs nothing."""

    prefect_artifacts: bool = Field(True, description="progress and summary artifacts in the Prefect UI (only "
                                    "inside a flow run)")
    track_energy: bool = Field(True, description="codecarbon around synthesize, tokenizer, shard, evaluate and "
                               "export (train measures its loop itself: train.track_emissions); starting it costs "
                               "2-4 s a stage")
    country_iso_code: CountryCode = Field("FRA", description="the grid the energy is costed on")


# `register` is the stage's name; pydantic warns that it shadows ABCMeta.register, which no config code uses.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class PipelineConfig(Section):
    name: str = "quickstart"
    artifacts_dir: Path = Path("artifacts")
    acquire: AcquireConfig = Field(default_factory=AcquireConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="before")
    @classmethod
    def _checkpoint_prompts(cls, data: Any) -> Any:
        """Checkpoint samples continue evaluate's prompts unless `train.samples.prompts` names others."""
        train = data.get("train", {}) if isinstance(data, dict) else None
        samples = train.get("samples", {}) if isinstance(train, dict) else None
        if not isinstance(samples, dict) or samples.get("prompts") is not None:
            return data
        evaluate = data.get("evaluate", {})
        prompts = evaluate.get("prompts") if isinstance(evaluate, dict) else getattr(evaluate, "prompts", None)
        prompts = EvaluateConfig.model_fields["prompts"].default_factory() if prompts is None else prompts
        if not prompts:
            return data  # evaluate.prompts is refused on its own; one error, named where the user wrote it
        return {**data, "train": {**train, "samples": {**samples, "prompts": prompts}}}

    @model_validator(mode="after")
    def _has_data(self) -> "PipelineConfig":
        if not self.acquire.sources and self.synthesize.n == 0:
            raise ValueError("no data: give acquire.sources or synthesize.n > 0")
        return self

    @model_validator(mode="after")
    def _shards_hold_a_window(self) -> "PipelineConfig":
        """Training draws its windows (block_size + 1 tokens) inside one shard: with smaller shards the shard stage
        ran to its end and train then found no window at all."""
        least = self.train.model.block_size + 2
        if self.shard.tokens_per_shard < least:
            raise ValueError(f"shard.tokens_per_shard ({self.shard.tokens_per_shard}) is below train.model.block_size "
                             f"+ 2 ({least}): a training window is block_size + 1 consecutive tokens of one shard; "
                             "raise shard.tokens_per_shard (shards of millions of tokens are usual)")
        return self

    @model_validator(mode="after")
    def _registry_for_parents(self) -> "PipelineConfig":
        """`champion` and `models:/...` are looked up in the store `register` writes to."""
        uri = self.register.tracking_uri or \
            f"sqlite:///{Path(self.artifacts_dir).resolve() / 'mlflow' / 'mlflow.db'}"
        ref = RegistryRef(tracking_uri=uri, model_name=self.register.model_name, alias=self.register.champion_alias)
        for name in ("train", "tokenizer"):
            section = getattr(self, name)
            wants = section.init_from != "scratch" if name == "train" else section.from_model is not None
            if wants and section.registry is None:  # frozen sections: set through object's own setattr
                object.__setattr__(self, name, section.model_copy(update={"registry": ref}))
        return self
