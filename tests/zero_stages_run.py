"""Train one tiny config under several ZeRO stages in one process group (run by torchrun).

    python -m torch.distributed.run --nproc_per_node N tests/zero_stages_run.py CONFIG.json OUT.json 0 1 2 3

Rank 0 writes {stage: [loss per step]} to OUT.json. Used by tests/test_training.py.
"""

import json
import sys
from pathlib import Path

from lm.config import RunConfig
from lm.train import train


def main(config_path: str, result_path: str, *stages: str) -> None:
    base = json.loads(Path(config_path).read_text())
    results = {}
    for stage in map(int, stages):
        raw = json.loads(json.dumps(base))
        raw["train"]["zero_stage"] = stage
        raw["train"]["out_dir"] = f"{base['train']['out_dir']}/zero{stage}"
        results[stage] = train(RunConfig.from_dict(raw))["losses"]
    import torch.distributed as dist

    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
