"""Specification of reliability: killed ranks, interrupted checkpoints, a full disk, retention,
hostile and mixed-up files, and no shared memory left behind by any of these runs."""

import json
import math
import pickle
import shutil
import subprocess
import time

import pytest
import torch
import yaml

from conftest import (
    REPO,
    assert_one_error_line,
    copy_two_step_world,
    losses_from,
    run_lm,
    run_torchrun,
    tiny_run_config,
    write_config,
)
from lm.checkpoint import complete_checkpoints, tag_for_step
from lm.config import RunConfig
from lm.inference import load_model
from lm.schedule import lr_at

pytestmark = pytest.mark.slow

TRAIN = {"steps": 12, "zero_stage": 2, "checkpoint_interval": 5, "eval_interval": 0}
# As the deepspeed launcher says it (torchrun does not): every rank is on this machine, on which
# DeepSpeed would make its shared-memory all-reduce buffers in /dev/shm.
ALL_RANKS_LOCAL = {"LOCAL_SIZE": "2"}


def run_with_fault(fault: str, step: int | str, rank: int, config_path) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    args = (fault, str(step), str(rank), "--", "--config", str(config_path))
    result = run_torchrun(2, "fault_run.py", *args, timeout=300, env=ALL_RANKS_LOCAL)
    return result, time.monotonic() - began


@pytest.fixture(scope="module")
def straight_run(tiny_shards, tmp_path_factory, shm_segments):
    """The uninterrupted run every faulty one is compared with (checkpoints at steps 5, 10, 12). Read-only."""
    run_dir = tmp_path_factory.mktemp("straight")
    config = write_config(run_dir / "c.yaml", tiny_run_config(tiny_shards, run_dir / "run", {"dropout": 0.1}, TRAIN))
    result = run_lm("lm.train", "--config", str(config), nproc=2, env=ALL_RANKS_LOCAL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not shm_segments.left_behind()  # a run that ends well leaves no shared memory
    return run_dir / "run"


@pytest.fixture(scope="module")
def straight_losses(straight_run):
    return losses_from(straight_run)


def faulty_config(tiny_shards, tmp_path):
    config = tiny_run_config(tiny_shards, tmp_path / "faulty", {"dropout": 0.1}, TRAIN)
    return write_config(tmp_path / "faulty.yaml", config)


def test_a_killed_rank_ends_the_job_and_resume_continues_bitwise(tiny_shards, tmp_path, straight_losses, shm_segments):
    faulty = faulty_config(tiny_shards, tmp_path)
    result, seconds = run_with_fault("kill-in-step", 8, 1, faulty)
    assert result.returncode != 0 and seconds < 120  # the surviving rank does not hang
    assert not shm_segments.left_behind()  # neither the killed rank nor the one torchrun ended left shared memory
    resumed = run_lm("lm.train", "--config", str(faulty), "--resume", "auto", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "twicing on two SDPA passes, resuming at step 5" in resumed.stdout  # a CPU keeps the two-pass path
    assert losses_from(tmp_path / "faulty") == straight_losses


def test_sigterm_to_one_rank_checkpoints_the_next_step_exits_0_and_resume_continues_bitwise(
    tiny_shards, tmp_path, straight_losses
):
    """The rank gets a second SIGTERM while it writes that checkpoint: the save just finishes."""
    faulty = faulty_config(tiny_shards, tmp_path)
    result, seconds = run_with_fault("term-in-step", 6, 1, faulty)  # after its 6th step
    assert result.returncode == 0 and seconds < 60, result.stderr[-2000:]
    newest = complete_checkpoints(tmp_path / "faulty")[-1]
    assert newest.name == "step00000007"  # agreed one step later, on every rank alike
    assert f"stopped by SIGTERM at step 7, checkpoint {newest}" in result.stdout
    resumed = run_lm("lm.train", "--config", str(faulty), "--resume", "auto", nproc=2)
    assert resumed.returncode == 0 and "resuming at step 7" in resumed.stdout, resumed.stderr[-2000:]
    assert losses_from(tmp_path / "faulty") == straight_losses


def test_a_checkpoint_interrupted_while_written_is_never_used(tiny_shards, tmp_path, straight_losses):
    faulty = faulty_config(tiny_shards, tmp_path)
    result, _ = run_with_fault("kill-in-save", 10, 1, faulty)
    assert result.returncode != 0
    partial = tmp_path / "faulty" / "checkpoints" / "step00000010"
    assert partial.is_dir() and not (partial / "complete.json").exists()
    resumed = run_lm("lm.train", "--config", str(faulty), "--resume", "auto", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step 5" in resumed.stdout and f"removed {partial}" in resumed.stdout
    assert losses_from(tmp_path / "faulty") == straight_losses
    assert (partial / "complete.json").is_file()  # rewritten whole by the resumed run


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs: room for one checkpoint of TRAIN's run, not two (needs root: skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_ends_the_run_with_one_line_and_resume_continues_exactly(
    tiny_shards, small_disk, straight_losses, shm_segments
):
    config = write_config(
        small_disk.parent / "c.yaml", tiny_run_config(tiny_shards, small_disk / "run", {"dropout": 0.1}, TRAIN)
    )
    result = run_lm("lm.train", "--config", str(config), nproc=2, env=ALL_RANKS_LOCAL)
    assert result.returncode != 0
    root = small_disk / "run" / "checkpoints"
    assert f"warning: {small_disk / 'run'} has 1.0 MB free, less than two checkpoints" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f'File "{REPO / "lm"}' not in result.stderr  # torchrun's own report follows
    assert f"error: cannot write checkpoint step00000010 in {root} (rank " in errors[0]
    assert "[Errno 28] No space left on device" in errors[0]
    assert "the last complete checkpoint is step00000005; resume with --resume auto" in errors[0]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000005"]  # no partial directory
    assert (root / "latest").read_text() == "step00000005"
    assert not shm_segments.left_behind()  # a failed run leaves no shared memory either
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # the user makes room
    resumed = run_lm("lm.train", "--config", str(config), "--resume", "auto", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step 5" in resumed.stdout and "removed" not in resumed.stdout
    assert losses_from(small_disk / "run") == straight_losses


def test_a_checkpoint_mixing_files_of_two_saves_is_refused_naming_the_file(straight_run, tmp_path, lm_in_process):
    run = shutil.copytree(straight_run, tmp_path / "run")
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # of the same size at every step
    tag = run / "checkpoints" / "step00000010"
    shutil.copyfile(run / "checkpoints" / "step00000005" / name, tag / name)
    (tmp_path / "text.txt").write_text("Some text to score. " * 20)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["out_dir"] = str(run)
    config = write_config(tmp_path / "c.yaml", config)
    expected = f"{tag / name} comes from the save of step 5, not from the save of step 10"
    for command in (
        ["train", "--config", str(config), "--resume", str(tag)],
        ["eval", "--checkpoint", str(tag), "--text", str(tmp_path / "text.txt")],
    ):
        assert_one_error_line(lm_in_process(*command), expected, "files of two checkpoints are mixed")


def test_a_non_finite_loss_stops_training_before_anything_is_saved(tiny_shards, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tiny_shards, tmp_path / "run", train=TRAIN))
    result, _ = run_with_fault("nan-in-step", 14, 1, config)  # micro step 14 of rank 1 is in step 7
    assert result.returncode != 0
    assert (
        "error: non-finite loss at step 7: training stopped without saving "
        "(the last complete checkpoint is step00000005"
    ) in result.stderr
    checkpoints = sorted(d.name for d in (tmp_path / "run" / "checkpoints").iterdir() if d.is_dir())
    assert checkpoints == ["step00000005"]
    model = load_model(tmp_path / "run")[0]
    assert all(torch.isfinite(w).all() for w in model.state_dict().values())
    metrics = map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert all(math.isfinite(m["train/loss"]) for m in metrics if "train/loss" in m)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_the_skip_policy_drops_a_non_finite_update_and_trains_on(tiny_shards, tmp_path, zero_stage):
    train = {**TRAIN, "steps": 8, "checkpoint_interval": 1, "zero_stage": zero_stage, "nonfinite": "skip"}
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tiny_shards, tmp_path / "run", train=train))
    result, _ = run_with_fault("nan-in-step", 14, 1, config)  # rank 1's loss in step 7 only
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 7/8: non-finite loss or gradients, update skipped (1 so far)" in result.stdout
    metrics = {}
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        metrics.setdefault(record["step"], {}).update(record)
    assert "train/loss" not in metrics[7] and metrics[8]["train/skipped_steps"] == 1
    run_config = RunConfig.from_dict(yaml.safe_load(config.read_text()))
    assert metrics[8]["train/lr"] == pytest.approx(lr_at(7, run_config.train), rel=1e-12)  # the schedule went on
    weights = {
        step: load_model(tmp_path / "run" / "checkpoints" / tag_for_step(step))[0].state_dict() for step in range(1, 9)
    }
    assert all(torch.equal(weights[6][name], weights[7][name]) for name in weights[6])  # the update was dropped
    assert not all(torch.equal(weights[7][name], weights[8][name]) for name in weights[7])  # the next one was not
    # No checkpoint holds a NaN.
    assert all(torch.isfinite(w).all() for state in weights.values() for w in state.values())


def test_too_many_skips_in_a_row_stop_the_run(tiny_shards, tmp_path):
    train = {**TRAIN, "nonfinite": "skip", "skip_limit": 2}
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tiny_shards, tmp_path / "run", train=train))
    result, _ = run_with_fault("nan-in-step", "14+", 1, config)  # every step from 7 on
    assert result.returncode != 0
    assert (
        "error: 2 steps in a row had a non-finite loss or gradients (train.skip_limit): training stopped at step 8 "
        "(the last complete checkpoint is step00000005"
    ) in result.stderr
    assert sorted(d.name for d in (tmp_path / "run" / "checkpoints").iterdir() if d.is_dir()) == ["step00000005"]


def test_weights_that_turned_non_finite_are_never_checkpointed(tiny_shards, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tiny_shards, tmp_path / "run", train=TRAIN))
    result, _ = run_with_fault("nan-in-weights", 10, 1, config)
    assert result.returncode != 0
    assert (
        "error: non-finite weights at step 10: checkpoint not saved (the last complete checkpoint is step00000005"
    ) in result.stderr
    assert sorted(d.name for d in (tmp_path / "run" / "checkpoints").iterdir() if d.is_dir()) == ["step00000005"]


def test_retention_keeps_the_newest_complete_checkpoints(tiny_shards, tmp_path):
    train = {"steps": 8, "checkpoint_interval": 2, "keep_last": 2}
    config = tiny_run_config(tiny_shards, tmp_path / "run", train=train)
    assert run_lm("train", "--config", str(write_config(tmp_path / "c.yaml", config))).returncode == 0
    kept = sorted(d.name for d in (tmp_path / "run" / "checkpoints").iterdir() if d.is_dir())
    assert kept == ["step00000006", "step00000008"]


class RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_hostile_checkpoint_files_are_refused_without_running_their_code(two_step_world, tmp_path):
    world = copy_two_step_world(two_step_world, tmp_path / "world")
    path = world / "good.yaml"  # the config of the 2-step run in world / "run"
    tag = world / "run" / "checkpoints" / "step00000002"
    marker = tmp_path / "pwned"
    (tag / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    info = json.loads((tag / "complete.json").read_text())
    info["files"]["mp_rank_00_model_states.pt"] = (tag / "mp_rank_00_model_states.pt").stat().st_size
    (tag / "complete.json").write_text(json.dumps(info))  # a crafted checkpoint lists its files' sizes
    result = run_lm("eval", "--checkpoint", str(world / "run"), "--text", str(path))
    assert_one_error_line(result, "mp_rank_00_model_states.pt: cannot be read as a DeepSpeed checkpoint file")
    longer = tiny_run_config(world / "shards", world / "run", train={"steps": 4})
    longer = write_config(tmp_path / "longer.yaml", longer)
    result = run_lm("train", "--config", str(longer), "--resume", "auto")
    assert result.returncode != 0 and "cannot be read as a DeepSpeed checkpoint file" in result.stderr
    (tag / "rng_rank0.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    assert not marker.exists()
    info = json.loads((tag / "complete.json").read_text())
    assert info["step"] == 2  # the marker itself is JSON: inspecting a checkpoint unpickles nothing
