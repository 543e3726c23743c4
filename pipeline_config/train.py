"""The train stage's settings: the model (`model/config.py`), the optimizer and schedule, checkpoints, the
samples written at each, and where training starts from (scratch, a registered model, LoRA)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from model.config import ModelSection
from pipeline_config.registry import MODEL_REF, RegistryRef
from pipeline_config.section import CountryCode, Section, Seed


class LoraConfig(Section):
    """LoRA adapters: only these low-rank updates train, the parent's weights stay frozen; merged after training."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    targets: list[str] = Field(
        default_factory=lambda: ["c_attn", "c_proj", "c_fc", "wqkv", "wo", "w13", "w2", "in_proj", "out_proj"],
        min_length=1, description="linear layers to adapt: a layer's name (gpt: c_attn c_proj c_fc; llama: wqkv wo "
        "w13 w2; mamba2: in_proj out_proj) or a glob over its full name (h.*.attn.c_attn); the output head never")


class CheckpointSamplesConfig(Section):
    """What the model writes at each checkpoint (Alexandria's "evolution of language modeling"): each prompt continued
    greedily and at `temperature`, kept per step in the train artifact's `samples.jsonl` and logged as an MLflow
    table, so a reader sees the writing improve."""

    enabled: bool = True
    prompts: list[str] | None = Field(None, min_length=1, description="None: evaluate.prompts (filled in when the "
                                      "configuration is loaded, so train's cache key holds them)")
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.5, ge=0, description="the sampled continuation's temperature (the other is greedy)")


class TrainConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    seed: Seed = 1337
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch (per process under DDP)")
    grad_accum_steps: int = Field(1, ge=1)
    max_steps: int = Field(200, ge=1)
    max_seconds: float | None = Field(
        None, gt=0, description="also stop when training has run this long (seconds, summed over resumptions); the "
        "cosine decay then follows the fraction of this budget spent, so the run ends on the floor rate"
    )
    learning_rate: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of the peak rate")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon for the blocks' matrices, AdamW (learning_rate) for embeddings, head, norms")
    muon_learning_rate: float = Field(0.02, gt=0, description="optimizer=muon: peak rate of the Muon matrices (the "
                                      "schedule scales it like learning_rate)")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="optimizer=muon: Nesterov momentum of the Muon matrices")
    muon_weight_decay: float = Field(0.0, ge=0, description="optimizer=muon: decoupled weight decay of the Muon "
                                     "matrices")
    dropout_final: float | None = Field(None, ge=0, lt=1, description="anneal dropout linearly to this value")
    eval_interval: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1)
    early_stopping_patience: int = Field(0, ge=0, description="evaluations without improvement; 0 disables")
    checkpoint_interval: int = Field(100, ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool = False
    deterministic: bool = False
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None leaves torch's default")
    keep_heap: bool = Field(True, description="keep freed memory in the process between steps (glibc's malloc "
                            "thresholds, tasks/training/allocator.py): fewer page faults, a shorter CPU step")
    track_emissions: bool = True
    country_iso_code: CountryCode = Field("FRA", description="the grid the energy is costed on")
    log_interval: int = Field(20, ge=1)
    samples: CheckpointSamplesConfig = Field(default_factory=CheckpointSamplesConfig)
    init_from: str = Field(
        "scratch", pattern=MODEL_REF.replace("^(", "^(scratch|", 1),
        description="scratch, champion (the registered champion of register.model_name; scratch while there is "
        "none), models:/NAME/VERSION or models:/NAME@ALIAS: start from that model's weights (same model config "
        "and tokenizer, see tokenizer.from_model)")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters on the init_from model instead of all "
                                    "weights (needs init_from); e.g. {rank: 8, alpha: 16}")
    registry: RegistryRef | None = Field(None, exclude=True, description="filled in by the pipeline")

    @model_validator(mode="after")
    def _lora_needs_a_parent(self) -> "TrainConfig":
        if self.lora is not None and self.init_from == "scratch":
            raise ValueError("train.lora adapts a trained model: set train.init_from (champion or "
                             "models:/NAME/VERSION), or remove train.lora")
        return self
