"""What the protocol doubles share: an HTTP server on 127.0.0.1 for the length of a `with` block, and byte ranges."""
from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def closed_port() -> int:
    """A port on 127.0.0.1 that nobody listens on: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackServer:
    """`handler` served on 127.0.0.1 at a free port (`url`) by a daemon thread, from `__enter__` to `__exit__`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str = "loopback"):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def send_range(handler: BaseHTTPRequestHandler, body: bytes, cut_after: int | None = None) -> None:
    """Answer a GET for `body` as a file server (nginx, S3) does: `Range: bytes=N-` gets 206 and the rest from N,
    unless an `If-Range` names another version than this body's strong ETag: then 200 and the whole body.

    `cut_after`: send only that many bytes of a full (non-range) answer, then hang up mid-transfer.
    """
    etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
    current = handler.headers.get("If-Range", etag) == etag
    start = int(handler.headers["Range"].split("=")[1].split("-")[0]) if "Range" in handler.headers and current else 0
    handler.send_response(206 if start else 200)
    handler.send_header("ETag", etag)
    if start:
        handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
    handler.send_header("Content-Length", str(len(body) - start))
    handler.end_headers()
    if cut_after is not None and not start:
        handler.wfile.write(body[:cut_after])
        handler.wfile.flush()
        handler.connection.close()
        return
    handler.wfile.write(body[start:])
