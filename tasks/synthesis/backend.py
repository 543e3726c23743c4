"""What every story backend is: requests in, completions out, behind one interface that the config chooses.

`llamacpp` (tasks/synthesis/llamacpp.py, the offline default) embeds llama.cpp with a GGUF file; `ollama`
(tasks/synthesis/ollama.py) sends chat requests to an Ollama server. Both pull work through `next_request()` instead
of taking a list: the caller may queue a retry for a rejected story while generation is running, and a backend asks
again whenever a slot frees up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from tasks.stage import PipelineError

if TYPE_CHECKING:
    from pipeline_config.synthesize import SynthesizeConfig


class SynthesizeError(PipelineError):
    """A synthesis problem the user can fix; the message names the fix (the key, the file, the host)."""


@dataclass(frozen=True)
class StoryRequest:
    index: int
    attempt: int
    prompt: str
    system: str | None
    seed: int


@dataclass(frozen=True)
class Completion:
    request: StoryRequest
    text: str
    tokens: int  # tokens generated (the end-of-turn token not counted)
    truncated: bool  # stopped by max_tokens rather than by the model


NextRequest = Callable[[], "StoryRequest | None"]


class StoryBackend(Protocol):
    name: str
    model: str  # what wrote the stories, for the record: a GGUF file name or an Ollama model tag

    def generate(self, next_request: NextRequest) -> Iterator[Completion]:
        """Yield completions as they finish (in any order) until `next_request()` returns None and none is in flight."""
        ...

    def close(self) -> None: ...


def open_backend(cfg: "SynthesizeConfig") -> StoryBackend:
    if cfg.backend == "ollama":
        from tasks.synthesis.ollama import OllamaBackend

        return OllamaBackend(cfg)
    from tasks.synthesis.llamacpp import LlamaCppBackend

    return LlamaCppBackend(cfg)


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Every core: the stage runs alone in the pipeline. On a machine shared with other work set
    `synthesize.n_threads` lower: ggml's threads meet at a spinning barrier after every operation, so one descheduled
    thread stalls the others (a step can run many times slower than with one thread)."""
    return cpu_threads()
