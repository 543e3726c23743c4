"""Configuration: validation before anything runs, errors that name the key and the file, presets, cache keys."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.__main__ import add_arguments, overrides_of
from pipeline_config import ConfigError, load_config
from pipeline_config.loader import PRESETS_DIR, split_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_key_names_the_key_the_file_and_the_allowed_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: quickstart\ntrain:\n  max_stepz: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert "train.max_stepz" in message and str(bad) in message and "max_steps" in message


def test_wrong_value_names_allowed_values_and_the_override():
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", ["train.model.arch=transformer"])
    assert "--set" in str(err.value) and "'gpt', 'llama' or 'mamba2'" in str(err.value)


@pytest.mark.parametrize("override", ["train.learning_rate=.inf", "synthesize.temperature=.inf",
                                      "synthesize.quality.max_repeated_ngram_fraction=.nan",
                                      "acquire.byte_budget=.inf"])
def test_an_infinite_or_nan_knob_is_a_config_error(override):
    """`.inf` passes `gt=0`, and a run at an infinite learning rate would only fail once training diverged."""
    with pytest.raises(ConfigError, match="finite number"):
        load_config("quickstart", [override])


@pytest.mark.parametrize("override", ["train.seed=-1", f"train.seed={2**64}", f"evaluate.seed={2**70}"])
def test_a_seed_torch_or_numpy_cannot_take_is_a_config_error(override):
    """torch.manual_seed overflows past 64 bits and numpy's generators refuse a negative seed: both were a
    traceback from train or evaluate, after every stage before had run."""
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override])
    says = "greater than or equal to 0" if int(value) < 0 else f"less than {2**63}"
    assert f"--set: {key}: Input should be {says}" in str(err.value)


@pytest.mark.parametrize(("override", "says"), [
    ("register.model_name=a:b", "register.model_name: 'a:b' is not a name MLflow can register"),
    ("register.model_name=team/lm", "register.model_name: 'team/lm' is not a name MLflow can register"),
    ("register.model_name=my lm", "register.model_name: 'my lm' is not a name MLflow can register"),
    ("register.model_name=..", "register.model_name: '..' is not a name MLflow can register"),
    ("register.champion_alias=latest", "register.champion_alias: 'latest' is not an alias MLflow can set"),
    ("register.champion_alias=v2", "register.champion_alias: 'v2' is not an alias MLflow can set"),
    ("register.champion_alias=best.one", "register.champion_alias: 'best.one' is not an alias MLflow can set"),
    ("register.experiment=' '", "register.experiment: String should have at least 1 character"),
])
def test_a_name_mlflow_refuses_is_a_config_error_not_a_failure_after_training(override, says):
    """MLflow refused these only in register, after every stage before it had run: a traceback after training."""
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override])
    assert says in str(err.value)


def test_a_country_codecarbon_has_no_grid_for_is_a_config_error_and_case_does_not_matter():
    """codecarbon costs an unknown code (or `fra` in lower case) at the world average after one log line, which
    made a French run's CO2 about eight times too high; the code is upper-cased and checked against its data."""
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", ["train.country_iso_code=XXX"])
    assert "train.country_iso_code: 'XXX' is not a country codecarbon has a grid for" in str(err.value)
    assert "Value error" not in str(err.value)
    cfg = load_config("quickstart", ["train.country_iso_code=deu", "report.country_iso_code=esp"])
    assert (cfg.train.country_iso_code, cfg.report.country_iso_code) == ("DEU", "ESP")


def test_a_checksum_that_could_never_match_is_a_config_error_and_case_does_not_matter():
    """A truncated or mistyped sha256 used to be found out only after the whole file had downloaded, and the file
    was then deleted; PowerShell's Get-FileHash prints upper case, and some tools write a `sha256:` prefix."""
    source = '[{kind: http, url: "http://127.0.0.1:1/a.txt", sha256: "%s"}]'
    with pytest.raises(ConfigError, match=r"sources.0.sha256: 'abc123' is not a SHA-256"):
        load_config("quickstart", ["acquire.sources=" + source % "abc123"])
    cfg = load_config("quickstart", ["acquire.sources=" + source % ("sha256:" + "AB" * 32)])
    assert cfg.acquire.sources[0].sha256 == "ab" * 32


def test_cli_exits_2_and_writes_nothing_on_a_bad_key(tmp_path, capsys):
    from flows.__main__ import main

    artifacts = tmp_path / "artifacts"
    status = main(["--set", f"artifacts_dir={artifacts}", "--set", "tokenizer.vocab=12"])
    assert status == 2
    assert "tokenizer.vocab" in capsys.readouterr().err
    assert not artifacts.exists()


def test_override_parses_yaml_values_and_extends_merges(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: quickstart\ntrain:\n  model:\n    n_layer: 2\n")
    cfg = load_config(child, ["train.learning_rate=3e-4", "evaluate.prompts=[a, b]"])
    assert cfg.train.model.n_layer == 2 and cfg.train.model.n_embd == 192  # the rest comes from quickstart
    assert cfg.train.learning_rate == 3e-4 and cfg.evaluate.prompts == ["a", "b"]


def test_extends_names_a_file_beside_the_preset_and_its_errors_name_the_preset(tmp_path, monkeypatch):
    """`extends: base.yaml` was looked up in the working directory, so a team's presets kept together in one folder
    broke when run from the repository (or a deployment's directory); and `extends: nope` said only "unknown preset
    'nope'", not which file asked for it."""
    monkeypatch.chdir(ROOT)
    team = tmp_path / "team"
    team.mkdir()
    (team / "base.yaml").write_text("extends: quickstart\ntrain: {max_steps: 7}\n")
    (team / "night.yaml").write_text("extends: base.yaml\ntrain: {learning_rate: 0.01}\n")
    train = load_config(team / "night.yaml").train
    assert (train.max_steps, train.learning_rate) == (7, 0.01)
    (team / "typo.yaml").write_text("extends: nope\n")
    (team / "gone.yaml").write_text("extends: missing.yaml\n")
    for name, says in [("typo", "extends: unknown preset 'nope' (available: "), ("gone", "extends: no such file")]:
        with pytest.raises(ConfigError) as err:
            load_config(team / f"{name}.yaml")
        assert str(err.value).startswith(f"{team / name}.yaml: {says}"), str(err.value)


def test_several_overrides_in_one_string_split_as_words_and_values_with_spaces_stay_whole():
    """`make run SET="..."` hands the whole string over: quotes keep a value whole, and a word that does not start
    with KEY= continues the value before it, so a YAML list or mapping needs no quotes."""
    text = "train.max_steps=3 evaluate.prompts=[Once upon a time, The dog] 'register.experiment=my runs'"
    assert split_overrides(text) == ["train.max_steps=3", "evaluate.prompts=[Once upon a time, The dog]",
                                     "register.experiment=my runs"]
    cfg = load_config("quickstart", split_overrides(text))
    assert cfg.train.max_steps == 3 and cfg.register.experiment == "my runs"
    assert cfg.evaluate.prompts == ["Once upon a time", "The dog"]
    assert split_overrides("") == []
    with pytest.raises(ConfigError, match="No closing quotation"):
        split_overrides("register.experiment='my runs")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("quickstart", split_overrides("train.max_steps 3"))


def test_make_run_passes_set_and_preset_to_the_flow_whole(tmp_path):
    """The Makefile's own `run` recipe, with its Python replaced by one that prints the arguments it was given."""
    stamp = tmp_path / "stamp"
    stamp.touch()  # newer than pyproject.toml and the patches: make does not set anything up
    echo = f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    text = "train.max_steps=3 evaluate.prompts=[Once upon a time, The dog] 'register.experiment=my $runs'"
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "run", f"STAMP={stamp}", f"PY={echo}", f"SET={text}",
                           f"PRESET={tmp_path / 'my presets' / 'fr.yaml'}"],
                          capture_output=True, text=True, check=True)
    argv = json.loads(done.stdout.strip().splitlines()[-1])
    args = argparse.ArgumentParser()
    add_arguments(args)
    parsed = args.parse_args(argv[argv.index("flows") + 1:])
    assert overrides_of(parsed) == ["train.max_steps=3", "evaluate.prompts=[Once upon a time, The dog]",
                                    "register.experiment=my $runs"]  # a `$` is the user's, not make's or the shell's
    assert parsed.server and parsed.preset == str(tmp_path / "my presets" / "fr.yaml")


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_preset_validates(preset):
    assert load_config(preset).name == preset


def test_cache_key_ignores_unrelated_knobs_and_follows_upstream(tmp_path):
    from tasks.stage import Artifact
    from tasks.tokenizer import STAGE as TOKENIZER
    from tasks.train import STAGE as TRAIN

    base = load_config("quickstart")
    changed = load_config("quickstart", ["train.max_steps=300", "evaluate.temperature=0.1"])
    docs = Artifact("acquire", tmp_path, "a" * 64)
    assert TOKENIZER.key(base.tokenizer, {"acquire": docs, "synthesize": None}) == TOKENIZER.key(changed.tokenizer, {"acquire": docs, "synthesize": None})
    assert TRAIN.key(base.train, {"tokenizer": docs, "shard": docs}) != TRAIN.key(changed.train, {"tokenizer": docs, "shard": docs})
    other_docs = Artifact("acquire", tmp_path, "b" * 64)
    assert TOKENIZER.key(base.tokenizer, {"acquire": docs, "synthesize": None}) != TOKENIZER.key(base.tokenizer, {"acquire": other_docs, "synthesize": None})


def test_fingerprint_follows_file_contents_not_timings(tmp_path):
    from tasks.stage import load_artifact, write_manifest

    files = {"x.bin": {"bytes": 3, "sha256": "a" * 64}}
    first = write_manifest(tmp_path / "a", "train", {"config": {"k": 1}, "files": files, "train_seconds": 1.0})
    again = write_manifest(tmp_path / "b", "train", {"config": {"k": 1}, "files": files, "train_seconds": 9.0})
    assert first.fingerprint == again.fingerprint
    changed = write_manifest(tmp_path / "c", "train", {"config": {"k": 1}, "files": {"x.bin": {"bytes": 3, "sha256": "b" * 64}}})
    assert changed.fingerprint != first.fingerprint
    assert load_artifact(tmp_path / "a", "train") == first


def test_a_preset_file_that_is_not_yaml_or_not_utf8_is_one_line_naming_where(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  max_steps: 3\n   bad: 1\n")
    (tmp_path / "latin1.yaml").write_bytes("name: \xe9t\xe9\n".encode("latin-1"))
    cases = [(tmp_path / "bad.yaml", [], "not valid YAML: mapping values are not allowed here at line 3, column 7"),
             (tmp_path / "latin1.yaml", [], "not UTF-8 text (invalid byte at offset 6)"),
             ("quickstart", ["train.max_steps=[1"], "value is not valid YAML: expected ',' or ']'"),
             # PyYAML alone keeps the second `train:` and drops the first block's max_steps without a word
             (tmp_path / "twice.yaml", [], "not valid YAML: duplicate key 'train' (first at line 2) at line 4, column 1"),
             ("quickstart", ["acquire.sources=[{kind: local, path: a, path: b}]"], "duplicate key 'path'")]
    (tmp_path / "twice.yaml").write_text("extends: quickstart\ntrain:\n  max_steps: 3\ntrain:\n  learning_rate: 0.01\n")
    merged = load_config("quickstart", ["train={<<: {max_steps: 7, learning_rate: 0.01}, max_steps: 8}"]).train
    assert (merged.max_steps, merged.learning_rate) == (8, 0.01)  # a YAML merge key still overrides: no duplicate
    for preset, overrides, says in cases:
        with pytest.raises(ConfigError) as err:
            load_config(preset, overrides)
        assert says in str(err.value) and "\n" not in str(err.value)


def test_shards_smaller_than_a_training_window_are_a_config_error():
    """Training draws each window inside one shard: `shard.tokens_per_shard=100` with quickstart's context of 128 was
    accepted, shard wrote 3376 shards, and train then failed on 'the train split is too short'."""
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", ["shard.tokens_per_shard=129"])
    assert "--set: shard.tokens_per_shard (129) is below train.model.block_size + 2 (130)" in str(err.value)
    assert load_config("quickstart", ["shard.tokens_per_shard=130"]).shard.tokens_per_shard == 130
    assert load_config("quickstart", ["shard.tokens_per_shard=100", "train.model.block_size=64"]).train.model


def test_a_check_across_sections_names_the_file_or_set_that_wrote_its_keys(tmp_path):
    """Such a check fails at the top level, so the error was blamed on the preset and '(top level)' even when a --set
    had written the key; now the source of the first key the message names (a --set before a file) is named."""
    preset = tmp_path / "small-shards.yaml"
    preset.write_text("extends: quickstart\nshard: {tokens_per_shard: 100}\n", encoding="utf-8")
    cases = [(preset, [], f"{preset}: shard.tokens_per_shard (100) is below"),
             (preset, ["train.model.block_size=200"], "--set: shard.tokens_per_shard (100) is below"),
             ("quickstart", ["acquire.sources=[]", "synthesize.n=0"], "--set: no data: give acquire.sources")]
    for name, overrides, says in cases:
        with pytest.raises(ConfigError) as err:
            load_config(name, overrides)
        assert says in str(err.value) and "(top level)" not in str(err.value)


def test_empty_prompt_lists_are_config_errors_named_where_they_were_written():
    """Evaluation and checkpoint samples index their prompts: an empty list failed inside the train stage."""
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", ["evaluate.prompts=[]"])
    assert "evaluate.prompts: List should have at least 1 item" in str(err.value)
    assert "train.samples.prompts" not in str(err.value)  # not copied over from evaluate, so not reported twice
    with pytest.raises(ConfigError, match="train.samples.prompts: List should have at least 1 item"):
        load_config("quickstart", ["train.samples.prompts=[]"])


def test_a_modelfile_for_a_gguf_the_export_does_not_write_is_a_config_error():
    """It was accepted and the export stage then wrote no Modelfile, without a word."""
    for overrides in (["export.modelfile=q5_0"], ["export.quantize=[]"]):
        with pytest.raises(ConfigError, match="names a GGUF this stage does not write"):
            load_config("quickstart", overrides)
    assert load_config("quickstart", ["export.quantize=[q5_0]", "export.modelfile=q5_0"]).export.modelfile == "q5_0"
    assert load_config("quickstart", ["export.quantize=[]", "export.modelfile=null"]).export.modelfile is None
