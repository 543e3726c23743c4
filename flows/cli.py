"""`scriptorium`: the command line over the pipeline and the models it registers.

    scriptorium run [--preset P] [--set k=v ...]                  build-model (what `python -m flows` does)
    scriptorium generate --model models:/NAME@champion --prompt "once upon a time" --stream
    scriptorium generate --model models:/NAME/3 --interactive     a completion REPL (/temp 0.5, /top_k 20, Ctrl-D)
    scriptorium export --model models:/NAME@champion --format gguf --quant q8_0 --out DIR
    scriptorium models                                            registered models, versions, aliases, metrics
    scriptorium attention --model models:/NAME@champion --prompt "the dog" --out DIR   a heat map per layer and head
    scriptorium prune [--keep 3] [--dry-run]                      remove stage outputs no recent version came from
    scriptorium relocate [--artifacts-dir DIR]                    after moving artifacts/: its MLflow store follows

The verbs and sampling flags are the ones people know from litgpt (`generate`, `export`) and llama.cpp
(`--temperature`, `--top-k`, `--top-p`, `--seed`). `--model` takes a registry URI (an alias or a version) or a
directory: a train artifact (`artifacts/train/<key>`; its tokenizer is found through the shard it was trained on) or
any folder holding `model.safetensors`, `model_config.json` and a tokenizer. Generation goes through
`model/generation.py`, the same code evaluate and the MLflow pyfunc use.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from pipeline_config.loader import ConfigError


class CLIError(RuntimeError):
    """A command-line mistake the user can fix; printed as one line."""


# ------------------------------------------------------------------------------------------------ finding a model
def _default_tracking_uri() -> str:
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('artifacts/mlflow/mlflow.db').resolve()}"


def _missing_store(tracking_uri: str) -> str | None:
    """Why there is no MLflow store to read at `tracking_uri`, or None. Asked before MLflow is: it would create an
    empty SQLite store (folders included) where the file is not, and retry a server that does not answer for four
    minutes."""
    from tasks.lineage.registry import store_exists, unreachable_server

    if not store_exists(tracking_uri):
        return (f"no MLflow store at {tracking_uri.removeprefix('sqlite:///')} (`make run` registers the first model "
                "there; or pass --tracking-uri)")
    return unreachable_server(tracking_uri)


def _registered_version(uri: str) -> tuple[str, str] | None:
    """(version, where its files are) for the version a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI names;
    None where the registry has none or cannot say, or for another form of URI. Asked only once a download failed,
    to tell a version that is not registered from one whose files are gone."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline_config.registry import REGISTRY_URI

    match = re.fullmatch(REGISTRY_URI, uri)
    if not match:
        return None
    name, number, alias = match.groups()
    client = MlflowClient()
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        where = found.source  # models:/m-<id> (a logged model) in MLflow 3: its files are at its artifact_location
        if where.startswith("models:/m-"):
            where = client.get_logged_model(where.removeprefix("models:/")).artifact_location
    except MlflowException:
        return None
    return found.version, where


def _registry_files(uri: str, tracking_uri: str) -> tuple[Path, Path, Path]:
    """Download a registered version and return (weights, model config, tokenizer dir), as its MLmodel file names
    the pyfunc's artifacts."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    missing = _missing_store(tracking_uri)
    if missing:
        raise CLIError(f"{uri}: {missing}")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as err:
        reason = err.message.splitlines()[0]
        found = _registered_version(uri)
        if found is None:
            raise CLIError(f"{uri}: not in the registry at {tracking_uri} ({reason}); `scriptorium models` lists "
                           "what is there") from None
        version, where = found
        raise CLIError(f"{uri}: version {version} is registered, but its files at {where} cannot be read ({reason}): "
                       "the MLflow artifact store was moved or deleted (after moving artifacts_dir: `scriptorium "
                       "relocate`)") from None
    mlmodel = yaml.safe_load((root / "MLmodel").read_text(encoding="utf-8"))
    artifacts = mlmodel["flavors"]["python_function"].get("artifacts", {})
    try:
        return tuple(root / artifacts[key]["path"] for key in ("weights", "model_config", "tokenizer"))
    except KeyError:
        raise CLIError(f"{uri} is not a Scriptorium model (its MLmodel has no weights/tokenizer artifacts)") from None


def _tokenizer_of_train_artifact(train_dir: Path) -> Path:
    """The tokenizer a train artifact was trained with: through the shard artifact its manifest names (or, for a run
    that has not finished, the inputs it wrote down when it started)."""
    from tasks.stage import load_artifact
    from tasks.train import UPSTREAM

    root = train_dir.parents[1]
    done = load_artifact(train_dir, "train")
    try:
        upstream = done.manifest.get("upstream") if done else json.loads((train_dir / UPSTREAM).read_text())
    except (OSError, ValueError):
        upstream = None
    shard_fp = (upstream or {}).get("shard")
    for shard in (root / "shard").glob("*/"):
        art = load_artifact(shard, "shard")
        if art is not None and art.fingerprint == shard_fp:
            tok_fp = art.manifest["upstream"].get("tokenizer")
            for tok in (root / "tokenizer").glob("*/"):
                candidate = load_artifact(tok, "tokenizer")
                if candidate is not None and candidate.fingerprint == tok_fp:
                    return candidate.path
    raise CLIError(f"{train_dir}: cannot find the tokenizer it was trained with under {root}; pass --tokenizer DIR")


def resolve_model(spec: str, tracking_uri: str, tokenizer: str | None = None) -> tuple[Path, Path, Path]:
    """(weights, model_config.json, tokenizer dir) for a registry URI or a directory."""
    if spec.startswith("models:/"):
        weights, config, tok = _registry_files(spec, tracking_uri)
        return weights, config, Path(tokenizer) if tokenizer else tok
    folder = Path(spec)
    if folder.suffix == ".gguf" and folder.is_file():
        raise CLIError(f"{spec}: a GGUF file runs in llama.cpp or Ollama (`ollama create -f` its Modelfile); --model "
                       "takes models:/NAME@ALIAS, models:/NAME/VERSION or a directory")
    if (folder / "config.json").is_file() and not (folder / "model_config.json").is_file():
        raise CLIError(f"{spec}: a Hugging Face export runs in transformers (AutoModelForCausalLM.from_pretrained"
                       f"('{folder}')); --model takes models:/NAME@ALIAS, models:/NAME/VERSION or a directory with "
                       "model.safetensors and model_config.json")
    weights, home = _checkpoint_weights(spec, folder)
    if not weights.is_file() or not (home / "model_config.json").is_file():
        raise CLIError(f"{spec}: no model.safetensors and model_config.json in {folder}")
    if tokenizer:
        tok = Path(tokenizer)
    elif (home / "tokenizer").is_dir():
        tok = home / "tokenizer"
    elif (home / "tokenizer.model").is_file() or (home / "vocab.json").is_file():
        tok = home
    elif (home / "manifest.json").is_file() or weights.parent != home:  # a train artifact, or one of its checkpoints
        tok = _tokenizer_of_train_artifact(home)
    else:
        raise CLIError(f"{spec}: no tokenizer beside the model; pass --tokenizer DIR")
    return weights, home / "model_config.json", tok


def _checkpoint_weights(spec: str, folder: Path) -> tuple[Path, Path]:
    """(weights, the folder holding model_config.json): the model's own, or, for a run that has not finished training
    (stopped, or still going), its newest checkpoint's, or those of the checkpoint `folder` names; the run wrote its
    model config when it started. A LoRA run's checkpoint holds unmerged adapters and is refused."""
    if (folder / "model.safetensors").is_file() and folder.parent.name == "checkpoints":
        home, weights = folder.parents[1], folder / "model.safetensors"
    elif not (folder / "model.safetensors").is_file() and (folder / "checkpoints" / "latest.json").is_file():
        try:
            newest = json.loads((folder / "checkpoints" / "latest.json").read_text())["path"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CLIError(f"{spec}: checkpoints/latest.json cannot be read: name a checkpoint, "
                           f"{folder / 'checkpoints'}/step-N") from None
        home, weights = folder, folder / "checkpoints" / str(newest) / "model.safetensors"
        print(f"{spec}: training has not finished: its newest checkpoint, {newest}", file=sys.stderr)
    else:
        return folder / "model.safetensors", folder
    if weights.is_file() and any("lora_" in key for key in _tensor_names(weights)):
        raise CLIError(f"{spec}: this checkpoint holds LoRA adapters beside the frozen weights (they are merged "
                       "when training finishes): finish the run, or generate from the model it started from")
    return weights, home


def _tensor_names(weights: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        return list(handle.keys())


def load(args: argparse.Namespace):
    from model import load_model
    from model.tokenizer import load_tokenizer

    weights, config, tok = resolve_model(args.model, args.tracking_uri, getattr(args, "tokenizer", None))
    return load_model(weights, config), load_tokenizer(tok), tok


# ------------------------------------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from flows.__main__ import run

    return run(args)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k or None,
            "top_p": args.top_p, "seed": args.seed}


def _prompts(args: argparse.Namespace) -> list[str]:
    if not args.prompts_file:
        return [args.prompt]
    try:
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise CLIError(f"--prompts-file {args.prompts_file}: not UTF-8 text (invalid byte at offset {err.start})") \
            from None
    except OSError as err:
        raise CLIError(f"--prompts-file {args.prompts_file}: {err.strerror.lower()}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise CLIError(f"--prompts-file {args.prompts_file}: no prompt in it (one per line)")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from model.generation import generate_text, stream_text

    prompts = [] if args.interactive else _prompts(args)  # a bad prompts file fails before the model loads
    model, tokenizer, _ = load(args)
    if args.interactive:
        return repl(model, tokenizer, _sampling(args), args.stream)
    if args.stream:
        for prompt in prompts:
            print(prompt, end="", flush=True)
            for piece in stream_text(model, tokenizer, prompt, **_sampling(args)):
                print(piece, end="", flush=True)
            print()
        return 0
    for text in generate_text(model, tokenizer, prompts, **_sampling(args), batched=len(prompts) > 1):
        print(text)
    return 0


def _number(name: str):
    """A parser for one sampling knob (argparse `type=` and the REPL): a number in the range model/knobs.py gives
    `name`; anything else raises ArgumentTypeError naming the range."""
    from model.knobs import RANGES, bounds, fits

    kind = RANGES[name][0]

    def parse(text: str):
        wrong = argparse.ArgumentTypeError(f"needs a number {bounds(name)}, not {text!r}")
        try:
            value = kind(text)
        except ValueError:
            raise wrong from None
        if not fits(name, value):
            raise wrong
        return value

    return parse


MAX_NEW_TOKENS = _number("max_new_tokens")
TEMPERATURE = _number("temperature")
TOP_K = _number("top_k")
TOP_P = _number("top_p")
SEED = _number("seed")
REPL_KNOBS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "/temp": ("temperature", TEMPERATURE), "/top_k": ("top_k", lambda v: TOP_K(v) or None), "/top_p": ("top_p", TOP_P),
    "/max": ("max_new_tokens", MAX_NEW_TOKENS), "/seed": ("seed", SEED),
}


def _repl_command(line: str, knobs: dict[str, Any]) -> str:
    """Apply a `/knob value` line; returns what to print."""
    name, _, value = line.partition(" ")
    if name in ("/help", "/?"):
        return "commands: " + ", ".join(f"{k} N" for k in REPL_KNOBS) + ", /show; Ctrl-D leaves"
    if name == "/show":
        return ", ".join(f"{k}={v}" for k, v in knobs.items())
    if name not in REPL_KNOBS:
        return f"unknown command {name}; /help lists them"
    key, parse = REPL_KNOBS[name]
    try:
        knobs[key] = parse(value.strip())
    except argparse.ArgumentTypeError as err:
        return f"{name} {err}"
    return f"{key} = {knobs[key]}"


def repl(model, tokenizer, knobs: dict[str, Any], stream: bool = True, read: Callable[[str], str] = input,
         write: Callable[[str], None] = lambda s: print(s, end="", flush=True)) -> int:
    """A completion REPL: each line is a prompt, continued; `/temp 0.5` and friends change sampling; Ctrl-C stops a
    completion, Ctrl-D (or Ctrl-C at the prompt) ends."""
    from model.generation import generate_text, stream_text

    try:
        import readline  # noqa: F401  (history and line editing for input())
    except ImportError:
        pass
    write("scriptorium: type a prompt; /help for commands; Ctrl-D to leave\n")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        if line.startswith("/"):
            write(_repl_command(line, knobs) + "\n")
        elif line.strip():
            write(line)
            try:
                pieces = stream_text(model, tokenizer, line, **knobs) if stream else \
                    [generate_text(model, tokenizer, [line], **knobs)[0][len(line):]]
                for piece in pieces:
                    write(piece)
            except KeyboardInterrupt:  # Ctrl-C stops this completion, as in Ollama and llama-cli, not the REPL
                write(" [stopped]")
            write("\n")


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    return out


def cmd_export(args: argparse.Namespace) -> int:
    from model.export import export_gguf, export_hf, quantize_gguf, write_modelfile

    out = _out_dir(args.out)
    model, _, tok = load(args)
    if args.format == "hf":
        print(export_hf(model, tok, out))
        return 0
    source = export_gguf(model, tok, out / f"model-{args.outtype}.gguf", args.outtype)
    print(source)
    if args.quant:
        quantized = quantize_gguf(source, out / f"model-{args.quant}.gguf", args.quant)
        write_modelfile(out, quantized.name, num_ctx=None if model.config.arch == "mamba2" else model.config.block_size)
        print(quantized)
        print(f"ollama create my-model -f {out / 'Modelfile'}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from model.attention_maps import AttentionMapError, write_attention_maps

    out = _out_dir(args.out)
    model, tokenizer, _ = load(args)
    try:
        paths = write_attention_maps(model, tokenizer, args.prompt, out)
    except AttentionMapError as err:
        raise CLIError(str(err)) from None
    tokens, block = 1 + len(tokenizer.encode([args.prompt])[0]), model.config.block_size  # <s> and the prompt
    print(f"{len(paths)} attention maps ({model.config.n_layer} layers x {model.config.n_head} heads) over "
          f"{min(tokens, block)} tokens in {args.out}")
    if tokens > block:
        print(f"the prompt is {tokens} tokens with <s>; the model's context is {block}, so only the first {block} "
              "are drawn", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tasks.lineage.registry import PARENT_TAG

    missing = _missing_store(args.tracking_uri)
    if missing:
        raise CLIError(missing)
    try:
        client = MlflowClient(args.tracking_uri)
        models = client.search_registered_models()
    except MlflowException as err:  # e.g. a URI scheme MLflow has no registry for
        raise CLIError(f"{args.tracking_uri}: {err.message.strip().splitlines()[0]}") from None
    if not models:
        print(f"no registered models in {args.tracking_uri}")
    for registered in models:
        aliases: dict[str, list[str]] = {}  # a version may hold several aliases (champion, and any set in the UI)
        for alias, version in sorted((registered.aliases or {}).items()):
            aliases.setdefault(str(version), []).append(alias)
        print(f"{registered.name}")
        for version in sorted(client.search_model_versions(f"name='{registered.name}'"), key=lambda v: int(v.version)):
            metrics = client.get_run(version.run_id).data.metrics
            shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("val_bpb", "val_loss") if k in metrics)
            alias = "".join(f" @{name}" for name in aliases.get(str(version.version), []))
            parent = version.tags.get(PARENT_TAG)  # "NAME/VERSION" it was trained from (init_from); "" for scratch
            print(f"  version {version.version}{alias}: {shown}  models:/{registered.name}/{version.version}"
                  f"{f'  (trained from models:/{parent})' if parent else ''}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from flows.prune import prune, report

    root = Path(args.artifacts_dir)
    if not root.is_dir():
        raise CLIError(f"{root}: no such artifacts directory (--artifacts-dir, or a preset's artifacts_dir)")
    result, records = prune(root, args.keep, dry_run=args.dry_run, wait=not args.no_wait)
    print("\n".join(report(root.resolve(), result, args.keep, records, args.dry_run)))
    return 0


def cmd_relocate(args: argparse.Namespace) -> int:
    import sqlite3

    from flows.relocate import STORE, files_uri, relocate

    root = Path(args.artifacts_dir)
    store = root.resolve() / STORE
    if not store.is_file():
        raise CLIError(f"{root}: no MLflow store ({STORE}) in it (--artifacts-dir, or a preset's artifacts_dir)")
    try:
        old, changed = relocate(root)
    except sqlite3.Error as err:  # e.g. "database is locked" by an MLflow server writing to it: nothing was changed
        raise CLIError(f"{store}: {err}; nothing was changed (stop what uses the store, e.g. `make ui`, and run it "
                       "again)") from None
    if old is None:
        print(f"{store.parent}: the store already keeps its files here; nothing to change")
        return 0
    rows = ", ".join(f"{n} {column}" for column, n in changed.items() if n)
    print(f"{store}: file locations moved from {old} to {files_uri(root)} ({rows})")
    return 0


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _prune_parser(sub) -> None:
    prune = sub.add_parser("prune", help="remove stage outputs that no recent registered version came from",
                           description="Remove finished stage directories under the artifacts directory, keeping "
                                       "the lineage of the newest registered runs, everything finished since, and "
                                       "unfinished stages; the MLflow store is never touched.")
    prune.add_argument("--artifacts-dir", default="artifacts", help="the pipeline's artifacts_dir (default: artifacts)")
    prune.add_argument("--keep", type=_count, default=3, help="how many of the newest registered runs to keep the "
                                                               "lineage of (default 3)")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    prune.add_argument("--no-wait", action="store_true", help="fail at once if a run holds the artifacts directory")
    prune.set_defaults(func=cmd_prune)
    relocate = sub.add_parser("relocate", help="point a moved artifacts directory's MLflow store at its files here",
                              description="After moving or copying the artifacts directory: rewrite the file "
                                          "locations its MLflow store records (one SQLite transaction).")
    relocate.add_argument("--artifacts-dir", default="artifacts", help="the moved artifacts_dir (default: artifacts)")
    relocate.set_defaults(func=cmd_relocate)


# ---------------------------------------------------------------------------------------------------------- parser
def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a directory (artifacts/train/<key>, or one "
                             "with model.safetensors, model_config.json and a tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer directory, when --model is a directory without one")
    parser.add_argument("--tracking-uri", default=_default_tracking_uri(),
                        help="MLflow tracking store (default: $MLFLOW_TRACKING_URI or artifacts/mlflow/mlflow.db)")


def _generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="continue prompts with a registered or trained model",
                         description="Continue prompts with a registered or trained model.")
    _model_options(gen)
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="Once upon a time", help="the text to continue")
    source.add_argument("--prompts-file", help="one prompt per line, generated together in one left-padded batch")
    gen.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=128, help="tokens to add at most (stops at </s>)")
    gen.add_argument("--temperature", type=TEMPERATURE, default=0.8, help="0 is greedy")
    gen.add_argument("--top-k", type=TOP_K, default=50, help="sample among the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=TOP_P, default=0.95, help="nucleus sampling: the smallest set with this mass")
    gen.add_argument("--seed", type=SEED, default=0, help="sampling seed (the same seed gives the same text)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are sampled")
    gen.add_argument("--interactive", action="store_true",
                     help="a REPL: each line is a prompt; /temp 0.5, /top_k 20, /top_p 0.9, /max 64, /seed 1; Ctrl-D")
    gen.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    from flows import __main__ as flows_main  # no Prefect import: `--server` must set PREFECT_API_URL first

    parser = argparse.ArgumentParser(prog="scriptorium", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the build-model flow", description="Run the build-model flow.")
    flows_main.add_arguments(run)  # the options of `python -m flows`, from the one place they are defined
    run.set_defaults(func=cmd_run)
    _generate_parser(sub)
    export = sub.add_parser("export", help="export a model to a transformers folder or GGUF",
                            description="Export a registered or trained model outside the flow.")
    _model_options(export)
    export.add_argument("--format", choices=("hf", "gguf"), required=True, help="hf: transformers; gguf: llama.cpp")
    export.add_argument("--outtype", choices=("f32", "f16"), default="f32", help="the unquantized GGUF's type")
    export.add_argument("--quant", choices=("q8_0", "q5_0", "q4_0", "q4_k_m"), help="also quantize the GGUF to this")
    export.add_argument("--out", required=True, help="output directory")
    export.set_defaults(func=cmd_export)
    attention = sub.add_parser("attention", help="draw a model's attention over a prompt, one PNG per layer and head",
                               description="Draw each head's attention probabilities over a prompt (gpt, llama).")
    _model_options(attention)
    attention.add_argument("--prompt", default="Once upon a time", help="the text whose attention is drawn")
    attention.add_argument("--out", required=True, help="output directory for layerLL_headHH.png")
    attention.set_defaults(func=cmd_attention)
    models = sub.add_parser("models", help="list registered models, versions, aliases and metrics",
                            description="List registered models, versions, aliases and their metrics.")
    models.add_argument("--tracking-uri", default=_default_tracking_uri(), help="MLflow tracking store")
    models.set_defaults(func=cmd_models)
    _prune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model.export import ExportError
    from tasks.stage import PipelineError  # e.g. the artifacts lock held by a run (prune, relocate with --no-wait)

    try:
        return args.func(args)
    except (CLIError, ConfigError, ExportError, PipelineError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except BrokenPipeError:  # `scriptorium generate --stream | head`: the reader has all it wanted; say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as Python's docs do: no error at exit
        return 1
    except OSError as err:  # a folder that cannot be made, a full disk: the path and the reason, not "[Errno 2] ..."
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C during a long generation or export: no traceback, the shell's status
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
