"""Benchmark: story generation tokens/s, single stream vs the batched llama.cpp backend, in one run.

    python benchmarks/synthesize.py [--stories 32] [--max-tokens 96] [--parallel 16] [--threads N] [--rounds 2]
                                    [--requantize q8_0|q4_0|f16|none] [--with-parallel-1]

All sides write the same stories (same recipe prompts, same sampling settings, same thread count):
- single stream: `Llama.create_chat_completion` on the GGUF as shipped, one story after another (what one would
  write without this backend; it too reuses the KV of the prompt prefix it shares with the previous story);
- with --with-parallel-1, `LlamaCppBackend` with one sequence (separates the gain of its weight conversion and
  prefix cache from the gain of batching);
- batched: `LlamaCppBackend` with `--parallel` stories decoded together, one `llama_decode` per step.
The machine is shared, so the sides alternate in rounds (a share of the stories each round) to see the same load.
Each round gives the batched side twice `parallel` stories or more, so that its slots mostly stay full (a real n is
much larger than `parallel`). The default run takes about 2 minutes on 2 cores.
The last line is `speedup: <batched tokens/s / single-stream tokens/s>`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline_config.synthesize import SynthesizeConfig  # noqa: E402
from tasks.story_backends import LlamaCppBackend, StoryRequest, default_threads  # noqa: E402
from tasks.story_recipes import derive_seed, load_recipe, story_prompt  # noqa: E402


def requests(cfg: SynthesizeConfig, indices: range) -> list[StoryRequest]:
    recipe = load_recipe(cfg.recipe)
    out = []
    for i in indices:
        p = story_prompt(recipe, cfg.seed, i, cfg.languages)
        out.append(StoryRequest(index=i, attempt=0, prompt=p.prompt, system=p.system,
                                seed=derive_seed("sample", cfg.seed, i, 0)))
    return out


def single_stream(llm, cfg: SynthesizeConfig, batch: list[StoryRequest]) -> int:
    tokens = 0
    for r in batch:
        messages = ([{"role": "system", "content": r.system}] if r.system else []) + [
            {"role": "user", "content": r.prompt}]
        reply = llm.create_chat_completion(
            messages=messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k, repeat_penalty=cfg.repeat_penalty, seed=r.seed,
        )
        tokens += reply["usage"]["completion_tokens"]
    return tokens


def with_backend(backend: LlamaCppBackend, batch: list[StoryRequest]) -> int:
    queue = list(batch)
    return sum(c.tokens for c in backend.generate(lambda: queue.pop(0) if queue else None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=32, help="stories per side")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--parallel", type=int, default=SynthesizeConfig().parallel)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the backend's default)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the sides")
    parser.add_argument("--requantize", default=SynthesizeConfig().requantize or "none",
                        help="the backend's weight conversion (q8_0, q4_0, f16, none)")
    parser.add_argument("--with-parallel-1", action="store_true", help="also time the backend at parallel=1")
    args = parser.parse_args()

    import llama_cpp

    threads = args.threads or default_threads()
    cfg = SynthesizeConfig(n=args.stories, max_tokens=args.max_tokens, parallel=args.parallel, n_threads=threads,
                           requantize=None if args.requantize == "none" else args.requantize)
    batched = LlamaCppBackend(cfg)
    one = LlamaCppBackend(cfg.model_copy(update={"parallel": 1})) if args.with_parallel_1 else None
    llm = llama_cpp.Llama(model_path=str(batched.model_path), n_ctx=cfg.n_ctx, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    print(f"{batched.model_path.name}, {threads} thread(s), {args.stories} stories of <= {args.max_tokens} tokens "
          f"per side, backend weights {cfg.requantize or 'as shipped'}, parallel {args.parallel}")

    sides = {"single-stream": lambda chunk: single_stream(llm, cfg, chunk),
             "backend parallel=1": (lambda chunk: with_backend(one, chunk)) if one else None,
             f"batched parallel={args.parallel}": lambda chunk: with_backend(batched, chunk)}
    sides = {name: run for name, run in sides.items() if run}
    # one untimed story each, so that no side pays first-call costs inside the measurement
    for run in sides.values():
        run(requests(cfg.model_copy(update={"max_tokens": 8}), range(10_000, 10_001)))

    work = requests(cfg, range(args.stories))
    per_round = -(-len(work) // args.rounds)
    totals = {name: [0, 0.0] for name in sides}
    for r in range(args.rounds):
        chunk = work[r * per_round:(r + 1) * per_round]
        for name, run in sides.items():
            if not chunk:
                continue
            started = time.perf_counter()
            tokens = run(chunk)
            seconds = time.perf_counter() - started
            totals[name][0] += tokens
            totals[name][1] += seconds
            print(f"round {r + 1} {name:20s} {tokens:5d} tokens in {seconds:6.1f} s = {tokens / seconds:6.1f} tokens/s")

    rates = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    for name, (tokens, seconds) in totals.items():
        print(f"{name}: {rates[name]:.1f} tokens/s ({tokens} tokens in {seconds:.1f} s)")
    llm.close()
    batched.close()
    if one:
        one.close()
    print(f"speedup: {rates[f'batched parallel={args.parallel}'] / rates['single-stream']:.2f}")


if __name__ == "__main__":
    main()
