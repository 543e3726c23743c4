"""The `scriptorium` command line and the one generation path under it (model/generation.py).

A tiny GPT with a real SentencePiece vocabulary stands in for a trained model: what is tested is that every way of
asking (one prompt, a left-padded batch, a stream, the REPL, the console script) gives the model's own greedy text.
Generation from a registry URI (`models:/NAME@champion`) and `scriptorium models` are tested in test_flow.py, on the
model the flow registers.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from model.generation import generate_text, stream_text
from model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "top_k": None, "top_p": None, "seed": 0}


@pytest.fixture(scope="module")
def loaded(trained):
    from model import load_model

    return load_model(trained / "model.safetensors", trained / "model_config.json"), load_tokenizer(trained / "tokenizer")


def test_a_left_padded_batch_gives_each_prompt_its_own_greedy_text(loaded):
    model, tokenizer = loaded
    prompts = ["once upon a time", "the dog", "a very small girl named Lily went"]  # three different lengths
    one_by_one = generate_text(model, tokenizer, prompts, **GREEDY)
    together = generate_text(model, tokenizer, prompts, **GREEDY, batched=True)
    assert together == one_by_one
    assert all(text.startswith(prompt) for text, prompt in zip(together, prompts))


def test_streaming_yields_the_same_continuation_piece_by_piece(loaded):
    model, tokenizer = loaded
    pieces = list(stream_text(model, tokenizer, "once upon a time", **GREEDY))
    assert len(pieces) > 1
    assert "once upon a time" + "".join(pieces) == generate_text(model, tokenizer, ["once upon a time"], **GREEDY)[0]


def typed(*lines: str) -> Callable[[str], str]:
    """The REPL's `input`: the given lines, then Ctrl-D."""
    remaining = iter(lines)

    def read(_prompt: str) -> str:
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None

    return read


def test_the_repl_changes_sampling_without_restarting_and_leaves_on_ctrl_d(loaded):
    from flows.cli import repl

    model, tokenizer = loaded
    read = typed("/temp 0", "/top_k 5", "/top_k x", "once upon a time", "/show")

    out: list[str] = []
    knobs = {"max_new_tokens": 12, "temperature": 0.9, "top_k": 50, "top_p": None, "seed": 0}
    assert repl(model, tokenizer, knobs, read=read, write=out.append) == 0
    text = "".join(out)
    assert "temperature = 0.0" in text and "top_k = 5" in text and "/top_k needs a number" in text
    greedy = generate_text(model, tokenizer, ["once upon a time"], **GREEDY)[0]
    assert greedy in text  # the prompt was continued at the temperature set by /temp
    assert knobs["temperature"] == 0.0 and knobs["top_k"] == 5


def test_ctrl_c_stops_one_completion_and_the_repl_goes_on(loaded):
    from flows.cli import repl

    model, tokenizer = loaded
    read = typed("once upon a time", "/show")

    out: list[str] = []

    def write(text: str) -> None:
        if out and out[-1] == "once upon a time":  # the first piece of the completion: the user presses Ctrl-C
            out.append("<ctrl-c>")
            raise KeyboardInterrupt
        out.append(text)

    knobs = {"max_new_tokens": 12, "temperature": 0.0, "top_k": None, "top_p": None, "seed": 0}
    assert repl(model, tokenizer, knobs, read=read, write=write) == 0
    text = "".join(out)
    assert "once upon a time<ctrl-c> [stopped]\n" in text
    assert "temperature=0.0" in text  # the REPL read the next line after the interrupted completion


def test_ctrl_c_in_a_command_exits_130_without_a_traceback(monkeypatch, capsys):
    import flows.cli as cli

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_models", interrupted)
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_the_console_script_generates_streams_and_reads_a_prompts_file(trained, loaded, tmp_path):
    model, tokenizer = loaded
    script = Path(sys.executable).parent / "scriptorium"
    assert script.is_file(), "pip install -e . installs the scriptorium console script"
    base = [str(script), "generate", "--model", str(trained), "--temperature", "0", "--max-new-tokens", "12"]
    plain = subprocess.run(base + ["--prompt", "the dog"], capture_output=True, text=True, check=True)
    streamed = subprocess.run(base + ["--prompt", "the dog", "--stream"], capture_output=True, text=True, check=True)
    expected = generate_text(model, tokenizer, ["the dog"], **GREEDY)[0]
    assert plain.stdout.strip() == streamed.stdout.strip() == expected.strip()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the dog\nonce upon a time\n")
    batch = subprocess.run(base + ["--prompts-file", str(prompts)], capture_output=True, text=True, check=True)
    assert batch.stdout.splitlines() == [t for t in generate_text(model, tokenizer, ["the dog", "once upon a time"],
                                                                    **GREEDY)]


def test_a_directory_without_a_model_is_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--model", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no model.safetensors" in result.stderr


def test_an_unfinished_run_generates_from_its_newest_checkpoint(tmp_path):
    """A run stopped in training (Ctrl-C, SIGTERM, a kill) or still training has checkpoints but no final weights and
    no manifest. `--model artifacts/train/<key>` then takes its newest checkpoint, with the model config and the
    tokenizer the run wrote down when it started; `--model .../checkpoints/step-N` takes that checkpoint."""
    from model import load_model
    from tests.conftest import run_stages

    train_dir = run_stages(tmp_path, ("acquire", "tokenizer", "shard", "train"))["train"].path
    (train_dir / "manifest.json").unlink()  # what a stopped run leaves
    (train_dir / "model.safetensors").unlink()
    newest = train_dir / "checkpoints" / json.loads((train_dir / "checkpoints" / "latest.json").read_text())["path"]
    base = [sys.executable, "-m", "flows.cli", "generate", "--temperature", "0", "--max-new-tokens", "8", "--prompt",
            "the dog"]
    outs = [subprocess.run(base + ["--model", str(spec)], capture_output=True, text=True, cwd=REPO)
            for spec in (train_dir, newest)]
    for out in outs:
        assert out.returncode == 0, out.stderr[-2000:]
    tokenizer = next((tmp_path / "artifacts" / "tokenizer").glob("*/"))
    model = load_model(newest / "model.safetensors", train_dir / "model_config.json")
    expected = generate_text(model, load_tokenizer(tokenizer), ["the dog"], **{**GREEDY, "max_new_tokens": 8})[0]
    assert outs[0].stdout.strip() == outs[1].stdout.strip() == expected.strip()
    assert f"training has not finished: its newest checkpoint, {newest.name}" in outs[0].stderr


def test_a_lora_checkpoint_is_refused_in_one_line(trained, tmp_path):
    """A LoRA run's checkpoints hold the adapters beside the frozen weights (the artifact merges them at the end)."""
    from safetensors.torch import load_file, save_file

    step = tmp_path / "train" / "k" / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    tensors = load_file(trained / "model.safetensors")
    adapter = tensors[next(iter(tensors))][:2].clone()
    save_file({**tensors, "blocks.0.attn.c_attn.lora_A": adapter}, step / "model.safetensors")
    (step.parents[1] / "model_config.json").write_text((trained / "model_config.json").read_text())
    result = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--model", str(step), "--tokenizer",
                             str(trained / "tokenizer"), "--prompt", "x"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "LoRA adapters" in result.stderr, result.stderr


def test_every_option_has_help_text():
    from flows.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"scriptorium {name} {action.option_strings}: no help text"


def test_scriptorium_run_takes_the_options_of_python_m_flows_and_refuses_a_bad_knob(tmp_path, capsys):
    """`scriptorium run` = `python -m flows`: the same options parse to the same values (so `--server` and `--no-wait`
    reach the run), and a bad `--set` is a one-line error with exit status 2 before anything is written."""
    import argparse

    from flows import __main__ as flows_main
    from flows import cli

    argv = ["--preset", "mini-llm", "--set", "train.max_steps=3", "--no-wait", "--server"]
    direct = argparse.ArgumentParser()
    flows_main.add_arguments(direct)
    via_cli = vars(cli.build_parser().parse_args(["run", *argv]))
    assert {k: via_cli[k] for k in vars(direct.parse_args(argv))} == vars(direct.parse_args(argv))
    assert via_cli["server"] and via_cli["no_wait"] and via_cli["overrides"] == ["train.max_steps=3"]

    bad = ["run", "--set", "train.max_steps=abc", "--set", f"artifacts_dir={tmp_path / 'artifacts'}"]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert "train.max_steps" in err and "Traceback" not in err
    assert not (tmp_path / "artifacts").exists()


def test_bad_sampling_values_prompts_files_and_outs_are_one_line_errors(trained, tmp_path, capsys):
    from flows import cli

    for argv in (["--max-new-tokens", "0"], ["--temperature", "-1"], ["--top-p", "0"], ["--top-k", "x"],
                 ["--temperature", "nan"], ["--seed", str(2**64)]):
        with pytest.raises(SystemExit) as exited:
            cli.main(["generate", "--model", str(trained), *argv])
        assert exited.value.code == 2
        assert f"argument {argv[0]}: needs a number" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("il était une fois\n".encode("latin-1"))
    for name, says in (("empty.txt", "no prompt in it (one per line)"),
                       ("latin1.txt", "not UTF-8 text (invalid byte at offset 3)"),
                       ("missing.txt", "no such file or directory")):
        assert cli.main(["generate", "--model", str(trained), "--prompts-file", str(tmp_path / name)]) == 1
        assert capsys.readouterr().err.strip() == f"error: --prompts-file {tmp_path / name}: {says}"
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert cli.main(["generate", "--model", str(tmp_path / "model.gguf")]) == 1
    assert "a GGUF file runs in llama.cpp or Ollama" in capsys.readouterr().err
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")  # what `scriptorium export --format hf` writes, in short
    assert cli.main(["generate", "--model", str(tmp_path / "hf")]) == 1
    assert "a Hugging Face export runs in transformers (AutoModelForCausalLM" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("kept")
    for command in (["export", "--format", "hf"], ["attention", "--prompt", "the dog"]):
        assert cli.main([*command, "--model", str(trained), "--out", str(a_file)]) == 1
        assert capsys.readouterr().err.strip() == f"error: --out {a_file}: exists and is not a directory"
        assert cli.main([*command, "--model", str(trained), "--out", str(a_file / "sub")]) == 1
        assert capsys.readouterr().err.strip() == f"error: {a_file / 'sub'}: Not a directory"
    assert a_file.read_text() == "kept"


def test_a_store_that_is_not_there_is_one_line_and_nothing_is_created(tmp_path, capsys):
    """Reading commands never create a store: MLflow would make an empty SQLite file (and its folders) for a path
    that does not exist, and retry a server that does not answer for minutes before a traceback."""
    from flows import cli
    from tests.loopback import closed_port

    missing = tmp_path / "nowhere" / "mlflow.db"
    assert cli.main(["models", "--tracking-uri", f"sqlite:///{missing}"]) == 1
    assert capsys.readouterr().err == f"error: no MLflow store at {missing} (`make run` registers the first model " \
                                      "there; or pass --tracking-uri)\n"
    assert not (tmp_path / "nowhere").exists()
    down = f"http://127.0.0.1:{closed_port()}"
    for argv in (["models"], ["generate", "--model", "models:/m@champion"]):
        assert cli.main([*argv, "--tracking-uri", down]) == 1
        err = capsys.readouterr().err
        assert f"no MLflow tracking server answers at {down}" in err and err.count("\n") == 1
    assert cli.main(["models", "--tracking-uri", "bogus://x"]) == 1
    assert capsys.readouterr().err.startswith("error: bogus://x: Model registry functionality is unavailable")


def test_a_reader_that_stops_early_gets_no_traceback(trained):
    """`scriptorium generate --stream | head -c 5`: the pipe closes while tokens are still coming; like other
    command-line tools it stops quietly with status 1 (it printed a BrokenPipeError traceback)."""
    command = [sys.executable, "-m", "flows.cli", "generate", "--model", str(trained), "--prompt", "the", "--stream",
               "--max-new-tokens", "2000", "--temperature", "1", "--seed", "1"]
    reader = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(reader.stdout.read(3)) == 3
    reader.stdout.close()
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=300) == 1 and err == "", err[-2000:]


def test_a_registered_version_whose_files_are_gone_is_not_called_unregistered(trained, tmp_path, capsys):
    """The registry (SQLite) and the artifact store (files) are two places: with the files moved or deleted, the
    command said the version was "not in the registry", which `scriptorium models` then contradicted."""
    import shutil

    from flows import cli
    from tests.conftest import register_tiny, temporary_mlflow_store

    with temporary_mlflow_store(tmp_path) as (uri, experiment):
        version = register_tiny(trained, experiment)
    shutil.rmtree(tmp_path / "artifacts")
    capsys.readouterr()
    assert cli.main(["generate", "--model", f"models:/tiny/{version}", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: models:/tiny/{version}: version {version} is registered, but its files at ")
    assert f"its files at {(tmp_path / 'artifacts').as_uri()}/" in err  # where they were, not models:/m-<id>
    assert "cannot be read" in err and err.count("\n") == 1
    assert cli.main(["generate", "--model", "models:/tiny/9", "--tracking-uri", uri]) == 1
    assert "not in the registry" in capsys.readouterr().err
