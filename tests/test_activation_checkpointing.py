"""Specification of activation checkpointing (`train.activation_checkpointing: none | full | every:K`).

A checkpointed block keeps only its input and runs its forward again in backward. That must change
memory and time only: the losses and gradients are those of the run without it (bitwise in one fp32
process, dropout included, since the recompute replays the RNG), under tensor parallelism (whose
collectives run again in the recompute) and ZeRO-3 (which gathers the parameters again), for
softmax and twicing layers, the Triton kernel too, under bf16 autocast and compiled.
"""

import dataclasses
import importlib
import json

import pytest
import torch

from conftest import run_lm, run_torchrun, tiny_run_config, write_config
from core.errors import UserError
from lm import attention
from lm.config import ModelConfig, RunConfig, TrainConfig
from lm.model import GPT
from lm.parallel import ParallelGroups
from lm.plain_loop import train_plain
from lm.train import build_model

CONFIG = dict(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=32, d_ff=64, dropout=0.1)
TWICING = {"softmax": "none", "twicing": "all"}

# --------------------------------------------------------------------------- the config value


@pytest.mark.parametrize(
    "value, blocks",
    [("none", []), ("full", [0, 1, 2, 3, 4]), ("every:1", [0, 1, 2, 3, 4]), ("every:2", [0, 2, 4]), ("every:9", [0])],
)
def test_the_value_names_the_blocks_to_recompute(value, blocks):
    assert TrainConfig(activation_checkpointing=value).checkpointed_blocks(5) == blocks


def test_the_default_recomputes_nothing():
    assert TrainConfig().activation_checkpointing == "none"
    assert TrainConfig().checkpointed_blocks(12) == []


@pytest.mark.parametrize("value", ["every:0", "every:-1", "every:x", "every:", "every:1.5", "every", "all", "FULL", ""])
def test_a_bad_value_is_one_line_naming_the_key_and_the_accepted_forms(value):
    with pytest.raises(UserError) as info:
        TrainConfig(activation_checkpointing=value)
    message = str(info.value)
    assert "\n" not in message
    assert "train.activation_checkpointing" in message and repr(value) in message
    assert "'none', 'full' or 'every:K'" in message


def test_lm_train_refuses_a_bad_value_with_one_error_line(tiny_shards, tmp_path):
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"activation_checkpointing": "every:0"})
    result = run_lm("train", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.activation_checkpointing" in lines[0]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- one process


def loss_and_grads(model_config: ModelConfig, recompute: list[int], autocast: bool = False, compile: bool = False):
    torch.manual_seed(0)
    model = GPT(model_config)
    model.recompute_blocks = frozenset(recompute)
    if compile:
        model.compile()
    ids = torch.randint(
        0, model_config.vocab_size, (2, model_config.block_size + 1), generator=torch.Generator().manual_seed(1)
    )
    torch.manual_seed(5)  # dropout's stream
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [[0, 1, 2], [0, 2]], ids=["full", "every:2"])
@pytest.mark.parametrize("layers", sorted(TWICING))
def test_loss_and_gradients_are_bitwise_those_without_checkpointing(layers, recompute):
    config = ModelConfig(**CONFIG, twicing_layers=TWICING[layers])
    reference_loss, reference_grads = loss_and_grads(config, [])
    loss, grads = loss_and_grads(config, recompute)
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference_grads.keys()
    assert all(torch.equal(grads[name], reference_grads[name]) for name in grads), layers


def test_a_checkpointed_block_runs_its_forward_again_in_backward():
    config = ModelConfig(**CONFIG, twicing_layers="last:1")
    model = GPT(config)
    model.recompute_blocks = frozenset([0, 2])  # every:2 of 3 blocks
    calls = {i: [] for i in range(config.n_layer)}
    for i, block in enumerate(model.transformer.h):
        # a pre-hook: the recompute stops as soon as it has what backward needs, before forward hooks
        block.register_forward_pre_hook(lambda module, args, i=i: calls[i].append(1))
    ids = torch.randint(0, config.vocab_size, (2, 16))
    _, loss = model(ids, ids)
    assert all(len(c) == 1 for c in calls.values())  # the forward itself
    loss.backward()
    assert [len(c) for c in calls.values()] == [2, 1, 2]  # the recompute, of the chosen blocks only
    with torch.no_grad():  # nothing to recompute for: evaluation and generation run each block once
        model(ids)
    assert [len(c) for c in calls.values()] == [3, 2, 3]


def saved_bytes(recompute: list[int]) -> int:
    """Bytes autograd keeps for backward outside checkpointed regions, over one forward."""
    config = ModelConfig(**{**CONFIG, "n_layer": 4, "block_size": 64}, twicing_layers="all")
    model = GPT(config)
    model.recompute_blocks = frozenset(recompute)
    seen = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # shared storage counts once
        return t

    ids = torch.randint(0, config.vocab_size, (4, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, ids)
    return sum(seen.values())


def test_full_checkpointing_keeps_far_fewer_activations_for_backward():
    none, full = saved_bytes([]), saved_bytes([0, 1, 2, 3])
    assert full < 0.4 * none, (full, none)
    assert full < saved_bytes([0, 2]) < none  # every:2 lies between


def test_the_twicing_triton_kernel_is_recomputed_and_gives_the_same_gradients(monkeypatch):
    pytest.importorskip("triton")
    kernel = importlib.import_module("lm.kernels.twicing_triton")  # in Triton's interpreter on a CPU (conftest)
    calls = []

    def counted(q, k, v):
        calls.append(1)
        return kernel.twicing_attention_triton(q, k, v)

    monkeypatch.setitem(
        attention.ATTENTION, "twicing", dataclasses.replace(attention.ATTENTION["twicing"], attend=counted)
    )
    config = ModelConfig(**{**CONFIG, "n_layer": 2}, twicing_layers="all")
    reference_loss, reference_grads = loss_and_grads(config, [])
    assert len(calls) == 2
    loss, grads = loss_and_grads(config, [0, 1])
    assert len(calls) == 2 + 4  # forward and recompute of both layers
    assert torch.equal(loss, reference_loss)
    assert all(torch.equal(grads[name], reference_grads[name]) for name in grads)


def test_under_bf16_autocast_the_recompute_is_bitwise_the_forward():
    config = ModelConfig(**CONFIG, twicing_layers="last:1")
    reference_loss, reference_grads = loss_and_grads(config, [], autocast=True)
    loss, grads = loss_and_grads(config, [0, 1, 2], autocast=True)
    assert torch.equal(loss, reference_loss)
    assert all(torch.equal(grads[name], reference_grads[name]) for name in grads)


@pytest.mark.slow
def test_a_compiled_model_checkpoints_with_the_same_loss_and_gradients():
    config = ModelConfig(**{**CONFIG, "dropout": 0.0, "n_layer": 2}, twicing_layers="last:1")
    reference_loss, reference_grads = loss_and_grads(config, [])
    loss, grads = loss_and_grads(config, [0, 1], compile=True)
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-6)
    for name, grad in grads.items():  # inductor fuses differently: fp32 rounding only
        assert ((grad - reference_grads[name]).norm() / reference_grads[name].norm()).item() <= 1e-5, name


@pytest.mark.parametrize("layers", sorted(TWICING))
def test_the_plain_loop_trains_bitwise_the_same_with_checkpointing(tiny_shards, tmp_path, layers):
    def losses(value: str) -> list[float]:
        model = {"dropout": 0.1, "twicing_layers": TWICING[layers]}
        config = tiny_run_config(tiny_shards, tmp_path, model, {"steps": 3, "activation_checkpointing": value})
        return train_plain(RunConfig.from_dict(config))["losses"]

    reference = losses("none")
    assert losses("full") == reference and losses("every:2") == reference


def test_lm_train_builds_the_model_with_the_configured_blocks_and_unchanged_names(tiny_shards, tmp_path):
    config = RunConfig.from_dict(
        tiny_run_config(tiny_shards, tmp_path, {"n_layer": 3}, {"activation_checkpointing": "every:2"})
    )
    one_rank = ParallelGroups(tp_size=1, tp_rank=0, tp_group=None, dp_size=1, dp_rank=0, dp_group=None)
    model, _ = build_model(config, one_rank, torch.device("cpu"))
    assert model.recompute_blocks == {0, 2}
    # An attribute, not a wrapper module: checkpoints and the HF export see the same names.
    assert list(model.state_dict()) == list(GPT(config.model).state_dict())


# --------------------------------------------------------------------------- under DeepSpeed, two processes

# Measured: each checkpointed run below equals its run without checkpointing bitwise; 1e-6 leaves
# room for BLAS builds that reduce in another order between forward and recompute.
RELATIVE_TOLERANCE = 1e-6


@pytest.mark.slow
def test_tp2_and_zero3_with_two_ranks_train_the_same_with_checkpointing(tiny_shards, tmp_path):
    """TP2 x DP1 under ZeRO-0 and TP1 x DP2 under ZeRO-3, dropout on, softmax and twicing layers."""
    config = tiny_run_config(tiny_shards, tmp_path / "runs", {"dropout": 0.1}, {"steps": 4})
    runs = {}
    for layout, overrides in {"tp2-z0": {"tensor_parallel": 2, "zero_stage": 0}, "dp2-z3": {"zero_stage": 3}}.items():
        for value in ("none", "full"):  # every:2 is checked in one process above
            runs[f"{layout}-{value}"] = {**overrides, "activation_checkpointing": value}
    (tmp_path / "spec.json").write_text(json.dumps({"config": config, "runs": runs}))
    result = run_torchrun(2, "activation_checkpointing_run.py", str(tmp_path / "spec.json"), str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    n_layer = config["model"]["n_layer"]
    for layout in ("tp2-z0", "dp2-z3"):
        reference = out[f"{layout}-none"]
        for value, recomputed_blocks in (("full", n_layer),):
            run = out[f"{layout}-{value}"]
            assert run["losses"] == pytest.approx(reference["losses"], rel=RELATIVE_TOLERANCE), (layout, value)
            # Every micro step called each checkpointed block once more: the recompute really ran.
            extra = run["block_calls"] - reference["block_calls"]
            assert extra == recomputed_blocks * run["micro_steps"], (layout, value)
