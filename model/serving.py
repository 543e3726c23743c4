"""The registered model as MLflow serves it: a pyfunc that loads safetensors weights and generates text.

`mlflow.pytorch.log_model` would save through `torch.export`, which freezes the input length of its example; a
pyfunc that owns tokenization and `generate()` answers prompts of any length and keeps the weights in the same
safetensors file the pipeline trained. Generation knobs are declared params of the signature, so MLflow passes them
through at predict time instead of silently dropping them.
"""
from __future__ import annotations

import json

import mlflow.pyfunc
import torch

PARAMS = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": 0}


class ScriptoriumLM(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from safetensors.torch import load_model

        from model import ModelConfig, build_model
        from model.tokenizer import load_tokenizer

        with open(context.artifacts["model_config"], encoding="utf-8") as handle:
            self.model = build_model(ModelConfig(**json.load(handle)))
        load_model(self.model, context.artifacts["weights"])
        self.model.eval()
        self.tokenizer = load_tokenizer(context.artifacts["tokenizer"])

    def predict(self, context, model_input, params=None):
        params = {**PARAMS, **(params or {})}
        prompts = model_input["prompt"].tolist() if hasattr(model_input, "columns") else list(model_input)
        outputs = []
        for prompt in prompts:
            ids = [self.tokenizer.bos_id, *self.tokenizer.encode([str(prompt)])[0]]
            torch.manual_seed(int(params["seed"]))
            out = self.model.generate(
                torch.tensor([ids]), int(params["max_new_tokens"]), temperature=float(params["temperature"]),
                top_k=int(params["top_k"]) or None, top_p=float(params["top_p"]), eos_id=self.tokenizer.eos_id,
            )
            # decode prompt and continuation together: SentencePiece drops the leading space of a lone continuation
            outputs.append(self.tokenizer.decode(out[0, 1:].tolist()))
        return outputs
