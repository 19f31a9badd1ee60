"""Save a run in one layout, resume it in another (run by torchrun; used by test_reshard.py).

    python -m torch.distributed.run --nproc_per_node N tests/reshard_run.py CONFIG.json OUT.json save STOP
    python -m torch.distributed.run --nproc_per_node N tests/reshard_run.py CONFIG.json OUT.json resume CKPT SNAPSHOT

`save`: a fresh run of CONFIG to step STOP (its checkpoint), whose 3rd training forward pass on
rank 0 has a NaN loss (with train.nonfinite=skip: one skipped update before the checkpoint); then
the same run resumed in the same layout to train.steps, as the reference continuation.
`resume`: CONFIG's run resumed from checkpoint CKPT (any layout), checkpointed at once into the
run directory SNAPSHOT, then trained to train.steps.
Both modes also check the live optimizer against the files: `live_state_equal` is whether every
rank's Adam state (moments whole over data parallelism, steps) equals, bitwise, this TP rank's
slice of what lm.consolidate reads back from the checkpoint written under this layout (`save`:
STOP's; `resume`: SNAPSHOT's). Rank 0 writes {"losses": [...], "live_state_equal": bool} to OUT.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lm.config import RunConfig
from lm.consolidate import MOMENTS, load_optimizer_state
from lm.distributed import close_distributed
from lm.model import CrossEntropy
from lm.parallel import slice_state_dict
from lm.saving import save_checkpoint
from lm.train import Run, run_loop, start_run


def live_state_equals(run: Run, tag_dir: Path) -> bool:
    """Whether the engine's Adam state is exactly this TP rank's slice of the checkpoint's (a collective)."""
    moments, steps = run.engine.full_optimizer_state()
    saved = load_optimizer_state(tag_dir)
    tp, rank = run.groups.tp_size, run.groups.tp_rank
    expected = {key: slice_state_dict(saved.moments[key], run.config.model, tp, rank) for key in MOMENTS}
    same = all(torch.equal(v, expected[key][name]) for key in MOMENTS for name, v in moments[key].items())
    same &= all(torch.equal(v, saved.steps[name]) for name, v in steps.items())
    flag = torch.tensor(float(same))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def nan_in_third_forward() -> None:
    real, calls = CrossEntropy.forward, {"n": 0}

    def cross_entropy(self, logits, targets, reduction="mean"):
        loss = real(self, logits, targets, reduction)
        if logits.requires_grad:  # training forward passes only
            calls["n"] += 1
        hit = calls["n"] == 3 and dist.get_rank() == 0
        return loss * float("nan") if hit else loss

    CrossEntropy.forward = cross_entropy


def main(config_path: str, out_path: str, mode: str, *args: str) -> None:
    config = RunConfig.from_dict(json.loads(Path(config_path).read_text()))
    if mode == "save":
        real_forward = CrossEntropy.forward
        nan_in_third_forward()
        run = start_run(config)
        checkpoint = run_loop(run, stop_at=int(args[0])).checkpoint
        run.log.close()
        equal = live_state_equals(run, checkpoint)
        CrossEntropy.forward = real_forward
        run = start_run(config, resume="auto")
    else:
        run = start_run(config, resume=args[0])
        snapshot = save_checkpoint(run.engine, Path(args[1]), run.start, run.config, run.world, run.policy.skipped)
        equal = live_state_equals(run, snapshot)
    losses = run_loop(run).losses
    run.log.close()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"losses": losses, "live_state_equal": equal}))
    close_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
