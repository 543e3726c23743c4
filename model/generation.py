"""Prompt in, text out: the one generation path that evaluate, the MLflow pyfunc, the CLI and export's checks call.

A prompt is encoded with `<s>` in front (as every training document starts), continued by the model (KV cache or
recurrent state), and decoded together with the prompt: SentencePiece drops the leading space of a continuation
decoded on its own, so decoding the whole sequence is what gives back "once upon a time there was" rather than
"once upon a timethere was".

Three ways to ask, one sampler (`model.layers.sample_next_token`) underneath:
- `generate_text(..., batched=False)`: one prompt at a time, the seed set before each, so a prompt's text does not
  depend on which other prompts were asked in the same call (what evaluate and the pyfunc need);
- `generate_text(..., batched=True)`: all prompts in one left-padded batch, one forward per step for all of them
  (the CLI's `--prompts-file`); sampled texts then depend on the batch, greedy ones do not;
- `stream_text`: the continuation of one prompt, piece by piece as tokens are sampled.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from .layers import sample_next_token


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode([str(prompt)])[0]]


def _until_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None) -> list[list[int]]:
    """The new token ids of each prompt (up to `</s>`, excluded). Prompts of one length run through the model's
    cached `generate`; prompts of different lengths are left-padded into one batch."""
    device = next(model.parameters()).device
    if len({len(p) for p in prompts}) == 1:
        idx = torch.tensor(prompts, dtype=torch.long, device=device)
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                             eos_id=eos_id)
        return [_until_eos(row[idx.size(1):], eos_id) for row in out.tolist()]
    return _generate_padded(model, prompts, max_new_tokens, temperature, top_k or None, top_p, eos_id)


def _generate_padded(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id) -> list[list[int]]:
    """Left padding with an attention mask, so every row sees the positions of its unpadded self; each step
    recomputes the (cropped) window, as the models' uncached path does."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), eos_id or 0, dtype=torch.long, device=device)
    mask = torch.zeros_like(idx)
    for row, ids in enumerate(prompts):
        idx[row, width - len(ids):] = torch.tensor(ids, device=device)
        mask[row, width - len(ids):] = 1
    crop = None if model.config.arch == "mamba2" else model.config.block_size
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new = []
    for _ in range(max_new_tokens):
        window, keep = (idx, mask) if crop is None else (idx[:, -crop:], mask[:, -crop:])
        logits, _ = model(window, attention_mask=keep)
        token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p)
        if eos_id is not None:
            token = token.masked_fill(finished[:, None], eos_id)
            finished |= token[:, 0] == eos_id
        new.append(token)
        idx, mask = torch.cat((idx, token), dim=1), torch.cat((mask, torch.ones_like(token)), dim=1)
        if eos_id is not None and bool(finished.all()):
            break
    continuations = torch.cat(new, dim=1).tolist() if new else [[] for _ in prompts]
    return [_until_eos(row, eos_id) for row in continuations]


def generate_text(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int = 64,
                  temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.95, seed: int = 0,
                  batched: bool = False) -> list[str]:
    """Each prompt continued by up to `max_new_tokens` tokens (stopping at `</s>`), as text including the prompt."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if batched:
        torch.manual_seed(seed)
        new = generate_ids(model, encoded, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_id)
    else:
        new = []
        for ids in encoded:
            torch.manual_seed(seed)
            new += generate_ids(model, [ids], max_new_tokens, temperature, top_k, top_p, tokenizer.eos_id)
    return [tokenizer.decode(ids[1:] + more) for ids, more in zip(encoded, new)]


@torch.no_grad()
def stream_text(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64,
                temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.95,
                seed: int = 0) -> Iterator[str]:
    """The continuation of `prompt`, yielded piece by piece as tokens are sampled (the same tokens, for the same
    seed, as `generate_text`). A piece is held back while it ends inside a UTF-8 character (byte fallback)."""
    ids = encode_prompt(tokenizer, prompt)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    shown, new = tokenizer.decode(ids[1:]), []
    for token in model.stream(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k or None, top_p,
                              tokenizer.eos_id):
        if int(token) == tokenizer.eos_id:
            return
        new.append(int(token))
        text = tokenizer.decode(ids[1:] + new)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(shown):
            yield text[len(shown):]
        shown = text
