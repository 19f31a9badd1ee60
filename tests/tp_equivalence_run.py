"""TP = world size versus the full model, on every rank (run by torchrun; used by test_tensor_parallel.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/tp_equivalence_run.py OUT.json

For softmax and twicing models of GPT-2's layout, and twicing models with grouped-query attention
(2 kv heads for 4 query heads) in Llama's layout and in GPT-2's (with rotary positions, RMSNorm,
SwiGLU and an untied output layer): logits (gathered over the vocabulary slices), loss and gradients
(each rank's slice against the same slice of the full gradient), as worst relative errors; and
the number of collectives one forward+backward issues. Rank 0 writes OUT.json.
"""

import json
import sys
from unittest import mock

import torch
import torch.distributed as dist

from lm.config import ModelConfig
from lm.distributed import close_distributed, init_distributed
from lm.model import GPT
from lm.parallel import build_groups, shard_model

CONFIG = dict(vocab_size=96, block_size=16, n_layer=3, n_head=4, n_embd=32, d_ff=64)
MODELS = {
    "none": dict(twicing_layers="none"),
    "all": dict(twicing_layers="all"),
    "llama-gqa": dict(arch="llama", n_kv_head=2, twicing_layers="all"),
    "gpt2-gqa-rope-swiglu": dict(
        n_kv_head=2, position="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, twicing_layers="all"
    ),
}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def gathered_logits(logits: torch.Tensor, group, tp: int) -> torch.Tensor:
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def compare(options: dict, groups) -> dict:
    config = ModelConfig(**CONFIG, **options)
    torch.manual_seed(0)
    full = GPT(config)
    torch.manual_seed(0)
    sharded = shard_model(GPT(config), groups)
    ids = torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_loss = full(ids, targets)
    ref_loss.backward()
    calls = {"n": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["n"] += 1
        return real_all_reduce(*args, **kwargs)

    with mock.patch.object(dist, "all_reduce", counting_all_reduce):
        logits, loss = sharded(ids, targets)
        loss.backward()
    errors = {
        "logits": relative(gathered_logits(logits, groups.tp_group, groups.tp_size), ref_logits),
        "loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
    }
    full_params = dict(full.named_parameters())
    worst, slices_equal, checked = 0.0, True, 0
    for name, p in sharded.named_parameters():
        ref_value, ref_grad = full_params[name].detach(), full_params[name].grad
        if getattr(p, "tensor_model_parallel", False):
            ref_value = ref_value.index_select(p.partition_dim, p.full_index)
            ref_grad = ref_grad.index_select(p.partition_dim, p.full_index)
        slices_equal &= torch.equal(p.detach(), ref_value)  # no update happened: still the init
        worst = max(worst, relative(p.grad, ref_grad))
        checked += 1
    errors["grads"] = worst
    return {
        "errors": errors,
        "parameters_checked": checked,
        "init_is_exact_slice": slices_equal,
        "all_reduces": calls["n"],
    }


def main(out_path: str) -> None:
    init_distributed()
    groups = build_groups(dist.get_world_size())
    results = {name: compare(options, groups) for name, options in MODELS.items()}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
