"""Every choice the data stages make about a document comes from its content hash, never from its position.

A document's 64-bit content hash is computed once, when acquire writes it (and it also finds exact duplicates).
Disjoint digit groups of that hash (`bucket(h, use)`, a bucket out of a million) decide, independently of one another:
- the train/val split (`SPLIT`, the shard stage);
- the tokenizer's training sample and the fertility sample (`TOKENIZER_SAMPLE`, `FERTILITY_SAMPLE`), so a sample is
  not biased towards or away from the validation split.
Because they depend on content only, the choices are identical on every machine and in any order, a sample is spread
evenly over the whole corpus (not its first megabytes), and adding documents never moves the existing ones.
"""
from __future__ import annotations

import hashlib

import numpy as np

BUCKETS = 1_000_000
SPLIT, TOKENIZER_SAMPLE, FERTILITY_SAMPLE = 0, 1, 2  # which million-bucket digit group of the hash decides what


def content_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def content_hashes(texts: list[str]) -> np.ndarray:
    return np.fromiter(map(content_hash, texts), dtype=np.uint64, count=len(texts))


def bucket(hashes: np.ndarray | int, use: int) -> np.ndarray | int:
    """The hash's bucket (0..BUCKETS-1) for one use; different uses read different digits of the same hash."""
    if isinstance(hashes, np.ndarray):
        return (hashes // np.uint64(BUCKETS**use)) % np.uint64(BUCKETS)
    return (hashes // BUCKETS**use) % BUCKETS


def in_sample(hashes: np.ndarray, rate: float, use: int) -> np.ndarray:
    """Which documents a sample of `rate` (a share of documents, 0..1) takes."""
    return bucket(hashes, use) < np.uint64(round(min(max(rate, 0.0), 1.0) * BUCKETS))


def language_quotas(sizes: dict[str, int], total: int, exponent: float) -> dict[str, int]:
    """Bytes of a `total`-byte sample per language: shares go as size ** exponent (1: proportional, 0: equal), and a
    language smaller than its share gives the rest to the others."""
    quotas: dict[str, int] = {}
    left, open_ = total, {lang: size for lang, size in sizes.items() if size > 0}
    while open_:
        weights = {lang: size**exponent for lang, size in open_.items()}
        scale = left / sum(weights.values())
        small = {lang for lang in open_ if open_[lang] <= weights[lang] * scale}
        if not small:
            quotas.update({lang: int(weights[lang] * scale) for lang in open_})
            break
        for lang in small:
            quotas[lang] = open_.pop(lang)
            left -= quotas[lang]
    return quotas
