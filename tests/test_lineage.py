"""Lineage without Prefect: the stages as plain functions on a small corpus, a real SQLite MLflow registry.

One registered parent (module fixture) serves every test: `init_from` resolution and the train key, the refusals
that name a mismatch, LoRA through the train stage, the champion gate's rescoring, and the fixed held-out set."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.conftest import SAMPLE

LOG = logging.getLogger("test.lineage")
NAME = "lineage-test"


def _stage(root: Path, name: str, cfg, run) -> object:
    """What `Stage.execute` writes: the function's fields plus the config slice."""
    from tasks.stage import write_manifest

    (root / name).mkdir(parents=True, exist_ok=True)
    return write_manifest(root / name, name, {"config": cfg.model_dump(mode="json"), **run(cfg, root / name)})


def _train_config(**changes):
    from tests.test_train import tiny_train_config

    return tiny_train_config(**{"max_steps": 4, "checkpoint_interval": 2, **changes})


def _pipeline(root: Path, records: list[str], train_cfg, upstream: dict | None = None) -> dict:
    """acquire -> tokenizer -> shard -> train -> evaluate -> export (none) as plain stage functions."""
    from pipeline_config.schema import AcquireConfig, EvaluateConfig, ExportConfig, ShardConfig, SourceConfig, \
        TokenizerConfig
    from tasks.acquire import acquire
    from tasks.evaluate import evaluate
    from tasks.export import export
    from tasks.shard import shard
    from tasks.tokenizer import tokenizer
    from tasks.train import train_stage

    (root / "corpus.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    a = dict(upstream or {})
    if "tokenizer" not in a:
        sources = [SourceConfig(path=str(root / "corpus.jsonl"))]
        a["acquire"] = _stage(root, "acquire", AcquireConfig(sources=sources), lambda c, out: acquire(c, out, LOG))
        a["tokenizer"] = _stage(root, "tokenizer", TokenizerConfig(vocab_size=320), lambda c, out: tokenizer(
            c, out, LOG, acquire=a["acquire"], synthesize=None))
        a["shard"] = _stage(root, "shard", ShardConfig(tokens_per_shard=20000, val_fraction=0.1), lambda c, out: shard(
            c, out, LOG, acquire=a["acquire"], synthesize=None, tokenizer=a["tokenizer"]))
    a["train"] = _stage(root, "train", train_cfg, lambda c, out: train_stage(c, out, LOG, tokenizer=a["tokenizer"],
                                                                             shard=a["shard"]))
    a["evaluate"] = _stage(root, "evaluate", EvaluateConfig(max_batches=2, max_new_tokens=4, prompts=["once"]),
                           lambda c, out: evaluate(c, out, LOG, tokenizer=a["tokenizer"], shard=a["shard"],
                                                   train=a["train"]))
    a["export"] = _stage(root, "export", ExportConfig(formats=[]), lambda c, out: export(
        c, out, LOG, tokenizer=a["tokenizer"], train=a["train"]))
    return a


def _register(store: Path, upstream: dict, name: str) -> dict:
    """Register into the default store of an artifacts root `store` (SQLite and artifacts under store/mlflow)."""
    from pipeline_config.schema import RegisterConfig
    from tasks.register import register

    out = store / "register" / name
    out.mkdir(parents=True, exist_ok=True)
    return register(RegisterConfig(model_name=NAME), out, LOG, synthesize=None, **upstream)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """Version 1 of NAME, trained from scratch on 150 stories, and its stage artifacts."""
    root = tmp_path_factory.mktemp("lineage") / "v1"
    stories = SAMPLE.read_text(encoding="utf-8").splitlines()
    upstream = _pipeline(root, stories[:150], _train_config())
    registered = _register(root.parent, upstream, "v1")
    assert registered["version"] == "1" and registered["champion"] is True
    return {"root": root, "upstream": upstream, "registered": registered, "stories": stories}


def _ref(parent):
    from pipeline_config.schema import RegistryRef

    return RegistryRef(tracking_uri=parent["registered"]["tracking_uri"], model_name=NAME)


def test_init_from_resolves_the_champion_and_the_train_key_follows_the_resolved_version(parent, tmp_path):
    from pipeline_config.schema import RegistryRef
    from tasks.lineage.registry import WEIGHTS_TAG, resolve
    from tasks.train import STAGE

    found = resolve(_ref(parent), "champion")
    assert (found.name, found.version) == (NAME, "1")
    weights = parent["upstream"]["train"].manifest["files"]["model.safetensors"]["sha256"]
    assert found.weights_sha256 == weights
    assert resolve(_ref(parent), f"models:/{NAME}/1") == found == resolve(_ref(parent), f"models:/{NAME}@champion")

    upstream = {"tokenizer": parent["upstream"]["tokenizer"], "shard": parent["upstream"]["shard"]}
    cfg = _train_config(init_from="champion", registry=_ref(parent))
    nobody = cfg.model_copy(update={"registry": RegistryRef(tracking_uri=f"sqlite:///{tmp_path / 'none.db'}",
                                                            model_name=NAME)})
    assert STAGE.key(cfg, upstream) != STAGE.key(nobody, upstream)  # no champion yet vs version 1
    assert not (tmp_path / "none.db").exists()  # resolving did not create a store
    # another version's weights under the same alias: a new key (what moving the champion does)
    from mlflow import MlflowClient

    client = MlflowClient(parent["registered"]["tracking_uri"])
    before = STAGE.key(cfg, upstream)
    client.set_model_version_tag(NAME, "1", WEIGHTS_TAG, "0" * 64)
    try:
        assert STAGE.key(cfg, upstream) != before
    finally:
        client.set_model_version_tag(NAME, "1", WEIGHTS_TAG, weights)
    assert STAGE.key(cfg, upstream) == before


def test_champion_with_no_champion_trains_from_scratch_and_says_so(tmp_path, caplog):
    from model import ModelConfig
    from pipeline_config.schema import RegistryRef
    from tasks.training.init import starting_point

    cfg = _train_config(init_from="champion",
                        registry=RegistryRef(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", model_name=NAME))
    with caplog.at_level(logging.INFO, logger=LOG.name):
        start = starting_point(cfg, ModelConfig(vocab_size=320), None, tmp_path, LOG)
    assert start.parent is None and start.init is None
    assert f"{NAME} has no 'champion' yet: training from scratch" in caplog.text


def test_a_parent_of_another_architecture_or_tokenizer_or_a_missing_version_is_refused_by_name(parent, tmp_path):
    from model import ModelConfig
    from tasks.lineage.registry import LineageError, fetch, resolve
    from tasks.training.init import check_compatible, starting_point

    found = resolve(_ref(parent), f"models:/{NAME}/1")
    files = fetch(found, tmp_path / "parent")
    theirs = ModelConfig.model_validate(json.loads(files.model_config.read_text()))
    check_compatible(found, files, theirs.model_copy(update={"dropout": 0.3}), found.tokenizer_sha256)  # dropout ok
    with pytest.raises(LineageError, match=r"another architecture: n_embd 32 \(this run: 64\)"):
        check_compatible(found, files, theirs.model_copy(update={"n_embd": 64}), found.tokenizer_sha256)
    with pytest.raises(LineageError, match=rf"another tokenizer .*tokenizer.from_model: models:/{NAME}/1"):
        check_compatible(found, files, theirs, "f" * 64)
    with pytest.raises(LineageError, match=rf"models:/{NAME}/7 is not in the MLflow store"):
        starting_point(_train_config(init_from=f"models:/{NAME}/7", registry=_ref(parent)), theirs, None, tmp_path,
                       LOG)


def test_lora_from_a_registered_model_trains_adapters_and_writes_plain_merged_weights(parent, tmp_path):
    from safetensors.torch import load_file

    from pipeline_config.schema import LoraConfig
    from tasks.train import train_stage

    up = parent["upstream"]
    cfg = _train_config(init_from=f"models:/{NAME}@champion", registry=_ref(parent),
                        lora=LoraConfig(rank=4, alpha=8, targets=["c_attn"]))
    summary = train_stage(cfg, tmp_path, LOG, tokenizer=up["tokenizer"], shard=up["shard"])
    assert summary["init_from"]["version"] == "1"
    before, after = load_file(str(up["train"].path / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert set(before) == set(after)  # plain weights, the parent's keys: no adapter tensors left
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed == {"h.0.attn.c_attn.weight"}  # only the adapted layer moved (the merge), nothing else
    assert summary["trainable_parameters"] == 4 * (32 + 96)  # A (4 x 32) and B (96 x 4)


def test_the_gate_rescores_the_champion_on_the_same_text_whatever_its_tokenizer(parent, monkeypatch):
    """The re-tokenizing path rebuilds exactly the held-out stream the shard stage wrote, so with the champion's own
    tokenizer it reproduces the same-tokens figure; and a new candidate's gate is recorded on its version."""
    import tasks.lineage.gate as gate
    from tasks.lineage.registry import resolve

    champion = resolve(_ref(parent), "champion")
    upstream = {**parent["upstream"], "synthesize": None}
    same = gate.score_champion(champion, upstream, LOG)
    monkeypatch.setattr(gate, "tokenizer_digest", lambda path: str(path))  # never equal: take the other path
    retokenized = gate.score_champion(champion, upstream, LOG)
    assert same["same_tokenizer"] and not retokenized["same_tokenizer"]
    assert retokenized["metrics"]["val_bpb"] == pytest.approx(same["metrics"]["val_bpb"], rel=1e-6)
    stored = parent["upstream"]["evaluate"].manifest["metrics"]["val_bpb"]
    assert same["metrics"]["val_bpb"] == pytest.approx(stored, rel=1e-6)  # the very windows evaluate scored


def test_a_version_trained_from_the_champion_records_its_parent_and_the_gate(parent, tmp_path):
    from mlflow import MlflowClient

    up = parent["upstream"]
    child = _pipeline(tmp_path / "v2", [], _train_config(init_from="champion", registry=_ref(parent), max_steps=6),
                      upstream={k: up[k] for k in ("acquire", "tokenizer", "shard")})
    registered = _register(parent["root"].parent, child, "v2")
    v1_run = parent["registered"]["run_id"]
    assert registered["parent"] == {"name": NAME, "version": "1", "run_id": v1_run}
    version = MlflowClient(registered["tracking_uri"]).get_model_version(NAME, registered["version"])
    assert version.tags["scriptorium.parent"] == f"{NAME}/1" and version.tags["scriptorium.parent_run_id"] == v1_run
    gate = {k.split(".", 2)[2]: v for k, v in version.tags.items() if k.startswith("scriptorium.gate.")}
    candidate, champion = float(gate["candidate"]), float(gate["champion"])
    assert champion == pytest.approx(up["evaluate"].manifest["metrics"]["val_bpb"], abs=1e-6)
    assert float(gate["margin"]) == pytest.approx(champion - candidate, abs=1e-5)
    assert registered["champion"] is (candidate < champion) and registered["gate"] == gate["decision"]
    assert f"parent: models:/{NAME}/1" in version.description and "champion gate on val_bpb" in version.description


def test_the_held_out_set_is_fixed_when_documents_are_added(parent):
    """Split by content hash: adding documents never moves an existing one between train and validation."""
    from tasks.corpus.reader import Corpus
    from tasks.shard import forced_val, held_out

    def split(texts: list[str]) -> dict[str, bool]:
        corpus = Corpus.from_records([{"text": t, "language": "en"} for t in texts])
        forced = forced_val(corpus, 0.1)
        batches = list(corpus.batches())
        return {t: held for b in batches for t, held in zip(b.texts, held_out(b.hashes, 0.1, forced).tolist())}

    texts = [json.loads(line)["text"] for line in parent["stories"]]
    before, after = split(texts[:150]), split(texts[:150] + texts[150:300])
    assert any(before.values()) and not all(before.values())
    assert {t: after[t] for t in before} == before


def test_a_parent_trained_from_this_very_input_is_the_output_not_trained_again(parent, tmp_path):
    """The nightly fixed point: a champion whose recorded train input (config and shards) is this run's."""
    from model import ModelConfig
    from tasks.lineage.registry import resolve
    from tasks.training.init import starting_point

    found = resolve(_ref(parent), f"models:/{NAME}/1")
    assert found.train_input  # register recorded it
    cfg = _train_config(init_from=f"models:/{NAME}/1", registry=_ref(parent))
    expected = ModelConfig.model_validate(parent["upstream"]["train"].manifest["model_config"])
    tokenizer = parent["upstream"]["tokenizer"]
    same = starting_point(cfg, expected, tokenizer, tmp_path / "a", LOG, found.train_input)
    assert same.reuse is not None and same.init is None
    assert same.reuse.weights.read_bytes() == (parent["upstream"]["train"].path / "model.safetensors").read_bytes()
    other = starting_point(cfg, expected, tokenizer, tmp_path / "b", LOG, "another input")
    assert other.reuse is None and other.init is not None


def test_a_tracking_server_that_does_not_answer_fails_in_one_line_at_once(parent, tmp_path):
    """An http(s) tracking URI is tried once before MLflow is asked (its client retries a refused connection for
    about four minutes, then raises a traceback): register and `init_from` stop at once, naming the URI without its
    password. A server that answers, with any status, passes: here a loopback HTTP server stands in for one, since
    what is checked is only whether something answers."""
    from http.server import BaseHTTPRequestHandler

    from pipeline_config.schema import RegisterConfig, RegistryRef
    from tasks.lineage.registry import LineageError, resolve, unreachable_server
    from tasks.register import RegisterError, register
    from tests.loopback import LoopbackServer, closed_port

    class Answers(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *_args):
            pass

    with LoopbackServer(Answers) as server:
        assert unreachable_server(server.url) is None
    down = f"http://user:s3cret@127.0.0.1:{closed_port()}"
    said = unreachable_server(down)
    assert said.startswith("no MLflow tracking server answers at http://***@127.0.0.1:") and "refused" in said
    assert unreachable_server(f"sqlite:///{tmp_path / 'mlflow.db'}") is None  # not a server: not asked
    with pytest.raises(RegisterError, match="register.tracking_uri: no MLflow tracking server answers"):
        register(RegisterConfig(model_name=NAME, tracking_uri=down), tmp_path / "register" / "x", LOG,
                 synthesize=None, **parent["upstream"])
    with pytest.raises(LineageError, match="champion: no MLflow tracking server answers"):
        resolve(RegistryRef(tracking_uri=down, model_name=NAME), "champion")
