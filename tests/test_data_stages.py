"""acquire, tokenizer and shard as plain functions on real files, SentencePiece and Parquet."""
from __future__ import annotations

import gc
import hashlib
import http.server
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline_config.schema import AcquireConfig, ShardConfig, SourceConfig, TokenizerConfig
from tasks.acquire import AcquireError, acquire, download, normalize
from tasks.stage import write_manifest
from tasks.corpus.reader import Corpus, split_tokens
from tasks.corpus.sampling import content_hashes
from tasks.shard import frame_documents, held_out, shard_corpus
from tasks.tokenizer import build_tokenizer
from tests.loopback import LoopbackServer, closed_port, send_range

LOG = logging.getLogger("test")


def test_normalize_strips_bom_unifies_newlines_and_composes():
    assert normalize("\ufeffa\r\nb\rc") == "a\nb\nc"
    assert normalize("cafe\u0301") == "caf\u00e9"


def test_acquire_reads_jsonl_and_txt_and_stops_at_a_document_boundary(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i} " + "x" * 90}) for i in range(10)))
    (tmp_path / "b.txt").write_bytes("\ufeffline one\r\nline two".encode())
    cfg = AcquireConfig(sources=[SourceConfig(path=str(tmp_path / "b.txt")), SourceConfig(path=str(tmp_path / "*.jsonl"), text_field="body")], byte_budget=350)
    out = tmp_path / "out"
    out.mkdir()
    summary = acquire(cfg, out, LOG)
    texts = pq.read_table(out / "documents.parquet").column("text").to_pylist()
    assert texts[0] == "line one\nline two"
    assert summary["budget_reached"] and summary["bytes"] <= 350
    assert all(t.startswith("doc ") and len(t) == 96 for t in texts[1:])  # whole documents only
    assert summary["documents"] == len(texts) == 4


def test_acquire_names_the_missing_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(AcquireError, match="no field 'text'"):
        acquire(AcquireConfig(sources=[SourceConfig(path=str(tmp_path / "a.jsonl"))]), tmp_path, LOG)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    fail_after: int | None = None
    ranges: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).ranges.append(self.headers.get("Range") or "")
        send_range(self, self.payload, cut_after=self.fail_after)  # the first transfer hangs up half-way

    def log_message(self, *args):
        pass


def test_download_resumes_with_a_range_request_and_checks_the_checksum(tmp_path):
    """A loopback HTTP server (this machine has no internet) that drops the first transfer half-way."""
    payload = b"".join(json.dumps({"text": f"story {i}"}).encode() + b"\n" for i in range(2000))
    _RangeHandler.payload, _RangeHandler.fail_after, _RangeHandler.ranges = payload, 10_000, []
    dest = tmp_path / "data.jsonl"
    digest = hashlib.sha256(payload).hexdigest()
    with LoopbackServer(_RangeHandler) as server:
        url = f"{server.url}/data.jsonl"
        with pytest.raises(AcquireError, match="resumes"):
            download(url, dest, digest, LOG, timeout=5)
        assert (tmp_path / "data.jsonl.part").stat().st_size == 10_000
        download(url, dest, digest, LOG, timeout=5)
        assert dest.read_bytes() == payload
        assert _RangeHandler.ranges[-1] == "bytes=10000-"
        _RangeHandler.fail_after = None
        with pytest.raises(AcquireError, match="checksum mismatch"):
            download(url, tmp_path / "other.jsonl", "0" * 64, LOG, timeout=5)


def test_a_new_byte_budget_reads_the_file_already_downloaded(tmp_path):
    """Against a loopback HTTP server (no internet here): the pipeline's acquire downloads a remote file once into
    the folder its directories share, so a second key (another byte budget) reads it without a request; each
    manifest names that folder (what `scriptorium prune` follows)."""
    from tasks.acquire import DOWNLOADS, STAGE

    payload = b"".join(json.dumps({"text": f"story number {i}"}).encode() + b"\n" for i in range(2000))
    _RangeHandler.payload, _RangeHandler.fail_after, _RangeHandler.ranges = payload, None, []
    with LoopbackServer(_RangeHandler) as server:
        source = SourceConfig(kind="http", url=f"{server.url}/stories.jsonl")
        small = STAGE.execute(AcquireConfig(sources=[source], byte_budget=10_000), {}, tmp_path, LOG)
        large = STAGE.execute(AcquireConfig(sources=[source], byte_budget=30_000), {}, tmp_path, LOG)
    assert len(_RangeHandler.ranges) == 1
    assert small.path != large.path and large.manifest["bytes"] > small.manifest["bytes"]
    [folder] = large.manifest["downloads"]
    assert small.manifest["downloads"] == [folder]
    assert (tmp_path / "acquire" / DOWNLOADS / folder / "stories.jsonl").read_bytes() == payload
    assert not list(tmp_path.glob("acquire/*/downloads"))


def test_a_file_changed_on_the_server_is_not_glued_onto_its_old_beginning(tmp_path):
    """A loopback server that sends ETags and honours If-Range as nginx and S3 do (no internet here): the first
    transfer is cut, the file is replaced on the server, and the re-run (no sha256 configured) must come back with
    the new file whole, not the old file's first bytes followed by the new file's rest."""
    old = b"".join(f"old story {i:05d}\n".encode() for i in range(2000))
    new = b"".join(f"new story {i:05d}\n".encode() for i in range(2000))
    _RangeHandler.payload, _RangeHandler.fail_after, _RangeHandler.ranges = old, 10_000, []
    dest = tmp_path / "data.txt"
    with LoopbackServer(_RangeHandler) as server:
        with pytest.raises(AcquireError, match="resumes"):
            download(f"{server.url}/data.txt", dest, None, LOG, timeout=5)
        _RangeHandler.payload, _RangeHandler.fail_after = new, None
        download(f"{server.url}/data.txt", dest, None, LOG, timeout=5)
    assert _RangeHandler.ranges[-1] == "bytes=10000-"  # it did ask to resume
    assert dest.read_bytes() == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]  # no part or validator file left behind


class _WrongRangeHandler(http.server.BaseHTTPRequestHandler):
    """Answers every range request with 206 but from byte 0, as a misbehaving proxy can."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = b"x" * 100
        self.send_response(206 if "Range" in self.headers else 200)
        self.send_header("Content-Range", f"bytes 0-99/{len(body)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_range_answered_from_another_offset_is_not_appended(tmp_path):
    """A loopback server whose 206 starts at byte 0 when byte 40 was asked for: the part file is not extended with
    bytes that do not belong there; it is removed, and the error says a re-run starts over."""
    (tmp_path / "data.txt.part").write_bytes(b"x" * 40)
    with LoopbackServer(_WrongRangeHandler) as server:
        with pytest.raises(AcquireError, match="bytes 0-99/100.*starts over"):
            download(f"{server.url}/data.txt", tmp_path / "data.txt", None, LOG, timeout=5)
    assert list(tmp_path.iterdir()) == []


def _parquet_bytes(texts: list[str]) -> bytes:
    import io

    import pyarrow as pa

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), buffer)
    return buffer.getvalue()


def test_hub_dataset_split_is_listed_downloaded_and_checked(tmp_path, monkeypatch):
    """Against HubDouble, a loopback server speaking the hub's tree and resolve endpoints (no internet here): the
    split's files are found across listing pages, LFS files follow the redirect and are checked against their
    sha256, and the token goes to the hub but not to the CDN it redirects to."""
    from tests.hub_double import HubDouble

    files = {
        "data/train-00000-of-00002.parquet": _parquet_bytes([f"parquet story {i}" for i in range(3)]),
        "data/train-00001-of-00002.jsonl": b"".join(json.dumps({"text": f"json story {i}"}).encode() + b"\n"
                                                    for i in range(2)),
        "data/validation-00000-of-00001.parquet": _parquet_bytes(["held out"]),
    }
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with HubDouble("org/tiny", files, lfs={"data/train-00000-of-00002.parquet"}) as hub:
        source = SourceConfig(kind="hf", dataset="org/tiny", endpoint=hub.url)
        summary = acquire(AcquireConfig(sources=[source]), tmp_path, LOG)
        texts = pq.read_table(tmp_path / "documents.parquet").column("text").to_pylist()
        assert texts == [f"parquet story {i}" for i in range(3)] + [f"json story {i}" for i in range(2)]
        assert summary["documents"] == 5
        assert sum(1 for path, _ in hub.requests if "/tree/" in path) == 4  # README + 3 files, one per page
        auth = dict(hub.requests)
        assert auth["/datasets/org/tiny/resolve/main/data/train-00000-of-00002.parquet"]
        assert auth["/cdn/data/train-00000-of-00002.parquet"] is False

        hub.corrupt.add("data/validation-00000-of-00001.parquet")
        hub.lfs.add("data/validation-00000-of-00001.parquet")
        with pytest.raises(AcquireError, match="checksum mismatch"):
            acquire(AcquireConfig(sources=[source.model_copy(update={"split": "validation"})]), tmp_path / "v", LOG)
        with pytest.raises(AcquireError, match="no .parquet/.jsonl/.jsonl.gz file with 'test'.*split"):
            acquire(AcquireConfig(sources=[source.model_copy(update={"split": "test"})]), tmp_path / "t", LOG)
        with pytest.raises(AcquireError, match="'org/missing'.*HTTP 404.*HF_TOKEN"):
            acquire(AcquireConfig(sources=[source.model_copy(update={"dataset": "org/missing"})]), tmp_path / "m", LOG)


def test_unreachable_hub_names_the_endpoint(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    source = SourceConfig(kind="hf", dataset="org/tiny", endpoint=endpoint)
    with pytest.raises(AcquireError, match=f"cannot reach the hub at {endpoint}.*endpoint"):
        acquire(AcquireConfig(sources=[source]), tmp_path, LOG)


def test_an_http_source_nobody_answers_at_names_the_host_and_the_internet(tmp_path):
    """Offline, the `tinystories` preset's download said '(URLError: <urlopen error [Errno -2] Name or service not
    known>); a re-run resumes from 0 bytes'. A refused connection (a closed loopback port; this machine has no DNS to
    fail) now names the host and what the source needs, and resuming only once there are bytes to resume from."""
    port = closed_port()
    url = f"http://user:secret@127.0.0.1:{port}/TinyStories.txt"
    with pytest.raises(AcquireError) as err:
        download(url, tmp_path / "TinyStories.txt", None, LOG, timeout=5)
    said = str(err.value)
    assert said.startswith(f"cannot reach 127.0.0.1:{port} (") and "Connection refused" in said, said
    assert said.endswith("this source needs the internet (or a copy at a URL this machine can reach)"), said
    assert "resumes" not in said and "secret" not in said and err.value.transient
    (tmp_path / "TinyStories.txt.part").write_bytes(b"once upon")
    with pytest.raises(AcquireError, match=r"; a re-run resumes from 9 bytes$"):
        download(url, tmp_path / "TinyStories.txt", None, LOG, timeout=5)


def _records(small_corpus: Path) -> list[dict[str, str]]:
    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    return [{"text": t, "language": "en"} for t in texts] + [
        {"text": "el pequeño perro jugaba en el jardín con su pelota roja.", "language": "es"}
    ]


def test_sentencepiece_tokenizer_and_fertility_report(tmp_path, small_corpus):
    cfg = TokenizerConfig(vocab_size=320)
    summary = build_tokenizer(cfg, _records(small_corpus), tmp_path, LOG)
    report = json.loads((tmp_path / "fertility.json").read_text())
    assert set(report["languages"]) == {"en", "es"}
    en, es = report["languages"]["en"], report["languages"]["es"]
    assert 1.0 <= en["tokens_per_word"] < es["tokens_per_word"]  # a vocabulary learned on English splits Spanish more
    assert en["unknown_rate"] == 0.0  # byte fallback
    assert 0 < en["continued_word_share"] < 1 and en["bytes_per_token"] > 1 and 0 < en["vocab_use"] <= 1
    assert summary["vocab_size"] == 320


def test_a_vocabulary_the_sample_cannot_fill_is_said_not_silently_shrunk(tmp_path, small_corpus, caplog):
    """SentencePiece's vocab_size is a soft limit here (hard_vocab_limit=False): asked for more pieces than the sample
    holds, it makes fewer, and the model is sized to those. That is now one warning naming both figures and the fix,
    and the manifest records what was asked."""
    caplog.set_level(logging.INFO)
    summary = build_tokenizer(TokenizerConfig(vocab_size=60000), _records(small_corpus), tmp_path, LOG)
    assert summary["vocab_size"] < 60000 and summary["vocab_size_asked"] == 60000
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING and "vocab_size" in r.getMessage()]
    assert f"tokenizer.vocab_size is 60000 but the training sample yields {summary['vocab_size']} pieces" in \
        warning.getMessage()


def test_char_tokenizer_round_trips(tmp_path, small_corpus):
    from model.tokenizer import load_tokenizer

    build_tokenizer(TokenizerConfig(kind="char"), _records(small_corpus), tmp_path, LOG)
    tok = load_tokenizer(tmp_path)
    text = "el pequeño perro"
    assert tok.decode(tok.encode([text])[0]) == text
    assert tok.encode(["\u4e2d"])[0] == [tok.unk_id]


def test_split_is_by_content_and_stable():
    texts = [f"document number {i}" for i in range(2000)]
    splits = held_out(content_hashes(texts), 0.1)
    assert 100 < splits.sum() < 300
    assert held_out(content_hashes(texts[::-1]), 0.1).tolist() == splits[::-1].tolist()


def test_frame_documents_wraps_each_document():
    framed = frame_documents([[5, 6], [], [7]], bos=1, eos=2, dtype=np.dtype(np.uint16))
    assert framed.tolist() == [1, 5, 6, 2, 1, 2, 1, 7, 2]


def test_shards_are_fixed_size_deterministic_whatever_the_chunking_and_load_zero_copy(tmp_path, small_corpus,
                                                                                      monkeypatch):
    import tasks.corpus.reader as reader

    records = _records(small_corpus) + [{"text": "la gata duerme al sol toda la tarde.", "language": "es"}]
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    build_tokenizer(TokenizerConfig(vocab_size=320), records, tok_dir, LOG)
    outs = []
    for name, chunk_bytes, workers in (("a", 4_000_000, 2), ("b", 9_000, 1)):  # 1 chunk vs ~15, 2 threads vs 1
        monkeypatch.setattr(reader, "INLINE_CHUNK_BYTES", chunk_bytes)
        out = tmp_path / name
        out.mkdir()
        cfg = ShardConfig(tokens_per_shard=5000, val_fraction=0.1, num_workers=workers)
        outs.append(shard_corpus(cfg, Corpus.from_records(records), tok_dir, out, LOG))
    assert outs[1]["chunks"] > 10 > outs[0]["chunks"]
    assert [s["sha256"] for s in outs[0]["shards"]] == [s["sha256"] for s in outs[1]["shards"]]
    manifest = outs[0]
    train_shards = [s for s in manifest["shards"] if s["split"] == "train"]
    assert manifest["dtype"] == "uint16" and all(s["tokens"] == 5000 for s in train_shards[:-1])
    assert {s["language"] for s in manifest["shards"] if s["split"] == "val"} == {"en", "es"}  # es: 1 doc of 2
    assert pq.ParquetFile(tmp_path / "a" / manifest["shards"][0]["file"]).metadata.num_row_groups == 1
    assert not (tmp_path / "a" / ".runs").exists()
    artifact = write_manifest(tmp_path / "a", "shard", manifest)
    val = split_tokens(artifact, "val", "en")
    assert val.size == manifest["totals"]["val"]["languages"]["en"]["tokens"]
    assert val.shard(0).dtype == np.uint16 and not val.shard(0).flags.writeable  # zero-copy view of Arrow's buffer
    train = split_tokens(artifact, "train")
    assert train.size == manifest["totals"]["train"]["tokens"] and len(train) == len(train_shards)
    assert train.shard(0)[0] == 1  # starts with <s>


def test_language_quotas_are_proportional_or_equal_and_capped():
    from tasks.corpus.sampling import language_quotas

    sizes = {"en": 9_000, "es": 1_000, "fr": 100}
    assert language_quotas(sizes, 1_000, 1.0) == {"en": 891, "es": 99, "fr": 9}
    assert language_quotas(sizes, 1_200, 0.0) == {"fr": 100, "en": 550, "es": 550}  # fr has less than a third
    assert language_quotas(sizes, 50_000, 1.0) == sizes  # the whole corpus fits


def test_tokenizer_sample_spans_the_corpus_and_every_language(tmp_path):
    """English listed first, Spanish last: a sample of the first bytes would be English only."""
    en = [{"text": f"the little dog number {i} ran to the park and played with a red ball.", "language": "en"}
          for i in range(3000)]
    es = [{"text": f"el perrito número {i} corrió al parque y jugó con una pelota roja.", "language": "es"}
          for i in range(1000)]
    cfg = TokenizerConfig(vocab_size=300, train_bytes=40_000, fertility_bytes=5_000)
    summary = build_tokenizer(cfg, en + es, tmp_path, LOG)
    sample = summary["sample"]["train"]
    assert 0.15 < sample["es"]["bytes"] / (sample["en"]["bytes"] + sample["es"]["bytes"]) < 0.35  # es is 25%
    assert 30_000 < sample["en"]["bytes"] + sample["es"]["bytes"] < 50_000
    assert all(4_000 < row["bytes"] < 6_500 for row in summary["sample"]["fertility"].values())
    balanced = build_tokenizer(cfg.model_copy(update={"language_exponent": 0.0}), en + es, tmp_path / "b", LOG)
    shares = {lang: row["bytes"] for lang, row in balanced["sample"]["train"].items()}
    assert 0.8 < shares["es"] / shares["en"] < 1.25


def test_windows_are_drawn_inside_one_shard_and_one_shard_is_the_flat_draw():
    from tasks.corpus.reader import ShardTokens
    from tasks.training.data import Windows

    shards = [np.full(n, i, dtype=np.uint16) for i, n in enumerate((40, 3, 500, 90))]  # shard 1 is too short
    tokens = ShardTokens([None] * 4, [a.size for a in shards], shards)
    x, y = Windows(tokens, block_size=16, seed=0).batch(256, 0, 5)
    assert all(len(set(row.tolist())) == 1 for row in x)  # every window within one shard
    counts = np.bincount(x[:, 0].numpy(), minlength=4)
    assert counts[1] == 0 and counts[2] > 5 * counts[0] > 0 and counts[3] > 0  # uniform over valid starts
    flat = np.arange(1000, dtype=np.uint16)
    rng = np.random.default_rng([7, 3, 1])
    starts = rng.integers(0, flat.size - 16 - 1, size=4)
    xf, _ = Windows(flat, block_size=16, seed=7).batch(4, 3, 1)
    assert xf[:, 0].tolist() == starts.tolist()  # the draw a flat array always had


def test_per_language_metrics_weight_each_language_by_its_held_out_text():
    import math

    from tasks.evaluate import language_metrics

    totals = {"tokens": 300, "text_bytes": 1000, "languages": {"en": {"tokens": 200, "text_bytes": 800},
                                                                "fr": {"tokens": 100, "text_bytes": 200}}}
    metrics = language_metrics({"en": (1.0, 64), "fr": (2.0, 32)}, totals)
    assert metrics["val_bpb.fr"] == pytest.approx(2.0 / math.log(2) * 100 / 200)
    assert metrics["val_bpb.en"] == pytest.approx(1.0 / math.log(2) * 200 / 800)
    assert metrics["val_loss"] == pytest.approx((1.0 * 200 + 2.0 * 100) / 300)
    assert metrics["val_bpb"] == pytest.approx((1.0 * 200 + 2.0 * 100) / math.log(2) / 1000)
    assert metrics["val_perplexity.fr"] == pytest.approx(math.exp(2.0)) and metrics["val_tokens_scored"] == 96


def test_shards_are_the_same_bytes_on_a_dask_cluster_of_two_processes(prefect_api, tmp_path, small_corpus,
                                                                        monkeypatch):
    """Inside a flow run, shard maps its chunks as Prefect task runs on prefect-dask's DaskTaskRunner (a local
    cluster of two worker processes); the shards must match, byte for byte, those made on threads without Prefect."""
    from prefect import flow

    import tasks.corpus.reader as reader
    from pipeline_config.schema import RunnerConfig

    monkeypatch.setattr(reader, "INLINE_CHUNK_BYTES", 12_000)  # ~10 chunks
    records = _records(small_corpus)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    build_tokenizer(TokenizerConfig(vocab_size=320), records, tok_dir, LOG)
    cfg = ShardConfig(tokens_per_shard=6000, val_fraction=0.1, num_workers=2)
    (tmp_path / "threads").mkdir()
    local = shard_corpus(cfg, records, tok_dir, tmp_path / "threads", LOG)

    @flow(name="shard-on-dask")
    def shard_on_dask() -> dict:
        dask = cfg.model_copy(update={"runner": RunnerConfig(kind="dask")})
        return shard_corpus(dask, records, tok_dir, tmp_path / "dask", LOG)

    (tmp_path / "dask").mkdir()
    distributed = shard_on_dask()
    assert local["chunks"] == distributed["chunks"] >= 8 and local["worker_processes"] == 1
    assert distributed["worker_processes"] == 2  # chunks were tokenized in both worker processes
    assert [(s["file"], s["sha256"]) for s in distributed["shards"]] == [(s["file"], s["sha256"]) for s in local["shards"]]


@pytest.mark.parametrize("existing_cluster", [False, True], ids=["its-own-cluster", "address"])
def test_the_shard_stage_runs_on_dask_as_the_flow_runs_it(prefect_api, tmp_path, existing_cluster):
    """`python -m flows --set shard.runner.kind=dask` failed on every chunk: the stage's own Prefect task (the parent
    of the chunk task runs) went to the Dask workers with its result serializer, a class defined inside a function,
    which cloudpickle sent by value and the workers could not rebuild (Prefect's registry refused the empty class).
    The test above called the shard function in a flow of its own, without the stage's task, so it never saw it.
    Both runner forms: a cluster the runner starts, and one already running at `shard.runner.address` (here a
    distributed.LocalCluster of two worker processes on 127.0.0.1, started by the test)."""
    import contextlib

    import distributed
    from prefect import flow

    from tasks.shard import shard_task
    from tasks.stage import StageRunner
    from tests.conftest import run_stages

    made = run_stages(tmp_path, ("acquire", "tokenizer"), ("acquire.batch_bytes=16000",))  # 7 chunks (row groups)
    cfg = made["cfg"]
    with contextlib.ExitStack() as stack:
        address = None
        if existing_cluster:
            address = stack.enter_context(distributed.LocalCluster(
                n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
            )).scheduler_address
        runner = cfg.shard.runner.model_copy(update={"kind": "dask", "address": address})
        dask = cfg.shard.model_copy(update={"runner": runner, "num_workers": 2})

        @flow(name="shard-stage-on-dask")
        def shard_stage_on_dask() -> dict:
            run = StageRunner(made["root"], cfg.report)
            return run(shard_task, dask, acquire=made["acquire"], synthesize=None,
                       tokenizer=made["tokenizer"]).manifest

        manifest = shard_stage_on_dask()
    assert manifest["chunks"] >= 4 and manifest["worker_processes"] == 2 and manifest["shards"], manifest


def test_training_windows_read_spilled_shards_and_draw_the_same_batches(tmp_path, small_corpus):
    """Training reads windows from each shard decompressed once into a private raw file: the batches are those of the
    in-memory shards, no shard is kept in memory, and the scratch directory goes with the windows."""
    from tasks.training.data import Windows

    tok_dir, out = tmp_path / "tok", tmp_path / "shards"
    tok_dir.mkdir()
    out.mkdir()
    records = _records(small_corpus)
    build_tokenizer(TokenizerConfig(vocab_size=320), records, tok_dir, LOG)
    manifest = shard_corpus(ShardConfig(tokens_per_shard=3000, val_fraction=0.1), Corpus.from_records(records),
                            tok_dir, out, LOG)
    train = split_tokens(write_manifest(out, "shard", manifest), "train")
    assert len(train) >= 3
    in_memory = [train.read(i).copy() for i in range(len(train))]
    windows = Windows(train, block_size=32, seed=7)
    scratch = Path(windows._scratch.name)
    x, y = windows.batch(64, 3)
    assert windows.tokens._arrays == [None] * len(train)  # nothing held: every row was a positioned read
    assert np.array_equal(windows.tokens.shard(1), in_memory[1])
    rng = np.random.default_rng([7, 3])
    picks = rng.integers(0, int(windows.starts.sum()), size=64)
    shard = np.searchsorted(windows.before, picks, side="right") - 1
    for row, (index, pick) in enumerate(zip(shard, picks)):
        start = pick - windows.before[index]
        expected = in_memory[index][start : start + 33]
        assert x[row].tolist() == expected[:-1].tolist() and y[row].tolist() == expected[1:].tolist()
    assert sorted(p.name for p in scratch.iterdir()) == [f"{i:05d}.tokens" for i in sorted({*shard.tolist(), 1})]
    del windows
    gc.collect()
    assert not scratch.exists()


@pytest.mark.parametrize("code, transient", [("EAI_NONAME", False), ("EAI_AGAIN", True)])
def test_a_host_name_that_does_not_resolve_is_not_retried_a_temporary_dns_failure_is(tmp_path, monkeypatch, code,
                                                                                     transient):
    """Offline, `mnemos-0.1` said 'cannot reach huggingface.co ([Errno -2] Name or service not known)' three times,
    after retries 5 and 10 s apart that could not change it: a name the resolver says does not exist is not transient;
    'Temporary failure in name resolution' (EAI_AGAIN) is, as is a refused connection (above). The resolver's answer
    is raised where urllib would raise it (this machine's own DNS answers vary), for a download and a hub listing."""
    import socket
    import urllib.error

    import tasks.corpus.download as fetching

    def resolver_says(*_args, **_kwargs):
        raise urllib.error.URLError(socket.gaierror(getattr(socket, code), "the resolver's answer"))

    monkeypatch.setattr(fetching, "open_url", resolver_says)
    with pytest.raises(AcquireError, match="cannot reach huggingface.co") as err:
        download("https://huggingface.co/TinyStories.txt", tmp_path / "TinyStories.txt", None, LOG, timeout=5)
    assert err.value.transient is transient
    source = SourceConfig(kind="hf", dataset="org/tiny", endpoint="https://hub.example")
    with pytest.raises(AcquireError, match="cannot reach the hub at https://hub.example") as err:
        acquire(AcquireConfig(sources=[source]), tmp_path / "hub", LOG)
    assert err.value.transient is transient


def test_a_corpus_of_one_document_has_no_held_out_text_and_shard_says_so(tmp_path, small_corpus, caplog):
    """The split holds out whole documents, so one document (a text file with no blank line, read as paragraphs)
    leaves validation empty: shard wrote its train shards anyway and train died on a ValueError traceback."""
    from tasks.shard import ShardError

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    build_tokenizer(TokenizerConfig(vocab_size=320), _records(small_corpus), tok_dir, LOG)
    one = [{"text": "\n".join(r["text"] for r in _records(small_corpus)), "language": "fr"}]
    with pytest.raises(ShardError, match=r"no held-out text: .*whole documents.*1 document \(fr\).*split_by: line"):
        shard_corpus(ShardConfig(val_fraction=0.1), Corpus.from_records(one), tok_dir, tmp_path / "out", LOG)
    assert not list((tmp_path / "out").glob("*.parquet"))
    with caplog.at_level(logging.WARNING):  # beside other languages: it trains, and the log says what is missing
        manifest = shard_corpus(ShardConfig(val_fraction=0.1), Corpus.from_records(_records(small_corpus) + one),
                                tok_dir, tmp_path / "both", LOG)
    assert set(manifest["totals"]["val"]["languages"]) == {"en"}  # es too has one document
    assert "nothing in es, fr is held out" in caplog.text and "evaluate reports no figures for it" in caplog.text
