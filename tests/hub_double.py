"""A loopback stand-in for the Hugging Face hub's HTTP API: a protocol double, because this machine has no internet.

It speaks the two endpoints a dataset download uses, as huggingface.co answers them:
- `GET /api/datasets/{id}/tree/{revision}?recursive=true`: a JSON list of entries (`type`, `path`, `size`, `oid`, and
  `lfs: {oid: sha256, size}` for LFS files), paginated one entry per page with `Link: <...>; rel="next"`;
- `GET /datasets/{id}/resolve/{revision}/{path}`: the file itself for a small file; for an LFS file a 302 to a CDN
  address on the same server, which serves byte ranges (`Range` -> 206).
It records every request's path and whether it carried an Authorization header.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import urllib.parse

from tests.loopback import LoopbackServer, send_range


class HubDouble(LoopbackServer):
    def __init__(self, dataset: str, files: dict[str, bytes], lfs: set[str], revision: str = "main"):
        self.dataset, self.files, self.lfs, self.revision = dataset, files, lfs, revision
        self.corrupt: set[str] = set()  # files served with a flipped byte, to fail their checksum
        self.requests: list[tuple[str, bool]] = []  # (path, carried Authorization)
        super().__init__(self._handler(), name="hub-double")

    def served(self, path: str) -> bytes:
        body = self.files[path]
        return bytes([body[0] ^ 1]) + body[1:] if path in self.corrupt else body

    def _entry(self, path: str) -> dict:
        body = self.files[path]
        entry = {"type": "file", "path": path, "size": len(body),
                 "oid": hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()}
        if path in self.lfs:
            entry["lfs"] = {"oid": hashlib.sha256(body).hexdigest(), "size": len(body), "pointerSize": 134}
        return entry

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                url = urllib.parse.urlsplit(self.path)
                hub.requests.append((url.path, "Authorization" in self.headers))
                tree = f"/api/datasets/{hub.dataset}/tree/{hub.revision}"
                resolve = f"/datasets/{hub.dataset}/resolve/{hub.revision}/"
                if url.path == tree:
                    paths = ["README.md"] + sorted(hub.files)  # a folder-less repo with a card
                    cursor = int(dict(urllib.parse.parse_qsl(url.query)).get("cursor", 0))
                    page = [{"type": "file", "path": "README.md", "size": 5, "oid": "0" * 40} if p == "README.md"
                            else hub._entry(p) for p in paths[cursor:cursor + 1]]
                    headers = {}
                    if cursor + 1 < len(paths):
                        headers["Link"] = f'<{hub.url}{tree}?recursive=true&cursor={cursor + 1}>; rel="next"'
                    return self._send(200, json.dumps(page).encode(), headers)
                if url.path.startswith(resolve):
                    path = urllib.parse.unquote(url.path[len(resolve):])
                    if path not in hub.files:
                        return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"})
                    if path in hub.lfs:
                        return self._send(302, b"", {"Location": f"{hub.url}/cdn/{urllib.parse.quote(path)}"})
                    return send_range(self, hub.served(path))
                if url.path.startswith("/cdn/"):
                    return send_range(self, hub.served(urllib.parse.unquote(url.path[len("/cdn/"):])))
                self._send(404, json.dumps({"error": "Repository not found"}).encode(),
                           {"X-Error-Code": "RepoNotFound"})

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        return Handler
