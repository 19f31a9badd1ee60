"""`lm.train` with a fault injected at a chosen point (run by torchrun; used by test_faults.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/fault_run.py FAULT STEP RANK -- --config C ...

FAULT is `kill-in-step` (SIGKILL rank RANK once it has run its STEP-th optimizer step), `term-in-step`
(a real SIGTERM to rank RANK once it has run its STEP-th optimizer step, and a second one while it
writes its next checkpoint), `nan-in-step`
(rank RANK's loss of its STEP-th training forward pass becomes NaN; with STEP written `N+`, of
every pass from the N-th on), `nan-in-weights` (rank RANK's first weight becomes NaN just before
the step-STEP checkpoint is saved) or `kill-in-save`
(SIGKILL rank RANK after its DeepSpeed files of the step-STEP checkpoint are written, before the
checkpoint is marked complete). Nothing in the library knows about these hooks.
"""

import os
import signal
import sys

import torch
import torch.distributed as dist

import lm.train
from core.errors import run_command
from lm import checkpoint


def die_if(condition: bool) -> None:
    if condition:
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    fault, step, rank = sys.argv[1], int(sys.argv[2].rstrip("+")), int(sys.argv[3])
    onwards = sys.argv[2].endswith("+")
    argv = sys.argv[sys.argv.index("--") + 1 :]
    if fault == "kill-in-step":
        real, calls = lm.train.optimizer_step, {"n": 0}

        def optimizer_step(*args, **kwargs):
            result = real(*args, **kwargs)
            calls["n"] += 1
            die_if(calls["n"] == step and dist.get_rank() == rank)
            return result

        lm.train.optimizer_step = optimizer_step
    elif fault == "term-in-step":
        real, real_save, calls = lm.train.optimizer_step, checkpoint.save_rng_state, {"n": 0}

        def optimizer_step(*args, **kwargs):
            result = real(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == step and dist.get_rank() == rank:
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        def save_rng_state(tag_dir, r, *args):
            if calls["n"] >= step and r == rank:  # the checkpoint the first signal asked for
                os.kill(os.getpid(), signal.SIGTERM)
            real_save(tag_dir, r, *args)

        lm.train.optimizer_step, checkpoint.save_rng_state = optimizer_step, save_rng_state
    elif fault == "nan-in-step":
        from lm.model import CrossEntropy

        real_loss, calls = CrossEntropy.forward, {"n": 0}

        def cross_entropy(self, logits, targets, reduction="mean"):
            loss = real_loss(self, logits, targets, reduction)
            if logits.requires_grad:  # training forward passes only
                calls["n"] += 1
            hit = calls["n"] >= step if onwards else calls["n"] == step
            return loss * float("nan") if hit and dist.get_rank() == rank else loss

        CrossEntropy.forward = cross_entropy
    elif fault == "nan-in-weights":
        real_save_checkpoint = lm.train.save_checkpoint

        def save_checkpoint(engine, run_dir, done, *args, **kwargs):
            if done == step and dist.get_rank() == rank:
                with torch.no_grad():
                    next(engine.module.parameters()).fill_(float("nan"))
            return real_save_checkpoint(engine, run_dir, done, *args, **kwargs)

        lm.train.save_checkpoint = save_checkpoint
    elif fault == "kill-in-save":
        real_save = checkpoint.save_rng_state

        def save_rng_state(tag_dir, r, *args):
            real_save(tag_dir, r, *args)
            die_if(tag_dir.name == checkpoint.tag_for_step(step) and r == rank)

        checkpoint.save_rng_state = save_rng_state
    else:
        raise SystemExit(f"unknown fault {fault}")
    raise SystemExit(run_command(lm.train.main, argv))


if __name__ == "__main__":
    main()
