"""One change at a time against the quality benchmark's configuration: a table of variant, steps, val_bpb.

    .venv/bin/python benchmarks/quality_sweep.py --minutes 10            # equal wall-clock (run it on an idle machine)
    .venv/bin/python benchmarks/quality_sweep.py --steps 300             # equal steps (fair under load)
    .venv/bin/python benchmarks/quality_sweep.py --ab 20 --no-train --only +relu2,-tie   # per-step cost only

The baseline is benchmarks/quality.py's defaults (the same flags are accepted here, so any configuration can be the
baseline); every variant flips or changes exactly one of them (`--only` picks some). `reference` is the nanoGPT-style
row (in-repo GPT, AdamW, fp32). With `--ab N` each variant's step time is also measured against the baseline's by
interleaving N steps of each in this one process (A, B, A, B, ...), so a machine that slows down or speeds up
mid-way moves both equally: the ratio is meaningful even under load, the absolute times are not.
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DEFAULT_DATA, add_options, prepare, run, train_config  # noqa: E402

from model import ModelConfig, build_model  # noqa: E402
from tasks.training.loop import TRAIN_STREAM, Windows  # noqa: E402
from tasks.training.muon import build_optimizer  # noqa: E402


def variants(base: argparse.Namespace) -> dict[str, dict]:
    """name -> the one flag it changes from `base`."""
    out: dict[str, dict] = {}
    for flag in ("muon", "qk_norm", "relu2", "tie", "scale_embeddings"):  # "+muon": switched on, "-tie": off
        on = not getattr(base, flag)
        out[("+" if on else "-") + flag] = {flag: on}
    out |= {
        "batch32": {"batch_size": base.batch_size * 2}, "batch8": {"batch_size": max(base.batch_size // 2, 1)},
        "lr_x2": {"lr": base.lr * 2}, "lr_half": {"lr": base.lr / 2},
        "muon_lr_x2": {"muon_lr": base.muon_lr * 2}, "muon_lr_half": {"muon_lr": base.muon_lr / 2},
        "block128": {"block_size": base.block_size // 2}, "block512": {"block_size": base.block_size * 2},
        "reference": {"reference": True},
    }
    if not base.muon:
        out.pop("muon_lr_x2"), out.pop("muon_lr_half")
    return out


def with_changes(base: argparse.Namespace, changes: dict) -> argparse.Namespace:
    args = copy.copy(base)
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def step_time_ratio(base_cfg, var_cfg, data, rounds: int) -> float:
    """Median step time of the variant over the baseline's, A and B interleaved in this process, per token."""
    train_tokens, _, vocab, _ = data
    setups = []
    for cfg in (base_cfg, var_cfg):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**cfg.model.model_dump(), vocab_size=vocab))
        setups.append((cfg, model, build_optimizer(model, cfg, "cpu"), Windows(train_tokens, cfg.model.block_size, 0)))
    times: list[list[float]] = [[], []]
    for step in range(rounds + 2):  # two warm-up rounds
        for i, (cfg, model, opt, windows) in enumerate(setups):
            x, y = windows.batch(cfg.batch_size, TRAIN_STREAM, step)
            started = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 2:
                times[i].append((time.perf_counter() - started) / (cfg.batch_size * cfg.model.block_size))
    return statistics.median(times[1]) / statistics.median(times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of every row")
    parser.add_argument("--steps", type=int, default=None, help="equal steps instead of equal time")
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--ab", type=int, default=0, help="also time N interleaved steps per variant (ratio)")
    parser.add_argument("--no-train", action="store_true", help="with --ab: the step-cost column only")
    parser.add_argument("--work", type=Path, default=None, help="keep the tokenizer and shards here (re-used)")
    add_options(parser)
    base = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    log = logging.getLogger("quality")
    work = base.work or Path(tempfile.mkdtemp(prefix="scriptorium-sweep-"))
    data = prepare(base.data, work, log)
    table = variants(base)
    chosen = ["baseline"] + [n for n in table if base.only is None or n in base.only.split(",")]
    limits = {"max_steps": base.steps, "eval_interval": 10**9} if base.steps else \
        {"max_steps": 10**9, "max_seconds": base.minutes * 60, "eval_interval": 10**9}
    budget = f"{base.steps} steps each" if base.steps else f"{base.minutes:g} min each"
    print(f"# baseline: {train_config(base, **limits).model_dump(exclude_defaults=True)}; {budget}", flush=True)
    print(f"{'variant':<18}{'steps':>8}{'val_bpb':>10}{'delta':>9}{'step cost':>11}", flush=True)
    first = None
    for name in chosen:
        args = with_changes(base, table.get(name, {}))
        cfg = train_config(args, **limits)
        cost = step_time_ratio(train_config(base, **limits), cfg, data, base.ab) if base.ab else None
        row = {"steps": 0, "val_bpb": float("nan")} if base.no_train else \
            run(cfg, data, Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work)), log)
        first = row["val_bpb"] if first is None else first
        cost_text = f"{cost:.2f}x" if cost else "-"
        print(f"{name:<18}{row['steps']:>8}{row['val_bpb']:>10.4f}{row['val_bpb'] - first:>+9.4f}{cost_text:>11}",
              flush=True)


if __name__ == "__main__":
    main()
