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
