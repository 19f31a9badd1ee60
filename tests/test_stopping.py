"""Specification of stopping on a signal: the config key, the in-rank handlers, the launcher that owns
its process tree (no orphans), and the SLURM job script that requeues. A signal to one rank of a
run is in test_faults.py (it is compared with the uninterrupted run there)."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, cpu_env, tiny_run_config, write_config
from core.errors import UserError
from core.ranks import free_port
from launch.processes import run_owned
from lm import checkpoint as ckpt
from lm.config import TrainConfig
from lm.stopping import StopSignals

TREE = str(REPO / "tests" / "process_tree_run.py")
SBATCH = REPO / "launch" / "templates" / "sbatch.sh"


def test_save_on_signal_takes_signal_names_in_any_spelling_and_stores_canonical_ones():
    assert TrainConfig().save_on_signal == ["SIGTERM", "SIGUSR1"]
    assert TrainConfig(save_on_signal=["term", "USR2", "SIGHUP"]).save_on_signal == ["SIGTERM", "SIGUSR2", "SIGHUP"]
    assert TrainConfig(save_on_signal=[]).save_on_signal == []  # no signal stops a run cleanly


@pytest.mark.parametrize(
    "names,message",
    [
        (["KILL"], "train.save_on_signal: SIGKILL cannot be caught, so no run can save on it"),
        (["sigstop"], "train.save_on_signal: SIGSTOP cannot be caught"),
        (["SIGTERM", "TERMINATE"], "train.save_on_signal: 'TERMINATE' is not a signal name"),
    ],
)
def test_signals_a_run_cannot_save_on_are_refused_in_one_line(names, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(save_on_signal=names)


def test_stop_signals_only_note_the_first_signal_and_restore_the_handlers_after():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals(["SIGUSR1", "SIGTERM"]) as signals:
        os.kill(os.getpid(), signal.SIGUSR1)  # would end this process without the handler
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: the first one stays
        time.sleep(0.01)
        assert signals.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_second_sigint_while_stopping_abandons_the_save():
    with StopSignals(["SIGINT"]) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)


# ---- the owned process tree, with a stand-in launcher (tests/process_tree_run.py) ----------------


def test_a_stop_signal_to_the_top_process_goes_to_the_ranks_and_it_waits_for_them(tmp_path):
    ended = run_owned([sys.executable, TREE, "launcher", "signal-parent", "saves", str(tmp_path)], cpu_env())
    assert ended.status == 0 and ended.signal == signal.SIGTERM  # the launcher itself was not signalled
    assert (tmp_path / "stopped-by-SIGTERM").is_file()
    assert not psutil.pid_exists(int((tmp_path / "ready").read_text()))


def test_ranks_left_by_a_killed_launcher_are_stopped_cleanly_before_it_returns(tmp_path):
    ended = run_owned([sys.executable, TREE, "launcher", "die", "saves", str(tmp_path)], cpu_env())
    assert ended.status == 128 + signal.SIGKILL and ended.signal is None
    assert (tmp_path / "stopped-by-SIGTERM").is_file()  # the orphan was asked, and saved
    assert not psutil.pid_exists(int((tmp_path / "ready").read_text()))


def test_a_rank_that_does_not_stop_is_killed_after_the_grace_period_and_named(tmp_path, capfd):
    began = time.monotonic()
    ended = run_owned([sys.executable, TREE, "launcher", "die", "ignores", str(tmp_path)], cpu_env(), grace=1)
    pid = int((tmp_path / "ready").read_text())
    assert ended.status == 128 + signal.SIGKILL and time.monotonic() - began < 10
    assert not psutil.pid_exists(pid)
    assert f"lm: killed process {pid} (" in capfd.readouterr().err


# ---- the SLURM job script, with stand-ins for srun and scontrol ---------------------------------


@pytest.fixture
def fake_slurm(tmp_path):
    """A submit directory whose `.venv/bin/lm` and PATH's srun/scontrol only record what they got."""
    (tmp_path / "bin").mkdir()
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    scripts = {
        "bin/srun": 'echo "$@" > "$FAKE/srun-args"; trap \'echo USR1 > "$FAKE/srun-got"; exit 0\' USR1\n'
        'touch "$FAKE/srun-started"; for _ in $(seq "$SRUN_TICKS"); do sleep 0.05; done',
        "bin/scontrol": 'echo "$@" > "$FAKE/scontrol-args"',
        ".venv/bin/lm": "exit 0",
    }
    for name, body in scripts.items():
        (tmp_path / name).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE": str(tmp_path)}
    env.update(SLURM_SUBMIT_DIR=str(tmp_path), SLURM_CPUS_PER_TASK="2", SLURM_JOB_ID="42")
    return tmp_path, env


def test_the_job_script_passes_usr1_to_srun_and_requeues_the_job(fake_slurm):
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    text = SBATCH.read_text()
    assert all(s in text for s in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"))
    root, env = fake_slurm
    job = subprocess.Popen(["bash", str(SBATCH), "c.yaml"], env={**env, "SRUN_TICKS": "400"}, cwd=root)
    while not (root / "srun-started").exists():
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)  # what SLURM sends 120 s before the time limit
    assert job.wait(timeout=10) == 0
    assert (root / "srun-got").read_text() == "USR1\n" and (root / "scontrol-args").read_text() == "requeue 42\n"
    assert "--resume auto" in (root / "srun-args").read_text()


def test_the_job_script_does_not_requeue_a_job_that_ended_by_itself(fake_slurm):
    root, env = fake_slurm
    assert subprocess.run(["bash", str(SBATCH), "c.yaml"], env={**env, "SRUN_TICKS": "0"}, cwd=root).returncode == 0
    assert (root / "srun-started").exists() and not (root / "scontrol-args").exists()


# ---- a real run under `lm launch` ----------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_to_lm_launch_checkpoints_the_step_reached_exits_0_and_leaves_no_rank(tiny_shards, tmp_path):
    train = {"steps": 5000, "zero_stage": 2, "eval_windows": 0}
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tiny_shards, tmp_path / "run", train=train))
    command = [sys.executable, "-m", "lm.cli", "launch", "--config", str(config), "--nodes", "localhost"]
    command += ["--slots", "2", "--master-port", str(free_port())]
    top = subprocess.Popen(
        command, env=cpu_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    for line in top.stdout:
        output.append(line)
        if line.startswith("step 3/"):
            break
    top.send_signal(signal.SIGTERM)
    began = time.monotonic()
    output += top.stdout.readlines()
    assert top.wait(timeout=60) == 0 and time.monotonic() - began < 60, "".join(output)[-3000:]
    left = [p for p in psutil.process_iter(["cmdline"]) if str(config) in " ".join(p.info["cmdline"] or [])]
    assert left == []
    newest = ckpt.complete_checkpoints(tmp_path / "run")[-1]
    step = ckpt.read_marker(newest)["step"]
    assert step >= 3 and f"stopped by SIGTERM at step {step}, checkpoint {newest}\n" in output
