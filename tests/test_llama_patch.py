"""The llama.cpp that `make` installs carries the patches in patches/: its grouped-query decode attention gives the
logits of llama.cpp's reference flash-attention path (same tokens, same context, the path switched with
GGML_FA_GQA_DECODE_OFF between two decodes of the same step), and its matmuls give the same bits with the weight
prefetch and without it (GGML_SGEMM_PREFETCH_OFF)."""
from __future__ import annotations

import logging

import llama_cpp
from llama_cpp import _logger
import numpy as np
import pytest

from model.export import ExportError
from model.export.gguf import quantize_gguf
from pipeline_config.synthesize import SynthesizeConfig
from tasks.synthesis.llamacpp import LlamaCppBackend

PROMPTS = (
    "Once upon a time, a little fox found a red ball in the snow.",
    "Tom and his sister went to the park to fly a kite.",
    "The old cat sat by the window and watched the rain.",
    "Mia wanted to bake a cake for her grandmother.",
)


def test_the_installed_llama_cpp_is_the_patched_build():
    assert "+scriptorium" in llama_cpp.__version__, (
        f"llama-cpp-python {llama_cpp.__version__} is the stock build: run `python patches/install_llama_cpp.py` "
        "(make does) and read its warning")


def test_with_verbose_off_llama_cpp_errors_reach_stderr_and_its_warnings_do_not(tmp_path, capfd):
    """llama-cpp-python 0.3.36 maps ggml's log levels by an older enum (WARN read as ERROR, ERROR as DEBUG): with its
    log cut to errors (`verbose=False`, or the exporter's quantizer) a warning printed and an error was hidden.
    patches/llama-cpp-python-0.3.36-log-levels.patch maps them by this release's ggml.h, and a continued line follows
    the level of the line it continues. (A model *load* with verbose=False stays silent: llama-cpp-python sends
    stdout and stderr to /dev/null around it.)"""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 28)
    with pytest.raises(ExportError, match="its log above says"):  # the quantizer runs with the log cut to errors
        quantize_gguf(bad, tmp_path / "q8.gguf", "q8_0")
    err = capfd.readouterr().err
    assert "failed to read header" in err and "failed to quantize" in err, err

    forwarded = logging.getLogger("llama-cpp-python")
    level = forwarded.level
    forwarded.setLevel(logging.ERROR)  # what verbose=False sets
    try:
        for ggml_level, text in ((3, b"a warning\n"), (5, b"its continuation\n"), (4, b"an error: "),
                                 (5, b"its continuation\n"), (2, b"an info line\n")):
            _logger.llama_log_callback(ggml_level, text, None)
    finally:
        forwarded.setLevel(level)
    assert capfd.readouterr().err == "an error: its continuation\n"


@pytest.fixture(scope="module")
def backend():
    b = LlamaCppBackend(SynthesizeConfig(n=4, parallel=len(PROMPTS), flash_attn=True, cache_type_k="f16",
                                         requantize="f16", n_threads=2))
    yield b
    b.close()


def decode(b: LlamaCppBackend, feeds: list[list[int]], positions: list[int]) -> np.ndarray:
    """One llama_decode of each sequence's `feeds` from its position; the logits of each sequence's last token."""
    batch, n, rows = b._batch, 0, []
    for seq_id, tokens in enumerate(feeds):
        for i, token in enumerate(tokens):
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, positions[seq_id] + i, 1
            batch.logits[n] = i == len(tokens) - 1
            batch.seq_id[n][0] = seq_id
            n += 1
        rows.append(n - 1)
    batch.n_tokens = n
    assert b._lib.llama_decode(b._ctx, batch) == 0
    return b._logits(rows).copy()


def test_grouped_query_decode_follows_the_reference_path(backend, monkeypatch):
    b = backend
    feeds = [b.llm.tokenize(p.encode(), add_bos=False) for p in PROMPTS]
    positions = [0] * len(feeds)
    decode(b, feeds, positions)  # the prompts (several query rows per stream: llama.cpp's own paths)
    positions = [len(f) for f in feeds]
    feeds = [[f[-1]] for f in feeds]
    worst, same_top, differs = [], [], False
    for _ in range(24):  # one query row per stream and head: the patched path, then the reference path, same step
        monkeypatch.delenv("GGML_FA_GQA_DECODE_OFF", raising=False)
        patched = decode(b, feeds, positions)
        for seq_id, pos in enumerate(positions):
            b._lib.llama_memory_seq_rm(b._memory, seq_id, pos, -1)
        monkeypatch.setenv("GGML_FA_GQA_DECODE_OFF", "1")
        reference = decode(b, feeds, positions)
        differs |= bool(np.any(patched != reference))
        worst.extend(np.abs(patched - reference).max(axis=1))
        same_top.extend(patched.argmax(axis=1) == reference.argmax(axis=1))
        positions = [p + 1 for p in positions]
        feeds = [[int(t)] for t in reference.argmax(axis=1)]
    for seq_id in range(len(PROMPTS)):
        b._lib.llama_memory_seq_rm(b._memory, seq_id, -1, -1)
    # the two paths ran (F32 against F16 value accumulation never gives identical logits over 24 steps) ...
    assert differs, "the patched attention path did not run (stock build, or the shape no longer qualifies)"
    # ... and agree to the precision of the reference path. Measured here: largest logit difference per row 0.016
    # median, 0.04 at most, while the reference path differs from llama.cpp's attention without flash attention by
    # 0.020 / 0.060. The weights are f16: with the Q4_1 file as shipped, activations are quantized to 8 bits before
    # every matmul, which amplifies any rounding difference (0.55 median between the two paths, 0.62 between the
    # reference and non-flash attention), so the comparison would say nothing about the kernel.
    assert np.median(worst) < 0.1 and max(worst) < 0.5, (np.median(worst), max(worst))
    assert np.mean(same_top) >= 0.95


def test_prefetching_the_weights_leaves_the_logits_bit_identical(backend, monkeypatch):
    """The sgemm patch only adds prefetches (the weight rows a thread computes next, a few cache lines before each
    column block of the current ones), so the same prompts decoded with and without it give the same bits. The four
    prompts are decoded together (one ubatch of ~50 rows, several column blocks per matmul). (Whether the prefetches
    were issued is not observable from here; benchmarks/synthesize.py measures their effect.)
    """
    b = backend
    feeds = [b.llm.tokenize(p.encode(), add_bos=False) for p in PROMPTS]
    runs = []
    for off in (False, True, False):
        if off:
            monkeypatch.setenv("GGML_SGEMM_PREFETCH_OFF", "1")
        else:
            monkeypatch.delenv("GGML_SGEMM_PREFETCH_OFF", raising=False)
        runs.append(decode(b, feeds, [0] * len(feeds)))
        for seq_id in range(len(PROMPTS)):
            b._lib.llama_memory_seq_rm(b._memory, seq_id, -1, -1)
    assert np.isfinite(runs[0]).all() and runs[0].std() > 0.1
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], runs[2])
