"""Non-finite training steps: find them before DeepSpeed applies the update, and skip that update.

`train.nonfinite` chooses what a step with a non-finite loss or gradient does:

- `stop`: the run ends with an error naming the step, before anything is saved. The loop sees a
  loss when it logs it (every train.log_interval steps, and before any validation or checkpoint),
  so it may have trained up to that many steps past it.
- `skip`: the update is not applied. Parameters, Adam's moments and its step count stay as they
  were. The step's batch and its place in the LR schedule are spent (as in Megatron-LM), so the
  data position is still the step and a resumed run stays exact. Skips are counted and logged;
  `train.skip_limit` skips in a row end the run.

Why the decision is taken before `engine.step()`: DeepSpeed calls the client optimizer's step()
once per parameter group (ZeRO-1/2) or sub-group (ZeRO-3), each time on one rank's partition, so
no single call sees the whole step. Instead a hook on every parameter folds "was this gradient
finite" into a device flag as the local gradients appear (no host sync), and one all-reduce over
the world at the last micro step makes every replica and tensor-parallel shard agree.
"""

import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from core.errors import UserError
from lm.config import TrainConfig


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose step() does nothing while `skip_update` is set.

    DeepSpeed hands every ZeRO stage's update to this optimizer (on the full parameters at stage 0,
    on fp32 partitions at 1-3), so this one switch skips the update in all of them.
    """

    skip_update = False

    def step(self, closure=None):
        if self.skip_update:
            return None
        return super().step(closure)


class NonFiniteGuard:
    """Watches one rank's loss and local gradients; `agree()` tells every rank whether to skip."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device = device
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        # Tensor hooks see each gradient as autograd produces it, before DeepSpeed's own hooks
        # reduce and partition it, the same way under every ZeRO stage.
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self._observe)

    def _observe(self, grad: torch.Tensor) -> None:
        self.bad |= ~torch.isfinite(grad).all().to(self.device)

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.bad |= ~torch.isfinite(loss.detach()).all().to(self.device)

    def agree(self) -> bool:
        """True on every rank when any rank saw a non-finite value since the last call."""
        flag = self.bad.float()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.bad.zero_()
        return bool(flag.item())


@torch.no_grad()
def weights_are_finite(local_weights: Iterable[torch.Tensor], device: torch.device) -> bool:
    """Whether every rank's share of the weights is finite (a collective: every rank must call it)."""
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for w in local_weights:
        bad |= ~torch.isfinite(w).all().to(device)
    flag = bad.float()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


class NonFinitePolicy:
    """`train.nonfinite` applied to each step: stop the run, or skip the update and count it.

    `hint()` says where the run can be resumed from, for the line that ends a run.
    """

    def __init__(
        self,
        train: TrainConfig,
        model: torch.nn.Module,
        device: torch.device,
        hint: Callable[[], str],
        skipped: int = 0,
    ):
        self.mode, self.limit, self.hint = train.nonfinite, train.skip_limit, hint
        self.guard = NonFiniteGuard(model, device) if self.mode == "skip" else None
        self.skipped = skipped  # over the whole run, resumed ones included (saved in checkpoints)
        self.in_a_row = 0

    def observe_loss(self, loss: torch.Tensor) -> None:
        if self.guard is not None:
            self.guard.observe_loss(loss)

    def skip_update(self) -> bool:
        """At the last micro step: whether every rank agrees to skip this update (a collective)."""
        return self.guard.agree() if self.guard is not None else False

    def after_step(self, step: int, loss: float, grad_norm: float | None, applied: bool) -> bool:
        """Whether step `step` was skipped; raises the UserError that ends the run where it must."""
        if not applied and self.mode == "skip":
            self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
            if self.in_a_row >= self.limit:
                raise UserError(
                    f"{self.in_a_row} steps in a row had a non-finite loss or gradients "
                    f"(train.skip_limit): training stopped at step {step} ({self.hint()})"
                )
            return True
        self.in_a_row = 0
        # Under `stop`, an update DeepSpeed discarded itself means non-finite gradients too.
        if applied and math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            return False
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        raise UserError(f"non-finite {what} at step {step}: training stopped without saving ({self.hint()})")
