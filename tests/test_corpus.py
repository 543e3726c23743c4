"""Documents out of real files: formats, compression, text splitting, encodings, duplicates, streaming."""
from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.corpus.formats as formats
from pipeline_config.schema import AcquireConfig, SourceConfig
from tasks.acquire import SeenHashes, acquire
from tasks.corpus.download import AcquireError
from tasks.corpus.formats import FileReport, documents_from

LOG = logging.getLogger("test")
FABLES = ["Le corbeau et le renard.\nMaître corbeau, sur un arbre perché,", "Tenait en son bec un fromage.",
          "Maître renard, par l'odeur alléché,\nLui tint à peu près ce langage :", "« Hé ! bonjour, Monsieur du Corbeau. »"]


def docs(path: Path, **source) -> list[str]:
    return list(documents_from(path, SourceConfig(path=str(path), **source)))


def _zst(path: Path, data: bytes) -> Path:
    with pa.output_stream(str(path), compression="zstd") as out:
        out.write(data)
    return path


@pytest.mark.parametrize("block", [7, 1 << 22])  # tiny blocks cut lines, CRLFs, separators and JSON mid-way
def test_a_french_txt_with_cr_endings_and_a_bom_becomes_paragraphs(tmp_path, monkeypatch, block):
    monkeypatch.setattr(formats, "BLOCK", block)
    text = "\ufeff" + "\r\r".join(p.replace("\n", "\r") for p in FABLES) + "\r"
    path = tmp_path / "fables.txt"
    path.write_bytes(text.encode("utf-8"))
    assert [d.strip() for d in docs(path)] == FABLES
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(("\ufeff" + "\r\n \r\n".join(FABLES).replace("\n", "\r\n")).encode())
    assert [d.strip().replace("\r", "") for d in docs(crlf)] == FABLES
    assert docs(path, split_by="line")[0] == "Le corbeau et le renard."
    assert len(docs(path, split_by="line")) == 6
    assert len(docs(path, split_by="file")) == 1


@pytest.mark.parametrize("block", [5, 1 << 22])
def test_separator_split_and_every_format_compressed_or_not(tmp_path, monkeypatch, block):
    monkeypatch.setattr(formats, "BLOCK", block)
    stories = [f"Story {i}.\n\nIt has two paragraphs, {i}." for i in range(5)]
    sep = "<|endoftext|>"
    raw = ("\n" + sep + "\n").join(stories) + "\n" + sep + "\n"
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(raw.encode()))
    _zst(tmp_path / "b.txt.zst", raw.encode())
    assert [d.strip() for d in docs(tmp_path / "a.txt.gz", separator=sep)] == stories
    assert [d.strip() for d in docs(tmp_path / "b.txt.zst", split_by="separator", separator=sep)] == stories
    (tmp_path / "c.jsonl.zst").unlink(missing_ok=True)
    _zst(tmp_path / "c.jsonl.zst", "".join(json.dumps({"text": s}) + "\n" for s in stories).encode())
    (tmp_path / "d.json.gz").write_bytes(gzip.compress(json.dumps([{"text": s, "n": i} for i, s in
                                                                    enumerate(stories)], indent=2).encode()))
    pq.write_table(pa.table({"id": list(range(5)), "content": stories}), tmp_path / "e.parquet")
    assert docs(tmp_path / "c.jsonl.zst") == stories
    assert docs(tmp_path / "d.json.gz") == stories
    assert docs(tmp_path / "e.parquet", text_field="content") == stories
    (tmp_path / "f.data").write_text(json.dumps({"text": "x"}))
    assert docs(tmp_path / "f.data", format="jsonl") == ["x"]
    with pytest.raises(AcquireError, match="format"):
        docs(tmp_path / "f.data")


def test_invalid_bytes_name_file_line_and_offset_unless_replaced_and_counted(tmp_path, caplog):
    path = tmp_path / "latin.txt"
    data = "première ligne\n\ndeuxième\n".encode() + "troisième écrite en latin-1\n".encode("latin-1")
    path.write_bytes(data)
    offset = data.index(b"\xe8")
    with pytest.raises(AcquireError, match=rf"latin\.txt: line 4, byte offset {offset}: .*not valid utf-8.*encoding"):
        docs(path)
    report = FileReport()
    got = list(documents_from(path, SourceConfig(path=str(path), errors="replace"), report))
    assert report.replaced == 2 and got[-1] == "deuxième\ntroisi\ufffdme \ufffdcrite en latin-1\n"
    assert docs(path, encoding="latin-1")[0] == "premiÃ¨re ligne"  # what it is read as when the encoding is wrong
    caplog.set_level(logging.WARNING)
    summary = acquire(AcquireConfig(sources=[SourceConfig(path=str(path), errors="replace")]), tmp_path, LOG)
    assert summary["replaced_characters"] == {"latin.txt": 2}
    assert "2 invalid utf-8 byte sequences replaced" in caplog.text


def test_null_or_non_string_text_names_the_line(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(AcquireError, match=r"a\.jsonl:2: 'text' is null, not text"):
        docs(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text('[\n  {"text": "fine"},\n  {"text": 3}\n]')
    with pytest.raises(AcquireError, match=r"b\.json:3: 'text' is int, not text"):
        docs(tmp_path / "b.json")
    (tmp_path / "c.json").write_text('[{"text": "fine"}, {"text": "cut')
    with pytest.raises(AcquireError, match="not valid JSON"):
        docs(tmp_path / "c.json")
    pq.write_table(pa.table({"text": ["a", "b", None]}), tmp_path / "d.parquet")
    with pytest.raises(AcquireError, match=r"d\.parquet: row 3: 'text' is null"):
        docs(tmp_path / "d.parquet")
    first = next(documents_from(tmp_path / "a.jsonl", SourceConfig(path="a.jsonl")))
    assert first == "fine"  # the BOM did not break the first line


def test_a_damaged_or_misnamed_file_is_one_error_naming_it(tmp_path):
    """A .gz cut short by a failed copy, a .gz that is not gzip, a .parquet that is not Parquet: pyarrow's OSError
    and ArrowInvalid reached the command line as tracebacks; each is now the stage's own error, naming the file."""
    whole = gzip.compress(b"".join(json.dumps({"text": f"story {i}"}).encode() + b"\n" for i in range(2000)))
    files = {"cut.jsonl.gz": whole[: len(whole) // 2], "plain.jsonl.gz": b'{"text": "hi"}\n',
             "text.parquet": b"not parquet at all"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        kind = "parquet" if name.endswith("parquet") else "jsonl (gz)"
        with pytest.raises(AcquireError, match=rf"^{tmp_path / name}: cannot be read as {re.escape(kind)}: .*"
                                               "the file is damaged or cut short, or not what its name says"):
            acquire(AcquireConfig(sources=[SourceConfig(path=str(tmp_path / name))]), tmp_path / "out", LOG)
    assert not (tmp_path / "out" / "documents.parquet").exists()


def test_duplicates_are_dropped_and_counted_and_row_groups_follow_batch_bytes(tmp_path):
    texts = [f"document {i} " + "x" * 50 for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts + texts[:5]))
    (tmp_path / "b.txt").write_text("\n\n".join(texts[10:13] + ["new one"]))
    cfg = AcquireConfig(sources=[SourceConfig(path=str(tmp_path / "a.jsonl")),
                                 SourceConfig(path=str(tmp_path / "b.txt"), language="fr")], batch_bytes=500)
    summary = acquire(cfg, tmp_path, LOG)
    table = pq.read_table(tmp_path / "documents.parquet")
    assert summary["duplicates"] == 8 and summary["documents"] == table.num_rows == 41
    assert len(set(table.column("hash").to_pylist())) == 41
    assert summary["languages"] == {"en": {"documents": 40, "bytes": sum(len(t) for t in texts)},
                                    "fr": {"documents": 1, "bytes": 7}}
    assert pq.ParquetFile(tmp_path / "documents.parquet").num_row_groups == summary["row_groups"] > 4


def test_a_directory_source_reads_known_formats_recursively_less_hidden_entries(tmp_path):
    for name in ("a.txt", "sub/b.jsonl.gz", "sub/notes.md", ".git/c.txt", "sub/.d.txt", "__pycache__/e.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert formats.resolve_local(str(tmp_path)) == [tmp_path / "a.txt", tmp_path / "sub" / "b.jsonl.gz"]
    assert formats.resolve_local(str(tmp_path / ".git" / "*.txt")) == [tmp_path / ".git" / "c.txt"]  # named: read


def test_sources_that_give_no_document_fail_the_stage_and_write_nothing(tmp_path):
    """An empty file, or one whose documents are all shorter than `min_chars`, is a mistake to name, not a corpus."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("a\n\nbb\n\nccc")
    cases = [([SourceConfig(path=str(tmp_path / "empty.txt"))], 1, "0 shorter"),
             ([SourceConfig(path=str(tmp_path / "short.txt"))], 4, "3 shorter than acquire.min_chars")]
    for sources, min_chars, counted in cases:
        with pytest.raises(AcquireError, match=f"gave no documents: {counted}"):
            acquire(AcquireConfig(sources=sources, min_chars=min_chars), tmp_path / "out", LOG)
        assert not (tmp_path / "out" / "documents.parquet").exists()


def test_a_byte_budget_below_the_first_document_says_so(tmp_path):
    """`acquire.byte_budget=10`: no document fits, and the error blamed min_chars and the paths (0 short, 0
    duplicates) instead of the budget."""
    (tmp_path / "a.txt").write_text("once upon a time there was a dog\n\nthe end of it all")
    with pytest.raises(AcquireError, match=r"acquire.byte_budget \(10 bytes\) is smaller than the first document "
                                           r"\(32 bytes, in a.txt\): raise it"):
        acquire(AcquireConfig(sources=[SourceConfig(path=str(tmp_path / "a.txt"))], byte_budget=10), tmp_path / "out",
                LOG)
    assert not (tmp_path / "out" / "documents.parquet").exists()


def test_a_text_file_without_blank_lines_is_said_to_be_one_document(tmp_path, monkeypatch, caplog):
    """A file of lines with no blank line between them (as many corpora are) is one paragraph, so one document: the
    budget error said "raise it", and a budget that held it left no document to hold out for validation. Both now
    name the source's `split_by: line`."""
    import tasks.acquire as acquire_module

    monkeypatch.setattr(acquire_module, "LARGE_PARAGRAPH", 1000)
    (tmp_path / "lines.txt").write_text("".join(f"la phrase numéro {i} du débat.\n" for i in range(100)))
    source = SourceConfig(path=str(tmp_path / "lines.txt"))
    with pytest.raises(AcquireError, match=r"smaller than the first document \(\d+ bytes, in lines.txt\); lines.txt "
                                           r"has no blank line in [\d.]+ MB.*set split_by: line on its source"):
        acquire(AcquireConfig(sources=[source], byte_budget=1500), tmp_path / "out", LOG)
    with caplog.at_level(logging.WARNING):
        manifest = acquire(AcquireConfig(sources=[source]), tmp_path / "out", LOG)
    assert manifest["documents"] == 1
    assert re.search(r"lines.txt has no blank line in [\d.]+ MB.*set split_by: line", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        manifest = acquire(AcquireConfig(sources=[SourceConfig(path=str(tmp_path / "lines.txt"), split_by="line")]),
                           tmp_path / "out", LOG)
    assert manifest["documents"] == 100 and "split_by" not in caplog.text


def test_reading_stops_at_the_byte_budget(tmp_path, monkeypatch):
    """Past the budget the file holds an invalid byte: reading it would fail, so passing proves it was not read."""
    monkeypatch.setattr(formats, "BLOCK", 1 << 12)
    path = tmp_path / "big.txt"
    path.write_bytes("\n\n".join(f"paragraph {i} " + "y" * 80 for i in range(3000)).encode() + b"\n\n\xff\n")
    summary = acquire(AcquireConfig(sources=[SourceConfig(path=str(path))], byte_budget=50_000), tmp_path, LOG)
    assert summary["budget_reached"] and 49_000 < summary["bytes"] <= 50_000
    with pytest.raises(AcquireError, match="byte offset"):
        acquire(AcquireConfig(sources=[SourceConfig(path=str(path))]), tmp_path / "all", LOG)


def test_seen_hashes_matches_a_set():
    rng = np.random.default_rng(0)
    seen, reference = SeenHashes(), set()
    for _ in range(50):
        group = rng.integers(0, 3000, size=200).astype(np.uint64)
        expected = []
        for value in group.tolist():
            expected.append(value not in reference)
            reference.add(value)
        assert seen.first_seen(group).tolist() == expected
    assert sum(run.size for run in seen.runs) == len(reference) and len(seen.runs) <= 12


def test_encoding_must_be_known_and_ascii_compatible():
    with pytest.raises(ValueError, match="unknown encoding"):
        SourceConfig(path="x", encoding="utf-9")
    with pytest.raises(ValueError, match="UTF-16"):
        SourceConfig(path="x", encoding="utf-16")
    with pytest.raises(ValueError, match="needs 'separator'"):
        SourceConfig(path="x", split_by="separator")


def test_a_french_txt_with_cr_and_a_bom_is_trained_and_evaluated_as_its_own_language(tmp_path, small_corpus):
    """acquire -> tokenizer -> shard -> train -> evaluate as plain stage functions: the French file becomes many
    documents, French lands in both splits, and evaluate reports French bits per byte beside the total."""
    from pipeline_config.schema import EvaluateConfig, ShardConfig, TokenizerConfig
    from tasks.evaluate import evaluate
    from tasks.shard import shard
    from tasks.stage import write_manifest
    from tasks.tokenizer import tokenizer
    from tasks.train import train_stage
    from tests.test_train import tiny_train_config

    paragraphs = [f"Fable {i}. Le renard {i} parla au corbeau perché sur l'arbre numéro {i}, et le fromage tomba."
                  for i in range(120)]
    (tmp_path / "fables.txt").write_bytes(("\ufeff" + "\r\r".join(paragraphs) + "\r").encode())
    sources = [SourceConfig(path=str(small_corpus)), SourceConfig(path=str(tmp_path / "fables.txt"), language="fr")]
    artifacts = {}
    steps = [("acquire", lambda out: acquire(AcquireConfig(sources=sources, batch_bytes=20_000), out, LOG)),
             ("tokenizer", lambda out: tokenizer(TokenizerConfig(vocab_size=400), out, LOG,
                                                 acquire=artifacts["acquire"], synthesize=None)),
             ("shard", lambda out: shard(ShardConfig(tokens_per_shard=4000, val_fraction=0.1), out, LOG,
                                         acquire=artifacts["acquire"], synthesize=None,
                                         tokenizer=artifacts["tokenizer"])),
             ("train", lambda out: train_stage(tiny_train_config(max_steps=4), out, LOG, shard=artifacts["shard"])),
             ("evaluate", lambda out: evaluate(EvaluateConfig(max_batches=2, max_new_tokens=4, prompts=["le"]), out,
                                               LOG, tokenizer=artifacts["tokenizer"], shard=artifacts["shard"],
                                               train=artifacts["train"]))]
    for name, run in steps:
        (tmp_path / name).mkdir()
        artifacts[name] = write_manifest(tmp_path / name, name, run(tmp_path / name))
    assert artifacts["acquire"].manifest["languages"]["fr"]["documents"] == 120
    totals = artifacts["shard"].manifest["totals"]
    assert totals["train"]["languages"]["fr"]["documents"] > 80 and totals["val"]["languages"]["fr"]["documents"] > 3
    metrics = artifacts["evaluate"].manifest["metrics"]
    assert {"val_bpb", "val_bpb.en", "val_bpb.fr", "val_perplexity.fr", "val_loss.en"} <= set(metrics)
    assert min(metrics["val_bpb.en"], metrics["val_bpb.fr"]) <= metrics["val_bpb"] <= \
        max(metrics["val_bpb.en"], metrics["val_bpb.fr"])


def _file_server(files: dict[str, bytes]):
    """A loopback file server (no internet here) answering GET /<path> with byte ranges."""
    import http.server

    from tests.loopback import LoopbackServer, send_range

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            send_range(self, files[self.path.lstrip("/")])

        def log_message(self, *args):
            pass

    return LoopbackServer(Handler)


def _preset_source(preset: str, **changes) -> tuple[SourceConfig, AcquireConfig]:
    from pipeline_config import load_config

    cfg = load_config(preset).acquire
    return cfg.sources[0].model_copy(update=changes), cfg


def test_mnemos_source_shape_one_large_french_txt_cut_at_the_budget(tmp_path):
    """The preset's own source settings against a generated file of the same shape: one large .txt of speech turns,
    served over HTTP; the budget (scaled down) stops reading mid-file at a turn boundary."""
    turns = "".join(f"[Intervenant {i % 7}:] Monsieur le président, l'amendement numéro {i} est défendu.\n"
                    for i in range(20_000)).encode()
    source, preset = _preset_source("mnemos-0.1")
    assert source.kind == "http" and source.language == "fr" and preset.byte_budget == 100_000_000
    with _file_server({"FR/AssembleeNationale_13/train.txt": turns}) as server:
        source = source.model_copy(update={"url": f"{server.url}/FR/AssembleeNationale_13/train.txt"})
        summary = acquire(preset.model_copy(update={"sources": [source], "byte_budget": 300_000}), tmp_path, LOG)
    assert summary["budget_reached"] and 3500 < summary["languages"]["fr"]["documents"] < 4000  # ~80 B a turn
    assert pq.read_table(tmp_path / "documents.parquet").column("text")[0].as_py().startswith("[Intervenant 0:]")


def test_alexandria_source_shape_a_parquet_hub_dataset(tmp_path):
    import io

    from tests.hub_double import HubDouble

    fables = [f"Había una vez un zorro número {i} que ayudaba a sus amigos." for i in range(300)]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": fables, "id": list(range(300))}), buffer)
    source, preset = _preset_source("alexandria")
    assert source.kind == "hf" and source.dataset == "hetline/tiny-coop-es" and preset.byte_budget is None
    files = {"data/train-00000-of-00001.parquet": buffer.getvalue()}
    with HubDouble(source.dataset, files, lfs=set(files)) as hub:
        source = source.model_copy(update={"endpoint": hub.url})
        summary = acquire(preset.model_copy(update={"sources": [source]}), tmp_path, LOG)
    assert summary["languages"] == {"es": {"documents": 300, "bytes": sum(len(f.encode()) for f in fables)}}


def test_tinystories_source_shape_an_endoftext_separated_txt(tmp_path):
    from pipeline_config import load_config

    stories = [f"Once upon a time, there was a little dog named Max {i}.\n\nMax liked to run." for i in range(500)]
    data = "\n<|endoftext|>\n".join(stories).encode() + b"\n<|endoftext|>\n"
    source, preset = _preset_source("tinystories")
    assert source.kind == "http" and source.document_split == "separator" and preset.byte_budget is None
    with _file_server({"TinyStoriesV2-GPT4-train.txt": data}) as server:
        source = source.model_copy(update={"url": f"{server.url}/TinyStoriesV2-GPT4-train.txt"})
        summary = acquire(preset.model_copy(update={"sources": [source]}), tmp_path, LOG)
    assert summary["documents"] == 500 and not summary["budget_reached"]
    assert pq.read_table(tmp_path / "documents.parquet").column("text")[1].as_py() == stories[1]
    assert load_config("tinystories").synthesize.n == 0
