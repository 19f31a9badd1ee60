"""Train several run configs of one world size in one process group (run by torchrun).

    python -m torch.distributed.run --nproc_per_node N tests/layouts_run.py RUNS.json OUT.json

RUNS.json maps a name to {"config": RUN CONFIG, "stop_at": STEP or null, "resume": RUN CONFIG or
null}: the run trains to the end, or to `stop_at` and then continues with --resume auto under
`resume` (the same config, or another layout of it). Rank 0 writes {name: {"losses": [the loss of
every step, both halves], "logits": [...], "run_dir": ..., "layout": [TP, CP, DP]}} to OUT.json; the
logits are the trained engine's for the ids 0..block_size-1, put together over the context-parallel
chunks and the tensor-parallel vocabulary slices. Used by test_context_parallel.py.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lm.config import RunConfig
from lm.distributed import close_distributed
from lm.train import Run, run_loop, start_run


def gathered(part: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    if size == 1:
        return part
    parts = [torch.empty_like(part) for _ in range(size)]
    dist.all_gather(parts, part.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def final_logits(run: Run) -> list[float]:
    model = run.config.model
    ids = torch.arange(model.block_size + 1).remainder(model.vocab_size)[None]
    inputs, _ = run.context.chunk(ids)
    run.engine.eval()
    logits, _ = run.engine(inputs)
    g = run.groups
    logits = gathered(logits, g.tp_group, g.tp_size, dim=-1)  # the vocabulary slices
    logits = gathered(logits, g.cp_group, g.cp_size, dim=1)  # the chunks, in CP rank order
    positions = torch.cat(
        [type(run.context)(g.cp_size, r, run.context.impl).positions(model.block_size) for r in range(g.cp_size)]
    )
    in_order = torch.empty_like(logits)
    in_order[:, positions] = logits
    return in_order.float().flatten().tolist()


def train(raw: dict, resume: str = "none", stop_at: int | None = None) -> tuple[Run, list[float]]:
    run = start_run(RunConfig.from_dict(raw), resume=resume)
    try:
        return run, run_loop(run, stop_at).losses
    finally:
        run.log.close()


def main(runs_path: str, result_path: str) -> None:
    results = {}
    for name, entry in json.loads(Path(runs_path).read_text()).items():
        run, losses = train(entry["config"], stop_at=entry.get("stop_at"))
        if entry.get("stop_at"):
            run, rest = train(entry.get("resume") or entry["config"], resume="auto")
            losses += rest
        g = run.groups
        results[name] = {
            "losses": losses,
            "logits": final_logits(run),
            "run_dir": run.config.train.out_dir,
            "layout": [g.tp_size, g.cp_size, g.dp_size],
        }
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(results))
    close_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
