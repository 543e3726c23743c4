"""Exported models compute what ours compute: transformers folders and GGUF files, checked by the real runtimes.

Each model is tiny (2 layers, n_embd 64, a 400-piece SentencePiece BPE trained here the way the pipeline trains it) and
has taken 40-60 AdamW steps on four TinyStories stories, so norm gains, biases, the position table and the SSM's
per-head scalars have all moved off their initial values (a tensor exported from the wrong place, or transposed, shows
in the logits), and greedy decoding recites varied text instead of repeating one token.
The references are transformers' `AutoModelForCausalLM`/`AutoTokenizer` and llama.cpp through llama-cpp-python; there
are no test doubles.

Variants cover the layouts that need care: llama with grouped-query attention (4 query heads, 2 kv heads) and an
untied output layer; gpt with learned positions and biases; gpt with the fixed sinusoidal table and no biases; mamba2.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ModelConfig, build_model
from model.export import ExportError, export_gguf, export_hf, gguf_tensor_types, quantize_gguf, write_modelfile
from model.export.hf import ARCHITECTURES

STORIES = Path(__file__).resolve().parents[1] / "data" / "tinystories-sample" / "stories.jsonl"
VOCAB, BLOCK, NEW_TOKENS = 400, 64, 32
# Leading/double spaces, digits (split one by one), a newline and characters outside the vocabulary (byte fallback):
# the places where a tokenizer conversion goes wrong.
TRICKY = ["once upon a time, there was a little", " the dog said  hello.\nthen 2024 birds sang",
          "café naïve — 日本", ""]
VARIANTS = {
    "llama-gqa-untied": dict(arch="llama", n_kv_head=2, tie_weights=False),
    "gpt-learned-bias": dict(arch="gpt", pos_encoding="learned", bias=True),
    "gpt-sinusoidal": dict(arch="gpt", pos_encoding="sinusoidal", bias=False),
    "mamba2": dict(arch="mamba2", d_state=16, headdim=16, chunk_size=16),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these matmuls are tiny, and on a shared 2-core machine a second spinning thread makes
    training several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [json.loads(line)["text"] for line in STORIES.read_text(encoding="utf-8").splitlines()[:200]]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(out / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, minloglevel=2,
    )
    return out


@pytest.fixture(scope="module")
def sp(tokenizer_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def stream(sp, corpus) -> torch.Tensor:
    """Four stories (about 1,650 tokens) as the shard stage frames them: <s> story </s> ..."""
    return torch.tensor([t for ids in sp.encode(corpus[:4]) for t in (1, *ids, 2)])


@pytest.fixture(scope="module")
def prompt(stream) -> list[int]:
    """<s> and the first words of a story the models were trained on."""
    return stream[:8].tolist()


@pytest.fixture(scope="module")
def trained(stream):
    """variant name -> a model trained by `train_tiny` (built once per module, on first use)."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cache[name] = train_tiny(ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, block_size=BLOCK,
                                                 **VARIANTS[name]), stream)
        return cache[name]

    return get


def train_tiny(cfg: ModelConfig, stream: torch.Tensor) -> torch.nn.Module:
    """A few AdamW steps. The embedding gets 10x the learning rate: next to the sinusoidal table (values up to 1) an
    embedding initialised at std 0.02 is too faint for the model to read the tokens within 60 steps."""
    torch.manual_seed(0)
    model = build_model(cfg)
    embeddings = [p for p in model.parameters() if p.dim() == 2 and p.size(0) == cfg.vocab_size]
    rest = [p for p in model.parameters() if all(p is not e for e in embeddings)]
    opt = torch.optim.AdamW([{"params": embeddings, "lr": 3e-2}, {"params": rest}], lr=3e-3)
    steps = 40 if cfg.arch == "mamba2" else 60
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - BLOCK - 1, (16,), generator=g)
        batch = torch.stack([stream[s : s + BLOCK + 1] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Our logits at every position (forward with targets returns all of them)."""
    with torch.no_grad():
        return model(ids, ids)[0][0]


def our_greedy(model, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """Our greedy continuation (KV cache / recurrent state) and, per step, the gap between the top two logits."""
    x = torch.tensor([prompt])
    out = model.generate(x, NEW_TOKENS, temperature=0.0)[0]
    top2 = full_logits(model, out[None, :-1])[len(prompt) - 1 :].topk(2, dim=-1).values
    return out[len(prompt) :].tolist(), (top2[:, 0] - top2[:, 1]).numpy()


def assert_same_greedy(ours: list[int], theirs: list[int], margins: np.ndarray, tie: float) -> None:
    """Equal continuations, except that they may part where our top-two logits are closer than `tie` (the runtime's
    known error): there either choice is right, and the contexts differ from then on."""
    for j, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            assert margins[j] < tie, f"step {j}: ours {a}, theirs {b}, though our top-2 margin is {margins[j]:.4g}"
            return
    assert len(theirs) == len(ours)
    assert len(set(ours)) > 1, "a constant continuation would not test much; train the fixture longer"


def llama_cpp_greedy(llm, prompt: list[int]) -> list[int]:
    """llama.cpp's own greedy decode: argmax of its logits, fed back one token at a time through its KV cache."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def load_gguf(path: Path):
    """llama.cpp with an f32 KV cache: its default f16 cache alone moves logits by ~1e-3, which would hide a
    layout error of that size."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=BLOCK, n_batch=BLOCK, logits_all=True, verbose=False,
                           n_threads=1, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


# -----------------------------------------------------------------------------
# transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_folder_loads_without_custom_code_and_matches(variant, trained, tokenizer_dir, sp, stream, prompt,
                                                         tmp_path):
    """AutoTokenizer gives SentencePiece's ids (with BOS) on tricky text; AutoModelForCausalLM's logits over a whole
    block equal ours to 1e-4 (f32); greedy decoding gives the same 32 tokens (compared up to an EOS stop)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = trained(variant)
    out = export_hf(model, tokenizer_dir, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == ARCHITECTURES[model.config.arch]
    for text in TRICKY:
        assert hf_tok(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)], text
    window = stream[100 : 100 + BLOCK][None]
    with torch.no_grad():
        theirs = hf(window).logits[0]
    torch.testing.assert_close(theirs, full_logits(model, window), atol=1e-4, rtol=0)

    x = torch.tensor([prompt])
    with torch.no_grad():
        hf_out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS)[0]
    ours = model.generate(x, NEW_TOKENS, temperature=0.0, eos_id=sp.eos_id())[0]
    # transformers stops at </s>; ours then keeps emitting </s> to stay rectangular.
    assert len(set(ours[len(prompt) :].tolist())) > 1, "a constant continuation would not test much"
    assert hf_out.tolist() == ours[: len(hf_out)].tolist()
    assert (ours[len(hf_out) :] == sp.eos_id()).all() and (len(hf_out) == len(ours) or hf_out[-1] == sp.eos_id())


# -----------------------------------------------------------------------------
# GGUF / llama.cpp

# With an f32 KV cache llama.cpp differs from us only in summation order (measured ~6e-6 on these logits). Its "gpt2"
# graph evaluates GELU as the tanh approximation read from an f16 table, ours is exact erf: ~1e-3 (see gguf.py).
GGUF_ATOL = {"llama": 1e-4, "mamba2": 1e-4, "gpt": 5e-3}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_gguf_matches_ours_in_llama_cpp(variant, trained, tokenizer_dir, sp, stream, prompt, tmp_path):
    """llama.cpp loads the f32 GGUF, tokenizes like SentencePiece (BOS first), gives our logits over a whole block
    (llama: so the q/k permutation to interleaved RoPE is right), and decodes the same greedy 32 tokens."""
    model = trained(variant)
    path = export_gguf(model, tokenizer_dir, tmp_path / "model-f32.gguf")
    assert set(gguf_tensor_types(path)) == {"F32"}
    llm = load_gguf(path)
    try:
        for text in TRICKY:
            assert llm.tokenize(text.encode("utf-8")) == [sp.bos_id(), *sp.encode(text)], text
        window = stream[100 : 100 + BLOCK].tolist()
        atol = GGUF_ATOL[model.config.arch]
        ours = full_logits(model, torch.tensor([window])).numpy()
        np.testing.assert_allclose(llama_cpp_logits(llm, window), ours, atol=atol, rtol=0)
        continuation, margins = our_greedy(model, prompt)
        assert_same_greedy(continuation, llama_cpp_greedy(llm, prompt), margins, tie=2 * atol)
    finally:
        llm.close()


def relative_error(theirs: np.ndarray, ours: np.ndarray) -> float:
    """RMS of the logit error over the RMS spread of our logits (their scale, without the per-row offset)."""
    spread = ours - ours.mean(axis=-1, keepdims=True)
    return float(np.sqrt(((theirs - ours) ** 2).mean() / (spread**2).mean()))


def test_f16_and_q8_0_gguf_load_and_stay_close(trained, tokenizer_dir, stream, prompt, tmp_path):
    """The f16 file holds f16 matrices (norms stay f32, as llama.cpp's converter writes them); llama.cpp's q8_0
    quantization of the f32 file holds q8_0 matrices; both load, decode, and keep our logits within what their
    precision allows (measured here: f16 ~4e-4, q8_0 ~1e-2 relative) and our argmax at nearly every position."""
    model = trained("llama-gqa-untied")
    f32 = export_gguf(model, tokenizer_dir, tmp_path / "model-f32.gguf")
    f16 = export_gguf(model, tokenizer_dir, tmp_path / "model-f16.gguf", outtype="f16")
    q8 = quantize_gguf(f32, tmp_path / "model-q8_0.gguf", "q8_0")
    matrices, vectors = 2 + 7 * 2, 1 + 2 * 2  # embedding + output + 7 per layer; final norm + 2 per layer
    assert gguf_tensor_types(f16) == {"F16": matrices, "F32": vectors}
    assert gguf_tensor_types(q8) == {"Q8_0": matrices, "F32": vectors}
    assert not list(tmp_path.glob("*.partial"))
    window = stream[100 : 100 + BLOCK].tolist()
    ours = full_logits(model, torch.tensor([window])).numpy()
    for path, bound in ((f16, 3e-3), (q8, 5e-2)):
        llm = load_gguf(path)
        try:
            theirs = llama_cpp_logits(llm, window)
            assert relative_error(theirs, ours) < bound, path.name
            assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9, path.name
            assert len(set(llama_cpp_greedy(llm, prompt))) > 1, path.name
        finally:
            llm.close()


def test_quantizing_prints_nothing_into_a_run_log(trained, tokenizer_dir, tmp_path, capsys, monkeypatch):
    """llama.cpp's loader dump (a line per GGUF key, ~40) reached sys.stderr through llama-cpp-python's log callback
    whenever nothing in the process had yet made a `Llama(verbose=False)`, and the flow's log_prints turned each line
    into an INFO record of synthesize (which re-quantizes SmolLM2) or export."""
    import logging

    monkeypatch.setattr(logging.getLogger("llama-cpp-python"), "level", logging.NOTSET)  # a fresh process's level
    f32 = export_gguf(trained("llama-gqa-untied"), tokenizer_dir, tmp_path / "model-f32.gguf")
    capsys.readouterr()
    quantize_gguf(f32, tmp_path / "model-q8_0.gguf", "q8_0")
    assert "llama_model_loader" not in capsys.readouterr().err
    assert logging.getLogger("llama-cpp-python").level == logging.NOTSET  # left as it was


def test_q4_k_m_needs_rows_of_256(trained, tokenizer_dir, stream, tmp_path):
    """q4_k_m on a 64-wide model: llama.cpp would fall back to q5_0/q8_0 on every tensor, so quantize_gguf refuses
    with a message naming the 256 rule and leaves no file; on a 256-wide model it writes real Q4_K tensors (llama.cpp's
    mixture keeps some at Q6_K) that llama.cpp runs close to our logits."""
    f32 = export_gguf(trained("llama-gqa-untied"), tokenizer_dir, tmp_path / "narrow.gguf")
    with pytest.raises(ExportError, match="multiple of 256"):
        quantize_gguf(f32, tmp_path / "narrow-q4_k_m.gguf", "q4_k_m")
    assert not list(tmp_path.glob("narrow-q4_k_m*"))

    torch.manual_seed(0)
    wide = build_model(ModelConfig(arch="llama", vocab_size=VOCAB, n_layer=1, n_head=4, n_embd=256, block_size=BLOCK))
    q4 = quantize_gguf(export_gguf(wide.eval(), tokenizer_dir, tmp_path / "wide.gguf"), tmp_path / "wide-q4_k_m.gguf",
                       "q4_k_m")
    assert gguf_tensor_types(q4).get("Q4_K", 0) >= 4
    llm = load_gguf(q4)
    try:
        window = stream[:BLOCK].tolist()
        assert relative_error(llama_cpp_logits(llm, window), full_logits(wide, torch.tensor([window])).numpy()) < 0.2
    finally:
        llm.close()


# -----------------------------------------------------------------------------
# what is not exportable, and the Ollama Modelfile


def test_a_char_vocabulary_exports_to_transformers_and_gguf_refuses_it_with_the_reason(trained, corpus, tmp_path):
    """The mini-llm preset's character-level vocabulary: AutoTokenizer gives CharTokenizer's ids with <s> first on
    tricky text (each unseen character one <unk>; "<s>" written in the text is three characters, as in training) and
    decodes as it does; the model loads and its logits match. GGUF refuses before writing a file and says why. A
    vocab.json that is not the model's (no specials first, or more pieces than rows) is refused before writing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.tokenizer import CharTokenizer

    char_dir = tmp_path / "char"
    char_dir.mkdir()
    (char_dir / "vocab.json").write_text(json.dumps(CharTokenizer.vocabulary(corpus)), encoding="utf-8")
    ours = CharTokenizer(char_dir / "vocab.json")
    model = trained("gpt-sinusoidal")
    hf_tok = AutoTokenizer.from_pretrained(export_hf(model, char_dir, tmp_path / "hf"))
    for text in [*TRICKY, "a <s> b </s>\n\n  x", "Zürich ☃ <unk>"]:
        ids = ours.encode([text])[0]
        assert hf_tok(text)["input_ids"] == [ours.bos_id, *ids], text
        assert hf_tok.decode([ours.bos_id, *ids, ours.eos_id], skip_special_tokens=True) == ours.decode(ids), text
    assert ours.encode(["日本"])[0] == [ours.unk_id] * 2  # the unseen case is exercised
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    window = torch.tensor([[ours.bos_id, *ours.encode([" ".join(corpus)])[0][: BLOCK - 1]]])
    with torch.no_grad():
        theirs = hf(window).logits[0]
    torch.testing.assert_close(theirs, full_logits(model, window), atol=1e-4, rtol=0)

    with pytest.raises(ExportError, match="character-level vocabulary .* GGUF cannot carry: .*byte_to_token"):
        export_gguf(model, char_dir, tmp_path / "model.gguf")
    assert not list(tmp_path.glob("model.gguf*"))
    for wrong in (["a", "b"], CharTokenizer.vocabulary(corpus) + [chr(0x4E00 + i) for i in range(VOCAB)]):
        (char_dir / "vocab.json").write_text(json.dumps(wrong), encoding="utf-8")
        with pytest.raises(ExportError, match="not the character vocabulary this model was trained with"):
            export_hf(model, char_dir, tmp_path / "hf-wrong")
        assert not (tmp_path / "hf-wrong").exists()


def test_a_killed_hf_export_leaves_the_previous_export_whole(trained, tokenizer_dir, tmp_path, monkeypatch):
    """Re-exporting over a folder and being killed while the weights are written (Ctrl-C, out of disk) leaves the
    earlier export byte for byte: never a new config.json beside old weights, nor a truncated model.safetensors."""
    import safetensors.torch

    out = tmp_path / "hf"
    export_hf(trained("gpt-learned-bias"), tokenizer_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        export_hf(trained("llama-gqa-untied"), tokenizer_dir, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing new, nothing left behind


def test_modelfile_is_plain_completion(tmp_path):
    """The Modelfile points at the GGUF beside it, passes the prompt through untouched, stops at </s>, and caps the
    context at the trained block size when given."""
    path = write_modelfile(tmp_path, "model-q8_0.gguf", temperature=0.7, num_ctx=BLOCK)
    assert path.read_text().splitlines() == [
        "FROM ./model-q8_0.gguf", 'TEMPLATE """{{ .Prompt }}"""', 'PARAMETER stop "</s>"', "PARAMETER temperature 0.7",
        f"PARAMETER num_ctx {BLOCK}",
    ]


@pytest.mark.parametrize("dummy_prefix,squeeze", [(False, False), (True, True)])
def test_sentencepiece_normalisation_options_survive_export(dummy_prefix, squeeze, corpus, tmp_path):
    """A SentencePiece model trained without the dummy "▁" prefix, or with whitespace squeezing, still tokenizes to
    SentencePiece's ids through transformers (leading, doubled and trailing spaces included), and decodes back the
    same. llama.cpp reproduces the prefix switch but cannot squeeze whitespace: that GGUF export raises instead."""
    import llama_cpp
    import sentencepiece as spm
    from transformers import AutoTokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=squeeze, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    texts = [*TRICKY, "  two  spaces  ", "\n leading newline", "a \n\n  b  \tc"]
    model = build_model(ModelConfig(arch="llama", vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, block_size=BLOCK))
    hf_tok = AutoTokenizer.from_pretrained(export_hf(model, tmp_path, tmp_path / "hf"))
    for text in texts:
        expected = [sp.bos_id(), *sp.encode(text)]
        assert hf_tok(text)["input_ids"] == expected, text
        assert hf_tok.decode(expected, skip_special_tokens=True) == sp.decode(expected), text
    if squeeze:
        with pytest.raises(ExportError, match="remove_extra_whitespaces"):
            export_gguf(model, tmp_path, tmp_path / "m.gguf")
        return
    gguf_tok = llama_cpp.Llama(model_path=str(export_gguf(model, tmp_path, tmp_path / "m.gguf")), vocab_only=True,
                               verbose=False)
    try:
        for text in texts:
            assert gguf_tok.tokenize(text.encode("utf-8")) == [sp.bos_id(), *sp.encode(text)], text
    finally:
        gguf_tok.close()
