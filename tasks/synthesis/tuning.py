"""`synthesize.requantize/parallel/flash_attn/cache_type_k: auto`: measure this machine once, keep the pick.

Which weight type and batch width write stories fastest depends on the CPU's kernels (AVX-512 or AVX2 only, bf16
instructions or not), on the thread count and on llama.cpp's version and build, so they are measured rather than
guessed: a short timed decode per candidate, the fastest kept in a JSON file (`synthesize.tuning_file`, by default
~/.cache/scriptorium/synthesize-tuning.json) under a key made of the CPU model, its flags, the thread count, the
llama-cpp-python version and build (its ggml backends, e.g. BLAS, and CPU feature line) and the GGUF (name and size).
A later load on the same machine reads the pick back at no cost. A small job (fewer stories than
`MIN_STORIES_TO_TUNE`) with nothing cached does not measure: it takes `FALLBACK`, since the measurement would cost
more than it saves.

Only weight types that keep the model's quality are candidates (`faithful_types`: its loss on a short probe story
within 2% of the GGUF as shipped): speed is never bought with worse stories. The search is four passes, not the grid:
every candidate type at the widest batch with flash attention on, then flash attention off for the winning type, then
every width for the winning pair, then q8_0 key cells for the winner (if they too keep the probe loss). A candidate's
figure is the median of `ROUNDS` samples (interleaved with the pass's other candidates), each generated tokens
per second over `STEPS` steps with every slot busy, after the prompts are in (prompt
processing is paid once per story whatever the pick, and the cached prefix makes it small), sampling included, since a
wider batch also samples more rows per step.

Where a batched step goes (SmolLM2-135M, 64 sequences, f32 weights, 2 threads, AMD EPYC with AVX2 only, measured
with `profile_steps` while the 2 cores were shared with heavy other work, so as shares, not times): llama_decode is
99% of a step, numpy sampling 0.6%, filling the batch in Python 0.01%. Taking in the 64 prompts (with the shared
prefix copied) cost as much as ~45 steps, i.e. under one step per story against the ~200 steps a story generates.
So the weight type (which matmul kernel runs) and the width (how well the matmuls amortise reading the weights) are
the knobs that matter; the Python around the step is not worth moving out. The third is attention: with 64 stories a
step reads 64 KV streams, and llama.cpp's flash-attention kernel made a step slower on the AVX-512 machine these
defaults came from but about 20% faster on a 2-core AVX2-only EPYC (q4_0, 64 sequences, steps interleaved in one
run: median 186 -> 225 tokens/s on a loaded host), so it is measured too. The fourth is the keys' cache cells:
attention's share of a step grows with the context (on that EPYC, 64 sequences, f16 weights: ~220 ms per step at
position 90, ~290 at 250), and q8_0 keys with f16 values made steps 4-10% faster there (interleaved), q8_0 values
too only 1-7%, f32 cells 2.5x slower; so q8_0 keys are a candidate, values stay f16. Those attention figures are
llama.cpp's reference kernel; the patched build (patches/README.md) computes decode attention with f16 cells about 2.6x
faster, while q8_0 keys keep the reference kernel, so the key-cell pass decides between the two kernels as much as
between the types.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from pipeline_config.synthesize import SynthesizeConfig
    from tasks.synthesis.llamacpp import LlamaCppBackend

WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
WIDTHS = (64, 32, 16)  # the first is the width the weight types are compared at
FALLBACK = {"requantize": "f32", "parallel": 64, "flash_attn": False, "cache_type_k": "f16"}
CACHE_TYPES = ("f16", "q8_0")  # the first is llama.cpp's default
# A weight type is a candidate for auto only if the model's per-token loss on PROBE stays within this fraction of the
# file's own (SmolLM2-135M, Q4_1 as shipped: f32, f16 and bf16 0.3-0.4% lower, q8_0 0.5% higher; q4_0 11.5% worse, a
# perplexity of 11.1 instead of 8.7, measured on 40 held-out TinyStories; it would have won on speed alone).
MAX_LOSS_INCREASE = 0.02
PROBE = (
    "Once upon a time, there was a little girl named Mia. She loved to play in the garden with her red ball. One day, "
    "the ball rolled under a big bush. Mia was sad because she could not reach it.\n\nHer friend Tom came to help. "
    "He was tall and strong. Tom pushed the branches away and found the ball. Mia smiled and said, \"Thank you, Tom! "
    "You are a good friend.\" They played together until the sun went down.\n\nThe next morning, a small bird sat on "
    "the fence and sang a happy song. Mia gave the bird some bread, and the bird came back every day. Mia learned that "
    "being kind makes new friends."
)
KNOBS = tuple(FALLBACK)  # the config fields that "auto" resolves
MIN_STORIES_TO_TUNE = 32
STEPS = 8  # per sample; ROUNDS samples per candidate and pass
ROUNDS = 3
DEFAULT_FILE = Path("~/.cache/scriptorium/synthesize-tuning.json")


def cpu_identity() -> dict[str, str]:
    """CPU model and a digest of its feature flags (Linux /proc/cpuinfo; elsewhere what platform knows)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and value:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return {"cpu": model, "flags": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def llama_build() -> str:
    """How this llama.cpp was built: its backends and its CPU feature line. The same version built another way ranks
    the candidates differently: with a BLAS backend (CMAKE_ARGS=-DGGML_BLAS=ON) every batched matmul goes through
    BLAS, which converts f16 weights to f32 at each call (measured on the AVX2 EPYC, 64 sequences: f16 weights 56
    tokens/s against 250 without BLAS, f32 weights 240)."""
    import ctypes

    import llama_cpp

    backends = []
    try:  # ggml's registry, reached through libllama (it links libggml)
        lib = llama_cpp.llama_cpp._lib
        count, get, name = lib.ggml_backend_reg_count, lib.ggml_backend_reg_get, lib.ggml_backend_reg_name
        count.restype, get.restype, get.argtypes = ctypes.c_size_t, ctypes.c_void_p, [ctypes.c_size_t]
        name.restype, name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        backends = sorted(name(get(i)).decode() for i in range(count()))
    except (AttributeError, OSError):
        pass
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return ",".join(backends) + "|" + hashlib.sha256(info.encode()).hexdigest()[:16]


def machine_key(gguf: Path, threads: int) -> str:
    import llama_cpp

    ident = {**cpu_identity(), "threads": threads, "llama_cpp": llama_cpp.__version__, "build": llama_build(),
             "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "candidates": ",".join(WEIGHT_TYPES)}
    return json.dumps(ident, sort_keys=True)


def label(kind: str, width: int, flash: bool, cache_k: str = "f16") -> str:
    return f"{kind}@{width}" + ("+fa" if flash else "") + ("" if cache_k == "f16" else f"+k:{cache_k}")


def choose(measure: Callable[[str, int, bool, str], float], types=WEIGHT_TYPES, widths=WIDTHS, flash=(True, False),
           cache_types=CACHE_TYPES) -> tuple[dict, dict[str, float]]:
    """The fastest (requantize, parallel, flash_attn, cache_type_k) by `measure(type, width, flash, cache_k) ->
    tokens/s`; a candidate that fails to load or run (a quantizer refusing a type, memory) measures as 0. Returns the
    pick and every figure (the median of a candidate's samples).

    Each pass measures its candidates in ROUNDS interleaved rounds (a, b, c, a, b, c, ...) and compares medians: on a
    shared host the speed drifts by more than the differences measured here within a minute, so candidates measured
    one after the other would be ranked by the moment each ran."""
    samples: dict[str, list[float]] = {}

    def one(candidate: tuple) -> float:
        try:
            return float(measure(*candidate))
        except Exception:  # noqa: BLE001 (a candidate that cannot run is simply not picked)
            return 0.0

    def fastest(candidates: list[tuple]) -> tuple:
        if len(candidates) == 1 and label(*candidates[0]) in samples:
            return candidates[0]  # nothing to compare it with
        for _ in range(ROUNDS):
            for c in candidates:
                if samples.get(label(*c)) == [0.0]:
                    continue  # it could not run: no second try
                samples.setdefault(label(*c), []).append(one(c))
        return max(candidates, key=lambda c: statistics.median(samples[label(*c)]))

    k0 = cache_types[0]
    kind = fastest([(t, widths[0], flash[0], k0) for t in types])[0]
    fa = fastest([(kind, widths[0], f, k0) for f in flash])[2]
    width = fastest([(kind, w, fa, k0) for w in widths])[1]
    cache_k = fastest([(kind, width, fa, k) for k in cache_types])[3]
    figures = {key: statistics.median(values) for key, values in samples.items()}
    if figures[label(kind, width, fa, cache_k)] <= 0:
        return dict(FALLBACK), figures
    return {"requantize": kind, "parallel": width, "flash_attn": fa, "cache_type_k": cache_k}, figures


def probe_loss(gguf: Path, kind: str | None, threads: int, cache_k: str = "f16") -> float:
    """Mean next-token loss (nats) of the model on PROBE with its weights converted to `kind` (None: as shipped) and
    its attention keys cached as `cache_k`."""
    import llama_cpp

    from tasks.synthesis.llamacpp import requantize_gguf

    weights = requantize_gguf(gguf, kind) if kind else gguf
    cells = {} if cache_k == "f16" else {"type_k": llama_cpp.GGML_TYPE_Q8_0, "flash_attn": True}
    try:
        llm = llama_cpp.Llama(model_path=str(weights), n_ctx=512, n_threads=threads, logits_all=True, verbose=False,
                              **cells)
    finally:
        if kind:
            weights.unlink(missing_ok=True)
    try:
        tokens = llm.tokenize(PROBE.encode(), add_bos=True)
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)
    finally:
        llm.close()
    top = logits.max(axis=1)
    lse = np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top
    return float(np.mean(lse - logits[np.arange(len(tokens) - 1), tokens[1:]]))


def faithful_types(gguf: Path, threads: int, loss: Callable[..., float] = probe_loss, types=WEIGHT_TYPES,
                   cache_types=CACHE_TYPES[1:]) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, float]]:
    """The weight `types`, and the key-cell types (f16 always; `cache_types` as candidates), that keep the model's loss
    on PROBE within MAX_LOSS_INCREASE of the file's own (auto trades no quality for speed), and every loss measured ("as
    shipped" for the file's own, "k:q8_0" for its weights as shipped with q8_0 key cells). A type that fails to convert
    or load is left out."""
    losses = {"as shipped": loss(gguf, None, threads)}
    for kind in types:
        try:
            losses[kind] = loss(gguf, kind, threads)
        except Exception:  # noqa: BLE001 (a type that cannot be made is not a candidate)
            continue
    for cache_k in cache_types:
        try:
            losses[f"k:{cache_k}"] = loss(gguf, None, threads, cache_k)
        except Exception:  # noqa: BLE001
            continue
    limit = losses["as shipped"] * (1 + MAX_LOSS_INCREASE)
    kept = tuple(k for k in types if k in losses and losses[k] <= limit)
    cells = (CACHE_TYPES[0],) + tuple(k for k in cache_types if losses.get(f"k:{k}", math.inf) <= limit)
    return kept or (FALLBACK["requantize"],), cells, losses


def has_auto(cfg: "SynthesizeConfig") -> bool:
    """Whether any of the KNOBS is "auto" in `cfg` (then `tuned` or `resolve` gives it this machine's pick)."""
    return any(getattr(cfg, k) == "auto" for k in KNOBS)


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def tuned(cfg: "SynthesizeConfig", gguf: Path, threads: int, stories: int | None = None,
          measure: Callable[[str, int, bool, str], float] | None = None,
          loss: Callable[..., float] = probe_loss) -> dict:
    """The concrete {requantize, parallel, flash_attn, cache_type_k} for `cfg` (its own values where they are not
    "auto"): from the cache, by measuring (and caching), or the fallback for a small job."""
    from tasks.stage import write_json

    wanted = {k for k in KNOBS if getattr(cfg, k) == "auto"}
    fixed = {k: getattr(cfg, k) for k in KNOBS if k not in wanted}
    if not wanted:
        return fixed
    path = Path(cfg.tuning_file or DEFAULT_FILE).expanduser()
    key = machine_key(gguf, threads)
    cached = read_cache(path).get(key)
    if isinstance(cached, dict) and set(KNOBS) <= cached.keys():  # a pick from before a knob existed is measured anew
        return {**{k: cached[k] for k in wanted}, **fixed}
    if stories is not None and stories < MIN_STORIES_TO_TUNE:
        return {**{k: FALLBACK[k] for k in wanted}, **fixed}
    # Only the knobs left to auto are probed for quality: a fixed weight type or key-cell type is the user's choice.
    types, cells, losses = (fixed.get("requantize"),), (fixed.get("cache_type_k"),), {}
    if {"requantize", "cache_type_k"} & wanted:
        kept, kept_cells, losses = faithful_types(gguf, threads, loss,
                                                  WEIGHT_TYPES if "requantize" in wanted else (),
                                                  CACHE_TYPES[1:] if "cache_type_k" in wanted else ())
        types = kept if "requantize" in wanted else types
        cells = kept_cells if "cache_type_k" in wanted else cells
    widths = WIDTHS if "parallel" in wanted else (fixed["parallel"],)
    flash = (True, False) if "flash_attn" in wanted else (fixed["flash_attn"],)
    pick, figures = choose(measure or (lambda t, w, f, k: measure_rate(cfg, t, w, f, threads, k)), types, widths,
                           flash, cells)
    if wanted == set(KNOBS):  # only a full search is a machine's answer
        entries = read_cache(path)
        entries[key] = {**pick, "tokens_per_s": figures, "probe_loss": losses,
                        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, entries)
    return {**{k: pick[k] for k in wanted}, **fixed}


def resolve(cfg: "SynthesizeConfig", stories: int | None = None) -> "SynthesizeConfig":
    """`cfg` with "auto" replaced by this machine's pick (llamacpp only; an Ollama server tunes itself)."""
    if cfg.backend != "llamacpp" or not has_auto(cfg):
        return cfg
    from tasks.synthesis.backend import default_threads
    from tasks.synthesis.llamacpp import default_gguf

    gguf = Path(cfg.model_path).expanduser() if cfg.model_path else default_gguf()
    return cfg.model_copy(update=tuned(cfg, gguf, cfg.n_threads or default_threads(), stories))


def measure_rate(cfg: "SynthesizeConfig", kind: str, width: int, flash: bool, threads: int, cache_k: str = "f16"
                 ) -> float:
    """Generated tokens/s of the backend with `kind` weights, `width` sequences, flash attention on or off and
    `cache_k` key cells (see `profile_steps`)."""
    from tasks.synthesis.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(cfg.model_copy(update={"requantize": kind, "parallel": width, "flash_attn": flash,
                                                     "n_threads": threads, "cache_type_k": cache_k}))
    try:
        profile = profile_steps(backend, STEPS)
        return profile["tokens"] / (profile["decode_s"] + profile["sample_s"] + profile["fill_s"])
    finally:
        backend.close()


def profile_steps(backend: "LlamaCppBackend", steps: int) -> dict[str, float]:
    """Fill every slot with a recipe prompt, then time `steps` batched steps split into llama_decode, sampling and
    the Python that fills the batch; prompt processing is timed apart (`prompt_s`)."""
    from tasks.synthesis.recipes import derive_seed, load_recipe, story_prompt
    from tasks.synthesis.backend import StoryRequest

    cfg, lib = backend.cfg, backend._lib
    recipe = load_recipe(cfg.recipe)
    slots = []
    for i in range(backend.parallel):
        p = story_prompt(recipe, cfg.seed, i, cfg.languages)
        slots.append(backend._start(i, StoryRequest(index=i, attempt=0, prompt=p.prompt, system=p.system,
                                                    seed=derive_seed("sample", cfg.seed, i, 0))))
    times = {"prompt_s": 0.0, "decode_s": 0.0, "sample_s": 0.0, "fill_s": 0.0, "tokens": 0.0}
    try:
        for step in range(steps + 1):
            t0 = time.perf_counter()
            backend._fill_batch(slots)
            t1 = time.perf_counter()
            if lib.llama_decode(backend._ctx, backend._batch) != 0:
                raise RuntimeError("llama_decode failed")
            t2 = time.perf_counter()
            for seq, token in zip(slots, backend._sample(slots)):
                seq.generated.append(token)
            t3 = time.perf_counter()
            if step == 0:
                times["prompt_s"] += t3 - t0
                continue
            times["fill_s"] += t1 - t0
            times["decode_s"] += t2 - t1
            times["sample_s"] += t3 - t2
            times["tokens"] += len(slots)
    finally:
        for seq_id in range(backend.parallel):
            lib.llama_memory_seq_rm(backend._memory, seq_id, -1, -1)
    return times


def cpu_flags_line() -> str:
    """The SIMD flags a reader compares figures by (benchmarks print it next to theirs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4"))]
    return f"{cpu_identity()['cpu']}; {os.cpu_count()} CPUs; {' '.join(sorted(simd))}"
