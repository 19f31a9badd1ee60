"""Non-finite training steps: find them before DeepSpeed applies the update, and skip that update.

`train.nonfinite` chooses what a step with a non-finite loss or gradient does:

- `stop`: the run ends with an error after the step, before anything is saved.
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

import torch
import torch.distributed as dist


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
def weights_are_finite(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether every rank's share of the weights is finite (ZeRO-3 keeps it in `ds_tensor`)."""
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for p in module.parameters():
        bad |= ~torch.isfinite(getattr(p, "ds_tensor", p)).all().to(device)
    flag = bad.float()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0
