"""Training throughput and MFU of each architecture, against this machine's own matmul peak.

    python benchmarks/train_throughput.py [--archs gpt,llama,mamba2] [--dtypes fp32,bf16] [--steps 10]
    python benchmarks/train_throughput.py --preset ys-71m [--batch-size 4]   a preset's own model (at its vocab size)

The reference is this machine's matmul peak: large square matmuls in the step's dtype, sampled right before
every timed step, so that MFU is relative to what this device sustains at that moment, not a datasheet
figure. (On a shared host both the peak and a step's time drift by tens of percent from one minute to the
next; a peak taken at another moment than the steps moves MFU by as much.) For each architecture and dtype it
times forward + backward + AdamW step on random tokens (bf16 through torch.autocast, and with glibc's heap
kept between steps, as training does it) and reports the median over the timed steps of

    MFU = step FLOPs / (step time * the peak sampled just before it),   step FLOPs = tokens * model.flops_per_token()

Uses CUDA when available, else the CPU. On a CPU shared with other work, `--threads 1` gives steadier
figures: two OpenMP threads on two busy cores wait on each other. The last line is
`mfu_bf16_llama: <fraction>` for scripts.
"""

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from model import ModelConfig, build_model  # noqa: E402
from tasks.training.allocator import kept_heap  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_OPERANDS: dict = {}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """FLOP/s of repeated n x n matmuls, best of a few timed batches (the least disturbed one) lasting about
    `seconds` in all; a single matmul where one already takes a third of that (bf16 without bf16 instructions)."""
    key = (device, dtype, n)
    if key not in _OPERANDS:  # made and warmed once per run: every step samples the peak again
        _OPERANDS[key] = a, b = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
        for _ in range(2):
            a @ b
    a, b = _OPERANDS[key]
    synchronize(device)
    # Size each batch from one timed matmul so a batch lasts about seconds / 3.
    t0 = time.perf_counter()
    a @ b
    synchronize(device)
    one = max(time.perf_counter() - t0, 1e-6)
    if one >= seconds / 3:
        return 2 * n**3 / one
    reps = max(1, int(seconds / 3 / one))
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def train_throughput(cfg: ModelConfig, dtype: str, batch_size: int, warmup: int, steps: int, device,
                     peak_size: int) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device.type)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    )

    def step():
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    synchronize(device)
    # Time steps one by one, each right after a sample of the matmul peak, and take medians: on a shared
    # machine one step that another process preempted should not move the figure, and each step is set
    # against the peak of its own moment (on CUDA the per-step synchronize costs microseconds).
    times, peaks = [], []
    for _ in range(steps):
        peaks.append(matmul_peak(device, DTYPES[dtype], peak_size, seconds=0.3))
        t0 = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens_per_s = batch_size * cfg.block_size / step_s
    step_flops = batch_size * cfg.block_size * model.flops_per_token()
    return {
        "params_m": model.num_params() / 1e6,
        "flops_per_token": model.flops_per_token(),
        "ms_per_step": 1e3 * step_s,
        "tokens_per_s": tokens_per_s,
        "flops": tokens_per_s * model.flops_per_token(),
        "peaks": peaks,
        "mfu": statistics.median(step_flops / (t * p) for t, p in zip(times, peaks)),
        "loss": loss.item(),
    }


def preset_models(preset: str) -> dict[str, ModelConfig]:
    """{preset name: the model its train stage builds}, at the preset's tokenizer.vocab_size (the most a word or
    SentencePiece vocabulary holds; a char vocabulary is taken as 96)."""
    from pipeline_config import load_config

    cfg = load_config(preset)
    vocab = 96 if cfg.tokenizer.chosen().kind == "char" else cfg.tokenizer.chosen().vocab_size
    return {cfg.name: ModelConfig(**cfg.train.model.model_dump(), vocab_size=vocab)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="gpt,llama,mamba2")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=10, help="timed steps per arch and dtype")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--matmul-size", type=int, default=None, help="side of the peak matmul (2048 CPU, 8192 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch's default if unset)")
    p.add_argument("--no-keep-heap", action="store_true", help="leave glibc's malloc thresholds at their defaults "
                   "(training raises them: train.keep_heap, tasks/training/allocator.py)")
    p.add_argument("--preset", default=None, help="time this preset's model (train.model at tokenizer.vocab_size) "
                   "instead of the --archs at the sizes above")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = preset_models(args.preset) if args.preset else None
    archs = list(models) if models else args.archs.split(",")
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: {d!r} is not one of {', '.join(DTYPES)}")
    n = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}   torch {torch.__version__}")

    if models:
        for label, c in models.items():
            print(f"model: {label}: {c.arch}, {c.n_layer} layers, d {c.n_embd}, context {c.block_size}, vocab "
                  f"{c.vocab_size}, batch {args.batch_size}; {args.warmup} warmup + {args.steps} timed steps")
    else:
        print(
            f"model: {args.n_layer} layers, d {args.n_embd}, {args.n_head} heads, context {args.block_size}, "
            f"vocab {args.vocab_size}, batch {args.batch_size}; {args.warmup} warmup + {args.steps} timed steps"
        )
    results = {}
    for arch in archs:
        cfg = models[arch] if models else ModelConfig(
            arch=arch,
            vocab_size=args.vocab_size,
            block_size=args.block_size,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
        )
        for d in dtypes:
            with kept_heap(not args.no_keep_heap) as kept:
                results[arch, d] = r = train_throughput(cfg, d, args.batch_size, args.warmup, args.steps, device,
                                                        peak_size=n)
            print(f"  measured {arch} {d}: {r['ms_per_step']:.1f} ms/step", flush=True)

    print(f"peak: {n}x{n} matmuls in the step's dtype, sampled before every timed step (median, min-max)")
    header = (
        f"{'arch':<8}{'dtype':<6}{'params(M)':>10}{'MFLOP/tok':>11}{'ms/step':>10}{'tokens/s':>11}"
        f"{'GFLOP/s':>10}{'peak GFLOP/s':>22}{'MFU':>8}"
    )
    print(header)
    print("-" * len(header))
    mfu = {}
    for (arch, d), r in results.items():
        mfu[arch, d] = r["mfu"]
        peaks = f"{statistics.median(r['peaks']) / 1e9:.1f} ({min(r['peaks']) / 1e9:.0f}-{max(r['peaks']) / 1e9:.0f})"
        print(
            f"{arch:<8}{d:<6}{r['params_m']:>10.2f}{r['flops_per_token'] / 1e6:>11.1f}{r['ms_per_step']:>10.1f}"
            f"{r['tokens_per_s']:>11.0f}{r['flops'] / 1e9:>10.1f}{peaks:>22}{mfu[arch, d]:>8.1%}"
        )
    print(f"heap kept between steps (as train.keep_heap does): {'yes' if kept else 'no'}")
    print(f"mfu_bf16_llama: {mfu.get(('llama', 'bf16'), math.nan):.4f}")

if __name__ == "__main__":
    main()
