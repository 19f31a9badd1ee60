"""Context parallelism: each sequence split into chunks over the ranks of a CP group.

`train.context_parallel: N` gives each of N ranks a chunk of T / N positions of every window; the
ranks of a CP group read the same rows (lm.parallel.groups) and each keeps its chunk
(`ContextLayout.chunk`). Everything but attention is per token, so the model runs on the chunk
unchanged, with its global positions (`GPT.chunk_positions`: learned positions and RoPE take the
chunk's offsets). Attention is where the chunks meet, in one of two ways
(`train.context_parallel_impl`):

- `ring`: the key/value chunks travel round the CP group (lm.parallel.ring_group; the math per chunk
  in lm.parallel.ring), softmax in one ring, twicing in two. Chunks are zigzag (pieces r and
  2N-1-r of 2N): under the causal mask every rank then does the same work. Any head count.
- `all_to_all` (DeepSpeed-Ulysses): an all-to-all swaps the sequence split for a head split, so
  each rank attends over the whole sequence with n_head / N of its heads, with the layer's own
  attention function (two SDPA passes or the kernel), and swaps back (lm.parallel.ulysses).
  Chunks are contiguous. The heads (and kv heads) must divide by N.

Each rank's loss is the mean over its chunk's tokens; chunks are equal, so the mean of the CP
ranks' losses, and of their gradients (ZeRO averages over DP x CP), is the whole sequence's.
Parameters are not split: checkpoints are those of CP = 1 and convert, evaluate and generate alike.
"""

import functools
from dataclasses import dataclass, replace

import torch

from lm.attention import AttentionVariant
from lm.model import GPT
from lm.parallel.groups import ParallelGroups
from lm.parallel.ring import zigzag_positions
from lm.parallel.ring_group import ring_attention
from lm.parallel.ulysses import ulysses_attention


@dataclass(frozen=True)
class ContextLayout:
    """Which positions of a sequence CP rank `rank` of `size` holds, for `impl` (ring or all_to_all)."""

    size: int
    rank: int
    impl: str

    def positions(self, seq_len: int) -> torch.Tensor:
        """The global positions of this rank's tokens, in the order it holds them."""
        if self.impl == "ring":
            return zigzag_positions(seq_len, self.size)[self.rank]
        if seq_len % self.size:
            raise ValueError(f"a sequence of {seq_len} tokens does not split into {self.size} chunks")
        c = seq_len // self.size
        return torch.arange(self.rank * c, (self.rank + 1) * c)

    @functools.lru_cache(maxsize=8)  # noqa: B019 (a layout per run: the cache dies with it)
    def positions_on(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """`positions` on `device`, made once per length and device: no host-to-device copy per step."""
        return self.positions(seq_len).to(device)

    def gathered_positions(self, seq_len: int) -> torch.Tensor:
        """The positions of the CP ranks' chunks concatenated in rank order (what an all-gather holds)."""
        return torch.cat([replace(self, rank=r).positions(seq_len) for r in range(self.size)])

    def chunk(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of this rank from windows `rows` (B, T + 1): its chunk of rows[:, :-1]
        and of rows[:, 1:], the same positions of each."""
        inputs, targets = rows[:, :-1], rows[:, 1:]
        if self.size == 1:
            return inputs, targets
        mine = self.positions_on(inputs.size(1), rows.device)
        return inputs.index_select(1, mine), targets.index_select(1, mine)


def context_layout(groups: ParallelGroups, impl: str) -> ContextLayout:
    return ContextLayout(groups.cp_size, groups.cp_rank, impl)


def context_variant(variant: AttentionVariant, group, impl: str) -> AttentionVariant:
    """`variant` attending over the whole sequence of which q, k, v hold this rank's chunk."""
    if impl == "ring":

        def attend(q, k, v):
            return ring_attention(q, k, v, group, variant.twices)
    else:
        inner = variant.attend

        def attend(q, k, v):
            return ulysses_attention(q, k, v, group, inner)

    return replace(variant, attend=attend)


def apply_context_parallel(model: GPT, groups: ParallelGroups, impl: str) -> GPT:
    """Make `model` (in place) run on this rank's chunks: global positions, attention across the CP group."""
    if groups.cp_size == 1:
        return model
    model.context_ranks = groups.cp_size
    model.chunk_positions = context_layout(groups, impl).positions_on
    for block in model.blocks:
        attention = block.attention
        attention.variant = context_variant(attention.variant, groups.cp_group, impl)
    return model
