"""What register puts in MLflow for a person to look at, beyond params, the curve and the model itself:

- `views`: each stage's time and energy as metrics (`stage/<name>/seconds`, `stage/<name>/energy_kwh`), the
  fertility report as a table and a bar chart per language, the evaluation samples and the samples of every
  checkpoint as tables (the evaluation view lists them; the checkpoint table has `step` as a column);
- `model_card`: the model card (`README.md`: data, tokenizer, architecture, parameters, metrics, energy, samples,
  intended use and limitations) as markdown, logged with the model and used as the registered version's description.

Unlike `tasks/reporting/`, this shapes what register writes, so it is part of register's code identity.
"""
