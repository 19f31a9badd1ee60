"""Train one tiny config in several layouts, with and without activation checkpointing (run by torchrun).

    python -m torch.distributed.run --nproc_per_node N tests/activation_checkpointing_run.py SPEC.json OUT.json

SPEC.json is {"config": run config, "runs": {name: {train overrides}}}; every run trains in the same
process group, one after the other. Rank 0 writes {name: {"losses": [loss per step], "block_calls":
forward calls of the transformer blocks over the whole run, "micro_steps": forward passes that
trained}} to OUT.json. A checkpointed block is called once more per micro step: its recompute in
backward. Used by test_activation_checkpointing.py.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from lm.config import RunConfig
from lm.distributed import close_distributed
from lm.train import run_loop, start_run


def count_block_calls(model) -> list[int]:
    """A one-element counter of the forward calls of the model's blocks, recomputes included.

    Pre-hooks: a recompute stops once it has what backward needs, before any forward hook runs.
    """
    calls = [0]
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    base, results = spec["config"], {}
    for name, overrides in spec["runs"].items():
        raw = json.loads(json.dumps(base))
        raw["train"].update(overrides, out_dir=f"{base['train']['out_dir']}/{name}")
        run = start_run(RunConfig.from_dict(raw))
        calls = count_block_calls(run.engine.module)
        losses = run_loop(run).losses
        run.log.close()
        results[name] = {"losses": losses, "block_calls": calls[0], "micro_steps": len(losses) * run.grad_accum}
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(results))
    close_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
