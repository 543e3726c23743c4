"""The MLflow UI as a person sees it, in a real browser: Debian's chromium, headless, driven through the DevTools
protocol, on a store that two tiny pipeline runs produced (two registered versions, one of them `champion`).

    .venv/bin/python benchmarks/mlflow_ui.py [--out artifacts/ui-screenshots] [--store DIR]

Screenshots (PNG, under --out, git-ignored by default): the experiment page (runs table, and its charts of the training
curves), the evaluation view of the logged tables, the compare view of the two versions' runs, a run's curves and
its fertility chart, the registered model page with the champion alias, and the champion version's page with its
model card. Each page is shot once the text it
must show has rendered; the script prints what it waited for. tests/test_mlflow_ui.py uses the same pieces and asserts
through the UI's own REST calls (`/ajax-api/2.0/mlflow/...`) and the rendered DOM.

Everything binds 127.0.0.1 (a free port each for the MLflow server and chromium's DevTools endpoint) and stops with
the script. Needs `chromium` on PATH (`make setup` installs it with apt when it is missing).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flows.local_api import end_process_group  # noqa: E402  (after the repository is on the path)

SAMPLE = REPO / "data" / "tinystories-sample" / "stories.jsonl"
STAGES = ("acquire", "tokenizer", "shard", "train", "evaluate", "export", "register")
MODEL_NAME = "scriptorium-ui"
# Quickstart shrunk to seconds; the second run trains longer, so the two versions differ and one takes the alias.
TINY = [
    "acquire.byte_budget=200000", "synthesize.n=0", "tokenizer.vocab_size=320", "train.model.n_layer=1",
    "train.model.n_embd=32", "train.model.n_head=2", "train.model.block_size=32", "train.batch_size=4",
    "train.warmup_steps=2", "train.eval_interval=4", "train.eval_batches=2", "train.checkpoint_interval=4",
    "train.track_emissions=false", "train.samples.max_new_tokens=24", "evaluate.max_batches=2",
    "evaluate.max_new_tokens=16", "evaluate.prompts=[once upon a time, the little dog]", "export.formats=[]",
    f"register.model_name={MODEL_NAME}", "register.experiment=scriptorium-ui", "report.track_energy=false",
]
RUN_STEPS = (8, 24)
# The MLflow Assistant panel opens itself on a browser's first visit and covers a third of every page: closed, as a
# person closes it once (its state lives in localStorage), before any page script runs.
CLOSED_ASSISTANT = """try {
  localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
  localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
} catch (e) {}"""


# ------------------------------------------------------------------------------------------------------- the store
def tiny_store(root: Path, log: logging.Logger | None = None) -> dict[str, Any]:
    """Two pipeline runs (every stage through `Stage.execute`, as the flow's tasks call it) into `root/artifacts`;
    returns what they registered: tracking URI, experiment, the runs, versions and the champion."""
    from pipeline_config import load_config

    log = log or logging.getLogger("mlflow_ui")
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:150]) + "\n", encoding="utf-8")
    registered = []
    for steps in RUN_STEPS:
        cfg = load_config("quickstart", [f"artifacts_dir={root / 'artifacts'}",
                                         f"acquire.sources={json.dumps([{'path': str(corpus)}])}",
                                         *TINY, f"train.max_steps={steps}"])
        made: dict[str, Any] = {"synthesize": None}
        for stage in STAGES:
            declared = importlib.import_module(f"tasks.{stage}").STAGE
            made[stage] = declared.execute(getattr(cfg, stage), {name: made[name] for name in declared.inputs},
                                           cfg.artifacts_dir, log, cfg.report)
        registered.append(made["register"].manifest)
    champion = next(r["version"] for r in reversed(registered) if r["champion"])
    return {"tracking_uri": registered[0]["tracking_uri"], "experiment_id": registered[0]["experiment_id"],
            "model_name": MODEL_NAME, "runs": [r["run_id"] for r in registered],
            "versions": [r["version"] for r in registered], "champion": champion,
            "artifacts": root / "artifacts" / "mlflow" / "artifacts"}


def free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]



def get_json(url: str, timeout: float = 30) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


# --------------------------------------------------------------------------------------------- the MLflow server
@contextlib.contextmanager
def mlflow_ui(store: dict[str, Any], log_file: Path) -> Iterator[str]:
    """`mlflow server` on a free 127.0.0.1 port against the store; yields its base URL once /health answers."""
    port = free_port()
    database = store["tracking_uri"]
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", database,
               "--default-artifact-root", Path(store["artifacts"]).as_uri()]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log_file, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {log_file.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        end_process_group(process)


def ajax(base: str, endpoint: str, **params: Any) -> Any:
    """What the UI's own pages call: `GET /ajax-api/2.0/mlflow/<endpoint>?...`."""
    return get_json(f"{base}/ajax-api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(params)}")


def artifact(base: str, run_id: str, path: str) -> bytes:
    """An artifact as the UI's artifact viewer fetches it."""
    query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
    with urllib.request.urlopen(f"{base}/get-artifact?{query}", timeout=30) as response:
        return response.read()


# ----------------------------------------------------------------------------------------------- the browser
class Browser:
    """Headless chromium on one page, spoken to over the DevTools protocol (a websocket, the `websockets` client)."""

    def __init__(self, width: int = 1600, height: int = 1000):
        self.width, self.height, self._id = width, height, 0
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            raise FileNotFoundError("chromium is not installed: `make setup` (or `apt-get install -y chromium`)")
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            self.socket = self._connect()
            self.send("Page.enable")
            self.send("Page.addScriptToEvaluateOnNewDocument", source=CLOSED_ASSISTANT)
        except BaseException:
            self.close()
            raise

    def _connect(self) -> Any:
        from websockets.sync.client import connect

        active, deadline = self.profile / "DevToolsActivePort", time.monotonic() + 60
        while not active.is_file() or not active.read_text().strip():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(active.read_text().split()[0])
        pages = [t for t in get_json(f"http://127.0.0.1:{port}/json/list") if t["type"] == "page"]
        return connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def open(self, url: str, *expected: str, timeout: float = 90) -> str:
        """Go to `url` and wait until the page's text shows every string of `expected`; returns the text."""
        self.send("Page.navigate", url=url)
        try:
            return self.wait_for(expected, timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{url}: {exc}") from None

    def wait_for(self, expected: tuple[str, ...], timeout: float = 90) -> str:
        deadline, text = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            text = self.text()
            if text and all(item in text for item in expected):
                time.sleep(1.0)  # charts and images finish drawing after their text
                return self.text()
            time.sleep(0.5)
        missing = [item for item in expected if item not in text]
        raise TimeoutError(f"the page did not show {missing} within {timeout:.0f} s; it showed: {text[:1500]!r}")

    def search(self, query: str, *expected: str) -> str:
        """Type `query` into the page's search box, as a person would, and wait for `expected`."""
        self.evaluate("(document.querySelector('input[placeholder*=\"Search\" i]') || {focus() {}}).focus()")
        self.send("Input.insertText", text=query)
        return self.wait_for(expected)

    def screenshot(self, path: Path, full_height: bool = False) -> Path:
        """The viewport, or with `full_height` a viewport as tall as the page's content (MLflow scrolls an inner
        panel, not the document, so the document's own height says nothing)."""
        height = self.height
        if full_height:
            bottom = "Math.max(...Array.from(document.querySelectorAll('body *'), e => e.getBoundingClientRect().bottom))"
            height = max(height, min(int(self.evaluate(bottom) or height) + 40, 6000))
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=height, deviceScaleFactor=1,
                  mobile=False)
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=full_height)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        self.send("Emulation.clearDeviceMetricsOverride")
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.socket.close()
        end_process_group(self.process)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------ pages
@dataclass(frozen=True)
class Page:
    """A page a person opens: where, the text it must show before it is shot, what to type in its search box."""

    name: str
    url: str
    expected: tuple[str, ...]
    search: str | None = None  # typed into the page's search box (the run page's "Search metric charts")
    ready: tuple[str, ...] = ()  # with `search`: the text to wait for before typing
    full_height: bool = False


def pages(base: str, store: dict[str, Any]) -> list[Page]:
    """The pages to compare two versions. MLflow 3's UI opens on its GenAI side unless told
    `workflowType=machine_learning` (what its sidebar's "Model training" switch sets)."""
    experiment, runs, name = store["experiment_id"], store["runs"], store["model_name"]
    ml = "workflowType=machine_learning"
    compare = urllib.parse.urlencode({"runs": json.dumps(runs), "experiments": json.dumps([experiment])})
    run = f"{base}/#/experiments/{experiment}/runs/{runs[-1]}"
    return [
        Page("experiment", f"{base}/#/experiments/{experiment}/runs?{ml}", (f"{name}-", "2 matching runs")),
        Page("experiment-charts", f"{base}/#/experiments/{experiment}/runs?{ml}&compareRunsMode=CHART",
             ("train/loss", "train/lr", "train/val_loss_estimate"), search="train/", ready=("Add chart",)),
        Page("evaluation-tables", f"{base}/#/experiments/{experiment}/runs?{ml}&compareRunsMode=ARTIFACT",
             ("Table:", "tables/checkpoint_samples.json")),
        Page("compare-versions", f"{base}/#/compare-runs?{compare}&{ml}", ("val_bpb", "stage/seconds/train"),
             full_height=True),
        Page("run-curves", f"{run}/model-metrics?{ml}", ("train/loss", "train/lr", "train/val_loss_estimate"),
             search="train/", ready=("Add chart",)),
        Page("run-fertility-chart", f"{run}/artifacts/plots/fertility.png?{ml}", ("fertility.png",)),
        Page("registered-model", f"{base}/#/models/{name}?{ml}", ("champion", f"Version {store['versions'][-1]}")),
        Page("model-card", f"{base}/#/models/{name}/versions/{store['champion']}?{ml}", ("Intended use", "Limitations"),
             full_height=True),
    ]


@dataclass(frozen=True)
class Shot:
    path: Path  # the screenshot
    text: str  # the page's rendered text
    images: tuple[tuple[int, int], ...]  # (width, height) of each image it loaded and decoded


LOADED_IMAGES = ("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
                 ".map(i => [i.naturalWidth, i.naturalHeight])")


def shoot(base: str, store: dict[str, Any], out: Path, browser: Browser) -> dict[str, Shot]:
    """Each page's screenshot, the text it rendered and the images it showed."""
    shots = {}
    for page in pages(base, store):
        text = browser.open(page.url, *(page.ready if page.search else page.expected))
        if page.search:
            text = browser.search(page.search, *page.expected)
        path = browser.screenshot(out / f"{page.name}.png", page.full_height)
        shots[page.name] = Shot(path, text, tuple(tuple(size) for size in browser.evaluate(LOADED_IMAGES) or ()))
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "ui-screenshots",
                        help="where the screenshots go (default: artifacts/ui-screenshots, git-ignored)")
    parser.add_argument("--store", type=Path, default=None, help="keep the two runs' artifacts here (default: a "
                        "temporary directory, removed at the end)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    root = args.store or Path(tempfile.mkdtemp(prefix="mlflow-ui-"))
    started = time.perf_counter()
    try:
        store = tiny_store(root)
        print(f"store: two runs {store['runs']}, versions {store['versions']}, champion {store['champion']} "
              f"({time.perf_counter() - started:.0f} s)")
        with mlflow_ui(store, root / "mlflow-server.log") as base, Browser() as browser:
            for name, shot in shoot(base, store, args.out, browser).items():
                print(f"{name:20s} {shot.path}  ({len(shot.text)} characters of text, {len(shot.images)} images)")
    finally:
        if args.store is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
