"""Benchmark: story generation tokens/s, single stream vs the batched llama.cpp backend, in one run.

    python benchmarks/synthesize.py [--stories 3*parallel] [--single-stories 32] [--max-tokens 200] [--parallel auto]
                                    [--threads N] [--requantize auto|f32|f16|bf16|q8_0|q4_0|none]
                                    [--flash-attn auto|on|off] [--cache-type-k auto|f16|q8_0] [--with-parallel-1]
                                    [--single-flash-attn]

The sides write stories from the same recipe prompts with the same sampling settings and thread count:
- batched: `LlamaCppBackend` with `--parallel` stories decoded together, one `llama_decode` per step, over one job
  of `--stories` stories, as the synthesize stage runs it (slots refill as stories end; the drain at the end, when
  the last stories finish with nobody to take their slots, is counted);
- single stream: `Llama.create_chat_completion` on the GGUF as shipped, one story after another (what one would
  write without this backend; it too reuses the KV of the prompt prefix it shares with the previous story), on
  `--single-stories` of the same prompts, spread evenly over them (its rate does not depend on how many it writes);
  llama-cpp-python's defaults (flash attention off; --single-flash-attn turns it on there too, to check that the
  batched side's gain is not just that kernel);
- with --with-parallel-1, `LlamaCppBackend` with one sequence on those same prompts (separates the gain of its
  weight conversion and prefix cache from the gain of batching).
The machine is shared, so the sides take turns and see the same load: the batched job is a generator that stands
still between turns, and after each `parallel` stories it completes, the other sides catch up to the same share of
their own stories. Only time spent inside a side counts for it. The defaults are the stage's (recipe, sampling,
max_tokens, parallel, weights); the default run takes about 4 minutes on 2 cores.
With `auto` (the stage's default) the weight type, width, flash attention and key cells are this machine's pick
(tasks/synthesis/tuning.py: read from its cache, or measured first, which is printed). The first line names the CPU
and its SIMD flags, the second the features the llama.cpp build was compiled for.
The last line is `speedup: <batched tokens/s / single-stream tokens/s>` (the goal: 3 or more).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline_config.synthesize import SynthesizeConfig  # noqa: E402
from tasks.synthesis.backend import StoryRequest, default_threads  # noqa: E402
from tasks.synthesis.llamacpp import LlamaCppBackend  # noqa: E402
from tasks.synthesis.recipes import derive_seed, load_recipe, story_prompt  # noqa: E402
from tasks.synthesis.tuning import cpu_flags_line, has_auto, resolve  # noqa: E402


def requests(cfg: SynthesizeConfig, indices) -> list[StoryRequest]:
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


class Side:
    """A side's running totals: tokens, seconds spent inside it, stories done."""

    def __init__(self, name: str, run=None, work: list[StoryRequest] | None = None):
        self.name, self.run, self.work = name, run, work or []
        self.tokens, self.seconds, self.done = 0, 0.0, 0

    def catch_up(self, share: float) -> None:
        """Write this side's stories up to `share` (0..1) of its own list."""
        target = round(share * len(self.work))
        if target > self.done:
            started = time.perf_counter()
            self.tokens += self.run(self.work[self.done:target])
            self.seconds += time.perf_counter() - started
            self.done = target

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def line(self) -> str:
        return f"{self.name}: {self.rate:.1f} tokens/s ({self.tokens} tokens, {self.done} stories, {self.seconds:.1f} s)"


def main() -> None:
    defaults = SynthesizeConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=None, help="stories in the batched job (3 x parallel)")
    parser.add_argument("--single-stories", type=int, default=32, help="stories written one at a time")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--parallel", default=defaults.parallel, help="sequences per batch, or auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the backend's default)")
    parser.add_argument("--requantize", default=defaults.requantize or "none",
                        help="the backend's weight conversion (f32, f16, bf16, q8_0, q4_0, none)")
    parser.add_argument("--flash-attn", default="auto", choices=("auto", "on", "off"),
                        help="the backend's flash attention (auto: this machine's pick)")
    parser.add_argument("--cache-type-k", default="auto", choices=("auto", "f16", "q8_0"),
                        help="the backend's key cache cells (auto: this machine's pick)")
    parser.add_argument("--single-flash-attn", action="store_true", help="flash attention on in the single stream")
    parser.add_argument("--with-parallel-1", action="store_true", help="also time the backend at parallel=1")
    args = parser.parse_args()

    import llama_cpp

    print(cpu_flags_line(), flush=True)
    # what the llama.cpp build uses of them (a build for another CPU, e.g. LLAMA_CPP_LIB_PATH to an AVX2-only one)
    print("llama.cpp:", llama_cpp.llama_print_system_info().decode(errors="replace").strip(), flush=True)
    threads = args.threads or default_threads()
    cfg = SynthesizeConfig(n=args.stories or 192, max_tokens=args.max_tokens, n_threads=threads,
                           parallel=args.parallel if args.parallel == "auto" else int(args.parallel),
                           requantize=None if args.requantize == "none" else args.requantize,
                           flash_attn={"auto": "auto", "on": True, "off": False}[args.flash_attn],
                           cache_type_k=args.cache_type_k)
    if has_auto(cfg):
        started = time.perf_counter()
        cfg = resolve(cfg)
        print(f"auto: requantize {cfg.requantize}, parallel {cfg.parallel}, flash_attn {cfg.flash_attn}, "
              f"cache_type_k {cfg.cache_type_k} "
              f"({time.perf_counter() - started:.1f} s to read or measure the pick)", flush=True)
    args.parallel = cfg.parallel
    args.stories = args.stories or 3 * args.parallel
    cfg = cfg.model_copy(update={"n": args.stories})
    batched = LlamaCppBackend(cfg)
    one = LlamaCppBackend(cfg.model_copy(update={"parallel": 1})) if args.with_parallel_1 else None
    llm = llama_cpp.Llama(model_path=str(batched.model_path), n_ctx=cfg.n_ctx, n_threads=threads,
                          n_threads_batch=threads, verbose=False, **({"flash_attn": True} if args.single_flash_attn
                                                                     else {}))
    print(f"{batched.model_path.name}, {threads} thread(s), stories of <= {args.max_tokens} tokens, backend weights "
          f"{cfg.requantize or 'as shipped'}, key cells {cfg.cache_type_k}, flash attention "
          f"{'on' if cfg.flash_attn else 'off'} (single stream "
          f"{'on' if args.single_flash_attn else 'off'}): batched job of {args.stories} stories at parallel "
          f"{args.parallel}, {args.single_stories} of its prompts one at a time")

    # one untimed story each (a prompt outside the job's), so that no side pays first-call costs inside the measurement
    warm = requests(cfg, range(10_000, 10_001))
    single_stream(llm, cfg, warm)
    with_backend(batched, warm)
    if one:
        with_backend(one, warm)

    work = requests(cfg, range(args.stories))
    step = max(1, args.stories // max(1, args.single_stories))
    sample = work[::step][: args.single_stories]
    others = [Side("single-stream", lambda chunk: single_stream(llm, cfg, chunk), sample)]
    if one:
        others.append(Side("backend parallel=1", lambda chunk: with_backend(one, chunk), sample))
    job = Side(f"batched parallel={args.parallel}")

    queue = list(work)
    stories = batched.generate(lambda: queue.pop(0) if queue else None)
    checkpoint = args.parallel
    while True:
        started = time.perf_counter()
        completion = next(stories, None)
        job.seconds += time.perf_counter() - started
        if completion is not None:
            job.tokens += completion.tokens
            job.done += 1
        if completion is None:
            break
        if job.done >= checkpoint or job.done == args.stories:  # the other sides catch up to the same share
            checkpoint += args.parallel
            for side in others:
                side.catch_up(job.done / args.stories)
            print(" | ".join(f"{s.name} {s.done} stories {s.rate:6.1f} tok/s" for s in [job, *others]), flush=True)

    for side in [job, *others]:
        print(side.line())
    llm.close()
    batched.close()
    if one:
        one.close()
    print(f"speedup: {job.rate / others[0].rate:.2f}")


if __name__ == "__main__":
    main()
