"""The registered model as MLflow serves it: a pyfunc that loads safetensors weights and generates text.

`mlflow.pytorch.log_model` would save through `torch.export`, which freezes the input length of its example; a
pyfunc that owns tokenization and generation answers prompts of any length and keeps the weights in the same
safetensors file the pipeline trained. Generation knobs are declared params of the signature, so MLflow passes them
through at predict time instead of silently dropping them; one out of range (model/knobs.py, the command line's
ranges) is refused as MLflow's INVALID_PARAMETER_VALUE, which `mlflow models serve` answers with a 400 naming it.

It is logged as MLflow's "models from code": register hands `log_model` this file's path, MLflow copies the file
(and the `model/` package, as code) into the model and runs it at load time, where `set_model` below names the
model. Nothing is cloudpickled, so loading the model unpickles nothing; the model's code is read like any source.
"""
from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import pandas as pd

PARAMS = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": 0}


class ScriptoriumLM(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from model import load_model
        from model.tokenizer import load_tokenizer

        self.model = load_model(context.artifacts["weights"], context.artifacts["model_config"])
        self.tokenizer = load_tokenizer(context.artifacts["tokenizer"])

    # A DataFrame hint: MLflow infers nothing from it and checks the signature given at logging, as without one
    # (where it warned "Add type hints" at every load).
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from model.generation import generate_text
        from model.knobs import checked

        prompts = model_input["prompt"].tolist() if hasattr(model_input, "columns") else list(model_input)
        try:
            params = checked({**PARAMS, **(params or {})})
            for row, prompt in enumerate(prompts, 1):
                if prompt is None or prompt != prompt:  # None, or NaN where the frame's column is numeric
                    raise ValueError(f"prompt {row} of {len(prompts)} is null: each row needs a prompt string")
        except ValueError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return generate_text(
            self.model, self.tokenizer, [str(p) for p in prompts], int(params["max_new_tokens"]),
            temperature=float(params["temperature"]), top_k=int(params["top_k"]) or None,
            top_p=float(params["top_p"]), seed=int(params["seed"]),
        )


mlflow.models.set_model(ScriptoriumLM())
