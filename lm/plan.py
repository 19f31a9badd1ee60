"""`lm plan`: the memory one rank of a run needs, before it starts.

    lm plan --config CFG [--set ...] --world N [--json] [--device-memory 80GB] [--ranks-per-node K]

Model states follow ZeRO's arithmetic for the stage, TP, DP, offload and precision, counted as
DeepSpeed holds them (lm.engine): fp32 weights 4 bytes per parameter, gradients 4, Adam's two
moments 8, and an fp32 master copy where the weights cannot be their own (bf16 weights, offload).
Buffers are the ones lm.ds_config sizes (gradient buckets, ZeRO-3's gathered and prefetched
weights); `step` is what the optimizer step's temporaries add at its peak. Activations are what
backward keeps per block for the attention kind, with activation checkpointing, and the logits. `runtime` is the
process itself (interpreter, torch, DeepSpeed; on a GPU the CUDA context), measured on our machines.

The figures are estimates (benchmarks/memory.py measures them: within 20% on its CPU grid), and the
peak of a run: weights, gradients and Adam's state together with one step's activations.

The plan also says what one checkpoint takes on disk (`checkpoint_size`) and whether the
filesystem of train.out_dir has room for two (the next is written before an old one is deleted).
"""

import argparse
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.errors import UserError, run_command
from lm.attention import get_attention
from lm.config import ModelConfig, RunConfig, load_config
from lm.config_layout import layout_summary, model_parallel_groups
from lm.ds_config import deepspeed_config, engine_stage, stage_name, weights_are_master, zero_ranks
from lm.initialization import parameter_count

ADAM = 8  # exp_avg and exp_avg_sq, fp32
RUNTIME = {"cpu": 450e6, "cuda": 600e6}  # peak RSS of an idle rank / a CUDA context, measured
# Per block, in units of micro_batch x block_size x n_embd values: what backward keeps of a block.
# Besides the attention's projections and the MLP: the norms' inputs, the attention output and the
# projections' inputs, and for twicing the first pass's output and 2V - AV. GPT-2's MLP keeps its
# 4d input and GELU output (8 units), so a GPT-2 block keeps 16 (18 twicing), checked against
# benchmarks/activation_memory.py (12 layers, d 768, T 1024). SwiGLU keeps gate, up, SiLU(gate)
# and their product; grouped-query attention keeps smaller keys and values.
SAVED_OUTSIDE_PROJECTIONS = 5
TWICING_EXTRA = 2


def saved_per_block(config: ModelConfig, twices: bool) -> float:
    """What backward keeps of one block, in units of tokens x n_embd values."""
    qkv = (config.n_head + 2 * config.n_kv_head) / config.n_head
    mlp = (4 if config.mlp == "swiglu" else 2) * config.ffn_dim / config.n_embd
    return SAVED_OUTSIDE_PROJECTIONS + qkv + mlp + (TWICING_EXTRA if twices else 0)


BACKWARD_WORKSPACE = 4  # gradients of activations alive at once during a block's backward
LOGIT_COPIES = 3  # the logits, cross-entropy's log-softmax, and their gradient
# ZeRO 1-3's step holds two fp32 partitions beyond the model states: the flat gradient it hands
# Adam, and the norm and clipping's working copy (measured: one partition fewer underestimates
# every ZeRO-3 row of benchmarks/memory.py by a partition).
STEP_PARTITIONS = 2


@dataclass
class MemoryPlan:
    """Bytes one rank holds at its peak, by part; `host` is what offload moves off a GPU.

    The peak falls in backward (activations and gathered ZeRO-3 weights alive) or in the
    optimizer step (its temporaries, once activations are freed): `step` is what the step needs
    beyond what backward's parts free, so that the parts add up to the peak either way.
    """

    weights: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int
    step: int
    runtime: int
    host: int = 0

    @property
    def total(self) -> int:
        return self.per_rank_bytes()["total"]

    def per_rank_bytes(self) -> dict:
        parts = asdict(self)
        del parts["host"]
        return {**parts, "total": sum(parts.values())}


def data_parallel_size(config: RunConfig, world: int) -> int:
    """The data-parallel size of `world` ranks; refuses a layout that does not divide."""
    tp, cp = config.train.tensor_parallel, config.train.context_parallel
    if world < 1 or world % (tp * cp):
        groups = model_parallel_groups(config.train)
        raise UserError(f"--world {world} does not split into groups of {groups}")
    config.train.grad_accum_steps(world // (tp * cp))  # raises with the batch numbers
    return world // (tp * cp)


def plan(config: RunConfig, world: int, device: str = "cpu") -> MemoryPlan:
    """The peak memory of one rank of `config` on `world` ranks (`device`: "cpu" or "cuda")."""
    t, m = config.train, config.model
    dp, tp = data_parallel_size(config, world), t.tensor_parallel
    stage = engine_stage(t, dp)  # ZeRO-1/2 on one data-parallel rank run as ZeRO-0
    params = parameter_count(m) / tp  # this rank's TP slice (replicated norms and positions: small)
    zero = zero_ranks(t, dp)  # ZeRO partitions over data x context parallel ranks
    share = params / zero  # one ZeRO partition of it
    low_weights = t.precision == "bf16-weights"
    w = 2 if low_weights else 4  # weights and gradients as the model holds them
    weights = params * w / (zero if stage == 3 else 1)
    # Stage 1 reduces gradient buckets into the partition during backward, as stage 2 does (one
    # implementation in DeepSpeed): measured alike.
    gradients = params * w / (zero if stage >= 1 else 1)
    states = params if stage == 0 else share
    master = 0 if weights_are_master(t) else 4 * states  # a second, fp32 copy of the weights
    optimizer = ADAM * states + master
    buffers, gathered = zero_buffers(config, dp, stage, params, w, device)
    activations = activation_bytes(config)
    if stage == 0:  # DP > 1: DeepSpeed flattens every gradient for its all-reduce, after backward
        temporaries = 0 if zero == 1 else w * min(params, 5e8)
    elif stage == 3 and t.offload != "none":
        temporaries = 0  # ZeRO-3 reduces gradients straight into their CPU partitions; the step runs there
    else:
        temporaries = STEP_PARTITIONS * 4 * share
    host = 0
    if t.offload != "none":  # Adam's state, the master copy and its fp32 gradients leave the device
        host += optimizer + 4 * share
        optimizer = 0
    if t.offload == "optimizer+params":
        host += weights
        weights = 0
    if device == "cpu":  # the host is the device
        optimizer, host = optimizer + host, 0
    return MemoryPlan(
        weights=round(weights),
        gradients=round(gradients),
        optimizer=round(optimizer),
        buffers=round(buffers),
        activations=round(activations),
        step=round(max(0.0, temporaries - activations - gathered)),
        runtime=round(RUNTIME[device]),
        host=round(host),
    )


def zero_buffers(
    config: RunConfig, dp: int, stage: int, params: float, grad_bytes: int, device: str
) -> tuple[float, float]:
    """(bytes of the communication buffers lm.ds_config sizes, of them ZeRO-3's gathered weights)."""
    if stage == 0:
        return 0.0, 0.0
    zero = deepspeed_config(config.train, dp, config.model, device)["zero_optimization"]
    bucket = grad_bytes * min(zero["reduce_bucket_size"], params)
    if stage in (1, 2):
        return bucket * (2 if zero.get("overlap_comm") else 1), 0.0
    live = zero["stage3_max_live_parameters"]  # prefetched weights count against it
    gathered = grad_bytes * min(live, params)
    return bucket + gathered, gathered


def activation_bytes(config: RunConfig) -> float:
    """The most one micro batch's activations hold at once in backward.

    That is the kept blocks (a checkpointed block keeps only its input) plus the larger of the
    logits' copies with backward's working set, alive at its start, or one block recomputed in
    full, alive while backward runs through it (by then the logits are freed, except under ZeRO-3).
    A rank holds its chunk of the sequence under context parallelism (every activation / CP); TP
    splits what the projections compute by heads and units, and sequence parallelism also the
    rest (norms, residuals, dropout), which TP alone keeps whole on every rank.
    """
    t, m = config.train, config.model
    tokens = t.micro_batch_size * m.block_size / t.context_parallel
    value = 2.5 if t.precision != "fp32" else 4  # autocast: matmul outputs bf16, norms and residuals fp32
    whole = tokens * m.n_embd * value  # one (tokens, n_embd) activation of this rank's chunk
    unit = whole / t.tensor_parallel
    outside = SAVED_OUTSIDE_PROJECTIONS * (unit if t.sequence_parallel else whole)
    saved = [
        (saved_per_block(m, get_attention(kind).twices) - SAVED_OUTSIDE_PROJECTIONS) * unit + outside
        for kind in m.layer_attention()
    ]
    recomputed = set(t.checkpointed_blocks(m.n_layer))
    block_input = unit if t.sequence_parallel else whole
    kept = sum(block_input if i in recomputed else b for i, b in enumerate(saved))
    logits = LOGIT_COPIES * tokens * m.vocab_size * 4 / t.tensor_parallel
    recompute = max(saved) if recomputed else 0.0
    if t.zero_stage == 3:
        # Measured: under ZeRO-3 the logits' copies outlive the output layer's backward (its module
        # hooks hold them), so a recomputed block comes on top of them.
        return kept + logits + max(BACKWARD_WORKSPACE * unit, recompute)
    return kept + max(logits + BACKWARD_WORKSPACE * unit, recompute)


# DeepSpeed's files beside the tensors (its config, the ZeRO bookkeeping) and the RNG state, per
# rank; measured on the tiny test model at ZeRO-0, 2 and 3 (20 to 80 kB).
CHECKPOINT_OVERHEAD_PER_RANK = 50_000


def checkpoint_size(config: RunConfig, world: int) -> int:
    """Bytes one checkpoint takes on disk, all ranks together: the weights as the model holds them
    (ZeRO-3 keeps them only in its fp32 partitions), an fp32 copy where ZeRO or bf16 weights keep
    one, and Adam's two moments."""
    t = config.train
    stage = engine_stage(t, data_parallel_size(config, world))
    weights = 0 if stage == 3 else (2 if t.precision == "bf16-weights" else 4)
    master = 4 if stage > 0 or not weights_are_master(t) else 0
    return parameter_count(config.model) * (weights + master + ADAM) + CHECKPOINT_OVERHEAD_PER_RANK * world


def free_bytes(directory: str | Path) -> int:
    """Free bytes of the filesystem `directory` is (or will be, once made) on."""
    path = Path(directory).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def two_checkpoints_fit(size: int, free: int) -> bool:
    """Whether `free` bytes hold two checkpoints of `size`: the next one is written before
    retention deletes an old one."""
    return free >= 2 * size


def device_memory(ranks_per_node: int) -> tuple[int, str]:
    """Memory one rank may use: a GPU's, or this machine's RAM shared by the node's ranks."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "cuda"
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return pages // max(1, ranks_per_node), "cpu"


def parse_bytes(text: str) -> int:
    """'24GB', '80 GiB', '512MiB' or a plain byte count."""
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not found or found[2].upper() not in units or not float(found[1]) > 0:
        raise UserError(f"--device-memory must be a positive size such as 24GB or 80GiB, got {text!r}")
    return int(float(found[1]) * units[found[2].upper()])


def check_memory(config: RunConfig, world: int, ranks_per_node: int) -> None:
    """Refuse, before anything is built, a run whose plan exceeds the memory a rank has.

    A layout `world` does not divide is left to lm.train's own checks, which name it.
    """
    try:
        data_parallel_size(config, world)
    except UserError:
        return
    budget, device = device_memory(ranks_per_node)
    need = plan(config, world, device)
    if need.total > budget:
        raise UserError(
            f"lm plan: this run needs about {need.total / 1e9:.1f} GB per rank but a rank has "
            f"{budget / 1e9:.1f} GB ({device}); see `lm plan` for the parts, reduce the micro batch, checkpoint "
            f"activations, raise ZeRO or TP, or set train.memory_check=false to start anyway"
        )


def table(need: MemoryPlan, budget: int, device: str) -> str:
    rows = [(name, value) for name, value in need.per_rank_bytes().items() if name != "total"]
    lines = [f"  {name:<12} {value / 1e9:8.3f} GB" for name, value in rows]
    if need.host:
        lines.append(f"  {'(host)':<12} {need.host / 1e9:8.3f} GB  offloaded, not on the device")
    verdict = "fits" if need.total <= budget else "does NOT fit"
    lines.append(f"  {'total':<12} {need.total / 1e9:8.3f} GB  {verdict} in {budget / 1e9:.1f} GB ({device})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lm plan", description="Per-rank memory of a run, before it starts.")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--world", type=int, required=True, help="number of ranks (processes, GPUs)")
    p.add_argument("--device-memory", default=None, help="memory of one rank's device (default: this GPU's, or RAM)")
    p.add_argument("--ranks-per-node", type=int, default=None, help="CPU: ranks sharing this RAM (default: --world)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    config = load_config(args.config, args.set)
    ranks_per_node = args.ranks_per_node or args.world
    budget, device = device_memory(ranks_per_node)
    if args.device_memory is not None:
        budget = parse_bytes(args.device_memory)
    dp = data_parallel_size(config, args.world)
    need = plan(config, args.world, device)
    if args.json:
        report = {
            "world": args.world,
            "data_parallel": dp,
            "tensor_parallel": config.train.tensor_parallel,
            "context_parallel": config.train.context_parallel,
            "sequence_parallel": config.train.sequence_parallel,
            "zero_stage": config.train.zero_stage,
            "engine_zero_stage": engine_stage(config.train, dp),  # as DeepSpeed runs it
            "device": device,
            "parameters": parameter_count(config.model),
            "per_rank_bytes": need.per_rank_bytes(),
            "host_bytes": need.host,
            "device_memory_bytes": budget,
            "fits": need.total <= budget,
            "checkpoint_bytes": checkpoint_size(config, args.world),
            "out_dir_free_bytes": free_bytes(config.train.out_dir),
        }
        print(json.dumps(report))
    else:
        t = config.train
        print(
            f"{parameter_count(config.model) / 1e6:.2f}M parameters, {stage_name(t, dp)}, "
            f"{layout_summary(t, dp)}, {t.precision}, offload {t.offload}, "
            f"checkpointing {t.activation_checkpointing}, "
            f"micro batch {t.micro_batch_size} x {config.model.block_size} tokens; per rank:"
        )
        print(table(need, budget, device))
        print(disk_line(config, args.world))
    return 0


def disk_line(config: RunConfig, world: int) -> str:
    """One checkpoint's size against the free space of train.out_dir; a warning if two do not fit."""
    size, free, out = checkpoint_size(config, world), free_bytes(config.train.out_dir), config.train.out_dir
    line = f"checkpoint: about {size / 1e9:.3f} GB each; {out} has {free / 1e9:.3f} GB free"
    warning = "\nwarning: less than two checkpoints fit there: a save may fail for lack of space"
    return line + ("" if two_checkpoints_fit(size, free) else warning)


if __name__ == "__main__":
    raise SystemExit(run_command(main))
