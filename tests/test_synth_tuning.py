"""requantize/parallel/flash_attn/cache_type_k auto: the pick is the fastest measured candidate (candidates interleaved,
medians compared), kept per machine in a JSON file, re-used without measuring again; a small job does not measure; and
real measurements run on the packaged model."""
from __future__ import annotations

import json

import pytest

from pipeline_config.synthesize import SynthesizeConfig
from tasks.synthesis import tuning
from tasks.synthesis.llamacpp import default_gguf

# tokens/s a machine might measure: q8_0 wins at the widest batch with flash attention, is faster still without it,
# 32 sequences beat 64 for it, and q8_0 key cells beat f16 ones there
FIGURES = {"f32@64+fa": 150.0, "bf16@64+fa": 140.0, "q8_0@64+fa": 170.0, "q4_0@64+fa": 160.0, "q8_0@64": 175.0,
           "q8_0@32": 180.0, "q8_0@16": 120.0, "q8_0@32+k:q8_0": 190.0}


def fake_loss(gguf, kind, threads, cache_k="f16") -> float:
    """Per-token loss on the probe: as a Q4_1 file might give it, q4_0 far worse than the rest, q8_0 keys a little."""
    own = {None: 2.0, "f32": 2.0, "f16": 2.0, "bf16": 2.001, "q8_0": 2.01, "q4_0": 2.3}[kind]
    return own + (0.004 if cache_k == "q8_0" else 0)


def fake_measure(calls: list):
    def measure(kind: str, width: int, flash: bool, cache_k: str = "f16") -> float:
        calls.append(tuning.label(kind, width, flash, cache_k))
        if kind == "f16":
            raise RuntimeError("this quantizer refuses f16")  # a candidate that cannot run is not picked
        return FIGURES.get(calls[-1], {"f32": 50.0, "bf16": 45.0, "q8_0": 60.0, "q4_0": 55.0}[kind])
    return measure


def test_choose_takes_the_fastest_type_then_the_fastest_width_for_it(monkeypatch):
    monkeypatch.setattr(tuning, "ROUNDS", 1)
    calls: list[str] = []
    pick, figures = tuning.choose(fake_measure(calls))
    assert pick == {"requantize": "q8_0", "parallel": 32, "flash_attn": False, "cache_type_k": "q8_0"}
    assert figures["f16@64+fa"] == 0.0
    # four passes, not the grid: the types, flash attention off for the winner, the widths for the winning pair, the
    # key cells for the winning three; each pass measures its own candidates (the previous winner again)
    assert calls == ["f32@64+fa", "f16@64+fa", "bf16@64+fa", "q8_0@64+fa", "q4_0@64+fa", "q8_0@64+fa", "q8_0@64",
                     "q8_0@64", "q8_0@32", "q8_0@16", "q8_0@32", "q8_0@32+k:q8_0"]


def test_a_pass_interleaves_its_candidates_and_ranks_them_by_median():
    """Measured one after the other, a candidate that ran while the host was busy would lose: rounds interleave the
    candidates, and one slow sample does not decide."""
    calls: list[str] = []
    slow = iter([100.0, 300.0, 100.0])  # q8_0 is disturbed once (the second round), f32 never

    def measure(kind, width, flash, cache_k="f16"):
        calls.append(tuning.label(kind, width, flash, cache_k))
        return {"f32": 150.0, "q8_0": next(slow) if len(calls) <= 6 and kind == "q8_0" else 200.0}[kind]
    pick, figures = tuning.choose(measure, types=("f32", "q8_0"), widths=(64,), flash=(True,), cache_types=("f16",))
    assert calls[:6] == ["f32@64+fa", "q8_0@64+fa"] * 3  # a, b, a, b, a, b
    assert figures["q8_0@64+fa"] == 100.0 and pick["requantize"] == "f32"  # median of (100, 300, 100)


def test_the_pick_is_cached_per_machine_and_reused_without_measuring(tmp_path):
    cfg = SynthesizeConfig(n=100, tuning_file=tmp_path / "tuning.json")
    gguf = default_gguf()
    calls: list[str] = []
    assert tuning.tuned(cfg, gguf, threads=2, stories=100, measure=fake_measure(calls), loss=fake_loss) == {
        "requantize": "q8_0", "parallel": 32, "flash_attn": False, "cache_type_k": "q8_0"}
    stored = json.loads((tmp_path / "tuning.json").read_text())
    [(key, entry)] = stored.items()
    assert json.loads(key)["threads"] == 2 and json.loads(key)["gguf"] == gguf.name and "cpu" in json.loads(key)
    assert entry["tokens_per_s"]["q8_0@32"] == 180.0
    assert entry["probe_loss"] == {"as shipped": 2.0, "f32": 2.0, "f16": 2.0, "bf16": 2.001, "q8_0": 2.01, "q4_0": 2.3,
                                   "k:q8_0": 2.004}
    assert not any(label.startswith("q4_0") for label in entry["tokens_per_s"])  # never measured for speed

    def refuse(kind, width, flash, cache_k):
        raise AssertionError("measured again")
    assert tuning.tuned(cfg, gguf, threads=2, stories=100, measure=refuse, loss=fake_loss)["requantize"] == "q8_0"
    # another thread count is another machine as far as speed goes: measured anew
    calls.clear()
    tuning.tuned(cfg, gguf, threads=1, stories=100, measure=fake_measure(calls), loss=fake_loss)
    assert calls and len(json.loads((tmp_path / "tuning.json").read_text())) == 2


def test_a_fixed_value_is_kept_and_a_small_job_does_not_measure(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "ROUNDS", 1)
    gguf = default_gguf()
    fixed = SynthesizeConfig(n=100, parallel=8, flash_attn=True, cache_type_k="f16", tuning_file=tmp_path / "t.json")
    calls: list[str] = []
    assert tuning.tuned(fixed, gguf, 2, 100, fake_measure(calls), fake_loss) == {"requantize": "q8_0", "parallel": 8,
                                                                       "flash_attn": True, "cache_type_k": "f16"}
    assert calls == ["f32@8+fa", "f16@8+fa", "bf16@8+fa", "q8_0@8+fa"]  # q4_0 loses quality: not a candidate
    assert not (tmp_path / "t.json").exists()  # a partial search is not this machine's answer: not kept

    def refuse(kind, width, flash, cache_k):
        raise AssertionError("a 4-story job measured")
    small = SynthesizeConfig(n=4, tuning_file=tmp_path / "t.json")
    assert tuning.tuned(small, gguf, 2, 4, refuse, fake_loss) == tuning.FALLBACK


def test_only_the_knobs_left_to_auto_are_probed_for_quality(tmp_path, monkeypatch):
    """A weight type the user fixed is not probed (each probe converts the weights and runs the model)."""
    monkeypatch.setattr(tuning, "ROUNDS", 1)
    probed: list[tuple] = []

    def loss(gguf, kind, threads, cache_k="f16"):
        probed.append((kind, cache_k))
        return fake_loss(gguf, kind, threads, cache_k)
    cfg = SynthesizeConfig(n=100, requantize="q8_0", tuning_file=tmp_path / "t.json")
    picked = tuning.tuned(cfg, default_gguf(), 2, 100, fake_measure([]), loss)
    assert probed == [(None, "f16"), (None, "q8_0")]  # the file's own loss, and with q8_0 key cells
    assert picked["requantize"] == "q8_0" and picked["cache_type_k"] == "q8_0"


def test_a_real_short_measurement_on_the_packaged_model(monkeypatch):
    monkeypatch.setattr(tuning, "STEPS", 2)
    cfg = SynthesizeConfig(n=2, max_tokens=16)
    assert tuning.measure_rate(cfg, "q8_0", 2, False, threads=1) > 0
    assert tuning.measure_rate(cfg, "q8_0", 2, True, threads=1) > 0  # llama.cpp's flash-attention path runs here
    assert tuning.measure_rate(cfg, "q8_0", 2, True, threads=1, cache_k="q8_0") > 0  # and its q8_0 key cells


def test_a_pick_cached_before_a_knob_existed_is_measured_again(tmp_path):
    cfg = SynthesizeConfig(n=100, tuning_file=tmp_path / "tuning.json")
    gguf = default_gguf()
    key = tuning.machine_key(gguf, 2)
    (tmp_path / "tuning.json").write_text(json.dumps({key: {"requantize": "q4_0", "parallel": 64, "flash_attn": True}}))
    calls: list[str] = []
    picked = tuning.tuned(cfg, gguf, threads=2, stories=100, measure=fake_measure(calls), loss=fake_loss)
    assert picked["flash_attn"] is False
    assert calls and json.loads((tmp_path / "tuning.json").read_text())[key]["requantize"] == "q8_0"


def test_the_probe_loss_keeps_faithful_types_and_drops_q4_0_on_the_packaged_model():
    """Real llama.cpp on the shipped SmolLM2-135M Q4_1: q8_0 and bf16 hold its weights almost exactly (within 2% of
    the file's own loss on the probe story; measured +0.5% and -0.3%, f16 -0.4%), q4_0 does not (measured: about 12%
    worse)."""
    gguf = default_gguf()
    own = tuning.probe_loss(gguf, None, threads=2)
    assert 0.5 < own < 5.0  # nats per token of a small model on a plain story
    assert tuning.probe_loss(gguf, "q8_0", threads=2) <= own * (1 + tuning.MAX_LOSS_INCREASE)
    assert tuning.probe_loss(gguf, "bf16", threads=2) <= own * (1 + tuning.MAX_LOSS_INCREASE)
    assert tuning.probe_loss(gguf, "q4_0", threads=2) > own * (1 + tuning.MAX_LOSS_INCREASE)


def test_q8_0_key_cells_keep_the_probe_loss_on_the_packaged_model():
    """Real llama.cpp on the shipped SmolLM2-135M: q8_0 key cells (values f16) stay within 2% of the file's own loss on
    the probe story (measured: +0.2%), so they are a candidate for auto."""
    gguf = default_gguf()
    own = tuning.probe_loss(gguf, None, threads=2)
    with_q8_keys = tuning.probe_loss(gguf, None, threads=2, cache_k="q8_0")
    assert with_q8_keys <= own * (1 + tuning.MAX_LOSS_INCREASE)


def test_the_machine_key_names_the_llama_cpp_build(monkeypatch):
    """Real llama.cpp: its CPU backend is named in the key; a build with another backend set (BLAS, which turns f16
    weights from the fastest into the slowest candidate) gets another key, so it never reads this build's pick."""
    gguf = default_gguf()
    assert tuning.llama_build().split("|")[0].split(",").count("CPU") == 1
    key = tuning.machine_key(gguf, 2)
    monkeypatch.setattr(tuning, "llama_build", lambda: "BLAS,CPU|0123456789abcdef")
    assert tuning.machine_key(gguf, 2) != key


def test_a_new_candidate_type_makes_a_new_machine_key(monkeypatch):
    """A pick measured before a weight type was a candidate (bf16 came later) is not read back: the machine measures
    again, with it."""
    gguf = default_gguf()
    key = tuning.machine_key(gguf, 2)
    monkeypatch.setattr(tuning, "WEIGHT_TYPES", ("f32", "f16", "q8_0", "q4_0"))
    assert tuning.machine_key(gguf, 2) != key
