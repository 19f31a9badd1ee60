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

from lm.config import ModelConfig
from lm.model import GPT


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one parameter, stable across processes, machines and Python versions."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def initial_value(name: str, shape: torch.Size, config: ModelConfig, seed: int) -> torch.Tensor:
    """The full fp32 initial value of parameter `name` (a GPT state-dict name)."""
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if ".ln_" in name or name.startswith("transformer.ln_f"):  # LayerNorm gains
        return torch.ones(shape)
    std = config.init_std
    if name.endswith("c_proj.weight"):
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
