"""`python -m flows --server`'s local Prefect API: started once (detached, 127.0.0.1), found again while healthy, and
stopped by `flows.local_api stop`. A real Prefect server in a temporary PREFECT_HOME."""
from __future__ import annotations

import json
import os
import time

from flows import local_api


def test_the_local_api_starts_once_is_reused_and_stops(tmp_path):
    url = local_api.ensure_local_api(tmp_path)
    try:
        assert url and url.startswith("http://127.0.0.1:") and local_api.healthy(url)
        pid = json.loads((tmp_path / local_api.RECORD).read_text())["pid"]
        assert local_api.ensure_local_api(tmp_path) == url  # found, not started again
        assert json.loads((tmp_path / local_api.RECORD).read_text())["pid"] == pid
        assert (tmp_path / "prefect.db").exists()  # its database lives in the home it was given
    finally:
        assert local_api.stop(tmp_path)
    deadline = time.monotonic() + 30
    while local_api.healthy(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not local_api.healthy(url) and not (tmp_path / local_api.RECORD).exists()
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it: it is this test process's child
    except ChildProcessError:
        pass
