"""Faults a careful user meets: concurrent runs, hostile or corrupt files, kills at any point, hostile servers.

One test per hole (issue 14), each failing on the code before the fix. Concurrency uses two real processes and the
OS lock; kills are real SIGKILLs. Prefect runs under its own test harness (the `prefect_api` fixture), on a flow of
two real stages (acquire and a character tokenizer), which is all a cache record needs.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.stage import MANIFEST, RESULTS_DIR

REPO = Path(__file__).resolve().parent.parent
LOG = logging.getLogger("test")


# ------------------------------------------------------------------------------------------------ Prefect records
def _mini_overrides(artifacts: Path, corpus: Path) -> list[str]:
    return [f"artifacts_dir={artifacts}", f"acquire.sources={json.dumps([{'path': str(corpus)}])}",
            "acquire.byte_budget=20000", "synthesize.n=0", "tokenizer.kind=char"]


def _mini_flow():
    from prefect import flow

    from pipeline_config import load_config
    from tasks.acquire import acquire_task
    from tasks.stage import StageRunner
    from tasks.tokenizer import tokenizer_task

    @flow(name="faults-mini")
    def mini(overrides: list[str]) -> dict:
        cfg = load_config("quickstart", overrides)
        run = StageRunner(cfg.artifacts_dir)
        documents = run(acquire_task, cfg.acquire)
        vocabulary = run(tokenizer_task, cfg.tokenizer, acquire=documents, synthesize=None)
        return {"states": dict(run.states), "tokenizer": str(vocabulary.path)}

    return mini


def _plain_json_record(path: Path) -> bool:
    """Whether a Prefect record is JSON whose payload no pickle library reads."""
    record = json.loads(path.read_bytes())
    return record["metadata"]["serializer"]["type"] not in ("pickle", "compressed/pickle") and \
        isinstance(record["result"], str) and isinstance(json.loads(record["result"]), dict)


class _Payload:
    """Unpickling this creates a directory: the proof that a record was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_cache_records_are_json_and_a_pickled_record_is_deleted_unread(prefect_api, tmp_path, small_corpus):
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    flow = _mini_flow()
    overrides = _mini_overrides(tmp_path / "artifacts", small_corpus)
    assert flow(overrides)["states"] == {"acquire": "Completed", "tokenizer": "Completed"}
    records = sorted((tmp_path / "artifacts" / RESULTS_DIR).iterdir())
    assert len(records) == 2 and all(_plain_json_record(r) for r in records)
    assert all(str(tmp_path) not in json.loads(r.read_bytes())["result"] for r in records)  # no absolute path

    marker = tmp_path / "pwned"
    hostile = ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer(picklelib="pickle")),
                           result=_Payload(marker))
    for record in records:
        record.write_bytes(hostile.serialize())
    again = flow(overrides)
    assert not marker.exists()
    assert again["states"] == {"acquire": "Completed", "tokenizer": "Completed"}  # ran again instead
    assert all(_plain_json_record(r) for r in (tmp_path / "artifacts" / RESULTS_DIR).iterdir())


def test_a_moved_artifacts_directory_keeps_its_cache(prefect_api, tmp_path, small_corpus):
    flow = _mini_flow()
    flow(_mini_overrides(tmp_path / "before", small_corpus))
    (tmp_path / "before").rename(tmp_path / "after")
    moved = flow(_mini_overrides(tmp_path / "after", small_corpus))
    assert moved["states"] == {"acquire": "Cached", "tokenizer": "Cached"}
    assert moved["tokenizer"].startswith(str(tmp_path / "after"))
    assert (Path(moved["tokenizer"]) / MANIFEST).is_file()


# ------------------------------------------------------------------------------------------------- corrupt files
class Captured(logging.Handler):
    """The messages a logger emitted (Prefect's logging setup keeps pytest's caplog from seeing some loggers)."""

    def __init__(self, name: str):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.logger = logging.getLogger(name)
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def test_a_torn_manifest_makes_the_stage_run_again_and_says_which_file(tmp_path, small_corpus):
    from pipeline_config.schema import AcquireConfig, SourceConfig
    from tasks.acquire import STAGE

    cfg = AcquireConfig(sources=[SourceConfig(path=str(small_corpus))], byte_budget=20000)
    first = STAGE.execute(cfg, {}, tmp_path, LOG)
    manifest = first.path / MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:40])  # what a dying disk or a bad copy leaves
    captured = Captured("faults.manifest")
    again = STAGE.execute(cfg, {}, tmp_path, captured.logger)
    assert again.fingerprint == first.fingerprint  # rebuilt to the same content
    assert str(manifest) in captured.text and "runs again" in captured.text


# ----------------------------------------------------------------------------------------------------- downloads
def _server(respond):
    """A loopback HTTP server (no internet here) whose GET handler is `respond(handler)`; it records the paths and
    Authorization headers it was asked for in `requests`."""
    import http.server

    from tests.loopback import LoopbackServer

    requests: list[tuple[str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            requests.append((self.path, self.headers.get("Authorization")))
            respond(self)

        def log_message(self, *args) -> None:
            pass

    server = LoopbackServer(Handler, name="faults-double")
    server.requests = requests
    return server


def _status(code: int, body: bytes = b"") -> callable:
    def respond(handler) -> None:
        handler.send_response(code)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


BODY = b"".join(json.dumps({"text": f"story {i}"}).encode() + b"\n" for i in range(500))


def _refused(respond, match: str, dest: Path, sha256: str | None = None) -> Exception:
    """The AcquireError a download from a server answering with `respond` raises; nothing reaches `dest`."""
    from tasks.corpus.download import AcquireError, download

    with _server(respond) as server:
        with pytest.raises(AcquireError, match=match) as err:
            download(f"{server.url}/data.jsonl", dest, sha256, LOG, timeout=5)
    assert not dest.exists()
    return err.value


def test_a_body_that_just_stops_without_a_length_is_refused_not_cached(tmp_path):
    def close_delimited(handler) -> None:  # HTTP/1.0 style: the body ends when the server hangs up
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(BODY[:3000])
        handler.close_connection = True

    _refused(close_delimited, "without a length.*sha256", tmp_path / "data.jsonl")


def test_a_broken_chunked_transfer_is_a_transient_acquire_error(tmp_path):
    def broken_chunks(handler) -> None:
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.write(b"%x\r\n%s\r\n" % (1000, BODY[:1000]) + b"%x\r\n" % 5000 + BODY[1000:2000])
        handler.close_connection = True  # hangs up inside the second chunk

    assert _refused(broken_chunks, "IncompleteRead", tmp_path / "data.jsonl").transient


def test_only_5xx_429_408_dropped_connections_and_timeouts_are_retryable(tmp_path):
    """429 (the hub's rate limit) and 408 say "later", as a 5xx does; they were failures for good."""
    from tasks.stage import retryable

    outcomes = {code: retryable(_refused(_status(code), f"HTTP {code}", tmp_path / f"{code}.jsonl"))
                for code in (404, 403, 408, 429, 500, 503)}
    outcomes["checksum"] = retryable(_refused(_status(200, BODY), "checksum mismatch", tmp_path / "x.jsonl", "0" * 64))
    assert outcomes == {404: False, 403: False, 408: True, 429: True, 500: True, 503: True, "checksum": False}
    from pipeline_config.schema import AcquireConfig, SourceConfig
    from tasks.acquire import acquire
    from tasks.corpus.download import AcquireError

    for code in (429, 404):  # the hub's tree listing, before any file
        with _server(_status(code)) as server, pytest.raises(AcquireError, match=f"HTTP {code}") as err:
            hub = SourceConfig(kind="hf", dataset="org/tiny", endpoint=server.url)
            acquire(AcquireConfig(sources=[hub]), tmp_path / "hub", LOG)
        assert retryable(err.value) is (code == 429)
    assert retryable(ConnectionResetError()) and retryable(TimeoutError()) and not retryable(KeyError("bug"))


def test_a_rate_limited_download_waits_as_long_as_the_server_asks_then_goes_on(tmp_path, caplog):
    """A 429 or 503 with `Retry-After: N` (the hub's rate limit says how long) is waited out in place when N is a
    minute or less: the stage's own retries come after 5 and 10 s, too soon for such a server. A longer wait is
    not sat through: the error is transient, for the stage's retries and a later run."""
    from tasks.corpus.download import AcquireError, download

    answers = iter([(429, "1"), (503, "0"), (200, None)])

    def limited(handler) -> None:
        code, wait = next(answers)
        body = BODY if code == 200 else b""
        handler.send_response(code)
        if wait is not None:
            handler.send_header("Retry-After", wait)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    caplog.set_level(logging.INFO)
    with _server(limited) as server:
        download(f"{server.url}/data.jsonl", tmp_path / "data.jsonl", None, LOG, timeout=5)
    assert (tmp_path / "data.jsonl").read_bytes() == BODY and len(server.requests) == 3
    assert any("HTTP 429" in r.getMessage() and "asks to wait 1 s" in r.getMessage() for r in caplog.records)

    def for_an_hour(handler) -> None:
        handler.send_response(429)
        handler.send_header("Retry-After", "3600")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with _server(for_an_hour) as server, pytest.raises(AcquireError, match="HTTP 429") as err:
        download(f"{server.url}/data.jsonl", tmp_path / "late.jsonl", None, LOG, timeout=5)
    assert err.value.transient and len(server.requests) == 1

    import email.message
    import email.utils
    import urllib.error

    from tasks.corpus.download import retry_after

    def asked(code: int, value: str) -> float | None:
        headers = email.message.Message()
        headers["Retry-After"] = value
        return retry_after(urllib.error.HTTPError("http://x", code, "", headers, None))

    assert 25 < asked(503, email.utils.formatdate(time.time() + 30, usegmt=True)) <= 30  # the HTTP-date form
    assert asked(429, "soon") is None and asked(500, "5") is None  # unreadable, or not a status that asks to wait


def test_only_http_and_https_are_downloaded_redirects_included(tmp_path):
    from tasks.corpus.download import AcquireError, download

    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(BODY)
    with pytest.raises(AcquireError, match="only http"):
        download(secret.as_uri(), tmp_path / "copy.jsonl", None, LOG, timeout=5)

    def to_ftp(handler) -> None:
        handler.send_response(302)
        handler.send_header("Location", "ftp://127.0.0.1/secret.jsonl")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    _refused(to_ftp, "only http and https", tmp_path / "copy.jsonl")


def test_credentials_in_a_url_are_sent_but_never_recorded(tmp_path):
    from pipeline_config.schema import AcquireConfig, SourceConfig
    from tasks.acquire import STAGE, AcquireError

    def needs_login(handler) -> None:
        ok = handler.headers.get("Authorization") == "Basic dXNlcjpzM2NyZXQ="  # user:s3cret
        _status(200 if ok and handler.path.startswith("/data.jsonl") else 404, BODY if ok else b"")(handler)

    with _server(needs_login) as server:
        url = server.url.replace("http://", "http://user:s3cret@")
        cfg = AcquireConfig(sources=[SourceConfig(kind="http", url=f"{url}/data.jsonl?token=t0ps3cret")])
        artifact = STAGE.execute(cfg, {}, tmp_path, LOG)
        with pytest.raises(AcquireError) as err:
            STAGE.execute(AcquireConfig(sources=[SourceConfig(kind="http", url=f"{url}/gone.jsonl")]), {}, tmp_path,
                          LOG)
    manifest = (artifact.path / MANIFEST).read_text()
    assert artifact.manifest["documents"] == 500 and server.requests[0][1].startswith("Basic ")
    assert "s3cret" not in manifest and "t0ps3cret" not in manifest and "***@" in manifest
    assert "HTTP 404" in str(err.value) and "s3cret" not in str(err.value)


def test_a_hostile_hub_cannot_write_outside_the_download_folder(tmp_path):
    """Against HubDouble (the hub's HTTP API on loopback; no internet here), listing `../` and absolute names."""
    from pipeline_config.schema import AcquireConfig, SourceConfig
    from tasks.acquire import AcquireError, acquire
    from tests.hub_double import HubDouble

    out = tmp_path / "artifacts" / "acquire" / "key"
    out.mkdir(parents=True)
    climb = "../" * 9 + "escape_train.jsonl"  # out/downloads/hf/org/tiny/main is 9 levels below tmp_path
    absolute = str(tmp_path / "absolute_train.jsonl")
    for hostile in (climb, absolute, "data/../../../../x_train.jsonl"):
        with HubDouble("org/tiny", {hostile: BODY, "data/ok_train.jsonl": BODY}, lfs=set()) as hub:
            source = SourceConfig(kind="hf", dataset="org/tiny", endpoint=hub.url)
            with pytest.raises(AcquireError, match="refusing the file name"):
                acquire(AcquireConfig(sources=[source]), out, LOG)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []  # not outside, and not even the well-named file: the listing is refused as a whole


# -------------------------------------------------------------------------------------------- concurrent runs
HOLD = textwrap.dedent("""
    import sys, time
    from tasks.stage import hold_artifacts
    with hold_artifacts(sys.argv[1], wait=sys.argv[2] == "wait"):
        print("held", time.time(), flush=True)
        time.sleep(float(sys.argv[3]))
        print("released", time.time(), flush=True)
""")


def _holder(root: Path, seconds: float, wait: bool = True) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(root), "wait" if wait else "no", str(seconds)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_run_waits_for_the_first_to_release_the_artifacts_directory(tmp_path):
    first = _holder(tmp_path, 2.0)
    held_at = float(first.stdout.readline().split()[1])
    second = _holder(tmp_path, 0.0)
    second_out, _ = second.communicate(timeout=60)
    first_out, _ = first.communicate(timeout=60)
    released_at = float(first_out.split()[1])
    second_held_at = float(second_out.split()[1])
    assert held_at < released_at <= second_held_at


def test_the_lock_keeps_a_dead_holders_name_until_a_flow_run_takes_it_up(tmp_path):
    """What a holder that died holding the lock wrote there (its flow run) is handed to the next flow run once
    (flows/killed_runs.py records that run Crashed). A holder that lets go without a flow run taking it up (a stage
    run on its own, a run refused before its flow started) writes it back rather than emptying the file."""
    from tasks.stage import hold_artifacts, lock_holder, note_holder

    dead = {"pid": 1, "host": "gone", "started": "then", "flow_run": "a-run-id", "flow_run_name": "silent-otter"}
    (tmp_path / ".lock").write_text(json.dumps(dead))
    with hold_artifacts(tmp_path):
        assert "silent-otter" not in lock_holder(tmp_path)  # now this process holds it
    assert json.loads((tmp_path / ".lock").read_text()) == dead  # not taken up: kept for the next one
    with hold_artifacts(tmp_path):
        assert note_holder(tmp_path, flow_run="mine", flow_run_name="brave-heron") == dead
        assert lock_holder(tmp_path).endswith("(Prefect flow run 'brave-heron')")
        assert note_holder(tmp_path, flow_run="mine") is None  # handed over once
    assert (tmp_path / ".lock").read_text() == ""  # let go of in order


def test_no_wait_fails_at_once_naming_the_holder_and_a_sigkilled_holder_frees_the_lock(tmp_path, small_corpus):
    import socket

    root = tmp_path / "artifacts"
    holder = _holder(root, 120.0)
    assert holder.stdout.readline().startswith("held")
    command = [sys.executable, "-m", "flows", "--no-wait", *[x for o in _mini_overrides(root, small_corpus)
                                                             for x in ("--set", o)]]
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert f"pid {holder.pid} on {socket.gethostname()}, started " in refused.stderr
    assert "Traceback" not in refused.stderr and sorted(p.name for p in root.iterdir()) == [".lock"]
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    after = _holder(root, 0.0, wait=False)  # the OS dropped the dead holder's lock: no stale lock to clean up
    assert after.communicate(timeout=60)[0].startswith("held") and after.returncode == 0


def test_an_artifacts_dir_that_cannot_be_made_is_one_line_before_any_stage(tmp_path, capsys):
    """A file where the artifacts folder should be, or below it: one line naming the folder, status 1, and the
    file untouched (it used to be a FileExistsError traceback)."""
    from flows.__main__ import main

    blocker = tmp_path / "artifacts"
    blocker.write_text("not a folder")
    for where, why in ((blocker, "a file is in the way"), (blocker / "sub", "Not a directory")):
        assert main(["--set", f"artifacts_dir={where}"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"artifacts_dir {where} cannot be created ({why}" in err
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------------------------------------------- training
def _train(cfg, out: Path):
    from tasks.training.loop import train
    from tests.test_train import corpus_tokens

    return train(cfg, corpus_tokens(), corpus_tokens(800), 64, out, LOG)[0]


def _poison_gradient_at(monkeypatch, step: int) -> None:
    """From optimizer step `step` (1-based) on, the first parameter's gradient is NaN while the loss stays finite."""
    import torch

    import tasks.training.loop as loop

    real = loop.build_model

    def build(cfg):
        model = real(cfg)
        calls = [0]

        def hook(grad):
            calls[0] += 1
            return torch.full_like(grad, float("nan")) if calls[0] >= step else grad

        next(model.parameters()).register_hook(hook)
        return model

    monkeypatch.setattr(loop, "build_model", build)


def _finite_checkpoint(out: Path) -> tuple[int, bool]:
    import torch
    from safetensors.torch import load_file

    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    weights = load_file(str(out / "checkpoints" / latest["path"] / "model.safetensors"))
    return latest["step"], all(torch.isfinite(t).all() for t in weights.values())


def test_a_torn_latest_checkpoint_falls_back_to_the_one_before_and_a_torn_metrics_line_is_dropped(tmp_path):
    from tests.test_train import tiny_train_config

    _train(tiny_train_config(max_steps=6, checkpoint_interval=3, eval_interval=3), tmp_path)
    weights = tmp_path / "checkpoints" / "step-00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # torn
    with open(tmp_path / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 7, "lo')  # what a kill mid-append leaves
    summary = _train(tiny_train_config(max_steps=9, checkpoint_interval=3, eval_interval=3), tmp_path)
    assert summary["resumed_from"] == 3 and summary["steps"] == 9
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))


def test_a_nonfinite_gradient_with_a_finite_loss_stops_before_any_checkpoint_holds_it(tmp_path, monkeypatch):
    from tasks.training.loop import TrainingDiverged
    from tests.test_train import tiny_train_config

    _poison_gradient_at(monkeypatch, 5)
    with pytest.raises(TrainingDiverged, match="gradient norm became nan.*step 5"):
        _train(tiny_train_config(max_steps=10, checkpoint_interval=1, grad_clip=0), tmp_path)
    assert _finite_checkpoint(tmp_path) == (4, True)


def test_a_diverged_run_resumes_from_its_last_finite_checkpoint_with_a_new_learning_rate(tmp_path, monkeypatch):
    from tasks.train import STAGE
    from tasks.training.loop import TrainingDiverged
    from tests.test_train import tiny_train_config

    first, lowered = tiny_train_config(max_steps=10, checkpoint_interval=3), tiny_train_config(
        max_steps=10, checkpoint_interval=3, learning_rate=3e-4, warmup_steps=5)
    shard = {"tokenizer": None, "shard": None}
    assert STAGE.workdir(tmp_path, first, shard) == STAGE.workdir(tmp_path, lowered, shard)
    assert STAGE.key(first, shard) != STAGE.key(lowered, shard)
    out = STAGE.workdir(tmp_path, first, shard)
    _poison_gradient_at(monkeypatch, 8)
    with pytest.raises(TrainingDiverged, match="resumes from the last good checkpoint"):
        _train(first, out)
    monkeypatch.undo()
    summary = _train(lowered, out)
    assert summary["resumed_from"] == 6 and summary["steps"] == 10
    assert _finite_checkpoint(out) == (10, True)


def test_a_new_learning_rate_on_a_finished_run_trains_from_scratch(tmp_path):
    from tests.test_train import tiny_train_config

    _train(tiny_train_config(max_steps=6, checkpoint_interval=3), tmp_path)
    summary = _train(tiny_train_config(max_steps=6, checkpoint_interval=3, learning_rate=3e-4), tmp_path)
    assert summary["resumed_from"] == 0 and summary["steps"] == 6  # not the old weights under a new label
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_a_validation_split_shorter_than_the_context_names_the_split_and_the_fix(tmp_path):
    from tasks.stage import PipelineError
    from tasks.training.loop import train
    from tests.test_train import corpus_tokens, tiny_train_config

    with pytest.raises(PipelineError, match="the val split is too short.*block_size=16.*shard.val_fraction"):
        train(tiny_train_config(max_steps=2), corpus_tokens(), corpus_tokens(12), 64, tmp_path, LOG)


# ---------------------------------------------------------------------------------------------------- register
@pytest.fixture(scope="module")
def lineage(tmp_path_factory) -> dict:
    """Real upstream artifacts for register (every stage run once on a tiny corpus; export writes no format)."""
    from tests.conftest import run_stages

    stages = ("acquire", "tokenizer", "shard", "train", "evaluate", "export")
    made = run_stages(tmp_path_factory.mktemp("lineage"), stages, ("export.formats=[]",))
    assert all(made[name] is not None for name in stages)
    return made


REGISTER_KILLED = textwrap.dedent("""
    import json, logging, os, signal, sys
    from pathlib import Path
    import tasks.register as R
    from pipeline_config.schema import RegisterConfig
    from tasks.stage import load_artifact
    paths, where, root = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    real = getattr(R, where)
    def killed(*args, **kwargs):
        if where == "_log_model":
            real(*args, **kwargs)  # the model version exists, then the process dies
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(R, where, killed)
    upstream = {name: load_artifact(Path(path), name) if path else None for name, path in paths.items()}
    R.STAGE.execute(RegisterConfig(), upstream, root, logging.getLogger())
""")


def _registry(root: Path) -> tuple[list, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("scriptorium").experiment_id])
    return runs, client.search_model_versions("name = 'scriptorium-lm'")


@pytest.mark.parametrize("killed_in", ["_log_exports", "_log_model"])
def test_register_killed_anywhere_is_finished_by_the_rerun_not_repeated(lineage, tmp_path, killed_in):
    from pipeline_config.schema import RegisterConfig
    from tasks.register import FINGERPRINT_TAG, STAGE

    upstream = {name: lineage[name] for name in STAGE.inputs}
    paths = json.dumps({name: str(a.path) if a else None for name, a in upstream.items()})
    killed = subprocess.run([sys.executable, "-c", REGISTER_KILLED, paths, killed_in, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    artifact = STAGE.execute(RegisterConfig(), upstream, tmp_path, LOG)
    runs, versions = _registry(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and FINGERPRINT_TAG in runs[0].data.tags
    assert [str(v.version) for v in versions] == ["1"] and artifact.manifest["run_id"] == runs[0].info.run_id
    assert artifact.manifest["champion"] is True and "val_bpb" in runs[0].data.metrics  # the lineage is complete


def _stored_figure(client, cfg, root: Path):
    """The gate's champion figure for these versions: they are no pipeline models (no weights to rescore), so the
    gate falls back to each one's stored metric, which is the path under test here."""
    from tasks.lineage.gate import champion_figure

    uri = f"sqlite:///{root / 'mlflow.db'}"
    return lambda current: champion_figure(client, cfg, uri, current, {}, logging.getLogger("test"))


def _store_with_versions(root: Path, figures: list[float]):
    """A real SQLite MLflow store holding one run and model version per figure (val_bpb)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("x", artifact_location=(root / "art").as_uri())
    client.create_registered_model("m")
    versions = []
    for figure in figures:
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "val_bpb", figure)
        versions.append(client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id).version)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return client, [str(v) for v in versions]


def test_a_nan_metric_never_takes_the_champion_and_a_nan_champion_loses_to_any_finite_one(tmp_path):
    from pipeline_config.schema import RegisterConfig
    from tasks.register import _maybe_promote

    cfg = RegisterConfig(model_name="m")
    client, (v1, v2, v3) = _store_with_versions(tmp_path, [1.5, float("nan"), 1.6])
    figure = _stored_figure(client, cfg, tmp_path)
    assert _maybe_promote(client, cfg, v1, {"val_bpb": 1.5}, figure) == (True, None)
    assert _maybe_promote(client, cfg, v2, {"val_bpb": float("nan")}, figure) == (False, v1)
    client.set_registered_model_alias("m", "champion", v2)  # a NaN champion left by an older run
    assert _maybe_promote(client, cfg, v3, {"val_bpb": 1.6}, figure) == (True, v2)
    assert str(client.get_model_version_by_alias("m", "champion").version) == v3


def test_the_champion_alias_moves_only_away_from_the_champion_it_was_compared_with(tmp_path):
    """Another run moving the alias mid-comparison is staged by a hook on the client's tag call (the one step
    between the comparison and the move); the store, the alias and the comparison are real."""
    from pipeline_config.schema import RegisterConfig
    from tasks.register import _maybe_promote

    client, (v1, better, ours) = _store_with_versions(tmp_path, [1.5, 1.2, 1.4])
    client.set_registered_model_alias("m", "champion", v1)
    tag = client.set_model_version_tag

    def concurrent_run_promotes_its_better_version(*args):
        tag(*args)
        if str(client.get_model_version_by_alias("m", "champion").version) == v1:
            client.set_registered_model_alias("m", "champion", better)

    client.set_model_version_tag = concurrent_run_promotes_its_better_version
    cfg = RegisterConfig(model_name="m")
    assert _maybe_promote(client, cfg, ours, {"val_bpb": 1.4}, _stored_figure(client, cfg, tmp_path)) == (False, better)
    assert str(client.get_model_version_by_alias("m", "champion").version) == better


def test_a_locked_registry_database_is_not_a_deleted_version(tmp_path, monkeypatch):
    import sqlite3

    import tasks.register as register
    from tasks.stage import write_manifest

    database = tmp_path / "mlflow.db"
    with sqlite3.connect(database) as connection:  # the one table still_registered reads, as MLflow lays it out
        connection.execute("CREATE TABLE model_versions (name TEXT, version INTEGER, run_id TEXT)")
        connection.execute("INSERT INTO model_versions VALUES ('m', 1, 'r1')")
    artifact = write_manifest(tmp_path / "register", "register",
                              {"tracking_uri": f"sqlite:///{database}", "model_name": "m", "version": "1",
                               "run_id": "r1"})
    assert register.still_registered(artifact)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, time
        connection = sqlite3.connect({str(database)!r}, isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        monkeypatch.setattr(register, "SQLITE_TIMEOUT", 0.2)
        assert register.still_registered(artifact)  # busy: cannot tell, so not "deleted"
    finally:
        writer.kill()
        writer.wait()
    gone = write_manifest(tmp_path / "register2", "register",
                          {"tracking_uri": f"sqlite:///{database}", "model_name": "m", "version": "2", "run_id": "r1"})
    assert not register.still_registered(gone)


# ------------------------------------------------------------------------------------------- errors, one line
def test_config_errors_stop_before_any_stage_with_status_2(tmp_path):
    from flows.__main__ import main

    root = tmp_path / "artifacts"
    for override in ("tokenizer.vocab_size=259", "train.model.arch=llama", "synthesize.model_path=/nowhere.gguf",
                     'acquire.sources=[{kind: http, url: "file:///etc/passwd"}]'):
        extra = ["train.model.n_embd=30", "train.model.n_head=10"] if "llama" in override else []
        argv = [x for o in [f"artifacts_dir={root}", override, *extra] for x in ("--set", o)]
        assert main(argv) == 2, override
    assert not root.exists()


def test_a_device_this_machine_lacks_stops_before_any_stage(tmp_path, capsys):
    """`train.device: cuda` (or mps) where torch sees none: `python -m flows` exits 2 before Prefect starts, and the
    flow itself (what a deployment's run calls) fails in one line before any stage, with nothing written."""
    import torch

    from flows.__main__ import main
    from flows.build_model import build_model
    from tasks.stage import PipelineError

    missing = [name for name, there in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()))
               if not there]
    if not missing:
        pytest.skip("this machine has both CUDA and MPS")
    root = tmp_path / "artifacts"
    overrides = [f"artifacts_dir={root}", f"train.device={missing[0]}"]
    assert main([x for o in overrides for x in ("--set", o)]) == 2
    assert f"error: train.device is '{missing[0]}'" in capsys.readouterr().err
    with pytest.raises(PipelineError, match=f"train.device is '{missing[0]}'"):
        build_model.fn("quickstart", overrides)
    assert not root.exists()


def test_a_story_recipe_or_language_that_is_not_there_stops_before_any_stage(tmp_path, capsys):
    """A misspelt recipe, or a language the recipe has no block for, was found by the synthesize stage after
    acquire had run (exit 1); now `python -m flows` exits 2 before Prefect starts, and the flow fails in one line
    before any stage, with nothing written."""
    from flows.__main__ import main
    from flows.build_model import build_model
    from tasks.stage import PipelineError

    root = tmp_path / "artifacts"
    for wrong, said in (("synthesize.recipe=tinystorys", "recipe 'tinystorys' not found"),
                        ("synthesize.languages=[en, de]", "has no language ['de']; it has ['en', 'es', 'fr']")):
        overrides = [f"artifacts_dir={root}", "synthesize.n=4", wrong]
        assert main([x for o in overrides for x in ("--set", o)]) == 2
        assert said in capsys.readouterr().err
        with pytest.raises(PipelineError, match=re.escape(said)):
            build_model.fn("quickstart", overrides)
    assert not root.exists()


def test_a_local_source_or_registered_parent_that_is_not_there_stops_before_any_stage(tmp_path, capsys):
    """A local source path that matches no file, or a `tokenizer.from_model` / `train.init_from` naming a version the
    MLflow store does not hold, was found by acquire (after the temporary Prefect API had started) or by the tokenizer
    stage after acquire had run (exit 1, and a hint naming train.init_from for a tokenizer.from_model error). Now
    `python -m flows` exits 2 before Prefect starts naming the knob, and the flow fails in one line before any stage,
    with nothing written (the MLflow store is not created by looking)."""
    from flows.__main__ import main
    from flows.build_model import build_model
    from tasks.stage import PipelineError

    root = tmp_path / "artifacts"
    cases = (("acquire.sources=[{path: data/nowhere/*.txt}]", "acquire.sources[0]: local source 'data/nowhere/*.txt' "
              "matches no"),
             ("tokenizer.from_model=models:/scriptorium-quickstart@champion", "tokenizer.from_model: models:/"
              "scriptorium-quickstart@champion is not in the MLflow store"),
             ("train.init_from=models:/scriptorium-quickstart/3", "train.init_from: models:/scriptorium-quickstart/3 "
              "is not in the MLflow store"))
    for wrong, said in cases:
        overrides = [f"artifacts_dir={root}", wrong]
        assert main([x for o in overrides for x in ("--set", o)]) == 2, wrong
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
        assert ("train.init_from: scratch" in err) == wrong.startswith("train."), err
        with pytest.raises(PipelineError, match=re.escape(said)):
            build_model.fn("quickstart", overrides)
    assert not root.exists()


def test_a_local_source_that_reaches_into_the_artifacts_directory_stops_before_any_stage(tmp_path, capsys):
    """`path: .` (or a data folder holding artifacts_dir) read the pipeline's own stories and documents back, and
    acquire's key moved with every run, so nothing was ever cached. A directory that holds artifacts_dir, or a glob
    matching files in it, is now one line and status 2; a hidden artifacts_dir (skipped by a directory source) is
    not."""
    from flows.__main__ import main
    from flows.preflight import unrunnable
    from pipeline_config import load_config
    from tests.conftest import write_small_corpus

    (tmp_path / "data").mkdir()
    corpus = write_small_corpus(tmp_path / "data" / "corpus.jsonl")
    artifacts = tmp_path / "data" / "artifacts"
    said = f"acquire.sources[0]: '{corpus.parent}' reaches into artifacts_dir ({artifacts}), so the pipeline would"
    assert main(["--set", f"artifacts_dir={artifacts}", "--set", f"acquire.sources=[{{path: {corpus.parent}}}]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {said}") and len(err.strip().splitlines()) == 1, err
    assert not artifacts.exists()
    earlier = artifacts / "synthesize" / "0123" / "stories.jsonl"
    earlier.parent.mkdir(parents=True)
    earlier.write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    glob = f"{tmp_path}/data/**/*.jsonl"
    for root, source, wrong in ((artifacts, glob, True), (tmp_path / "data" / ".artifacts", str(corpus.parent), False),
                                (tmp_path / "out", str(corpus.parent), False), (artifacts, str(corpus), False)):
        cfg = load_config("quickstart", [f"artifacts_dir={root}", f"acquire.sources=[{{path: '{source}'}}]"])
        assert (unrunnable(cfg) is not None) == wrong, (root, source, unrunnable(cfg))


def test_an_mlflow_server_that_does_not_answer_stops_before_any_stage(tmp_path, capsys):
    """`register.tracking_uri` naming an MLflow server that is down was found by register, after training (exit 1;
    the trained stages cached for the re-run). Now one line naming the knob, status 2, before any stage; the flow
    fails the same way. The server is a loopback port nobody listens on."""
    from flows.__main__ import main
    from flows.build_model import build_model
    from tasks.stage import PipelineError
    from tests.loopback import closed_port

    root = tmp_path / "artifacts"
    overrides = [f"artifacts_dir={root}", f"register.tracking_uri=http://127.0.0.1:{closed_port()}"]
    assert main([x for o in overrides for x in ("--set", o)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: register.tracking_uri: no MLflow tracking server answers at http://127.0.0.1:"), err
    with pytest.raises(PipelineError, match="register.tracking_uri: no MLflow tracking server answers"):
        build_model.fn("quickstart", overrides)
    assert not root.exists()


@pytest.mark.parametrize("command", [["flows"], ["flows.serve"]])
def test_a_prefect_api_that_does_not_answer_is_one_line_and_status_2(tmp_path, command):
    """PREFECT_API_URL exported (as the README's deployment section does) but its server stopped: Prefect's client
    died on the first request with a 100-line traceback (a run, or serving the deployments). Now one line naming
    the URL and the fix, status 2, before the artifacts directory is touched. The URL is a loopback port nobody
    listens on."""
    from tests.loopback import closed_port

    port = closed_port()
    root = tmp_path / "artifacts"
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    argv = [sys.executable, "-m", *command, *(["--set", f"artifacts_dir={root}"] if command == ["flows"] else [])]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: no Prefect API answers at http://127.0.0.1:{port}/api (PREFECT_API_URL")
    assert "unset PREFECT_API_URL" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not root.exists()


def test_a_deployment_run_with_a_bad_override_fails_in_one_logged_line(prefect_api, tmp_path):
    """A deployment hands its overrides to the flow itself (no `python -m flows` refuses them first): the run fails
    before any stage, and Prefect's log holds the problem as one line, not a traceback; still a ConfigError."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "artifacts"
    script = ("from flows.build_model import build_model\nfrom pipeline_config import ConfigError\ntry:\n"
              f"    build_model(overrides=['train.max_steps=abc', 'artifacts_dir={root}'])\n"
              "except ConfigError as exc:\n    print('raised', type(exc).__name__)\n")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.strip() == "raised InvalidConfiguration", done.stderr[-3000:]
    assert "invalid configuration: --set: train.max_steps: Input should be a valid integer" in done.stderr
    assert "Traceback" not in done.stderr and not root.exists()


def test_ctrl_c_during_a_run_is_one_line_status_130_and_frees_the_artifacts_directory(tmp_path, capsys, monkeypatch):
    """Ctrl-C while a stage runs (here raised where build-model is called): no traceback, the shell's status 130, a
    line saying how to go on, and the artifacts directory's lock released for the next run. That the re-run then
    resumes training from its checkpoint is tested in test_train.py."""
    import flows.build_model
    from flows.__main__ import main
    from tasks.stage import hold_artifacts

    def interrupted(**_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.build_model, "build_model", interrupted)
    root = tmp_path / "artifacts"
    assert main(["--set", f"artifacts_dir={root}"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: run the same command again") and err.count("\n") == 1
    with hold_artifacts(root, wait=False):  # would raise, naming this process, had the lock stayed held
        pass


def test_a_404_fails_once_not_retried_and_prints_one_line_without_credentials(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    with _server(_status(404)) as server:
        url = server.url.replace("http://", "http://user:s3cret@") + "/gone.jsonl"
        overrides = [f"artifacts_dir={tmp_path / 'artifacts'}", "synthesize.n=0",
                     f"acquire.sources={json.dumps([{'kind': 'http', 'url': url}])}"]
        command = [sys.executable, "-m", "flows", *[x for o in overrides for x in ("--set", o)]]
        storage = tmp_path / "prefect-storage"  # where Prefect persists the failed flow run's exception
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOCAL_STORAGE_PATH": str(storage)}
        failed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stderr[-3000:]
    persisted = [json.loads(p.read_bytes()) for p in storage.iterdir()]  # JSON, not a pickled exception
    assert persisted and all(record.get("error") == "AcquireError" for record in persisted)
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: download of http://***@127.0.0.1") and "HTTP 404" in last
    assert len(server.requests) == 1  # acquire declares retries=2: a 404 is not retried
    assert "s3cret" not in failed.stderr + failed.stdout and "Traceback" not in failed.stderr


@pytest.mark.parametrize("raised", [
    OSError(errno.ENOSPC, "No space left on device"),  # Python's own writes, pyarrow's
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors' words
    OSError(errno.EROFS, "Read-only file system"),
    RuntimeError("(raised as a result of Query-invoked autoflush)\n(sqlite3.OperationalError) database or disk is "
                 "full"),  # MLflow's SQLite store, as register saw it on a full tmpfs
])
def test_a_full_or_read_only_disk_is_one_line_naming_the_stage_and_the_way_on(tmp_path, raised):
    """The real thing was seen on a 3 MB tmpfs: a SafetensorError traceback from train's first checkpoint; after
    making room the same command resumed with every earlier stage cached. Here each way a library reports it."""
    from pipeline_config.schema import AcquireConfig
    from tasks.stage import Stage, StorageFull

    def run(cfg, out_dir, log):
        raise raised

    with pytest.raises(StorageFull) as full:
        Stage(name="acquire", run=run).execute(AcquireConfig(), {}, tmp_path)
    said, reason = str(full.value), os.strerror(getattr(raised, "errno", errno.ENOSPC)).lower()
    assert said.startswith(f"acquire: {reason} writing {tmp_path}")
    assert "GB free): make room, or set artifacts_dir on a larger disk, and run again" in said

    def other(cfg, out_dir, log):
        raise OSError(errno.ENOENT, "No such file or directory")  # not about room: left as it is

    with pytest.raises(FileNotFoundError):
        Stage(name="acquire", run=other).execute(AcquireConfig(), {}, tmp_path)


def test_mlflow_does_not_print_a_full_disk_traceback_before_register_says_it_in_one_line():
    """On a full tmpfs MLflow's store logged 80 lines of SQLAlchemy traceback before StorageFull's one line; its
    other database errors are still logged as MLflow logs them."""
    import sqlite3

    from tasks.register import MLFLOW_DB_LOGGER, quiet_mlflow_output

    quiet_mlflow_output()
    quiet_mlflow_output()  # once per register call: the filter is not stacked
    db_log = logging.getLogger(MLFLOW_DB_LOGGER)
    assert len(db_log.filters) == 1
    seen: list[str] = []
    collector = logging.Handler()
    collector.emit = lambda record: seen.append(record.exc_info[1].args[0])  # mlflow's loggers do not propagate
    db_log.addHandler(collector)
    try:
        for message in ("database or disk is full", "no such table: runs"):
            try:
                raise sqlite3.OperationalError(message)
            except sqlite3.OperationalError:
                db_log.exception("SQLAlchemy database error. The following exception is caught.")
    finally:
        db_log.removeHandler(collector)
    assert seen == ["no such table: runs"]


def test_prefect_retries_a_transient_error_with_backoff_and_never_a_deterministic_one(prefect_api, tmp_path):
    from prefect import flow

    from pipeline_config.schema import AcquireConfig
    from tasks.corpus.download import AcquireError
    from tasks.stage import Stage, StageRunner, prefect_task

    calls: list[float] = []

    def flaky(cfg, out_dir, log, transient: bool = True):
        calls.append(time.monotonic())
        if len(calls) < 3 or not transient:
            raise AcquireError("HTTP 503" if transient else "HTTP 404", transient=transient)
        return {"files": {}}

    def deterministic(cfg, out_dir, log):
        return flaky(cfg, out_dir, log, transient=False)

    @flow(name="faults-retries")
    def run(stage_task, root: Path) -> str:
        StageRunner(root)(stage_task, AcquireConfig())
        return "done"

    transient_task = prefect_task(Stage(name="acquire", run=flaky, retries=3, retry_delay_seconds=0.2))
    assert run(transient_task, tmp_path / "transient") == "done" and len(calls) == 3
    assert transient_task.retry_delay_seconds == [0.2, 0.4, 0.8] and calls[2] - calls[1] >= 0.4  # backoff
    calls.clear()
    with pytest.raises(AcquireError, match="404"):
        run(prefect_task(Stage(name="acquire", run=deterministic, retries=3, retry_delay_seconds=0.2)),
            tmp_path / "deterministic")
    assert len(calls) == 1


def test_make_clean_drops_stage_outputs_keeps_the_registry_and_refuses_during_a_run(tmp_path):
    """The Makefile's own `clean` recipe, run in a copy beside its own artifacts/: it removed every directory there,
    the MLflow store (every registered version) included, and did so under a run in progress. The downloaded remote
    files stay too (a clean start need not fetch 2 GB again)."""
    import shutil

    from tasks.stage import hold_artifacts

    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path)
    shutil.copytree(REPO / "patches", tmp_path / "patches")
    artifacts = tmp_path / "artifacts"
    for folder in ("train/0a1b", "synthesize/journal", "mlflow/artifacts", RESULTS_DIR, "acquire/0c0d",
                   "acquire/.downloads/4f2e"):
        (artifacts / folder).mkdir(parents=True)
    (artifacts / "mlflow" / "mlflow.db").write_text("the registry")
    (artifacts / "acquire" / ".downloads" / "4f2e" / "TinyStories.txt").write_text("2 GB, downloaded once")
    clean = ["make", "-s", "-C", str(tmp_path), "clean"]
    with hold_artifacts(artifacts):  # a run in progress
        busy = subprocess.run(clean, capture_output=True, text=True)
    assert busy.returncode != 0 and "a run holds" in busy.stderr, busy.stderr
    assert (artifacts / "train" / "0a1b").is_dir()
    done = subprocess.run(clean, capture_output=True, text=True, check=True)
    assert sorted(p.name for p in artifacts.iterdir() if p.is_dir()) == ["acquire", "mlflow"]
    assert (artifacts / "mlflow" / "mlflow.db").read_text() == "the registry"
    assert [p.name for p in (artifacts / "acquire").iterdir()] == [".downloads"]  # remote files are not re-fetched
    assert (artifacts / "acquire" / ".downloads" / "4f2e" / "TinyStories.txt").is_file()
    assert "kept artifacts/mlflow" in done.stdout and "artifacts/acquire/.downloads" in done.stdout
