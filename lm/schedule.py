"""The optimizer and its learning-rate schedule (train.schedule), shared by the engine and the plain loop.

Every schedule warms up linearly over train.warmup_steps (step w - 1 runs at lr), then:
  cosine    half a cosine from lr down to min_lr, reached at step train.steps (so never quite used)
  wsd       warmup-stable-decay: lr until the last train.decay_steps steps, which decay to min_lr, the
            last step at min_lr exactly; linearly, or as 1 - sqrt(progress) (Hägele et al., 2024,
            "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations")
  constant  lr to the end
"""

import math

import torch

from lm.config import TrainConfig


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate used by optimizer step `step` (0-based)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "wsd":
        decay_start = config.steps - config.decay_steps
        if step < decay_start:
            return config.lr
        progress = min(1.0, (step + 1 - decay_start) / config.decay_steps)  # 1/D .. 1 over the last D steps
        left = 1 - math.sqrt(progress) if config.decay_shape == "1-sqrt" else 1 - progress
        return config.min_lr + left * (config.lr - config.min_lr)
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, kind: type[torch.optim.AdamW] = torch.optim.AdamW
) -> torch.optim.AdamW:
    """AdamW (or a subclass) over the model's decay / no-decay groups, as torch's fused kernel.

    Fused on the GPU and on the CPU alike: one pass over each tensor with no temporaries, where
    the for-loop version allocates two tensors the size of the parameter (under ZeRO one flat
    partition: two more copies of a rank's share of the model at the peak) and is 8x slower on
    the CPU. Element by element it is the same update whether tensors are whole or flattened.
    """
    return kind(
        model.optimizer_groups(config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=True,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step; its state is saved with the checkpoint.

    `start_step` > 0 starts it as if it had already stepped that often (a weights-only resume).
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, config) / config.lr, last_epoch=start_step - 1
    )
