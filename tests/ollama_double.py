"""A protocol double of an Ollama server, for tests.

No Ollama server can run on these machines (the client is installed, the server binary is not), so the Ollama backend
is tested against this loopback HTTP server instead. It speaks the parts of Ollama's REST API that the backend and
the `ollama` client use, with the documented shapes (ollama/docs/api.md): `POST /api/chat` and `POST /api/generate`,
both as one JSON object (`"stream": false`) or as a stream of NDJSON objects ending with `"done": true` and the
timing counters, `GET /api/tags` and `GET /api/version`, and errors as `{"error": "..."}` with the HTTP status
(404 for an unknown model). What it answers is scripted by the test: the reply text, a delay, failures to return
before succeeding. It records every request it receives.
"""
from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

from tests.loopback import LoopbackServer

Reply = Callable[[dict[str, Any]], str]


def quoted_words(text: str) -> list[str]:
    """The words a prompt asks for, in "double quotes" or « guillemets »."""
    return re.findall(r"[\"«]\s?([^\"«»]+?)\s?[\"»]", text)


def story_reply(request: dict[str, Any]) -> str:
    """A plausible story that uses the prompt's quoted words and differs with the request's seed."""
    prompt = request.get("prompt") or request["messages"][-1]["content"]
    seed = (request.get("options") or {}).get("seed", 0)
    names = ["Lily", "Tom", "Mia", "Ben", "Sam", "Zoe", "Max", "Ann", "Leo", "Eva", "Kim", "Ray"]
    places = ["park", "garden", "forest", "beach", "farm", "kitchen", "school", "river", "hill", "shop"]
    name, friend = names[seed % len(names)], names[(seed // 7 + 3) % len(names)]
    place, other = places[seed % len(places)], places[(seed // 3 + 5) % len(places)]
    used = " ".join(quoted_words(prompt))
    return (
        f"Story number {seed}. {name} went to the {place} with {friend} on day {seed % 97}. "
        f"They talked about {used}. {friend} found a {other} map near a tree number {seed % 89}. "
        f"They walked home and {name} was happy. The end."
    )


class OllamaDouble(LoopbackServer):
    """`with OllamaDouble() as server: Client(host=server.host)`; scripted by the attributes below."""

    def __init__(
        self,
        models: tuple[str, ...] = ("smollm2:135m",),
        reply: Reply = story_reply,
        delay_s: float = 0.0,
        failures: list[int] | None = None,
        fail_after: int | None = None,
    ):
        self.models = set(models)
        self.reply = reply
        self.delay_s = delay_s
        self.failures = list(failures or [])  # statuses to answer, one per request, before answering normally
        self.fail_after = fail_after  # answer 500 to every generation request after this many successes
        self.requests: list[dict[str, Any]] = []
        self.successes = 0
        self._lock = threading.Lock()
        super().__init__(self._handler(), name="ollama-double")
        self.host = self.url

    def generation_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] in ("/api/chat", "/api/generate")]

    def _outcome(self, body: dict[str, Any]) -> int | str:
        """An HTTP error status, or the reply text."""
        with self._lock:
            self.requests.append({"path": body.pop("_path"), **body})
            if self.failures:
                return self.failures.pop(0)
            if body.get("model") not in self.models:
                return 404
            if self.fail_after is not None and self.successes >= self.fail_after:
                return 500
            self.successes += 1
        return self.reply(body)

    def _handler(self):
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/api/tags":
                    now = datetime.now(timezone.utc).isoformat()
                    models = [
                        {"name": m, "model": m, "modified_at": now, "size": 1, "digest": "0" * 64,
                         "details": {"format": "gguf", "family": "llama"}}
                        for m in sorted(double.models)
                    ]
                    self._json(200, {"models": models})
                elif self.path == "/api/version":
                    self._json(200, {"version": "0.0.0-double"})
                else:
                    self._json(404, {"error": f"no route {self.path}"})

            def do_POST(self) -> None:
                if self.path not in ("/api/chat", "/api/generate"):
                    self._json(404, {"error": f"no route {self.path}"})
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                body["_path"] = self.path
                started = time.monotonic_ns()
                if double.delay_s:
                    time.sleep(double.delay_s)
                outcome = double._outcome(body)
                model = body.get("model")
                if outcome == 404:
                    self._json(404, {"error": f"model '{model}' not found, try pulling it first"})
                    return
                if isinstance(outcome, int):
                    self._json(outcome, {"error": "the double was told to fail this request"})
                    return
                words = outcome.split(" ")
                limit = (body.get("options") or {}).get("num_predict")
                done_reason = "stop"
                if limit is not None and 0 < limit < len(words):
                    words, done_reason = words[:limit], "length"
                text = " ".join(words)
                chat = self.path == "/api/chat"
                base = {"model": model, "created_at": datetime.now(timezone.utc).isoformat()}
                stats = {
                    "done": True,
                    "done_reason": done_reason,
                    "total_duration": time.monotonic_ns() - started,
                    "load_duration": 1000,
                    "prompt_eval_count": 10,
                    "prompt_eval_duration": 1000,
                    "eval_count": len(words),
                    "eval_duration": max(1, time.monotonic_ns() - started),
                }

                def piece(content: str) -> dict[str, Any]:
                    if chat:
                        return {"message": {"role": "assistant", "content": content}}
                    return {"response": content}

                if body.get("stream", True):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
                    for i, word in enumerate(words):
                        chunk = word if i == 0 else " " + word
                        self.wfile.write(json.dumps({**base, **piece(chunk), "done": False}).encode() + b"\n")
                        self.wfile.flush()
                    self.wfile.write(json.dumps({**base, **piece(""), **stats}).encode() + b"\n")
                else:
                    self._json(200, {**base, **piece(text), **stats})

        return Handler
