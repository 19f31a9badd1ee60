"""Specification of the one rank-0 decision: whichever launcher started a job, an error is
reported once, by rank 0, and every rank exits with status 2."""

import subprocess
import sys

import pytest

from conftest import REPO, cpu_env
from core.errors import UserError, run_command
from core.ranks import LAUNCHERS, launcher_rank, launcher_world_size

ALL_RANK_VARIABLES = [v.rank for v in LAUNCHERS] + [v.size for v in LAUNCHERS]


@pytest.fixture
def lone_process(monkeypatch):
    """No launcher's variables: a plain `python` process."""
    for name in ALL_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def fail(argv):
    raise UserError("the data is bad")


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda v: v.launcher)
def test_only_rank_0_of_any_launcher_prints_the_error(lone_process, capsys, launcher):
    for rank, expected in (("0", "error: the data is bad\n"), ("1", "")):
        lone_process.setenv(launcher.rank, rank)
        lone_process.setenv(launcher.size, "2")
        assert run_command(fail) == 2
        assert capsys.readouterr().err == expected
        assert launcher_rank() == int(rank) and launcher_world_size() == 2


def test_a_lone_process_is_rank_0_of_1(lone_process, capsys):
    assert launcher_rank() == 0 and launcher_world_size() == 1
    assert run_command(fail) == 2 and capsys.readouterr().err == "error: the data is bad\n"


def test_torch_variables_win_over_the_job_launcher_that_started_the_launcher(lone_process):
    # srun starts one deepspeed launcher per node; its ranks carry SLURM_PROCID of the launcher.
    lone_process.setenv("SLURM_PROCID", "0")
    lone_process.setenv("SLURM_NTASKS", "2")
    lone_process.setenv("RANK", "3")
    lone_process.setenv("WORLD_SIZE", "4")
    assert launcher_rank() == 3 and launcher_world_size() == 4


def test_an_srun_started_job_reports_a_data_error_once(tmp_path):
    """Two tasks as `srun --ntasks 2 lm prep ...` starts them: one error line between them."""
    missing = tmp_path / "no-such-corpus.txt"
    tasks = []
    for rank in range(2):
        env = {k: v for k, v in cpu_env().items() if k not in ALL_RANK_VARIABLES}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID="4242")
        command = [sys.executable, "-m", "lm.cli", "prep", "--input", str(missing), "--out", str(tmp_path / "out")]
        tasks.append(
            subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = [(task.wait(timeout=120), task.stderr.read()) for task in tasks]
    assert [code for code, _ in results] == [2, 2]
    lines = [line for _, err in results for line in err.splitlines()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-corpus.txt" in lines[0], results
    assert not (tmp_path / "out").exists()
