"""The benchmark scripts run (in a reduced size) so they never rot; their figures are not checked."""

import subprocess
import sys

import pytest

from conftest import REPO, cpu_env

pytestmark = pytest.mark.slow

RUNS = {
    "attention": (["attention.py", "--lengths", "64", "128", "--repeats", "1"], "(ok, tolerance"),
    "generation": (["generate_throughput.py", "--prompt", "4", "--new", "4"], "speed-up"),
    "training": (["train_throughput.py", "--steps", "3", "--set", "model.n_layer=2", "--set", "train.precision=bf16",
                  "--twicing", "all", "--stages", "1", "--two-process-stages", "2"], "all      ds-2p-z2"),
    "data prep": (["prep_throughput.py", "--mb", "0.2", "--repeats", "1", "--vocab-size", "500"], "bare"),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_runs_and_prints_its_table(name):
    args, expected = RUNS[name]
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / args[0]), *args[1:]], capture_output=True,
                            text=True, env=cpu_env(threads=2), cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
