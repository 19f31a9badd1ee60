"""The benchmark scripts run (in a reduced size) so they never rot; their figures are not checked."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cpu_env

pytestmark = pytest.mark.slow

RUNS = {
    "generation": (["generate_throughput.py", "--prompt", "4", "--new", "4"], "speed-up"),
    "data prep": (["prep_throughput.py", "--mb", "0.2", "--repeats", "1", "--vocab-size", "500"], "bare"),
}


def run_benchmark(script: str, *args: str, threads: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "benchmarks" / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=cpu_env(threads), cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_runs_and_prints_its_table(name):
    args, expected = RUNS[name]
    result = run_benchmark(*args)
    assert expected in result.stdout


def test_the_gpu_check_runs_every_step_at_toy_size_and_prints_the_tables_last(tiny_shards, tmp_path):
    """`gpu_check.sh --smoke`: the kernel test, the attention benchmark and the training-throughput
    rows (the plain loop, DeepSpeed ZeRO-0 in one process), as on the GPU but tiny."""
    env = {
        **cpu_env(threads=2),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3 = ours
        "GPU_CHECK_SHARDS": str(tiny_shards),
    }
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    tables = result.stdout.split("================ tables ================")[-1]
    assert "1 passed" in tables  # the kernel test
    assert "twicing_sdpa" in tables and "(ok, tolerance" in tables  # the attention benchmark
    assert "all      plain" in tables and "all      ds-1p-z0" in tables  # the training rows
    assert (tmp_path / "train-all.txt").is_file() and (tmp_path / "attention.txt").is_file()


def test_the_step_profile_splits_ddp_and_zero2_steps_over_two_processes_into_phases(tiny_shards):
    result = run_benchmark(
        "profile_step.py",
        *("--set", "model.n_layer=1", "--set", "model.twicing_layers=all", "--shards", str(tiny_shards)),
        *("--stages", "2", "--steps", "1", "--processes", "2", "--interleave", "1"),
    )
    for run in ("## plain (DDP), 2 process(es)", "## ZeRO-2, 2 process(es)"):
        assert run in result.stdout
    assert result.stdout.count("forward ") == 2 and "backward " in result.stdout and "optimizer " in result.stdout
    assert "## taking turns" in result.stdout and "ZeRO-2" in result.stdout.split("## taking turns")[-1]


BAD_MEASUREMENTS = [
    ("train_throughput.py", ["--repeats", "0"]),
    ("train_throughput.py", ["--interval", "0"]),
    ("train_throughput.py", ["--warmup", "-1"]),
    ("profile_step.py", ["--steps", "0"]),
]


@pytest.mark.parametrize("script,args", BAD_MEASUREMENTS)
def test_a_benchmark_refuses_an_empty_or_negative_measurement_in_one_line(script, args):
    command = [sys.executable, str(REPO / "benchmarks" / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=cpu_env(2), cwd=REPO, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(f"{script}: error: ")


def test_memory_benchmark_prints_measurement_and_plan_for_each_layout(tiny_shards):
    size = ["--layers", "1", "--d-model", "64", "--heads", "1", "--block", "32"]
    # One process (under the deepspeed launcher, like every row) keeps this smoke run short.
    layout = "3x1,offload=optimizer"
    result = run_benchmark("memory.py", *size, "--layouts", layout, "--shards", str(tiny_shards), threads=2)
    row = next(line for line in result.stdout.splitlines() if line.startswith("| ZeRO-3 x 1, offload=optimizer |"))
    assert len(row.split("|")) == 11  # measured, per parameter, at the training line, plan, ratio, ideal, baseline


def test_the_activation_rows_measure_a_context_parallel_layout(tiny_shards):
    size = ["--layers", "1", "--d-model", "32", "--heads", "2", "--activations", "64"]
    result = run_benchmark("memory.py", *size, "--layouts", "0x2,context_parallel=2", "--shards", str(tiny_shards))
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 0x2,context_parallel=2 | 64 |"))
    forward, backward = (float(cell) for cell in row.split("|")[3:5])
    assert 0 < forward <= backward and row.rstrip().endswith("| 1.00 |")  # its own reference
