"""The DeepSpeed config, derived from the training config so the two can never disagree."""

import copy

from lm.config import TrainConfig
from lm.errors import UserError

# Keys derived from TrainConfig: set them there, not in train.deepspeed.
DERIVED = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.batch_size / (micro_batch_size x data-parallel size)",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
}


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
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        # We bring torch's AdamW (DeepSpeed's fused Adams need a compiled extension).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return _merge(config, train.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
