"""What a person sees while a stage runs and when it ends: Prefect artifacts (progress while it runs, a summary when
it ends) and each stage's wall time and energy.

- `prefect_artifacts`: `Progress` (a progress artifact a long loop updates) and `publish` (a markdown or table
  artifact); both are no-ops outside a Prefect flow or task run, so stage functions stay callable from tests and
  benchmarks, and a failing Prefect API costs a warning, never the stage.
- `compute`: `measured`, the wall-clock time and codecarbon energy around a stage, recorded in its manifest.
- `summaries`: the artifact each stage publishes when it ends, built from its manifest.

`Stage.execute` (tasks/stage.py) is where a stage is measured and its summary published; a stage module only adds a
`Progress` to its long loop. Nothing here shapes a stage's files, so this package is left out of every stage's code
identity: editing a summary table re-runs nothing.
"""
