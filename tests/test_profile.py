"""The model profile (parameters by component, FLOPs, memory) and the gradient norm, from the loop to MLflow."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from model import ModelConfig, build_model
from model.profile import activation_bytes, model_profile
from pipeline_config.schema import ModelSection, TokenizerConfig, TrainConfig
from tasks.stage import write_json, write_manifest
from tests.conftest import temporary_mlflow_store
from tasks.tokenizer import build_tokenizer
from tasks.training.files import PROFILE
from tasks.training.loop import train

LOG = logging.getLogger("test")
V, C, L, T = 100, 32, 2, 16


def _train_config(**changes) -> TrainConfig:
    return TrainConfig(**{**dict(model=ModelSection(arch="gpt", n_layer=L, n_head=2, n_embd=C, block_size=T),
                                 batch_size=4, max_steps=4, warmup_steps=1, eval_interval=2, eval_batches=1,
                                 checkpoint_interval=2, track_emissions=False, threads=1, dtype="float32",
                                 log_interval=2), **changes})


def test_parameters_by_component_follow_the_architecture():
    profile = model_profile(build_model(ModelConfig(arch="gpt", vocab_size=V, n_layer=L, n_embd=C, n_head=2,
                                                    block_size=T)), batch_size=2)
    parts = profile["parameters_by_component"]
    assert parts == {"embedding": V * C + T * C, "attention": L * 4 * C * C, "mlp": L * 8 * C * C,
                     "norms": (2 * L + 1) * C, "head": 0}  # tied: the head is the embedding's matrix
    assert profile["tied_embedding"] and sum(parts.values()) == profile["parameters"]
    for arch in ("llama", "mamba2"):
        model = build_model(ModelConfig(arch=arch, vocab_size=V, n_layer=L, n_embd=C, n_head=2, tie_weights=False,
                                        headdim=16, chunk_size=8, block_size=T))
        parts = model_profile(model, 2)["parameters_by_component"]
        assert sum(parts.values()) == model.num_params(non_embedding=False) and parts["head"] == V * C
        assert ("mixer" in parts) == (arch == "mamba2") and ("attention" in parts) == (arch == "llama")


def test_memory_estimate_grows_with_the_batch_and_holds_at_least_the_logits():
    cfg = ModelConfig(arch="llama", vocab_size=V, n_layer=L, n_embd=C, n_head=2, block_size=T)
    # Per sequence, plus a little that does not depend on the batch (a batch of one saves a few views instead).
    one, two, three, four = (activation_bytes(cfg, b) for b in (1, 2, 3, 4))
    assert four - three == three - two > 0.9 * one
    assert one > T * V * 4  # the fp32 logits alone are kept for the cross-entropy's backward
    deeper = activation_bytes(cfg.model_copy(update={"n_layer": 2 * L}), 1)
    assert one < deeper < 2 * one  # per-layer activations double, embedding and logits do not
    profile = model_profile(build_model(cfg), batch_size=4)
    memory = profile["memory_bytes"]
    assert memory["optimizer"] == 2 * memory["gradients"] == 8 * profile["trainable_parameters"]
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert profile["flops_per_token"] == build_model(cfg).flops_per_token()


def test_the_loop_logs_the_gradient_norm_before_clipping_and_writes_the_profile(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 64, 3000).astype(np.uint16)
    summary, _ = train(_train_config(grad_clip=1e-4), tokens, tokens[:600], 64, tmp_path, LOG)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 1e-3 for r in rows)  # the norm before the clip
    assert json.loads((tmp_path / PROFILE).read_text()) == summary["profile"]
    assert summary["profile"]["parameters"] == summary["parameters"]


def test_register_sends_the_grad_norm_curve_the_profile_and_the_tokenizer_comparison(tmp_path, small_corpus):
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.register import _log_lineage

    records = [{"text": json.loads(x)["text"], "language": "en"} for x in small_corpus.read_text().splitlines()[:30]]
    tok_cfg = TokenizerConfig(candidates=[{"kind": "char"}, {"kind": "word", "vocab_size": 500}])
    tokenizer = write_manifest(tmp_path / "tok", "tokenizer",
                               build_tokenizer(tok_cfg, records, tmp_path / "tok", LOG))
    tokens = np.random.default_rng(0).integers(0, 64, 3000).astype(np.uint16)
    summary, _ = train(_train_config(), tokens, tokens[:600], 64, tmp_path / "train", LOG)
    trained = write_manifest(tmp_path / "train", "train", {**summary, "config": _train_config().model_dump()})
    write_json(tmp_path / "eval" / "samples.json", [])
    evaluation = write_manifest(tmp_path / "eval", "evaluate", {"metrics": {"val_bpb": 3.0, "val_loss": 2.0}})
    with temporary_mlflow_store(tmp_path / "mlflow") as (_, experiment):
        with mlflow.start_run(experiment_id=experiment) as run:
            _log_lineage(MlflowClient(), run.info.run_id,
                         {"tokenizer": tokenizer, "train": trained, "evaluate": evaluation}, tmp_path)
        client = MlflowClient()
        history = client.get_metric_history(run.info.run_id, "train/grad_norm")
        logged = {a.path for a in client.list_artifacts(run.info.run_id)} | \
            {a.path for folder in ("plots", "tables") for a in client.list_artifacts(run.info.run_id, folder)}
        table = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/tables/tokenizer_comparison.json"))
    assert run.info.artifact_uri.startswith((tmp_path / "mlflow").as_uri())  # not ./mlruns where the tests run
    assert sorted(m.step for m in history) == [1, 2, 3, 4] and all(m.value > 0 for m in history)
    assert {"profile.json", "plots/comparison.png", "tables/tokenizer_comparison.json"} <= logged
    assert {"candidate", "language", "tokens_per_word", "bytes_per_token"} <= set(table["columns"])


