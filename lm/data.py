"""Sampling token windows for training and evaluation.

A *window* is seq_len + 1 consecutive tokens from one shard: the first seq_len are the
inputs and the last seq_len (shifted by one) the targets. Shard i of n_i tokens gives
floor((n_i - 1) / seq_len) windows; window j covers tokens [j * seq_len, j * seq_len + seq_len + 1),
so neighbouring windows share one token and every token after the first is a target exactly
once. Windows never cross shard files (and freely cross documents: the eod token marks the
boundary for the model).

Training batches are a pure function of (seed, k), where k = 0, 1, 2, ... counts global
batches across epochs. Resuming from a checkpoint therefore needs nothing but k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from core.errors import UserError

T = TypeVar("T")


def _windows_per_shard(token_arrays: Sequence[np.ndarray], seq_len: int) -> np.ndarray:
    if seq_len < 1:
        raise UserError(f"seq_len must be positive, got {seq_len}")
    return np.array([max(len(a) - 1, 0) // seq_len for a in token_arrays], dtype=np.int64)


def _window(array: np.ndarray, j: int, seq_len: int) -> np.ndarray:
    start = j * seq_len
    return np.asarray(array[start : start + seq_len + 1], dtype=np.int64)


class WindowBatches:
    """Shuffled global batches of windows, epoch after epoch, deterministic in (seed, k).

    Epoch e visits every window once in the order of a permutation drawn from
    numpy.random.default_rng([seed, e]); it yields num_windows // global_batch_size batches
    and drops the remainder, which the next epoch's permutation then covers at random.
    """

    def __init__(
        self,
        token_arrays: Sequence[np.ndarray],
        seq_len: int,
        global_batch_size: int,
        seed: int,
        stream: int | None = None,
    ):
        """`stream` keys the permutations too (rng [seed, stream, epoch]): each source of a mixture
        (lm.mixture) shuffles its own way, however many windows it has."""
        if global_batch_size < 1:
            raise UserError(f"global batch size must be positive, got {global_batch_size}")
        if seed < 0:
            raise UserError(f"data seed must be non-negative, got {seed}")
        self.token_arrays = list(token_arrays)
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.stream = stream
        counts = _windows_per_shard(self.token_arrays, seq_len)
        self.num_windows = int(counts.sum())
        # starts[i] is the global index of shard i's first window.
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        if self.num_windows < global_batch_size:
            total = sum(len(a) for a in self.token_arrays)
            raise UserError(
                f"the training data ({total} tokens in {len(self.token_arrays)} shards) gives "
                f"only {self.num_windows} windows of seq_len {seq_len}, fewer than one global "
                f"batch of {global_batch_size}; use a smaller batch size or seq_len, or more data"
            )
        self.batches_per_epoch = self.num_windows // global_batch_size
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        # Cached: consecutive batches come from the same epoch almost always.
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch] if self.stream is None else [self.seed, self.stream, epoch])
            self._perm = rng.permutation(self.num_windows)
            self._epoch = epoch
        return self._perm

    def window(self, index: int) -> np.ndarray:
        """Window number `index` in shard order (0 <= index < num_windows), as int64."""
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} outside 0..{self.num_windows - 1}")
        # The last shard starting at or before index; side="right" skips empty shards.
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return _window(self.token_arrays[shard], index - int(self._starts[shard]), self.seq_len)

    def global_batch(self, k: int) -> torch.Tensor:
        """Global batch number k: a LongTensor [global_batch_size, seq_len + 1]."""
        if k < 0:
            raise ValueError(f"batch number must be non-negative, got {k}")
        epoch, b = divmod(k, self.batches_per_epoch)
        size = self.global_batch_size
        picks = self._permutation(epoch)[b * size : (b + 1) * size]
        return torch.from_numpy(np.stack([self.window(int(i)) for i in picks]))

    def shuffled_window(self, n: int) -> np.ndarray:
        """Window number n of the shuffled order, epoch after epoch, all windows of an epoch taken
        (the batches of a global batch size of 1)."""
        epoch, i = divmod(n, self.num_windows)
        return self.window(int(self._permutation(epoch)[i]))

    def epoch_of(self, k: int) -> int:
        return k // self.batches_per_epoch


def rank_rows(batch: torch.Tensor, rank: int, world_size: int, micro_batch: int, micro_step: int) -> torch.Tensor:
    """The rows of a global batch that data-parallel `rank` uses at micro step `micro_step`.

    Layout: the global batch has world_size * grad_accum * micro_batch rows, and micro
    step m of rank r takes rows [(m * world_size + r) * micro_batch, ... + micro_batch).
    Micro step m of all ranks together is thus one contiguous block of world_size *
    micro_batch rows, so a single process with grad_accum' = world_size * grad_accum and
    the same micro_batch sees exactly the same rows in the same order, block by block.
    """
    grad_accum, leftover = divmod(batch.shape[0], world_size * micro_batch)
    if leftover:  # TrainConfig.grad_accum_steps refuses such sizes before training starts
        raise ValueError(
            f"a batch of {batch.shape[0]} rows does not split into {world_size} ranks x micro batches of {micro_batch}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if not 0 <= micro_step < grad_accum:
        raise ValueError(f"micro step {micro_step} outside 0..{grad_accum - 1}")
    start = (micro_step * world_size + rank) * micro_batch
    return batch[start : start + micro_batch]


def eval_windows(
    token_arrays: Sequence[np.ndarray], seq_len: int, max_windows: int | None = None
) -> list[torch.Tensor]:
    """Windows for evaluation in a fixed order: shard by shard, window by window, stopping
    after max_windows (None = all). Each is a LongTensor [seq_len + 1]."""
    if max_windows is not None and max_windows < 1:
        raise UserError(f"max eval windows must be positive, got {max_windows}")
    counts = _windows_per_shard(token_arrays, seq_len)
    if counts.sum() == 0:
        total = sum(len(a) for a in token_arrays)
        raise UserError(
            f"the evaluation data has {total} tokens, too few for one window of "
            f"seq_len {seq_len} (needs {seq_len + 1}); use a smaller seq_len"
        )
    out: list[torch.Tensor] = []
    for array, count in zip(token_arrays, counts):
        for j in range(int(count)):
            if max_windows is not None and len(out) >= max_windows:
                return out
            out.append(torch.from_numpy(_window(array, j, seq_len)))
    return out


def split_among_ranks(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank r's share of items: items[r], items[r + world_size], ... (strided)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(items[rank::world_size])
