"""Train one tiny config under several ZeRO stages in one process group (run by torchrun).

    python -m torch.distributed.run --nproc_per_node N tests/zero_stages_run.py CONFIG.json OUT.json 0 1 2 3 \
        [3:optimizer+params ...] [--without-mpu]

Rank 0 writes {stage: {"losses": [loss per step], "logits": [...], "logits_dtype": ..., "weights_dtype": ...,
"compiled": bool, "weight_views_saved": int, "run_dir": ..., "engine_stage": int, "direct": bool,
"global_steps": int, "global_samples": int, "offloaded": [bool, bool], "norms": [[ours, DeepSpeed's]],
"reduces_async": bool}}
to OUT.json (a stage written STAGE:OFFLOAD also sets train.offload): the logits are the trained engine's (gathered over
tensor-parallel ranks) for the ids 0..block_size-1, with the dtype the engine computed them in; then
the dtype of its weights, whether its module runs compiled, how many views of weights one forward
keeps for backward, what DeepSpeed offloads to the CPU (the optimizer, the weights), and at each
step where lm.engine computes ZeRO-1/2's gradient norm its own (norm_in_one_reduction), that norm and
DeepSpeed's over the same gradients. Used by
test_training.py and test_tensor_parallel.py.
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
from lm.distributed import close_distributed
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


def weight_views_saved(engine, model: dict) -> int:
    """Tensors one training forward keeps for backward that share a weight's storage without being
    the weight (F.linear keeps weight.t()): under ZeRO-3 each would hold a gathered weight to backward."""
    engine.train()
    params = list(engine.module.parameters())
    found = [0]

    def pack(saved):
        storage = saved.untyped_storage().data_ptr()
        if all(saved is not p for p in params) and any(
            p.data.numel() and storage == p.untyped_storage().data_ptr() for p in params
        ):
            found[0] += 1
        return saved

    ids = torch.arange(model["block_size"]).remainder(model["vocab_size"])[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        engine(ids, ids)  # the graph is dropped unused
    return found[0]


def record_norms(engine) -> list[list[float]]:
    """Where lm.engine replaced ZeRO-1/2's norm: each step's [ours, DeepSpeed's] on the same gradients."""
    zero = engine.ds.optimizer
    pairs = []
    if "scaled_global_norm" not in vars(zero):  # DeepSpeed's own: nothing to compare
        return pairs
    ours = zero.scaled_global_norm

    def both(norm_type=2):
        norm = ours(norm_type)
        pairs.append([float(norm), float(type(zero).scaled_global_norm(zero, norm_type))])
        return norm

    zero.scaled_global_norm = both
    return pairs


def main(config_path: str, result_path: str, *args: str) -> None:
    if "--without-mpu" in args:
        forget_the_mpu()
    base = json.loads(Path(config_path).read_text())
    results = {}
    for name in (a for a in args if a[:1].isdigit()):
        stage, _, offload = name.partition(":")
        raw = json.loads(json.dumps(base))
        raw["train"]["zero_stage"] = int(stage)
        raw["train"]["offload"] = offload or "none"
        raw["train"]["out_dir"] = f"{base['train']['out_dir']}/zero{name.replace(':', '-').replace('+', '-')}"
        run = start_run(RunConfig.from_dict(raw))  # set up apart from the loop, so the engine stays at hand
        norms = record_norms(run.engine)
        losses = run_loop(run).losses
        run.log.close()
        views = weight_views_saved(run.engine, raw["model"])
        logits, logits_dtype = final_logits(run.engine, run.groups, raw["model"])
        weights_dtype = str(next(run.engine.module.parameters()).dtype)
        compiled = getattr(run.engine.module, "_compiled_call_impl", None) is not None  # set by nn.Module.compile()
        results[name] = {
            "losses": losses,
            "logits": logits,
            "logits_dtype": logits_dtype,
            "weights_dtype": weights_dtype,
            "compiled": compiled,
            "weight_views_saved": views,
            "run_dir": raw["train"]["out_dir"],
            "engine_stage": int(run.engine.ds.zero_optimization_stage()),  # the stage DeepSpeed runs
            "direct": run.engine.direct,  # stepped without DeepSpeed's wrappers (one rank, ZeRO-0)
            "global_steps": run.engine.ds.global_steps,  # the counters DeepSpeed's checkpoints save
            "global_samples": run.engine.ds.global_samples,
            # what DeepSpeed's engine offloads to the CPU: the optimizer, the weights
            "offloaded": [run.engine.ds.zero_cpu_offload(), run.engine.ds.zero_offload_param() is not None],
            "norms": norms,
            # ZeRO-1/2 on gloo: each gradient bucket reduced while backward goes on (lm.engine)
            "reduces_async": "allreduce_and_copy" in vars(run.engine.ds.optimizer),
        }
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(results))
    close_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
