"""Train one tiny config under several ZeRO stages in one process group (run by torchrun).

    python -m torch.distributed.run --nproc_per_node N tests/zero_stages_run.py CONFIG.json OUT.json 0 1 2 3 \
        [--without-mpu]

Rank 0 writes {stage: {"losses": [loss per step], "logits": [...], "logits_dtype": ..., "weights_dtype": ...,
"compiled": bool}} to OUT.json, the logits being the trained engine's (gathered over tensor-parallel
ranks) for the ids 0..block_size-1, with the dtype the engine computed them in, the dtype of its
weights and whether its module runs compiled. Used by test_training.py and test_tensor_parallel.py.
`--without-mpu` is the negative control: DeepSpeed is not told about the tensor-parallel groups
(and derives its batch size from the whole world), as a training script that forgot the mpu would do.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from lm.config import RunConfig
from lm.train import run_loop, start_run


def forget_the_mpu():
    real = deepspeed.initialize

    def initialize(*args, mpu=None, config=None, **kwargs):
        config = {k: v for k, v in config.items() if k != "train_batch_size"}
        return real(*args, config=config, **kwargs)

    deepspeed.initialize = initialize


@torch.no_grad()
def final_logits(engine, groups, model: dict) -> tuple[list[float], str]:
    engine.eval()
    ids = torch.arange(model["block_size"]).remainder(model["vocab_size"])[None]
    logits, _ = engine(ids)
    parts = [torch.empty_like(logits) for _ in range(groups.tp_size)]
    dist.all_gather(parts, logits.contiguous(), group=groups.tp_group)
    return torch.cat(parts, dim=-1).float().flatten().tolist(), str(logits.dtype)


def main(config_path: str, result_path: str, *args: str) -> None:
    if "--without-mpu" in args:
        forget_the_mpu()
    base = json.loads(Path(config_path).read_text())
    results = {}
    for stage in (int(a) for a in args if a.isdigit()):
        raw = json.loads(json.dumps(base))
        raw["train"]["zero_stage"] = stage
        raw["train"]["out_dir"] = f"{base['train']['out_dir']}/zero{stage}"
        run = start_run(RunConfig.from_dict(raw))  # set up apart from the loop, so the engine stays at hand
        losses = run_loop(run).losses
        run.log.close()
        logits, logits_dtype = final_logits(run.engine, run.groups, raw["model"])
        weights_dtype = str(next(run.engine.module.parameters()).dtype)
        compiled = getattr(run.engine.module, "_compiled_call_impl", None) is not None  # set by nn.Module.compile()
        results[stage] = {
            "losses": losses,
            "logits": logits,
            "logits_dtype": logits_dtype,
            "weights_dtype": weights_dtype,
            "compiled": compiled,
        }
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
