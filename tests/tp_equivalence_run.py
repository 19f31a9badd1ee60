"""TP = world size versus the full model, on every rank (run by torchrun; used by test_tensor_parallel.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/tp_equivalence_run.py OUT.json

For softmax and twicing models of GPT-2's layout, and twicing models with grouped-query attention
(2 kv heads for 4 query heads) in Llama's layout and in GPT-2's (with rotary positions, RMSNorm,
SwiGLU and an untied output layer): logits (gathered over the vocabulary slices), loss and gradients
(each rank's slice against the same slice of the full gradient), as worst relative errors; and
the number of collectives one forward+backward issues. Each model also with sequence parallelism
("NAME/sp"), and GPT-2's softmax model with it and every block recomputed ("none/sp+recompute").
Under "dropout": with model.dropout > 0, whether the TP ranks drop alike, with SP and without.
Under "kept_whole": per model, how many (B, T, n_embd) activations one forward keeps for backward,
under TP and under SP; under "sp_exact", whether SP's column-parallel layers, which keep the shard
and gather it again, give bitwise the gradients of F.linear keeping the gathered input, in fp32 and
under bf16 autocast. Rank 0 writes OUT.json.
"""

import contextlib
import json
import sys
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lm.config import ModelConfig
from lm.distributed import close_distributed, init_distributed
from lm.model import GPT
from lm.parallel import build_groups, dropout_stream, shard_model
from lm.parallel.sequence import SequenceRegion

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


def counting(calls: dict):
    """Patches counting the collectives issued: the sizes of all-reduces, the number of the others."""

    def counted(name, real):
        def call(tensor, *args, **kwargs):
            calls.setdefault(name, []).append(tensor.numel())
            return real(tensor, *args, **kwargs)

        return mock.patch.object(dist, name, call)

    names = ("all_reduce", "all_gather_single", "reduce_scatter_single")
    return [counted(name, getattr(dist, name)) for name in names]


def compare(options: dict, groups, sequence_parallel: bool = False, recompute: bool = False) -> dict:
    config = ModelConfig(**CONFIG, **options)
    torch.manual_seed(0)
    full = GPT(config)
    torch.manual_seed(0)
    sharded = shard_model(GPT(config), groups, sequence_parallel)
    if recompute:
        sharded.recompute_blocks = frozenset(range(config.n_layer))
    ids = torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_loss = full(ids, targets)
    ref_loss.backward()
    calls = {}
    patches = counting(calls)
    for patch in patches:
        patch.start()
    try:
        logits, loss = sharded(ids, targets)
        loss.backward()
    finally:
        for patch in patches:
            patch.stop()
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
    hidden = ids.numel() * config.n_embd  # an all-reduce of this size moves activations (B, T, C)
    reduced = calls.get("all_reduce", [])
    return {
        "errors": errors,
        "parameters_checked": checked,
        "init_is_exact_slice": slices_equal,
        "state_dict_keys_unchanged": list(sharded.state_dict()) == list(full.state_dict()),
        "all_reduces": len(reduced),
        "activation_all_reduces": sum(n == hidden for n in reduced),
        "other_all_reduce_sizes": [n for n in reduced if n != hidden],
        "all_gathers": len(calls.get("all_gather_single", [])),
        "reduce_scatters": len(calls.get("reduce_scatter_single", [])),
    }


def same_on_every_tp_rank(x: torch.Tensor, groups) -> bool:
    parts = [torch.empty_like(x) for _ in range(groups.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=groups.tp_group)
    return all(torch.equal(part, parts[0]) for part in parts)


def dropout(groups, sequence_parallel: bool) -> dict:
    """Seeded as lm.train seeds dropout: do the TP ranks draw the same embedding-dropout mask, and do
    they still agree on the loss and on the gradients of the parameters they all hold?"""
    config = ModelConfig(**CONFIG, dropout=0.5)
    torch.manual_seed(0)
    model = shard_model(GPT(config), groups, sequence_parallel)
    stream = dropout_stream(groups, sequence_parallel)
    torch.manual_seed(1 + stream)
    dropped = []
    model.embedding_dropout.register_forward_hook(lambda module, args, out: dropped.append(out == 0))
    ids = torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    _, loss = model(ids, ids)
    loss.backward()
    replicated = [p.grad.flatten() for p in model.parameters() if not getattr(p, "tensor_model_parallel", False)]
    return {
        "streams_equal": same_on_every_tp_rank(torch.tensor([stream]), groups),
        "masks_equal": same_on_every_tp_rank(dropped[0], groups),
        "loss_equal": same_on_every_tp_rank(loss.detach(), groups),
        "replicated_grads_equal": same_on_every_tp_rank(torch.cat(replicated), groups),
    }


def kept_whole(options: dict, groups, sequence_parallel: bool) -> int:
    """How many tensors a forward saves for backward that hold the whole sequence at full width: shape
    (B, T, n_embd) or flattened (B * T, n_embd), as F.linear keeps its input. Under SP the column-parallel
    layers keep only this rank's shard of the gathered norm output, so none should."""
    config = ModelConfig(**(CONFIG | dict(d_ff=128)), **options)  # 64 MLP units per rank: not n_embd wide
    torch.manual_seed(0)
    model = shard_model(GPT(config), groups, sequence_parallel)
    ids = torch.randint(0, config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(1))
    whole = {(5, 16, config.n_embd), (5 * 16, config.n_embd)}  # 80 rows: no weight's dimension
    kept = []

    def pack(saved: torch.Tensor) -> torch.Tensor:
        kept.append(tuple(saved.shape) in whole)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        _, loss = model(ids, ids)
    loss.backward()
    return sum(kept)


def sp_grads(options: dict, groups, autocast: bool, keep_gathered: bool) -> list[torch.Tensor]:
    config = ModelConfig(**CONFIG, **options)
    torch.manual_seed(0)
    model = shard_model(GPT(config), groups, sequence_parallel=True)
    ids = torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    plain = mock.patch.object(SequenceRegion, "linear", lambda region, x, weight, bias: F.linear(x, weight, bias))
    with plain if keep_gathered else contextlib.nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = model(ids, ids)
        loss.backward()
    return [logits.detach(), *(p.grad for p in model.parameters())]


def sp_exact(options: dict, groups) -> dict:
    exact = {}
    for precision, autocast in (("fp32", False), ("bf16", True)):
        kept_shard, kept_gathered = (sp_grads(options, groups, autocast, keep) for keep in (False, True))
        exact[precision] = all(map(torch.equal, kept_shard, kept_gathered))
    return exact


def main(out_path: str) -> None:
    init_distributed()
    groups = build_groups(dist.get_world_size())
    results = {name: compare(options, groups) for name, options in MODELS.items()}
    results |= {f"{name}/sp": compare(options, groups, sequence_parallel=True) for name, options in MODELS.items()}
    results["none/sp+recompute"] = compare(MODELS["none"], groups, sequence_parallel=True, recompute=True)
    results["dropout"] = {"tp": dropout(groups, False), "sp": dropout(groups, True)}
    results["kept_whole"] = {
        name: {"tp": kept_whole(options, groups, False), "sp": kept_whole(options, groups, True)}
        for name, options in MODELS.items()
    }
    results["sp_exact"] = {name: sp_exact(options, groups) for name, options in MODELS.items()}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
