"""A run's data: one shard directory (`data.path`) or a weighted mixture of several (`data.sources`).

A mixture's global batch k holds windows of every source in proportion to the weights, as a pure
function of (seed, k) like lm.data's batches: a resumed run draws what an uninterrupted one would,
and every rank computes the same global batch whatever the DP and TP sizes (lm.data.rank_rows
then gives each rank its rows).

Which source window g of the run gives (g = k * batch_size + row, counted over all batches) is
decided by a chain of exact two-way splits, no random draw: source 0 takes its share p0 = w0 / W of
the windows, floor(p0 * g) of the first g, so window g is source 0's when floor(p0 * (g + 1)) >
floor(p0 * g); the windows it leaves go on to source 1, which takes w1 / (W - w0) of those, and
so on to the last source, which takes what is left. After any number of windows each of S sources
has its share to within S - 1 windows (1 or less for the first; a 0.8 / 0.2 mixture is within one
window of its shares after every batch), and the counts after n windows are a closed form
(`windows_drawn`). Each source shuffles its own windows epoch by epoch (lm.data.WindowBatches, keyed
by the source's position); a source whose windows run out starts another epoch, which the log notes.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from data_prep.shards import ShardSet
from lm.config import RunConfig
from lm.data import WindowBatches, eval_windows


class MixtureBatches:
    """Global batches of windows from named, weighted sources; the same interface as WindowBatches."""

    def __init__(self, sources: list[tuple[str, float, list[np.ndarray]]], seq_len: int, batch_size: int, seed: int):
        self.names = [name for name, _, _ in sources]
        weights = [float(weight) for _, weight, _ in sources]
        self.shares = [w / sum(weights) for w in weights]
        # The fraction of the windows reaching source i (those its predecessors left) that it takes.
        self._takes = [w / sum(weights[i:]) for i, w in enumerate(weights)]
        self._takes[-1] = 1.0  # the last source takes every window left, whatever the rounding
        self.streams = []
        for i, (name, _, arrays) in enumerate(sources):
            try:
                self.streams.append(WindowBatches(arrays, seq_len, 1, seed, stream=i))
            except UserError as exc:
                raise UserError(f"data.sources {name}: {exc}") from None
        self.seq_len = seq_len
        self.global_batch_size = batch_size

    def windows_drawn(self, n: int) -> list[int]:
        """How many of the run's first n windows each source gave."""
        counts = []
        for take in self._takes:
            counts.append(math.floor(take * n))
            n -= counts[-1]
        return counts

    def tokens_drawn(self, steps: int) -> dict[str, int]:
        """`data/tokens/<name>`: each source's target tokens in the first `steps` global batches."""
        drawn = self.windows_drawn(steps * self.global_batch_size)
        return {f"data/tokens/{name}": count * self.seq_len for name, count in zip(self.names, drawn)}

    def global_batch(self, k: int) -> torch.Tensor:
        """Global batch number k: a LongTensor [batch_size, seq_len + 1], rows in window order."""
        if k < 0:
            raise ValueError(f"batch number must be non-negative, got {k}")
        size = self.global_batch_size
        reaching = np.arange(k * size, (k + 1) * size, dtype=np.int64)  # windows that reached this source before
        row = np.arange(size)
        source = np.full(size, -1)
        draw = np.zeros(size, dtype=np.int64)  # the window's number among its source's draws
        for i, take in enumerate(self._takes):
            before = np.floor(take * reaching).astype(np.int64)  # as windows_drawn counts them
            mine = (source < 0) & (np.floor(take * (reaching + 1)).astype(np.int64) > before)
            source[mine], draw[mine] = i, before[mine]
            reaching = reaching - before  # the windows left for the sources after this one
        rows = [self.streams[source[r]].shuffled_window(int(draw[r])) for r in row]
        return torch.from_numpy(np.stack(rows))

    def new_epochs(self, k: int) -> list[tuple[str, int, int]]:
        """(name, epoch, windows per epoch) of each source that starts another epoch (1, 2, ...) in batch k."""
        size = self.global_batch_size
        before, after = self.windows_drawn(k * size), self.windows_drawn((k + 1) * size)
        started = []
        for name, stream, first, end in zip(self.names, self.streams, before, after):
            n = stream.num_windows
            started += [(name, e, n) for e in range(max(1, -(-first // n)), (end - 1) // n + 1)]
        return started

    def mixed(self, per_source: dict[str, float]) -> float:
        """The mixture's value of a per-source figure (a validation loss): weighted by the shares."""
        return sum(share * per_source[name] for name, share in zip(self.names, self.shares))


@dataclass
class RunData:
    """What lm.train reads: the global batches, the validation windows, the tokenizer."""

    batches: WindowBatches | MixtureBatches
    val: dict[str, list[torch.Tensor]]  # a mixture's by source name; data.path's under "" (empty: none)
    tokenizer_path: Path

    @property
    def is_mixture(self) -> bool:
        return isinstance(self.batches, MixtureBatches)


def open_shards(path: str, config: RunConfig, verify: bool, what: str = "") -> ShardSet:
    """A shard directory, checked against the model's vocabulary; `what` prefixes its errors (a source)."""
    try:
        shards = ShardSet.open(path, verify=verify)
    except UserError as exc:
        raise UserError(f"{what}{exc}") from None
    if shards.vocab_size > config.model.vocab_size:
        raise UserError(
            f"{what}tokenizer/model vocabulary mismatch: the shards in {path} use {shards.vocab_size} ids "
            f"but model.vocab_size is {config.model.vocab_size}"
        )
    return shards


def open_run_data(config: RunConfig, verify: bool | None = None) -> RunData:
    """The batches and validation windows of config.data (checksums verified as data.verify_checksums says,
    unless `verify` is given); bad shards, and sources of different tokenizers, are one UserError."""
    d, t, seq_len = config.data, config.train, config.model.block_size
    verify = d.verify_checksums if verify is None else verify
    val = (lambda shards: eval_windows(shards.tokens(d.val_split), seq_len, t.eval_windows)) if t.eval_windows else None
    if not d.sources:
        shards = open_shards(d.path, config, verify)
        batches = WindowBatches(shards.tokens(d.train_split), seq_len, t.batch_size, t.seed)
        return RunData(batches, {"": val(shards)} if val else {}, shards.tokenizer_path)
    opened = [open_shards(s.path, config, verify, f"data.sources {s.name}: ") for s in d.sources]
    check_one_tokenizer(d.sources, opened)
    batches = MixtureBatches(
        [(s.name, s.weight, shards.tokens(d.train_split)) for s, shards in zip(d.sources, opened)],
        seq_len,
        t.batch_size,
        t.seed,
    )
    by_source = {s.name: val(shards) for s, shards in zip(d.sources, opened)} if val else {}
    return RunData(batches, by_source, opened[0].tokenizer_path)


def check_one_tokenizer(sources, opened: list[ShardSet]) -> None:
    """Token ids mean the same in every source only if one tokenizer made them: the manifests' checksums."""
    first, first_sha = sources[0], opened[0].manifest["tokenizer"]["sha256"]
    for source, shards in zip(sources[1:], opened[1:]):
        sha = shards.manifest["tokenizer"]["sha256"]
        if sha != first_sha:
            raise UserError(
                f"data.sources {first.name} and {source.name} were tokenized differently (tokenizer sha256 "
                f"{first_sha[:12]}... in {first.path}, {sha[:12]}... in {source.path}): "
                "a mixture needs shards of one tokenizer (lm prep --tokenizer)"
            )
