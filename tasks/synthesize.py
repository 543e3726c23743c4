"""Synthesize: write `cfg.n` short stories with a small instruct model, TinyStories-style, into `out_dir`.

    synthesize(cfg, out_dir, log) -> summary fields for the stage manifest

Story slot i (0 <= i < n) gets a prompt determined by (recipe, seed, i) (tasks/synthesis/recipes.py); a backend
(tasks/synthesis/llamacpp.py or ollama.py) writes it; the quality gates (tasks/synthesis/quality.py) accept it or name
why not. A rejected
slot is tried again with a new sampling seed derived from (seed, i, attempt), at most `max_attempts` times.

The non-obvious decision is that the output directory is a journal, not a result. Every story is appended to
`stories.jsonl` the moment it is judged (flush + fsync per line), and every rejection to `rejected.jsonl`, so a killed
run loses at most the stories being decoded at that instant. A re-run reads both files (cutting off a line torn by the
kill), keeps every accepted story, counts the attempts already spent, and generates only what is missing; a larger
`n` extends the set. Because the files mean something only for one way of generating, `synthesis.json` records the
run's identity (recipe contents, model, sampling, gates: everything but the knobs in `WORKDIR_IGNORES`), and a re-run
with a different identity in the same directory is refused rather than mixed in.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from pipeline_config.synthesize import SynthesizeConfig
from tasks.reporting.prefect_artifacts import Progress
from tasks.stage import Stage, describe_files, prefect_task, write_json
from tasks.synthesis.backend import Completion, StoryBackend, StoryRequest, SynthesizeError, open_backend
from tasks.synthesis.journal import Journal
from tasks.synthesis.llamacpp import default_gguf, gguf_model_name
from tasks.synthesis.tuning import resolve
from tasks.synthesis.quality import QualityGate
from tasks.synthesis.recipes import LoadedRecipe, StoryPrompt, check_languages, derive_seed, load_recipe, story_prompt

__all__ = ["synthesize", "SynthesizeError", "WORKDIR_IGNORES", "generation_identity", "STORIES", "REJECTED"]

STORIES = "stories.jsonl"
REJECTED = "rejected.jsonl"
IDENTITY = "synthesis.json"

# Knobs that change how fast stories are made, or how many, but not what any story is: a directory of stories stays
# valid when they change (the stage's `workdir_ignores`). Raising max_attempts retries the slots given up before.
WORKDIR_IGNORES = frozenset(
    {"n", "max_attempts", "parallel", "flash_attn", "host", "timeout_s", "retries", "retry_backoff_s", "n_ctx",
     "n_threads"}
)
_BACKEND_FIELDS = {"ollama": {"model"}, "llamacpp": {"model_path", "requantize", "cache_type_k"}}
PROGRESS_EVERY_S = 10.0


def _model_identity(cfg: SynthesizeConfig) -> dict[str, Any]:
    if cfg.backend == "ollama":
        return {"model": cfg.model}
    path = Path(cfg.model_path).expanduser() if cfg.model_path else default_gguf()
    if not path.is_file():
        raise SynthesizeError(f"GGUF model {path} does not exist: fix synthesize.model_path")
    return {"model": gguf_model_name(cfg), "model_bytes": path.stat().st_size}


def generation_identity(cfg: SynthesizeConfig, recipe: LoadedRecipe | None = None) -> dict[str, Any]:
    """What the stories in a directory depend on: the config minus `WORKDIR_IGNORES`, the recipe's bytes, the model.

    Also the right `external` for the stage's cache key: it notices an edited recipe file or a replaced GGUF.
    """
    recipe = recipe or load_recipe(cfg.recipe)
    other_backend = set().union(*(f for b, f in _BACKEND_FIELDS.items() if b != cfg.backend))
    return {
        "config": cfg.model_dump(mode="json", exclude=set(WORKDIR_IGNORES | other_backend)),
        "recipe": {"name": recipe.name, "sha256": recipe.sha256},
        **_model_identity(cfg),
    }


def _check_identity(out_dir: Path, identity: dict[str, Any], has_records: bool) -> None:
    path = out_dir / IDENTITY
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != identity:
            changed = _diff(previous, identity)
            raise SynthesizeError(
                f"{out_dir} holds stories generated differently ({', '.join(changed)} changed); they cannot be "
                "extended with these settings: use another output directory or delete this one"
            )
    elif has_records:
        raise SynthesizeError(f"{out_dir} holds stories but no {IDENTITY}; use another output directory")
    else:
        write_json(path, identity)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) for d in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# --- the stage ----------------------------------------------------------------------------------------------------


def synthesize(cfg: SynthesizeConfig, out_dir: Path, log: logging.Logger | None = None) -> dict:
    """Fill story slots 0..n-1 in `out_dir`, resuming what a previous run left; return the manifest's summary."""
    log = log or logging.getLogger("scriptorium.synthesize")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    journals = Journal(out_dir / STORIES, log), Journal(out_dir / REJECTED, log)
    journals[0].touch()
    if cfg.n == 0:
        return _summary(cfg, out_dir, journals[0].read(), journals[1].read(), backend=None, run={})

    recipe = load_recipe(cfg.recipe)
    check_languages(recipe, cfg.languages)
    stories, rejected = journals[0].read(), journals[1].read()
    _check_identity(out_dir, generation_identity(cfg, recipe), bool(stories or rejected))
    gate, accepted = _gate_with(cfg, stories, log)
    spent = Counter(record["index"] for record in rejected)
    todo = [i for i in range(cfg.n) if i not in accepted and spent[i] < cfg.max_attempts]
    given_up = sum(1 for i in range(cfg.n) if i not in accepted and spent[i] >= cfg.max_attempts)
    log.info(
        "synthesize: %d/%d stories on disk, %d slots given up earlier, %d to generate (%s, recipe %s, %s)",
        sum(1 for i in accepted if i < cfg.n), cfg.n, given_up, len(todo), cfg.backend, recipe.name,
        "/".join(cfg.languages),
    )
    run: dict[str, Any] = {"tokens": 0, "seconds": 0.0, "accepted": 0, "rejected": Counter()}
    if not todo:
        return _summary(cfg, out_dir, stories, rejected, backend=None, run=run)
    writer = _Writer(cfg, recipe, gate, journals, stories, rejected, run)
    backend = writer.write([(i, spent[i]) for i in todo], log)
    return _summary(cfg, out_dir, stories, rejected, backend=backend, run=run)


def _gate_with(cfg: SynthesizeConfig, stories: list[dict], log: logging.Logger) -> tuple[QualityGate, set[int]]:
    """The quality gate primed with the stories already on disk (for the duplicate check), and their indices."""
    gate = QualityGate(cfg.quality)
    accepted: set[int] = set()
    for record in stories:
        if record["index"] in accepted:
            log.warning("synthesize: %s lists story %d twice; keeping both lines", STORIES, record["index"])
        accepted.add(record["index"])
        gate.admit(record["text"])
    beyond = sorted(i for i in accepted if i >= cfg.n)
    if beyond:
        log.warning("synthesize: %s already holds %d stories beyond n=%d; they are kept on disk (not counted)",
                    STORIES, len(beyond), cfg.n)
    return gate, accepted


class _Writer:
    """One generation run: hands the backend requests, judges each completion and journals it, queues retries."""

    def __init__(self, cfg, recipe, gate, journals, stories, rejected, run):
        self.cfg, self.recipe, self.gate, self.run = cfg, recipe, gate, run
        self.journals, self.stories, self.rejected = journals, stories, rejected
        self.prompts: dict[int, StoryPrompt] = {}
        self.queue: deque[tuple[int, int]] = deque()

    def next_request(self) -> StoryRequest | None:
        if not self.queue:
            return None
        index, attempt = self.queue.popleft()
        if index not in self.prompts:
            self.prompts[index] = story_prompt(self.recipe, self.cfg.seed, index, self.cfg.languages)
        prompt = self.prompts[index]
        return StoryRequest(index=index, attempt=attempt, prompt=prompt.prompt, system=prompt.system,
                            seed=derive_seed("sample", self.cfg.seed, index, attempt))

    def write(self, slots: list[tuple[int, int]], log: logging.Logger) -> StoryBackend:
        self.queue.extend(slots)
        started = time.monotonic()
        # no more slots than stories to write: each llama.cpp slot holds n_ctx cells of KV cache, allocated up front
        cfg = resolve(self.cfg, len(slots))  # requantize/parallel auto: this machine's pick, or a small job's
        backend = open_backend(cfg.model_copy(update={"parallel": min(cfg.parallel, len(slots))}))
        log.info("synthesize: %s backend ready with %s in %.1f s", backend.name, backend.model,
                 time.monotonic() - started)
        done, last_log, started = 0, time.monotonic(), time.monotonic()
        progress = Progress("synthesize-progress", len(slots), "stories written")
        try:
            for completion in backend.generate(self.next_request):
                done += self._judge(completion, backend)
                progress.update(done, f"{self.run['accepted']} accepted, {sum(self.run['rejected'].values())} rejected")
                now = time.monotonic()
                if now - last_log >= PROGRESS_EVERY_S or done == len(slots):
                    last_log = now
                    _log_progress(log, self.run, done, len(slots), now - started)
        finally:
            self.run["seconds"] = time.monotonic() - started
            backend.close()
            for journal in self.journals:
                journal.close()
        return backend

    def _judge(self, completion: Completion, backend: StoryBackend) -> int:
        """Journal one completion as a story or a rejection; 1 when its slot is finished, 0 when it is retried."""
        prompt = self.prompts[completion.request.index]
        verdict = self.gate.judge(completion.text, prompt.language, prompt.words, truncated=completion.truncated)
        record = _record(completion, prompt, backend, verdict.text, verdict.n_words)
        self.run["tokens"] += completion.tokens
        index, attempt = completion.request.index, completion.request.attempt
        if verdict.accepted:
            self.gate.admit(verdict.text)
            self.journals[0].append(record)
            self.stories.append(record)
            self.run["accepted"] += 1
        else:
            record["reason"] = verdict.reason
            self.journals[1].append(record)
            self.rejected.append(record)
            self.run["rejected"][verdict.reason] += 1
        if not verdict.accepted and attempt + 1 < self.cfg.max_attempts:
            self.queue.appendleft((index, attempt + 1))  # the retry goes first, so slots finish roughly in order
            return 0
        del self.prompts[index]
        return 1


def _record(completion: Completion, prompt: StoryPrompt, backend: StoryBackend, text: str, n_words: int) -> dict:
    request = completion.request
    return {
        "index": request.index,
        "attempt": request.attempt,
        "text": text,
        "language": prompt.language,
        "recipe": prompt.recipe,
        "words": prompt.words,
        "features": prompt.features,
        "age": prompt.age,
        "prompt": prompt.prompt,
        "n_words": n_words,
        "tokens": completion.tokens,
        "truncated": completion.truncated,
        "backend": backend.name,
        "model": backend.model,
        "seed": request.seed,
    }


def _log_progress(log: logging.Logger, run: dict, done: int, total: int, elapsed: float) -> None:
    rate = run["tokens"] / elapsed if elapsed > 0 else 0.0
    eta = (total - done) * elapsed / done if done else float("nan")
    rejected = sum(run["rejected"].values())
    log.info(
        "synthesize: %d/%d slots done (%d accepted, %d rejected: %s), %.1f tokens/s, ETA %s",
        done, total, run["accepted"], rejected,
        ", ".join(f"{k} {v}" for k, v in run["rejected"].most_common()) or "none",
        rate, _duration(eta) if done else "unknown",
    )


def _summary(
    cfg: SynthesizeConfig, out_dir: Path, stories: list, rejected: list, backend: StoryBackend | None, run: dict
) -> dict:
    stories_path, rejected_path = out_dir / STORIES, out_dir / REJECTED
    indices = {r["index"] for r in stories}
    spent = Counter(r["index"] for r in rejected)
    attempts = len(stories) + len(rejected)
    seconds = run.get("seconds", 0.0)
    names = [STORIES] + ([REJECTED] if rejected_path.exists() else [])
    files = describe_files(out_dir, names, records={STORIES: len(stories), REJECTED: len(rejected)})
    return {
        "n_requested": cfg.n,
        "n_accepted": sum(1 for i in indices if i < cfg.n),  # what downstream reads: slots below n
        "n_given_up": sum(1 for i in range(cfg.n) if i not in indices and spent[i] >= cfg.max_attempts),
        "stories_on_disk": len(stories),  # more than n_accepted when an earlier run asked for a larger n
        "rejected": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "acceptance_rate": round(len(stories) / attempts, 4) if attempts else None,
        "languages": dict(sorted(Counter(r["language"] for r in stories).items())),
        "words": sum(r.get("n_words", 0) for r in stories),
        "backend": cfg.backend,
        "model": backend.model if backend else _model_identity(cfg)["model"] if cfg.n else None,
        "recipe": cfg.recipe,
        "run": {
            "accepted": run.get("accepted", 0),
            "rejected": dict(sorted(run.get("rejected", Counter()).items())),
            "seconds": round(seconds, 2),
        },
        "tokens_generated": run.get("tokens", 0),
        "tokens_per_s": round(run.get("tokens", 0) / seconds, 2) if seconds > 0 else 0.0,
        "stories_path": str(stories_path),
        "files": files,
    }


STAGE = Stage(
    name="synthesize",
    run=synthesize,
    workdir_ignores=WORKDIR_IGNORES,
    code_in_workdir=False,  # synthesis.json guards the directory; a code edit must not orphan generated stories
    external=generation_identity,
    retries=2,
    retry_delay_seconds=10,
)
synthesize_task = prefect_task(STAGE)
