"""Train one tiny config under several ZeRO stages in one process group (run by torchrun).

    python -m torch.distributed.run --nproc_per_node N tests/zero_stages_run.py CONFIG.json OUT.json 0 1 2 3 [--without-mpu]

Rank 0 writes {stage: [loss per step]} to OUT.json. Used by test_training.py and
test_tensor_parallel.py. `--without-mpu` is the negative control: DeepSpeed is not told about
the tensor-parallel groups (and derives its batch size from the whole world), as a training
script that forgot the mpu would do.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch.distributed as dist

from lm.config import RunConfig
from lm.train import train


def forget_the_mpu():
    real = deepspeed.initialize

    def initialize(*args, mpu=None, config=None, **kwargs):
        config = {k: v for k, v in config.items() if k != "train_batch_size"}
        return real(*args, config=config, **kwargs)

    deepspeed.initialize = initialize


def main(config_path: str, result_path: str, *args: str) -> None:
    if "--without-mpu" in args:
        forget_the_mpu()
    base = json.loads(Path(config_path).read_text())
    results = {}
    for stage in (int(a) for a in args if a.isdigit()):
        raw = json.loads(json.dumps(base))
        raw["train"]["zero_stage"] = stage
        raw["train"]["out_dir"] = f"{base['train']['out_dir']}/zero{stage}"
        results[stage] = train(RunConfig.from_dict(raw))["losses"]
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
