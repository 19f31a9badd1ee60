"""Specification of resuming on another layout: DeepSpeed's files of one TP x DP size and ZeRO stage
continue under another with the weights, Adam's moments and step counts, the LR schedule, the data
position and the skip counter; only the dropout streams are reseeded."""

import json
import shutil

import pytest
import torch

from conftest import (
    assert_one_error_line,
    copy_two_step_world,
    run_torchrun,
    tiny_run_config,
    tree_digest,
    write_config,
)
from lm import checkpoint as ckpt
from lm.config import ModelConfig
from lm.consolidate import MOMENTS, load_model_weights, load_optimizer_state
from lm.parallel import merge_state_dicts, slice_state_dict

SAVED_AT, STEPS = 5, 15  # saved at step 5 of a 15-step schedule: 10 steps continue in every layout
SAVED_LAYOUT = {"tensor_parallel": 1, "zero_stage": 2}  # on 2 processes: TP1 x DP2 under ZeRO-2
TOLERANCE = 1e-5  # relative, per continued step's loss


def config_for(tiny_shards, out_dir, **train) -> dict:
    # One skipped update before the checkpoint (reshard_run.py's NaN), so Adam's step (4) is not the run's (5).
    base = {"steps": STEPS, "eval_windows": 0, "log_interval": 5, "nonfinite": "skip", **SAVED_LAYOUT}
    return tiny_run_config(tiny_shards, out_dir, train={**base, **train})


def run_helper(tmp, nproc: int, config: dict, *args: str) -> dict:
    (tmp / "config.json").write_text(json.dumps(config))
    result = run_torchrun(nproc, "reshard_run.py", str(tmp / "config.json"), str(tmp / "out.json"), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads((tmp / "out.json").read_text()), "stdout": result.stdout}


@pytest.fixture(scope="module")
def saved_run(tiny_shards, tmp_path_factory):
    """TP1 x DP2 ZeRO-2 run checkpointed at step 5, and its own continuation to step 15 (the reference)."""
    root = tmp_path_factory.mktemp("reshard")
    config = config_for(tiny_shards, root / "original")
    result = run_helper(root, 2, config, "save", str(SAVED_AT))
    checkpoint = ckpt.checkpoint_root(root / "original") / ckpt.tag_for_step(SAVED_AT)
    # Kept aside: the reference continuation's retention may not touch what the layouts resume from.
    shutil.copytree(checkpoint, root / "saved" / "checkpoints" / checkpoint.name)
    return {"root": root, "checkpoint": root / "saved" / "checkpoints" / checkpoint.name, **result}


@pytest.mark.slow
def test_the_saved_run_skipped_one_update_and_its_files_hold_the_live_optimizer_state(saved_run):
    assert saved_run["live_state_equal"]  # ZeRO-2 over two ranks, consolidated = the engine's
    info = ckpt.read_marker(saved_run["checkpoint"])
    assert (info["step"], info["skipped_steps"], info["world_size"]) == (SAVED_AT, 1, 2)
    assert {float(s) for s in load_optimizer_state(saved_run["checkpoint"]).steps.values()} == {SAVED_AT - 1.0}
    assert len(saved_run["losses"]) == STEPS - SAVED_AT


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,stage,nproc,layout",
    [(2, 3, 2, "TP2xDP1 ZeRO-3"), (1, 0, 1, "TP1xDP1 ZeRO-0"), (1, 1, 4, "TP1xDP4 ZeRO-1")],
    ids=["TP2xDP1-ZeRO3", "TP1xDP1-ZeRO0", "TP1xDP4-ZeRO1"],
)
def test_a_run_resumed_on_another_layout_keeps_its_optimizer_state_and_loss_curve(
    saved_run, tiny_shards, tmp_path, tp, stage, nproc, layout
):
    config = config_for(tiny_shards, tmp_path / "resumed", tensor_parallel=tp, zero_stage=stage)
    resumed = run_helper(tmp_path, nproc, config, "resume", str(saved_run["checkpoint"]), str(tmp_path / "snapshot"))
    assert f"resuming at step {SAVED_AT} on a new layout (TP1xDP2 ZeRO-2 -> {layout})" in resumed["stdout"]
    assert "optimizer state re-split, dropout streams reseeded" in resumed["stdout"]

    # Checkpointed right after the resume, in the new layout: the same state, bitwise.
    snapshot = ckpt.checkpoint_root(tmp_path / "snapshot") / ckpt.tag_for_step(SAVED_AT)
    before, after = load_optimizer_state(saved_run["checkpoint"]), load_optimizer_state(snapshot)
    for key in MOMENTS:
        assert after.moments[key].keys() == before.moments[key].keys()
        for name, value in before.moments[key].items():
            assert torch.equal(after.moments[key][name], value), (key, name)
    assert all(torch.equal(after.steps[name], step) for name, step in before.steps.items())
    weights = load_model_weights(saved_run["checkpoint"])
    assert all(torch.equal(value, weights[name]) for name, value in load_model_weights(snapshot).items())
    assert resumed["live_state_equal"]  # what the engine holds is what its files say
    assert ckpt.read_marker(snapshot)["skipped_steps"] == 1

    # 10 more steps: the losses of the run that kept its layout.
    assert resumed["losses"] == pytest.approx(saved_run["losses"], rel=TOLERANCE)
    final = ckpt.read_marker(ckpt.resolve_checkpoint(tmp_path / "resumed"))
    assert (final["step"], final["skipped_steps"]) == (STEPS, 1)


def test_bf16_weights_files_resume_only_in_their_layout(two_step_world, tmp_path, lm_in_process):
    world = copy_two_step_world(two_step_world, tmp_path / "world")
    # Only the marker is read before the refusal: one that records bf16-weights stands for such a run.
    tag = ckpt.resolve_checkpoint(world / "run")
    info = ckpt.read_marker(tag)
    info["config"]["train"]["precision"] = "bf16-weights"
    ckpt.write_marker(tag, info)
    before = tree_digest(world / "run")
    other = tiny_run_config(world / "shards", world / "run", train={"precision": "bf16-weights", "zero_stage": 3})
    result = lm_in_process("train", "--config", str(write_config(tmp_path / "o.yaml", other)), "--resume", "auto")
    assert_one_error_line(result, "bf16-weights files of TP1xDP1 ZeRO-0", "not TP1xDP1 ZeRO-3", "lm convert")
    assert tree_digest(world / "run") == before


def test_slicing_a_state_dict_for_each_tp_rank_and_merging_the_slices_gives_it_back():
    config = ModelConfig(vocab_size=96, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, d_ff=64)
    generator = torch.Generator().manual_seed(0)
    shapes = {"transformer.wte.weight": (96, 32), "transformer.h.0.attn.c_attn.weight": (64, 32)}
    shapes |= {"transformer.h.1.mlp.c_proj.weight": (32, 64), "transformer.h.0.ln_1.weight": (32,)}
    full = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    slices = [slice_state_dict(full, config, 2, rank) for rank in range(2)]
    assert slices[0]["transformer.h.1.mlp.c_proj.weight"].shape == (32, 32)  # row-parallel: input features
    assert all(torch.equal(v, full[k]) for k, v in merge_state_dicts(slices, config).items())
