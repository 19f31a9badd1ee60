"""Initial weights that any rank can draw for its own slice alone, one parameter at a time.

GPT-2's initialisation (normal(0, init_std) for matrices and embeddings, init_std / sqrt(2 n_layer)
for the projections that write into the residual stream, zero biases, unit LayerNorm gains),
with every parameter drawn from a generator of its own, keyed by the seed and the parameter's
name. So a rank builds the model on the meta device (no memory), slices it for tensor
parallelism, and then draws each full parameter, keeps its slice and drops the rest: it never
holds more than its own slice plus one full parameter, and every layout starts as the exact
slice of the TP = 1 model of the same seed.
"""

import hashlib
import math
from collections.abc import Callable, Iterator

import torch

from lm.attention import check_runnable
from lm.config import ModelConfig, RunConfig
from lm.model import GPT, is_norm_parameter, writes_residual
from lm.parallel import ParallelGroups, shard_model
from lm.parallel.context import apply_context_parallel


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one parameter, stable across processes, machines and Python versions."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def initial_value(name: str, shape: torch.Size, config: ModelConfig, seed: int) -> torch.Tensor:
    """The full fp32 initial value of parameter `name` (a GPT state-dict name, of either layout)."""
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if is_norm_parameter(name):  # LayerNorm and RMSNorm gains
        return torch.ones(shape)
    std = config.init_std
    if writes_residual(name):
        # GPT-2 scales the projections into the residual stream, so its variance does not grow with depth.
        std /= math.sqrt(2 * config.n_layer)
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def full_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """The unsliced shape of every parameter of GPT(config) (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: p.shape for name, p in GPT(config).named_parameters()}


@torch.no_grad()
def materialized(
    model: torch.nn.Module, full_value: Callable[[str], torch.Tensor], device: torch.device | str
) -> Iterator[torch.nn.Parameter]:
    """Give each parameter of `model` (a GPT or its TP slice, built on the meta device) its value
    from `full_value(name)`, the full parameter of that name, on `device`, one at a time; yields
    each parameter as soon as it holds its value (ZeRO-3 partitions it right then, lm.engine).

    A sliced parameter carries `partition_dim` and `full_index` (lm.parallel.layers.mark_sharded):
    only its slice of the full value is kept. Tied parameters are filled once and stay tied.
    """
    # A buffer would stay on the meta device; the GPT has none, and a new one must be handled here.
    assert not any(True for _ in model.buffers()), "materialized() initialises parameters only"
    for name, param in model.named_parameters():  # each shared parameter once, by its first name
        value = full_value(name)
        if hasattr(param, "full_index"):
            value = value.index_select(param.partition_dim, param.full_index)
        real = torch.nn.Parameter(value.to(device), requires_grad=param.requires_grad)
        real.__dict__.update(param.__dict__)  # the TP marks go along
        torch.utils.swap_tensors(param, real)  # the same Parameter object, so ties and references hold
        del value, real
        yield param


def materialize(model: torch.nn.Module, full_value: Callable[[str], torch.Tensor], device: torch.device | str) -> None:
    """`materialized`, all at once."""
    for _ in materialized(model, full_value, device):
        pass


def initial_values(config: ModelConfig, seed: int) -> Callable[[str], torch.Tensor]:
    """`full_value` for `materialized`: GPT-2's initial weights of `seed`."""
    shapes = full_shapes(config)
    return lambda name: initial_value(name, shapes[name], config, seed)


def initialize(model: torch.nn.Module, config: ModelConfig, seed: int, device: torch.device | str = "cpu") -> None:
    """GPT-2's initial weights of `seed` for `model` (whole or a TP slice) on `device`."""
    materialize(model, initial_values(config, seed), device)


def build_gpt(
    config: RunConfig,
    device: torch.device | str,
    groups: ParallelGroups | None = None,
    initial_weights: dict[str, torch.Tensor] | None = None,
    place: Callable[[Iterator[torch.nn.Parameter]], None] | None = None,
) -> GPT:
    """This rank's GPT as every training loop starts it, never holding more than its slice plus one
    full parameter: built on the meta device, sliced for `groups`' tensor parallelism (and
    train.sequence_parallel), each parameter drawn (train.seed) or taken from `initial_weights` and
    handed to `place` as soon as it holds its value (lm.engine.partition_zero3 partitions it there),
    and the blocks that train.activation_checkpointing names set to recompute."""
    check_runnable(config.model.attention_impl, len(config.model.twicing_layer_indices()), torch.device(device))
    with torch.device("meta"):
        model = GPT(config.model)
    if groups is not None:
        model = shard_model(model, groups, config.train.sequence_parallel)
        model = apply_context_parallel(model, groups, config.train.context_parallel_impl)
    values = initial_values(config.model, config.train.seed) if initial_weights is None else initial_weights.__getitem__
    params = materialized(model, values, device)  # the same weights in every layout
    if place is not None:
        place(params)
    for _ in params:  # whatever `place` left undrawn
        pass
    model.recompute_blocks = frozenset(config.train.checkpointed_blocks(config.model.n_layer))
    return model


def parameter_count(config: ModelConfig) -> int:
    """Parameters of the whole GPT (tied ones once), before any slicing or partitioning."""
    return sum(math.prod(shape) for shape in full_shapes(config).values())
