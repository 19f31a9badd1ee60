"""The DeepSpeed config, derived from the training config so the two can never disagree."""

import copy

from core.errors import UserError
from lm.config import ModelConfig, TrainConfig

# Keys derived from TrainConfig: set them there, not in train.deepspeed.
DERIVED = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.batch_size / (micro_batch_size x data-parallel size)",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "torch_autocast": "train.precision",
}

# The smallest bucket: below it collectives are too short to pay their latency (4M fp32 = 16 MB).
MIN_BUCKET = 4 * 2**20


def zero_ranks(train: TrainConfig, data_parallel_size: int) -> int:
    """The ranks ZeRO partitions over: data x context parallel (each CP rank holds a chunk of the
    same sequences, and its gradients are averaged with the others' like a data-parallel rank's)."""
    return data_parallel_size * train.context_parallel


def engine_stage(train: TrainConfig, data_parallel_size: int) -> int:
    """The ZeRO stage DeepSpeed runs: train.zero_stage, except ZeRO-1/2 on one data-parallel rank.

    With one rank there is nothing to partition: stages 1-2 would copy every gradient into flat
    buckets, "reduce" them over a group of one and step on flat partitions, for the same update
    ZeRO-0 makes in place. They run as ZeRO-0 then, and their checkpoints are ZeRO-0's files (the
    checkpoint marker records the stage run: lm.checkpoint.layout_stage). Offload keeps its stage
    (it moves the optimizer off the device), and so does bf16-weights (its fp32 master lives in
    ZeRO's optimizer).
    """
    if train.zero_stage in (1, 2) and zero_ranks(train, data_parallel_size) == 1 and weights_are_master(train):
        return 0
    return train.zero_stage


def stage_name(train: TrainConfig, data_parallel_size: int) -> str:
    """`ZeRO-N` as configured, and the stage DeepSpeed runs where that differs (for the console)."""
    runs = engine_stage(train, data_parallel_size)
    ran = f" (runs as ZeRO-{runs}: one data-parallel rank)" if runs != train.zero_stage else ""
    return f"ZeRO-{train.zero_stage}{ran}"


def clips_itself(train: TrainConfig, data_parallel_size: int) -> bool:
    """Whether lm.engine clips gradients itself instead of DeepSpeed.

    At ZeRO-0 with fp32 weights and no TP every rank holds the whole, reduced gradient, and torch's
    foreach clip_grad_norm_ (the plain loop's) is one pass where DeepSpeed's loops over parameters
    in Python, with an all-reduce of the norm. Where DeepSpeed partitions the gradients or must
    combine TP shards, the norm stays DeepSpeed's.
    """
    return (
        engine_stage(train, data_parallel_size) == 0
        and train.tensor_parallel == 1
        and train.precision != "bf16-weights"
    )


def weights_are_master(train: TrainConfig) -> bool:
    """Whether the fp32 weights serve as the optimizer's master copy (no second fp32 copy).

    ZeRO-3 does so by itself for fp32 weights, ZeRO-1/2 through lm.engine.share_master_weights;
    DeepSpeed's bf16 mode and offload (master on the CPU) keep their own copy.
    """
    return train.precision != "bf16-weights" and train.offload == "none"


def buffer_unit(model: ModelConfig, tensor_parallel: int) -> int:
    """One transformer block's weights on one rank (12 d² / TP elements): the unit of ZeRO's buffers.

    DeepSpeed's defaults (5e8-element buckets, 1e9 live ZeRO-3 parameters) are sized for
    billion-parameter fp16 models on GPUs; for anything smaller they hold the whole model's
    gradients, or every gathered ZeRO-3 weight, at once. Buckets of a block or two keep
    collectives long while buffers stay a fixed, small part of memory (lm.plan counts them).
    """
    return 12 * model.n_embd**2 // tensor_parallel


def deepspeed_config(train: TrainConfig, data_parallel_size: int, model: ModelConfig, device: str = "cuda") -> dict:
    """DeepSpeed's JSON config for a run on `device` ("cuda" or "cpu"); `train.deepspeed` entries
    are merged over it."""
    for key in train.deepspeed:
        if key in DERIVED:
            raise UserError(f"train.deepspeed.{key} is derived from {DERIVED[key]}; set it there instead")
    zero = train.deepspeed.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError("train.deepspeed.zero_optimization must be a mapping")
    if zero.get("stage", train.zero_stage) != train.zero_stage:
        raise UserError("train.deepspeed.zero_optimization.stage conflicts with train.zero_stage; set train.zero_stage")
    config = {
        # DeepSpeed counts a chunk of a sequence (context parallelism) as a sample of its own.
        "train_batch_size": train.batch_size * train.context_parallel,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps(data_parallel_size),
        "gradient_clipping": 0.0 if clips_itself(train, data_parallel_size) else train.grad_clip,
        "zero_optimization": zero_defaults(
            train, data_parallel_size, buffer_unit(model, train.tensor_parallel), device
        ),
        **precision_config(train.precision),
        # We bring torch's AdamW (DeepSpeed's fused Adams need a compiled extension).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        # Its throughput timer synchronizes the device at every forward and every step, to time
        # them; we time steps ourselves and sync only when we log (lm.train).
        "timers": {"throughput": {"enabled": False}},
    }
    if train.offload != "none":
        config["zero_force_ds_cpu_optimizer"] = False  # see offload_config
    merged = _merge(config, train.deepspeed)
    merged["zero_optimization"]["stage"] = engine_stage(train, data_parallel_size)  # also over an explicit stage
    return merged


def precision_config(precision: str) -> dict:
    """bf16 is torch.autocast over fp32 weights and Adam state; bf16-weights is DeepSpeed's bf16 mode."""
    return {
        "bf16": {"enabled": precision == "bf16-weights"},
        "torch_autocast": {
            "enabled": precision == "bf16",
            "dtype": "bfloat16",
            # DeepSpeed would reduce the gradients (and ZeRO-3 gather the weights) of nn.Linear in
            # bf16. None listed: fp32 like the plain loop, also at DP=1 where the cast is pure
            # cost, and alike in every TP layout (our parallel layers are not nn.Linear).
            "lower_precision_safe_modules": [],
        },
    }


def zero_defaults(train: TrainConfig, data_parallel_size: int, unit: int, device: str = "cuda") -> dict:
    """ZeRO settings for memory and speed; train.deepspeed.zero_optimization overrides any of them.

    Buffers (elements, `unit` = one block's weights on this rank, see buffer_unit):
    - stages 1-3: gradient buckets of 2 units (reduce_bucket_size; stage 1/2's contiguous buffer
      is allocated at this size, twice with overlap_comm, on a GPU; on the CPU the bucket's
      gradients are flattened once when it is reduced); stage 1/2 all-gather updated weights in
      buckets of the same size;
    - stage 3: prefetch 1 unit ahead, release a gathered weight unless it is used again within 2
      units (max_reuse_distance), and hold at most 2 units of gathered weights (max_live_parameters).
      Weights under DeepSpeed's persistence threshold (1e5 elements: biases, norms) stay whole.
    """
    stage = engine_stage(train, data_parallel_size)
    zero = {"stage": stage}
    if stage == 0:
        return zero
    ranks = zero_ranks(train, data_parallel_size)
    bucket = max(2 * unit, MIN_BUCKET)
    zero.update(reduce_bucket_size=bucket)
    if stage in (1, 2):
        zero.update(allgather_bucket_size=bucket)
        if ranks > 1 and device == "cuda":
            # Reduce full buckets on a side stream during backward (off by default below stage 3).
            zero.update(overlap_comm=True)
        elif ranks > 1:
            # The CPU has no side stream to overlap on, and no allocator to fragment: copying each
            # gradient into a contiguous bucket as it appears is pure cost (two buckets of memory
            # too), where reducing the gradients themselves, flattened once per bucket, is not.
            zero.update(contiguous_gradients=False)
        else:
            # One rank (kept at stage 1/2 by offload or bf16-weights): reduce-scatter flattens the whole
            # bucket into a new tensor and copies it back (allreduce_and_scatter); a plain all-reduce
            # works in place, and there is nothing to scatter.
            zero.update(reduce_scatter=False)
    else:
        zero.update(
            stage3_prefetch_bucket_size=max(unit, MIN_BUCKET // 2),
            stage3_max_reuse_distance=bucket,
            stage3_max_live_parameters=bucket,
        )
        # ZeRO-3 keeps memory_efficient_linear: it swaps F.linear for a matmul and a separate bias
        # add (under autocast one more bf16 rounding than the plain loop) but holds no bf16 weight
        # copies for backward, which plain F.linear under autocast would, for every gathered layer.
    zero.update(offload_config(train))
    return zero


def offload_config(train: TrainConfig) -> dict:
    """train.offload as ZeRO-Offload: Adam's state, its fp32 gradients and its step on the CPU
    (stages 1-3), and at stage 3 the weights' partitions too.

    The step on the CPU stays torch's fused AdamW (lm.schedule): one vectorised, threaded pass with
    no temporaries, the same update as without offload. DeepSpeed would insist on its own CPU Adam
    (zero_force_ds_cpu_optimizer), a C++ extension that takes minutes to build on first use and
    rounds differently; deepspeed_config switches that insistence off.
    """
    config = {}
    if train.offload in ("optimizer", "optimizer+params"):
        config["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if train.offload == "optimizer+params":
        config["offload_param"] = {"device": "cpu", "pin_memory": False}
    return config


def _merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
