"""Prompt in, text out: the one generation path that evaluate, the MLflow pyfunc and anything later call.

A prompt is encoded with `<s>` in front (as every training document starts), continued by the model's `generate`
(KV cache or recurrent state), and decoded together with the prompt: SentencePiece drops the leading space of a
continuation decoded on its own, so decoding the whole sequence is what gives back "once upon a time there was"
rather than "once upon a timethere was". The sampling seed is set per prompt, so a prompt's text does not depend on
which other prompts were asked in the same call.
"""
from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
) -> list[str]:
    """Each prompt continued by up to `max_new_tokens` tokens (stopping at `</s>`), as text including the prompt."""
    device = next(model.parameters()).device
    texts = []
    for prompt in prompts:
        ids = [tokenizer.bos_id, *tokenizer.encode([str(prompt)])[0]]
        torch.manual_seed(seed)
        out = model.generate(
            torch.tensor([ids], dtype=torch.long, device=device), max_new_tokens, temperature=temperature,
            top_k=top_k or None, top_p=top_p, eos_id=tokenizer.eos_id,
        )
        texts.append(tokenizer.decode(out[0, 1:].tolist()))
    return texts
