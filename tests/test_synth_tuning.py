"""requantize/parallel/flash_attn auto: the pick is the fastest measured candidate, kept per machine in a JSON file,
re-used without measuring again; a small job does not measure; and one real measurement runs on the packaged model."""
from __future__ import annotations

import json

import pytest

from pipeline_config.synthesize import SynthesizeConfig
from tasks.synthesis import tuning
from tasks.synthesis.llamacpp import default_gguf

# tokens/s a machine might measure: q8_0 wins at the widest batch with flash attention, is faster still without it,
# and 32 sequences beat 64 for it
FIGURES = {"f32@64+fa": 150.0, "q8_0@64+fa": 170.0, "q4_0@64+fa": 160.0, "q8_0@64": 175.0, "q8_0@32": 180.0,
           "q8_0@16": 120.0}


def fake_loss(gguf, kind, threads) -> float:
    """Per-token loss on the probe: as a Q4_1 file might give it, q4_0 far worse than the rest."""
    return {None: 2.0, "f32": 2.0, "f16": 2.0, "q8_0": 2.01, "q4_0": 2.3}[kind]


def fake_measure(calls: list):
    def measure(kind: str, width: int, flash: bool) -> float:
        calls.append(tuning.label(kind, width, flash))
        if kind == "f16":
            raise RuntimeError("this quantizer refuses f16")  # a candidate that cannot run is not picked
        return FIGURES.get(calls[-1], {"f32": 50.0, "q8_0": 60.0, "q4_0": 55.0}[kind])
    return measure


def test_choose_takes_the_fastest_type_then_the_fastest_width_for_it():
    calls: list[str] = []
    pick, figures = tuning.choose(fake_measure(calls))
    assert pick == {"requantize": "q8_0", "parallel": 32, "flash_attn": False}
    assert figures["f16@64+fa"] == 0.0
    # three passes, not the grid: the types, flash attention off for the winner, the widths for the winning pair
    assert calls == ["f32@64+fa", "f16@64+fa", "q8_0@64+fa", "q4_0@64+fa", "q8_0@64", "q8_0@32", "q8_0@16"]


def test_the_pick_is_cached_per_machine_and_reused_without_measuring(tmp_path):
    cfg = SynthesizeConfig(n=100, tuning_file=tmp_path / "tuning.json")
    gguf = default_gguf()
    calls: list[str] = []
    assert tuning.tuned(cfg, gguf, threads=2, stories=100, measure=fake_measure(calls), loss=fake_loss) == {
        "requantize": "q8_0", "parallel": 32, "flash_attn": False}
    stored = json.loads((tmp_path / "tuning.json").read_text())
    [(key, entry)] = stored.items()
    assert json.loads(key)["threads"] == 2 and json.loads(key)["gguf"] == gguf.name and "cpu" in json.loads(key)
    assert entry["tokens_per_s"]["q8_0@32"] == 180.0
    assert entry["probe_loss"] == {"as shipped": 2.0, "f32": 2.0, "f16": 2.0, "q8_0": 2.01, "q4_0": 2.3}
    assert not any(label.startswith("q4_0") for label in entry["tokens_per_s"])  # never measured for speed

    def refuse(kind, width, flash):
        raise AssertionError("measured again")
    assert tuning.tuned(cfg, gguf, threads=2, stories=100, measure=refuse, loss=fake_loss)["requantize"] == "q8_0"
    # another thread count is another machine as far as speed goes: measured anew
    calls.clear()
    tuning.tuned(cfg, gguf, threads=1, stories=100, measure=fake_measure(calls), loss=fake_loss)
    assert calls and len(json.loads((tmp_path / "tuning.json").read_text())) == 2


def test_a_fixed_value_is_kept_and_a_small_job_does_not_measure(tmp_path):
    gguf = default_gguf()
    fixed = SynthesizeConfig(n=100, parallel=8, flash_attn=True, tuning_file=tmp_path / "t.json")
    calls: list[str] = []
    assert tuning.tuned(fixed, gguf, 2, 100, fake_measure(calls), fake_loss) == {"requantize": "q8_0", "parallel": 8,
                                                                       "flash_attn": True}
    assert calls == ["f32@8+fa", "f16@8+fa", "q8_0@8+fa"]  # q4_0 loses quality: not a candidate
    assert not (tmp_path / "t.json").exists()  # a partial search is not this machine's answer: not kept

    def refuse(kind, width, flash):
        raise AssertionError("a 4-story job measured")
    small = SynthesizeConfig(n=4, tuning_file=tmp_path / "t.json")
    assert tuning.tuned(small, gguf, 2, 4, refuse, fake_loss) == tuning.FALLBACK


def test_a_real_short_measurement_on_the_packaged_model(monkeypatch):
    monkeypatch.setattr(tuning, "STEPS", 2)
    cfg = SynthesizeConfig(n=2, max_tokens=16)
    assert tuning.measure_rate(cfg, "q8_0", 2, False, threads=1) > 0
    assert tuning.measure_rate(cfg, "q8_0", 2, True, threads=1) > 0  # llama.cpp's flash-attention path runs here


def test_a_pick_cached_before_flash_attn_existed_is_measured_again(tmp_path):
    cfg = SynthesizeConfig(n=100, tuning_file=tmp_path / "tuning.json")
    gguf = default_gguf()
    key = tuning.machine_key(gguf, 2)
    (tmp_path / "tuning.json").write_text(json.dumps({key: {"requantize": "q4_0", "parallel": 64}}))
    calls: list[str] = []
    picked = tuning.tuned(cfg, gguf, threads=2, stories=100, measure=fake_measure(calls), loss=fake_loss)
    assert picked["flash_attn"] is False
    assert calls and json.loads((tmp_path / "tuning.json").read_text())[key]["requantize"] == "q8_0"


def test_the_probe_loss_keeps_faithful_types_and_drops_q4_0_on_the_packaged_model():
    """Real llama.cpp on the shipped SmolLM2-135M Q4_1: q8_0 holds its weights almost exactly (within 2% of the file's
    own loss on the probe story), q4_0 does not (measured: about 12% worse)."""
    gguf = default_gguf()
    own = tuning.probe_loss(gguf, None, threads=2)
    assert 0.5 < own < 5.0  # nats per token of a small model on a plain story
    assert tuning.probe_loss(gguf, "q8_0", threads=2) <= own * (1 + tuning.MAX_LOSS_INCREASE)
    assert tuning.probe_loss(gguf, "q4_0", threads=2) > own * (1 + tuning.MAX_LOSS_INCREASE)
