"""Specification of reliability: killed ranks, interrupted checkpoints, retention, hostile files."""

import json
import math
import pickle
import subprocess
import sys
import time

import pytest

from conftest import REPO, cpu_env, run_lm, tiny_run_config, write_config
from test_training import assert_one_error_line, losses_from

pytestmark = pytest.mark.slow

TRAIN = {"steps": 12, "zero_stage": 2, "checkpoint_interval": 5, "eval_interval": 0}


def run_with_fault(fault: str, step: int, rank: int, config_path) -> tuple[subprocess.CompletedProcess, float]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "fault_run.py"), fault, str(step), str(rank), "--", "--config", str(config_path)]
    began = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=300)
    return result, time.monotonic() - began


@pytest.fixture(scope="module")
def straight_losses(tiny_shards, tmp_path_factory):
    """The uninterrupted run every faulty one is compared with."""
    run_dir = tmp_path_factory.mktemp("straight")
    config = write_config(run_dir / "c.yaml", tiny_run_config(tiny_shards, run_dir / "run", {"dropout": 0.1}, TRAIN))
    result = run_lm("lm.train", "--config", str(config), nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    return losses_from(run_dir / "run")


def faulty_config(tiny_shards, tmp_path):
    return write_config(tmp_path / "faulty.yaml", tiny_run_config(tiny_shards, tmp_path / "faulty", {"dropout": 0.1}, TRAIN))


def test_a_killed_rank_ends_the_job_and_resume_continues_bitwise(tiny_shards, tmp_path, straight_losses):
    faulty = faulty_config(tiny_shards, tmp_path)
    result, seconds = run_with_fault("kill-in-step", 8, 1, faulty)
    assert result.returncode != 0 and seconds < 120  # the surviving rank does not hang
    resumed = run_lm("lm.train", "--config", str(faulty), "--resume", "auto", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step 5" in resumed.stdout
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


def test_a_non_finite_loss_stops_training_before_anything_is_saved(tiny_shards, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tiny_shards, tmp_path / "run", train=TRAIN))
    result, _ = run_with_fault("nan-in-step", 14, 1, config)  # micro step 14 of rank 1 is in step 7
    assert result.returncode != 0
    assert "error: non-finite loss at step 7: training stopped without saving (the last complete checkpoint is step00000005" in result.stderr
    checkpoints = sorted(d.name for d in (tmp_path / "run" / "checkpoints").iterdir() if d.is_dir())
    assert checkpoints == ["step00000005"]
    assert all(math.isfinite(m["train/loss"]) for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
               if "train/loss" in m)


def test_retention_keeps_the_newest_complete_checkpoints(tiny_shards, tmp_path):
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"steps": 8, "checkpoint_interval": 2, "keep_last": 2})
    assert run_lm("train", "--config", str(write_config(tmp_path / "c.yaml", config))).returncode == 0
    kept = sorted(d.name for d in (tmp_path / "run" / "checkpoints").iterdir() if d.is_dir())
    assert kept == ["step00000006", "step00000008"]


class RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_hostile_checkpoint_files_are_refused_without_running_their_code(tiny_shards, tmp_path):
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"steps": 2})
    path = write_config(tmp_path / "c.yaml", config)
    assert run_lm("train", "--config", str(path)).returncode == 0
    tag = tmp_path / "run" / "checkpoints" / "step00000002"
    marker = tmp_path / "pwned"
    (tag / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    result = run_lm("eval", "--checkpoint", str(tmp_path / "run"), "--text", str(path))
    assert_one_error_line(result, "mp_rank_00_model_states.pt: cannot be read as a DeepSpeed checkpoint file")
    longer = write_config(tmp_path / "longer.yaml", tiny_run_config(tiny_shards, tmp_path / "run", train={"steps": 4}))
    result = run_lm("train", "--config", str(longer), "--resume", "auto")
    assert result.returncode != 0 and "cannot be read as a DeepSpeed checkpoint file" in result.stderr
    (tag / "rng_rank0.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    assert not marker.exists()
    info = json.loads((tag / "complete.json").read_text())
    assert info["step"] == 2  # the marker itself is JSON: inspecting a checkpoint unpickles nothing
