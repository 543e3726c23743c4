"""acquire, tokenizer and shard as plain functions on real files, SentencePiece and Parquet."""
from __future__ import annotations

import hashlib
import http.server
import json
import logging
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline_config.schema import AcquireConfig, ShardConfig, SourceConfig, TokenizerConfig
from tasks.acquire import AcquireError, acquire, download, normalize
from tasks.stage import write_manifest
from tasks.corpus.reader import load_split
from tasks.shard import frame_documents, shard_corpus, split_of
from tasks.tokenizer import build_tokenizer
from tests.loopback import LoopbackServer, send_range

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
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    source = SourceConfig(kind="hf", dataset="org/tiny", endpoint=endpoint)
    with pytest.raises(AcquireError, match=f"cannot reach the hub at {endpoint}.*endpoint"):
        acquire(AcquireConfig(sources=[source]), tmp_path, LOG)


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


def test_char_tokenizer_round_trips(tmp_path, small_corpus):
    from model.tokenizer import load_tokenizer

    build_tokenizer(TokenizerConfig(kind="char"), _records(small_corpus), tmp_path, LOG)
    tok = load_tokenizer(tmp_path)
    text = "el pequeño perro"
    assert tok.decode(tok.encode([text])[0]) == text
    assert tok.encode(["\u4e2d"])[0] == [tok.unk_id]


def test_split_is_by_content_and_stable():
    texts = [f"document number {i}" for i in range(2000)]
    splits = [split_of(t, 0.1) for t in texts]
    assert 100 < splits.count("val") < 300
    assert [split_of(t, 0.1) for t in reversed(texts)] == splits[::-1]


def test_frame_documents_wraps_each_document():
    framed = frame_documents([[5, 6], [], [7]], bos=1, eos=2, dtype=np.dtype(np.uint16))
    assert framed.tolist() == [1, 5, 6, 2, 1, 2, 1, 7, 2]


def test_shards_are_deterministic_and_load_zero_copy(tmp_path, small_corpus):
    records = _records(small_corpus)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    build_tokenizer(TokenizerConfig(vocab_size=320), records, tok_dir, LOG)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        outs.append(shard_corpus(ShardConfig(docs_per_shard=40, val_fraction=0.1), records, tok_dir, out, LOG))
    assert [s["sha256"] for s in outs[0]["shards"]] == [s["sha256"] for s in outs[1]["shards"]]
    manifest = outs[0]
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) >= 4
    assert pq.ParquetFile(tmp_path / "a" / manifest["shards"][0]["file"]).metadata.num_row_groups == 1
    artifact = write_manifest(tmp_path / "a", "shard", manifest)
    single = [s for s in manifest["shards"] if s["split"] == "val"]
    val = load_split(artifact, "val")
    assert val.dtype == np.uint16 and val.size == manifest["totals"]["val"]["tokens"]
    if len(single) == 1:
        assert not val.flags.writeable  # zero-copy view of the Arrow buffer
    train = load_split(artifact, "train")
    assert train.size == manifest["totals"]["train"]["tokens"] and train[0] == 1  # starts with <s>
