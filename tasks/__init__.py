"""The pipeline's stages, one module each, named as the stage, in the order they run:

    acquire ─┐
             ├─> tokenizer ─> shard ─> train ─> evaluate ─> register
    synthesize ┘

Each module holds the stage's plain function (`run(cfg, out_dir, log, **inputs) -> manifest fields`, callable
without Prefect) and ends with its `Stage(...)` declaration and thin Prefect task. `stage.py` is the mechanism they
share (caching, identity, artifact I/O). What a stage needs inside lives in a subpackage named for that concern:
`corpus/` (file formats, downloads, the corpus reader), `synthesis/` (recipes, backends, sampling, quality gates,
the journal), `training/` (the loop, checkpoints, devices and dtype, distributed launch).
"""
import os

# The one place telemetry is switched off, for every process that runs a stage (the Makefile exports the same two
# variables for the command-line servers it starts, which never import this package).
for _name, _value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true")):
    os.environ.setdefault(_name, _value)
