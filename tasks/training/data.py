"""Training windows drawn from a split's shards, never from one concatenated array.

A window is `block_size + 1` consecutive tokens inside one shard (a window never straddles two shards, which costs
`block_size` starts per shard and nothing else). The draw is uniform over every valid start of every shard, so each
token is as likely to be trained on as with one big array, and with a single shard it is exactly the old draw. The
batch for a key is a pure function of (seed, key): exact resumption needs nothing but the step number.

Each shard is decompressed once, when first drawn from, into a private temporary directory as a raw file, and each
window is one positioned read from it (`ShardTokens.spilled`): the tokens are page cache the kernel may drop, not
process memory, so a 2 GB corpus trains in the same resident memory as a small one; nothing is ever copied into one
array. The directory goes when the windows do.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from tasks.corpus.reader import ShardTokens


class Windows:
    """Random (x, y) windows of a split's shards (or of one flat array); the draw for a given key is always the same."""

    def __init__(self, tokens: np.ndarray | ShardTokens, block_size: int, seed: int):
        self._scratch = tempfile.TemporaryDirectory(prefix="scriptorium-tokens-")
        self.tokens = ShardTokens.of(tokens).spilled(Path(self._scratch.name))
        self.starts = np.maximum(self.tokens.sizes - block_size - 1, 0)  # valid window starts per shard
        if self.starts.sum() == 0:
            raise ValueError(f"only {self.tokens.size} tokens (largest shard {self.tokens.sizes.max(initial=0)}) for "
                             f"a context of {block_size}")  # the caller names the fix
        self.block_size, self.seed = block_size, seed
        self.before = np.cumsum(self.starts) - self.starts  # starts in the shards before each one

    def batch(self, batch_size: int, *key: int, part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch for `key`; `part=(rank, world)` returns this rank's slice of it."""
        rng = np.random.default_rng([self.seed, *key])
        picks = rng.integers(0, int(self.starts.sum()), size=batch_size * part[1])
        picks = picks[part[0] * batch_size : (part[0] + 1) * batch_size]
        shard = np.searchsorted(self.before, picks, side="right") - 1
        start = picks - self.before[shard]
        window = np.empty((picks.size, self.block_size + 1), dtype=np.int64)
        for index in np.unique(shard):
            rows = shard == index
            window[rows] = self.tokens.windows(int(index), start[rows], self.block_size + 1)
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]
