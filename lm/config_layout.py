"""The checks of a parallel layout against the model it splits: tensor, sequence and context parallelism.

Each refuses, in one line naming the keys, a layout that cannot split this model, before any
process starts (RunConfig runs them on every config it builds). Names only: no torch here.
"""

from core.errors import UserError

# Attention implementations ring context parallelism cannot run: the ring computes each chunk pair's
# scores itself in PyTorch, so it cannot use the Triton kernel nor the reference's whole A.
RING_REFUSES = {"triton": "the Triton kernel takes whole sequences", "reference": "the reference materialises A whole"}


def check_tensor_parallel(model, tp: int) -> None:
    """Tensor parallelism splits query and key/value heads, MLP units and the vocabulary: each must divide by tp."""
    for name, value in (
        ("model.n_head", model.n_head),
        ("model.n_kv_head", model.n_kv_head),
        ("model.vocab_size", model.vocab_size),
        ("model.d_ff", model.ffn_dim),
    ):
        if value % tp:
            hint = "; it may exceed the tokenizer's vocabulary, so round it up" if name == "model.vocab_size" else ""
            raise UserError(f"{name} ({value}) is not divisible by train.tensor_parallel ({tp}){hint}")


def check_sequence_parallel(model, train) -> None:
    """Sequence parallelism splits the activations between TP regions along the sequence over the TP group."""
    if not train.sequence_parallel:
        return
    tp, cp = train.tensor_parallel, train.context_parallel
    if tp == 1:
        raise UserError(
            "train.sequence_parallel splits activations over the tensor-parallel group and needs "
            "train.tensor_parallel > 1, got 1"
        )
    if model.block_size % (tp * cp):
        raise UserError(
            f"train.sequence_parallel: model.block_size ({model.block_size}) is not divisible by "
            f"train.tensor_parallel x train.context_parallel ({tp} x {cp})"
        )


def check_context_parallel(model, train) -> None:
    """Context parallelism splits each sequence over train.context_parallel ranks; each impl has its needs."""
    cp, tp, impl = train.context_parallel, train.tensor_parallel, train.context_parallel_impl
    if cp == 1:
        return
    if impl == "all_to_all":
        # Ulysses swaps the sequence split for a head split: each rank's heads must divide by cp.
        for name, heads in (("model.n_head", model.n_head), ("model.n_kv_head", model.n_kv_head)):
            if (heads // tp) % cp:
                raise UserError(
                    f"train.context_parallel_impl=all_to_all gives each rank {name} / (tensor_parallel x "
                    f"context_parallel) heads: {heads} / ({tp} x {cp}) is not whole; use ring, or another "
                    "context_parallel"
                )
        if model.block_size % cp:
            raise UserError(f"model.block_size ({model.block_size}) is not divisible by train.context_parallel ({cp})")
        return
    if model.block_size % (2 * cp):
        raise UserError(
            f"train.context_parallel_impl=ring cuts each sequence into 2 x context_parallel zigzag pieces: "
            f"model.block_size ({model.block_size}) is not divisible by 2 x {cp}"
        )
    attention = model.attention_impl
    if attention == "reference" or (attention == "triton" and model.twicing_layer_indices()):
        raise UserError(
            f"train.context_parallel_impl=ring cannot run model.attention_impl={attention} "
            f"({RING_REFUSES[attention]}); use fused or sdpa, or context_parallel_impl=all_to_all"
        )


def check_parallel_layout(model, train) -> None:
    check_tensor_parallel(model, train.tensor_parallel)
    check_sequence_parallel(model, train)
    check_context_parallel(model, train)


def layout_summary(train, dp: int) -> str:
    """`TP 2 (SP) x CP 2 (ring) x DP 1`: the parallel layout, context and sequence parallelism where used."""
    sp = " (SP)" if train.sequence_parallel else ""
    cp = f" x CP {train.context_parallel} ({train.context_parallel_impl})" if train.context_parallel > 1 else ""
    return f"TP {train.tensor_parallel}{sp}{cp} x DP {dp}"


def model_parallel_groups(train) -> str:
    """What the world must split into, for an error line."""
    cp = f" x context_parallel={train.context_parallel}" if train.context_parallel > 1 else ""
    return f"tensor-parallel groups of train.tensor_parallel={train.tensor_parallel}{cp}"
