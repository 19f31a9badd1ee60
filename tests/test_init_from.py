"""Specification of `lm train --init-from PATH`: a new run (step 0, fresh optimizer and schedule)
that starts from the weights of another run, checkpoint or converted directory, in any layout;
the layers may compute differently (twice a softmax model), the shapes may not."""

import json

import pytest
import torch

from conftest import assert_one_error_line, run_lm, tiny_run_config, tree_digest, write_config
from lm.inference import load_model

# An update of lr 1e-30 moves no fp32 weight of this model: the run's last checkpoint holds the
# weights it started from, bit for bit, so the start is checked through the files a user gets.
STILL = {"steps": 1, "lr": 1e-30, "min_lr": 0.0, "warmup_steps": 0, "eval_interval": 0, "eval_windows": 0}


def started_from(source, run_dir) -> bool:
    theirs, ours = load_model(source)[0].state_dict(), load_model(run_dir)[0].state_dict()
    return theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def first_step(run_dir) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return min(json.loads(line)["step"] for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout,nproc",
    [({}, 0), ({"tensor_parallel": 2, "zero_stage": 3}, 2)],
    ids=["one-process", "TP2-ZeRO3"],
)
def test_a_run_starts_at_step_zero_from_the_source_weights_in_any_layout(two_step_world, tmp_path, layout, nproc):
    # The source twices its last layer; the new run twices both: the weights carry over unchanged.
    config = tiny_run_config(
        two_step_world / "shards", tmp_path / "run", {"twicing_layers": "all"}, {**STILL, **layout}
    )
    path = write_config(tmp_path / "init.yaml", config)
    result = run_lm(
        *(["lm.train"] if nproc else ["train"]),
        "--config",
        str(path),
        "--init-from",
        str(two_step_world / "run"),
        nproc=nproc,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert started_from(two_step_world / "run", tmp_path / "run")
    assert first_step(tmp_path / "run") == 1  # step 0 ran first: a new run, not the source's step 2


def test_weights_of_another_shape_are_refused_naming_the_first_differing_one(two_step_world, tmp_path, lm_in_process):
    before = tree_digest(two_step_world)
    config = tiny_run_config(two_step_world / "shards", tmp_path / "run", {"d_ff": 96}, STILL)
    result = lm_in_process(
        "train", "--config", str(write_config(tmp_path / "c.yaml", config)), "--init-from", str(two_step_world / "run")
    )
    assert_one_error_line(result, "--init-from", "transformer.h.0.mlp.c_fc.bias is (64,) there and (96,) in the config")
    assert not (tmp_path / "run").exists() and tree_digest(two_step_world) == before


def test_weights_of_another_layout_are_refused_naming_a_missing_parameter(two_step_world, tmp_path, lm_in_process):
    config = tiny_run_config(two_step_world / "shards", tmp_path / "run", {"arch": "llama"}, STILL)
    result = lm_in_process(
        "train", "--config", str(write_config(tmp_path / "c.yaml", config)), "--init-from", str(two_step_world / "run")
    )
    assert_one_error_line(result, "--init-from", "the config's lm_head.weight is not in its weights")
    assert not (tmp_path / "run").exists()


def test_init_from_goes_with_a_fresh_or_auto_resume_only(two_step_world, tmp_path, lm_in_process):
    config = tiny_run_config(two_step_world / "shards", tmp_path / "run", train=STILL)
    path = str(write_config(tmp_path / "c.yaml", config))
    source = str(two_step_world / "run")
    result = lm_in_process("train", "--config", path, "--init-from", source, "--resume", source)
    assert_one_error_line(result, "--init-from starts a new run")
    assert_one_error_line(
        lm_in_process("train", "--config", path, "--init-from", str(tmp_path / "nothing")), "not found"
    )
