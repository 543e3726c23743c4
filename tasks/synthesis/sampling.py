"""Token sampling for the embedded backend, in numpy: repeat penalty, temperature, top-k, top-p.

One generator per story, seeded from (seed, index, attempt), so a story's random draws do not depend on which stories
shared its batch. Sampling ranks only the candidates that can make the top k (`top_superset`): a step samples every
story in flight, and ranking the whole 49k vocabulary for each was a visible share of a step.
"""
from __future__ import annotations

import numpy as np


def top_superset(values: np.ndarray, m: int, groups: int = 16) -> np.ndarray:
    """Indices of a set of entries that holds the `m` largest, about m * groups of them, found without ranking all.

    Split the entries into strided groups (entry j is in group j mod n/groups) and take each group's maximum: at
    least m entries reach the m-th largest group maximum, so the m largest entries all lie in the groups whose
    maximum reaches it. Ranking the group maxima, then those few groups, is several times faster than a partition
    of a 49k-entry row.
    """
    width = len(values) // groups
    if width <= m:
        return np.arange(len(values))
    whole = width * groups
    maxima = values[:whole].reshape(groups, width).max(axis=0)
    threshold = np.partition(maxima, -m)[-m]
    columns = np.flatnonzero(maxima >= threshold)
    picked = (columns[None, :] + np.arange(0, whole, width)[:, None]).ravel()
    return np.concatenate([picked, np.arange(whole, len(values))]) if whole < len(values) else picked


def sample_token(
    logits: np.ndarray,
    recent: list[int],
    rng: np.random.Generator,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repeat_penalty: float,
) -> int:
    """Repeat penalty (llama.cpp's rule), then temperature, top-k and top-p; one uniform draw from `rng`.

    The penalty only ever lowers the logits of tokens seen in `recent`, so the k best tokens after it are among the
    k + len(seen) best before it and the seen ones: only that pool is penalized and ranked (a step samples every
    story in flight, and ranking the whole vocabulary took most of the time).
    """
    vocab = logits.shape[0]
    seen = (
        np.unique(np.asarray(recent, dtype=np.intp)) if repeat_penalty != 1.0 and recent else np.empty(0, np.intp)
    )
    k = 1 if temperature <= 0.0 else (top_k if 0 < top_k < vocab else vocab)
    pool = top_superset(logits, k + len(seen))  # every index when k is the whole vocabulary
    values = logits[pool].astype(np.float64)
    if len(seen):
        is_seen = np.zeros(vocab, dtype=bool)
        is_seen[seen] = True
        values[is_seen[pool]] = -np.inf  # the seen ones come back below, penalized
        penalized = logits[seen].astype(np.float64)
        penalized = np.where(penalized > 0, penalized / repeat_penalty, penalized * repeat_penalty)
        pool, values = np.concatenate([pool, seen]), np.concatenate([values, penalized])
    if temperature <= 0.0:
        return int(pool[np.argmax(values)])
    if k < len(pool):
        best = np.argpartition(values, -k)[-k:]
        pool, values = pool[best], values[best]
    scaled = values / temperature
    order = np.argsort(-scaled, kind="stable")
    candidates, scaled = pool[order], scaled[order]
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    cumulative = np.cumsum(probs)
    keep = min(int(np.searchsorted(cumulative, top_p)) + 1, len(cumulative))  # smallest prefix reaching top_p
    cumulative = cumulative[:keep] / cumulative[keep - 1]
    pick = min(int(np.searchsorted(cumulative, rng.random(), side="right")), keep - 1)
    return int(candidates[pick])


def seen_tokens(recents: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's distinct recent tokens, padded to the longest row with token 0, and the mask of the real ones."""
    rows = [np.unique(np.asarray(r, dtype=np.intp)) if r else np.empty(0, np.intp) for r in recents]
    width = max((len(r) for r in rows), default=0)
    seen, real = np.zeros((len(rows), width), dtype=np.intp), np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        seen[i, : len(r)], real[i, : len(r)] = r, True
    return seen, real


def top_supersets(logits: np.ndarray, m: int, groups: int = 16) -> np.ndarray:
    """`top_superset` of every row at once: per row, indices of a fixed number of entries that hold its `m` largest
    (the columns of its m largest group maxima, by the same argument)."""
    rows, vocab = logits.shape
    width = vocab // groups
    if width <= m:
        return np.broadcast_to(np.arange(vocab), (rows, vocab))
    whole = width * groups
    maxima = logits[:, :whole].reshape(rows, groups, width).max(axis=1)
    columns = np.argpartition(maxima, -m, axis=1)[:, -m:]
    pool = (columns[:, None, :] + np.arange(0, whole, width)[None, :, None]).reshape(rows, -1)
    if whole < vocab:
        pool = np.concatenate([pool, np.broadcast_to(np.arange(whole, vocab), (rows, vocab - whole))], axis=1)
    return pool


def sample_tokens(
    logits: np.ndarray,
    recents: list[list[int]],
    rngs: list[np.random.Generator],
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repeat_penalty: float,
) -> list[int]:
    """`sample_token` for every row of `logits` (one row per story, each with its recent tokens and generator), in
    array operations over all the rows at once: one story at a time, the ~20 small numpy calls per row cost more than
    their arithmetic (8 ms for 64 rows, against ~3 ms here). Same rule and same draws; only exact ties between logits
    may rank differently. Greedy decoding or no top-k falls back to one row at a time.
    """
    rows, vocab = logits.shape
    if temperature <= 0.0 or not 0 < top_k < vocab:
        return [sample_token(logits[r], recents[r], rngs[r], temperature=temperature, top_k=top_k, top_p=top_p,
                             repeat_penalty=repeat_penalty) for r in range(rows)]
    seen, real = seen_tokens(recents if repeat_penalty != 1.0 else [[] for _ in recents])
    width = seen.shape[1]
    pool = top_supersets(logits, top_k + width)  # the candidates for each row's top k after the penalty
    values = np.take_along_axis(logits, pool, axis=1).astype(np.float64)
    if width:
        is_seen = np.zeros((rows, vocab + 1), dtype=bool)  # the padding marks the extra column
        np.put_along_axis(is_seen, np.where(real, seen, vocab), True, axis=1)
        values[np.take_along_axis(is_seen, pool, axis=1)] = -np.inf  # the seen ones come back below, penalized
        penalized = np.take_along_axis(logits, seen, axis=1).astype(np.float64)
        penalized = np.where(penalized > 0, penalized / repeat_penalty, penalized * repeat_penalty)
        pool = np.concatenate([pool, seen], axis=1)
        values = np.concatenate([values, np.where(real, penalized, -np.inf)], axis=1)
    best = np.argpartition(values, -top_k, axis=1)[:, -top_k:]
    pool, values = np.take_along_axis(pool, best, axis=1), np.take_along_axis(values, best, axis=1)
    scaled = values / temperature
    order = np.argsort(-scaled, axis=1, kind="stable")
    candidates, scaled = np.take_along_axis(pool, order, axis=1), np.take_along_axis(scaled, order, axis=1)
    probs = np.exp(scaled - scaled[:, :1])
    probs /= probs.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(probs, axis=1)
    keep = np.minimum((cumulative < top_p).sum(axis=1) + 1, top_k)  # smallest prefix reaching top_p, per row
    total = np.take_along_axis(cumulative, (keep - 1)[:, None], axis=1)
    draws = np.array([rng.random() for rng in rngs])[:, None]
    # searchsorted(cumulative[:keep] / total, draw, side="right"), counted over each row's kept prefix
    kept = np.arange(top_k)[None, :] < keep[:, None]
    pick = np.minimum(((cumulative / total <= draws) & kept).sum(axis=1), keep - 1)
    return np.take_along_axis(candidates, pick[:, None], axis=1)[:, 0].tolist()
