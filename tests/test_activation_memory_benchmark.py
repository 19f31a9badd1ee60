"""benchmarks/activation_memory.py runs (toy size) and prints both settings and their ratios; figures unchecked."""

import subprocess
import sys

import pytest

from conftest import REPO, cpu_env

pytestmark = pytest.mark.slow


def test_the_activation_memory_benchmark_runs_and_prints_its_table(tiny_shards):
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "activation_memory.py"),
        "--smoke",
        "--shards",
        str(tiny_shards),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=cpu_env(threads=2), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("none ") for line in lines) and any(line.startswith("full ") for line in lines)
    assert "full / none peak RSS" in result.stdout and "full / none step time" in result.stdout
