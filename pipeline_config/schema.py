"""Every knob of the pipeline, one pydantic model per stage.

This module is the single source of truth for configuration: presets are YAML data validated against these models,
and each stage receives only its own slice, which is also what its cache key hashes. `extra="forbid"` everywhere, so a
misspelt key is an error that names the key rather than a silently ignored setting.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from model.config import ModelSection
from pipeline_config.synthesize import SynthesizeConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no .inf or .nan knob


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# SentencePiece with byte fallback reserves one piece per byte value plus <unk>, <s>, </s>, and needs one more for
# every distinct character of the corpus on top (about 100 for English prose).
BYTE_FALLBACK_PIECES = 256 + 3


def _check_addresses(source: "SourceConfig") -> None:
    """Only http(s) is downloaded; a hub id and revision are names, never paths that could climb out of a folder."""
    for key, address in (("url", source.url if source.kind == "http" else None),
                         ("endpoint", source.endpoint if source.kind == "hf" else None)):
        if address is not None and urlsplit(address).scheme not in ("http", "https"):
            raise ValueError(f"{key} must be an http:// or https:// address (got {address.split(':')[0]}:); a local "
                             "file is a source of kind 'local' with a path")
    if source.kind == "hf" and not HUB_ID.fullmatch(source.dataset or ""):
        raise ValueError(f"dataset {source.dataset!r} is not a hub id like 'owner/name'")
    if source.kind == "hf" and (".." in source.revision.split("/") or source.revision.startswith("/")):
        raise ValueError(f"revision {source.revision!r} is not a branch, tag or commit")


def _sha256_hex(value: str) -> str:
    """A SHA-256 as `hashlib` writes it: lower case, no `sha256:` prefix; anything else could never match the
    download, which would be fetched whole and then thrown away."""
    digest = value.strip().lower().removeprefix("sha256:")
    if not re.fullmatch("[0-9a-f]{64}", digest):
        raise ValueError(f"'{value}' is not a SHA-256 (64 hexadecimal digits, as `sha256sum` prints)")
    return digest


Sha256 = Annotated[str, AfterValidator(_sha256_hex)]


class SourceConfig(Section):
    """One place documents come from."""

    kind: Literal["local", "http", "hf"] = "local"
    path: str | None = Field(None, description="local file, directory or glob (kind=local)")
    url: str | None = Field(None, description="HTTP(S) address of a .jsonl/.txt file, optionally .gz (kind=http)")
    sha256: Sha256 | None = Field(None, description="expected checksum of the downloaded file (kind=http): 64 hex "
                                  "digits, either case, optionally after 'sha256:'")
    dataset: str | None = Field(None, description="Hugging Face hub dataset id, e.g. roneneldan/TinyStories (kind=hf; "
                                "needs the internet)")
    split: str = Field("train", description="kind=hf: take the .parquet/.jsonl files with this in their name")
    revision: str = Field("main", description="kind=hf: branch, tag or commit of the dataset repository")
    endpoint: str = Field("https://huggingface.co", description="kind=hf: the hub, or a mirror of its HTTP API")
    token_env: str = Field("HF_TOKEN", description="kind=hf: environment variable holding a token for gated or "
                           "private datasets (sent to the hub only, never written anywhere)")
    text_field: str = Field("text", description="field (JSON) or column (Parquet) holding the text")
    language: str = Field("en", pattern=r"^[A-Za-z0-9_-]+$", description="ISO 639-1 code: the tokenizer samples, "
                          "the shard stage splits and evaluate reports each language on its own")
    format: Literal["auto", "jsonl", "json", "txt", "parquet"] = Field(
        "auto", description="auto: from the file name (.jsonl, .json array, .txt, .parquet; each optionally .gz/.zst)")
    split_by: Literal["file", "paragraph", "line", "separator"] | None = Field(
        None, description="how a .txt file becomes documents: the whole file, blank-line paragraphs (the default), "
        "lines, or `separator` (the default when a separator is given)")
    separator: str | None = Field(None, min_length=1, description="document separator, e.g. '<|endoftext|>'")
    encoding: str = Field("utf-8", description="text encoding of .txt/.jsonl/.json files (a BOM is always stripped)")
    errors: Literal["strict", "replace"] = Field(
        "strict", description="strict: an invalid byte stops acquire, naming file, line and byte offset; replace: "
        "it becomes U+FFFD and is counted in the manifest")

    @model_validator(mode="after")
    def _needs_location(self) -> "SourceConfig":
        needed = {"local": "path", "http": "url", "hf": "dataset"}[self.kind]
        if getattr(self, needed) is None:
            raise ValueError(f"a source of kind '{self.kind}' needs '{needed}'")
        if self.split_by == "separator" and self.separator is None:
            raise ValueError("split_by 'separator' needs 'separator' (e.g. '<|endoftext|>')")
        try:
            newline_is_a_byte = "\n".encode(self.encoding) == b"\n"
        except LookupError:
            raise ValueError(f"unknown encoding '{self.encoding}' (e.g. utf-8, latin-1, cp1252)") from None
        if not newline_is_a_byte:
            raise ValueError(f"encoding '{self.encoding}' is not ASCII-compatible (UTF-16/32): convert the file to "
                             "UTF-8 first")
        _check_addresses(self)
        return self

    @property
    def document_split(self) -> str:
        return self.split_by or ("separator" if self.separator is not None else "paragraph")


class AcquireConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    byte_budget: int | None = Field(None, gt=0, description="keep whole documents until this many UTF-8 bytes; "
                                    "reading stops there")
    min_chars: int = Field(1, ge=1, description="drop documents shorter than this after normalisation")
    batch_bytes: int = Field(4_000_000, ge=1, description="documents are written in row groups of about this many "
                             "bytes; a row group is one unit of the shard stage's mapped work")


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


def _check_byte_room(kind: str, byte_fallback: bool, vocab_size: int) -> None:
    if kind == "sentencepiece" and byte_fallback and vocab_size <= BYTE_FALLBACK_PIECES:
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for pieces: byte fallback alone takes "
            f"{BYTE_FALLBACK_PIECES} (256 bytes + 3 specials) and every distinct character of the corpus needs one "
            f"more (about 100 for English prose, so {BYTE_FALLBACK_PIECES + 100} or more), or set "
            "tokenizer.byte_fallback=false"
        )


class TokenizerCandidate(Section):
    """One vocabulary of a tokenizer comparison (`tokenizer.candidates`)."""

    kind: Literal["sentencepiece", "char", "word"] = "sentencepiece"
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(1024, ge=32)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*$", description="how the report and "
                             "`tokenizer.choose` name it; default kind-model_type-vocab_size (char: just `char`)")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "char":
            return "char"
        return f"word-{self.vocab_size}" if self.kind == "word" else f"{self.model_type}-{self.vocab_size}"


class TokenizerConfig(Section):
    kind: Literal["sentencepiece", "char", "word"] = "sentencepiece"
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(1024, ge=32, description="target size (sentencepiece); word: the most entries (characters, "
                            "then the most frequent words, two entries each); char-level uses what it sees")
    candidates: list[TokenizerCandidate] = Field(default_factory=list, description="a comparison: each trained on "
                                                 "the same sample and reported side by side per language; the one "
                                                 "`choose` names (or the first) replaces kind/model_type/vocab_size")
    choose: str | None = Field(None, description="the candidate (by name) that continues the pipeline")
    byte_fallback: bool = True
    character_coverage: float = Field(1.0, gt=0, le=1)
    train_bytes: int = Field(20_000_000, gt=0, description="size of the sample the vocabulary is learned from, drawn "
                             "evenly over the whole corpus (by content hash) and stratified by language")
    language_exponent: float = Field(1.0, ge=0, le=1, description="each language's share of that sample goes as its "
                                     "bytes to this power: 1 proportional, 0 equal shares (capped at what it has)")
    fertility_bytes: int = Field(2_000_000, gt=0, description="per language, the sample the fertility report encodes")
    num_threads: int = Field(2, ge=1)
    from_model: str | None = Field(
        None, pattern=MODEL_REF, description="champion, models:/NAME/VERSION or models:/NAME@ALIAS: take that "
        "registered model's vocabulary instead of learning one (what train.init_from needs once the data changed); "
        "while there is no champion yet, one is learned")
    registry: RegistryRef | None = Field(None, exclude=True, description="filled in by the pipeline")

    @model_validator(mode="after")
    def _room_for_bytes(self) -> "TokenizerConfig":
        _check_byte_room(self.kind, self.byte_fallback, self.vocab_size)
        labels = [c.label for c in self.candidates]
        for candidate in self.candidates:
            _check_byte_room(candidate.kind, self.byte_fallback, candidate.vocab_size)
        if len(set(labels)) < len(labels):
            raise ValueError(f"tokenizer.candidates: two candidates are named alike ({', '.join(labels)}); give each a "
                             "distinct `name`")
        if self.choose is not None and self.choose not in labels:
            raise ValueError(f"tokenizer.choose '{self.choose}' is not a candidate: choose one of "
                             f"{', '.join(labels) or '(none: add tokenizer.candidates)'}")
        return self

    @property
    def chosen_label(self) -> str | None:
        """The name of the candidate that continues the pipeline (None without candidates)."""
        return (self.choose or self.candidates[0].label) if self.candidates else None

    def chosen(self) -> "TokenizerConfig":
        """The configuration that continues the pipeline: the chosen candidate's kind, model_type and vocab_size."""
        if not self.candidates:
            return self
        return self.candidate(next(c for c in self.candidates if c.label == self.chosen_label))

    def candidate(self, candidate: TokenizerCandidate) -> "TokenizerConfig":
        """These settings with one candidate's kind, model_type and vocab_size, and no comparison of its own."""
        return self.model_copy(update={"kind": candidate.kind, "model_type": candidate.model_type,
                                       "vocab_size": candidate.vocab_size, "candidates": [], "choose": None})


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


class ExportConfig(Section):
    """Hand the trained model to other runtimes: a transformers folder and GGUF files for llama.cpp and Ollama."""

    formats: list[Literal["hf", "gguf"]] = Field(default_factory=lambda: ["hf", "gguf"],
                                                 description="which exports to write; [] turns the stage into a no-op")
    gguf_outtype: Literal["f32", "f16"] = Field("f32", description="the unquantized GGUF the quantized ones come from")
    quantize: list[Literal["q8_0", "q5_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]] = Field(
        default_factory=lambda: ["q8_0"], description="GGUF types made from it with llama.cpp's quantizer")
    modelfile: str | None = Field("q8_0", description="the GGUF type the Ollama Modelfile points at (None: no Modelfile)")
    temperature: float = Field(0.8, ge=0, description="the Modelfile's default sampling temperature")
    on_unsupported: Literal["skip", "error"] = Field(
        "skip", description="a model with no exact equivalent in a format (a char-level vocabulary, say): record why "
        "and go on, or fail the stage")

    @model_validator(mode="after")
    def _modelfile_is_made(self) -> "ExportConfig":
        made = [self.gguf_outtype, *self.quantize]
        if self.modelfile is not None and self.modelfile not in made:
            raise ValueError(f"modelfile {self.modelfile!r} names a GGUF this stage does not write (it writes "
                             f"{', '.join(made)}): add it to export.quantize, or set modelfile to one of those or null")
        return self


class RegisterConfig(Section):
    tracking_uri: str | None = Field(None, description="None: SQLite store under <artifacts_dir>/mlflow")
    experiment: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)] = "scriptorium"
    model_name: ModelName = "scriptorium-lm"
    champion_alias: Alias = "champion"
    champion_metric: str = Field(
        "val_bpb", pattern=r"^val_(bpb|loss|perplexity)(\.[A-Za-z0-9_-]+)?$",
        description="lower is better: val_bpb, val_loss or val_perplexity, or one language's, e.g. val_bpb.fr")


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
