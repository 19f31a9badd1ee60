"""The DeepSpeed config, derived from the training config so the two can never disagree."""

import copy

from core.errors import UserError
from lm.config import TrainConfig

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

# Gradient buckets when several data-parallel ranks reduce: smaller than GPT-2 small's 124M
# gradients, so overlap_comm can reduce the first buckets while backward still runs.
OVERLAP_BUCKET = 50_000_000


def deepspeed_config(train: TrainConfig, data_parallel_size: int) -> dict:
    """DeepSpeed's JSON config for a run; `train.deepspeed` entries are merged over it."""
    for key in train.deepspeed:
        if key in DERIVED:
            raise UserError(f"train.deepspeed.{key} is derived from {DERIVED[key]}; set it there instead")
    zero = train.deepspeed.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError("train.deepspeed.zero_optimization must be a mapping")
    if zero.get("stage", train.zero_stage) != train.zero_stage:
        raise UserError("train.deepspeed.zero_optimization.stage conflicts with train.zero_stage; set train.zero_stage")
    config = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps(data_parallel_size),
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero_defaults(train.zero_stage, data_parallel_size),
        **precision_config(train.precision),
        # We bring torch's AdamW (DeepSpeed's fused Adams need a compiled extension).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return _merge(config, train.deepspeed)


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


def zero_defaults(stage: int, data_parallel_size: int) -> dict:
    """ZeRO settings for speed; train.deepspeed.zero_optimization overrides any of them."""
    zero = {"stage": stage}
    if stage in (1, 2) and data_parallel_size > 1:
        zero.update(
            # Reduce full buckets on a side stream during backward (off by default below stage 3).
            overlap_comm=True,
            # DeepSpeed's 5e8 holds a whole GPT-2 small: one reduction after backward, nothing to
            # overlap; its contiguous buffer (x2 with overlap) is allocated at this size, too.
            reduce_bucket_size=OVERLAP_BUCKET,
        )
    elif stage in (1, 2):
        # One rank: reduce-scatter flattens the whole bucket into a new tensor and copies it back
        # (allreduce_and_scatter); a plain all-reduce works in place, and there is nothing to scatter.
        zero.update(reduce_scatter=False)
    # ZeRO-3 keeps memory_efficient_linear: it swaps F.linear for a matmul and a separate bias add
    # (under autocast one more bf16 rounding than the plain loop) but holds no bf16 weight copies
    # for backward, which plain F.linear under autocast would, for every gathered layer.
    # Otherwise DeepSpeed's 5e8 buckets: at DP=1 a single reduction and a single weight all-gather
    # per step for models up to 500M parameters, and no second buffer; see lm.train for ZeRO-0.
    return zero


def _merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
