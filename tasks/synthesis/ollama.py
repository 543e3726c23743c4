"""The Ollama story backend: chat requests to an Ollama server, `synthesize.parallel` of them in flight on threads,
retried with backoff on connection errors and 5xx; an unreachable host or a missing model is an error naming the fix.
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Iterator

from tasks.synthesis.backend import Completion, NextRequest, StoryRequest, SynthesizeError

if TYPE_CHECKING:
    from pipeline_config.synthesize import SynthesizeConfig


class OllamaBackend:
    name = "ollama"

    def __init__(self, cfg: "SynthesizeConfig"):
        import ollama

        self._ollama = ollama
        self.cfg = cfg
        self.model = cfg.model
        self.host = cfg.host
        # An explicit host: the client would otherwise read OLLAMA_HOST, and the config is the only source of knobs.
        self.client = ollama.Client(host=cfg.host, timeout=cfg.timeout_s)

    def options(self, request: StoryRequest) -> dict:
        cfg = self.cfg
        return {
            "seed": request.seed,
            "num_predict": cfg.max_tokens,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
            "repeat_penalty": cfg.repeat_penalty,
            "repeat_last_n": cfg.repeat_last_n,
        }

    def _unreachable(self, err: Exception) -> SynthesizeError:
        return SynthesizeError(
            f"cannot reach Ollama at {self.host} ({err.__class__.__name__}: {err}): start the server with "
            f"`ollama serve` (it listens where OLLAMA_HOST says, 127.0.0.1:11434 by default) or set synthesize.host "
            f"to where it runs"
        )

    def complete(self, request: StoryRequest) -> Completion:
        """One chat request, retried with exponential backoff on connection errors and HTTP 5xx."""
        import httpx

        cfg, ollama = self.cfg, self._ollama
        messages = ([{"role": "system", "content": request.system}] if request.system else []) + [
            {"role": "user", "content": request.prompt}
        ]
        for attempt in range(cfg.retries + 1):
            last = attempt == cfg.retries
            try:
                reply = self.client.chat(
                    model=cfg.model, messages=messages, options=self.options(request), stream=False
                )
            except ollama.ResponseError as err:
                if err.status_code == 404:
                    raise SynthesizeError(
                        f"Ollama at {self.host} has no model {cfg.model!r} ({err.error}): run `ollama pull "
                        f"{cfg.model}` or set synthesize.model to a model it has"
                    ) from None
                if err.status_code >= 500 and not last:
                    time.sleep(cfg.retry_backoff_s * 2**attempt)
                    continue
                raise SynthesizeError(
                    f"Ollama at {self.host} answered HTTP {err.status_code} for story {request.index}: {err.error}"
                    + (f" (after {cfg.retries} retries; raise synthesize.retries?)" if err.status_code >= 500 else "")
                ) from None
            except httpx.TimeoutException as err:
                if isinstance(err, httpx.ConnectTimeout) and not last:
                    time.sleep(cfg.retry_backoff_s * 2**attempt)
                    continue
                raise SynthesizeError(
                    f"Ollama at {self.host} did not answer story {request.index} within {cfg.timeout_s:g} s: raise "
                    f"synthesize.timeout_s, or lower synthesize.max_tokens or synthesize.parallel"
                ) from None
            except (ConnectionError, httpx.TransportError) as err:
                if not last:
                    time.sleep(cfg.retry_backoff_s * 2**attempt)
                    continue
                raise self._unreachable(err) from None
            text = reply.message.content or ""
            return Completion(
                request=request,
                text=text,
                tokens=int(reply.eval_count or 0),
                truncated=reply.done_reason == "length",
            )
        raise AssertionError("unreachable")

    def generate(self, next_request: NextRequest) -> Iterator[Completion]:
        pool = ThreadPoolExecutor(max_workers=self.cfg.parallel, thread_name_prefix="ollama")
        in_flight: set[Future] = set()
        failure: BaseException | None = None
        try:
            while in_flight or failure is None:
                while failure is None and len(in_flight) < self.cfg.parallel:
                    request = next_request()
                    if request is None:
                        break
                    in_flight.add(pool.submit(self.complete, request))
                if not in_flight:
                    return
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.exception() is None:
                        yield future.result()
                    elif failure is None:
                        # stop asking for work, but let the requests already out finish (each ends by its
                        # timeout) so that no story the server has written is thrown away
                        failure = future.exception()
            raise failure
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.client.close()
