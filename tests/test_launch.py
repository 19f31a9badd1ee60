"""Specification of launching: node lists, hostfiles, the launcher commands, multi-node runs on one machine."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, assert_one_error_line, cpu_env, losses_from, run_lm, tiny_run_config, write_config
from core.errors import UserError
from core.ranks import free_port
from launch.hosts import Allocation, expand_nodelist, from_slurm, parse_hostfile


def test_slurm_node_lists_expand_bracket_ranges_with_padding():
    assert expand_nodelist("gpu[01-04,07],cpu12") == ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu12"]
    assert expand_nodelist("node[8-10]") == ["node8", "node9", "node10"]
    assert expand_nodelist("a,b") == ["a", "b"]


@pytest.mark.parametrize("bad", ["gpu[01-", "gpu[04-01]", "", ","])
def test_malformed_node_lists_are_one_clear_error(bad):
    with pytest.raises(UserError, match="bad node list"):
        expand_nodelist(bad)


SLURM_JOB = {"SLURM_JOB_NODELIST": "gpu[01-03],cpu12", "SLURM_TASKS_PER_NODE": "4(x3),2"}


def test_slurm_allocation_reads_nodes_and_tasks_per_node():
    allocation = from_slurm(SLURM_JOB)
    assert allocation.hosts == ("gpu01", "gpu02", "gpu03", "cpu12") and allocation.slots == (4, 4, 4, 2)
    assert allocation.world_size == 14
    assert allocation.hostfile_text() == "gpu01 slots=4\ngpu02 slots=4\ngpu03 slots=4\ncpu12 slots=2\n"


def test_slurm_variables_that_do_not_describe_an_allocation_are_refused():
    with pytest.raises(UserError, match="gives 1 counts for 4 nodes"):
        from_slurm({**SLURM_JOB, "SLURM_TASKS_PER_NODE": "4"})
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST is not set"):
        from_slurm({})


def test_hostfiles_in_deepspeed_and_node_file_forms():
    deepspeed_form = "# cluster\nnode1 slots=8\nnode2 slots=8  # second\n"
    assert parse_hostfile(deepspeed_form, "h") == Allocation(("node1", "node2"), (8, 8))
    assert parse_hostfile("n1\nn1\nn2\n", "pbs") == Allocation(("n1", "n2"), (2, 1))  # one line per slot


def test_hostfiles_without_hosts_or_with_bad_slots_are_refused_naming_the_line():
    with pytest.raises(UserError, match="h line 1: expected 'host slots=N'"):
        parse_hostfile("node1 slots=eight\n", "h")
    with pytest.raises(UserError, match="lists no hosts"):
        parse_hostfile("# nothing\n", "h")


@pytest.fixture
def config_path(tiny_shards, tmp_path):
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"tensor_parallel": 2})
    return write_config(tmp_path / "c.yaml", config)


def dry_run(run, config_path, *args):
    """`lm launch --dry-run` through `run` (run_lm or lm_in_process): (the files it would write, the command)."""
    result = run("launch", "--config", str(config_path), "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    *files, command = result.stdout.strip().splitlines()
    return "\n".join(files), command


def test_dry_run_over_ssh_names_hosts_launcher_and_environment(config_path, tmp_path):
    """Through a real `lm` process; the other dry runs call it in this process."""
    files, command = dry_run(run_lm, config_path, "--nodes", "gpu[01-02]", "--slots", "2", "--set", "train.steps=3")
    assert "gpu01 slots=2\ngpu02 slots=2" in files and "MASTER_ADDR=gpu01" in files
    assert "TP 2 x DP 2" in files
    assert " -m deepspeed.launcher.runner --hostfile " in command and "--launcher pdsh" in command
    assert "--master_addr gpu01 --master_port 29500" in command and "--no_ssh_check" not in command
    assert command.endswith(f"--module lm.train --config {config_path} --set train.steps=3")
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_dry_run_for_a_slurm_allocation(config_path, monkeypatch, lm_in_process):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[3-4]")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x2)")
    _, command = dry_run(lm_in_process, config_path, "--slurm")
    assert "--launcher slurm" in command and "--master_addr node3" in command


def test_dry_run_for_an_mpi_allocation_from_its_node_file(config_path, tmp_path, monkeypatch, lm_in_process):
    (tmp_path / "nodefile").write_text("n1\nn1\nn2\nn2\n")
    monkeypatch.setenv("PBS_NODEFILE", str(tmp_path / "nodefile"))
    files, command = dry_run(lm_in_process, config_path, "--mpi", "--launcher-args", "--bind-to none")
    assert "n1 slots=2\nn2 slots=2" in files and "--launcher openmpi" in command
    assert "--launcher_args '--bind-to none'" in command


def test_dry_run_without_ssh_is_one_command_per_node(config_path, lm_in_process):
    _, command = dry_run(
        lm_in_process,
        config_path,
        "--nodes",
        "a,b",
        "--slots",
        "1",
        "--no-ssh",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
    )
    assert "--no_ssh --node_rank 1" in command and "--launcher" not in command and "--master_addr 10.0.0.1" in command


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--nodes", "a,b,c", "--slots", "1"],
            "3 processes (3 nodes) do not split into tensor-parallel groups of train.tensor_parallel=2",
        ),
        (
            ["--nodes", "a,b,c,d", "--slots", "3"],
            "train.batch_size (8) is not divisible by micro_batch_size (2) x data-parallel size (6)",
        ),
        (["--nodes", "a,b", "--no-ssh"], "--no-ssh needs --node-rank"),
        (["--nodes", "a,b", "--no-ssh", "--node-rank", "2"], "--node-rank 2 is not in 0..1"),
        (["--hostfile", "/no/such/hostfile"], "hostfile not found: /no/such/hostfile"),
        (["--nodes", "gpu[1-"], "bad node list 'gpu[1-'"),
    ],
)
def test_layouts_the_allocation_cannot_hold_are_refused_before_anything_starts(
    config_path, tmp_path, lm_in_process, args, message
):
    assert_one_error_line(lm_in_process("launch", "--config", str(config_path), *args), message)
    assert not (tmp_path / "run").exists()


def assert_same_losses(run_dir, reference):
    losses = losses_from(run_dir)
    assert [losses[s] for s in sorted(losses)] == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_two_nodes_without_ssh_train_like_one_process(tiny_shards, tmp_path, plain_losses):
    """Two `lm launch --no-ssh` invocations (node ranks 0 and 1), master on loopback, one rank each."""
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"zero_stage": 2})
    path = write_config(tmp_path / "c.yaml", config)
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lm.cli",
                "launch",
                "--config",
                str(path),
                "--nodes",
                "node0,node1",
                "--no-ssh",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
            ],
            env=cpu_env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    assert_same_losses(tmp_path / "run", plain_losses(config))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI (scripts/bootstrap.sh --mpi)")
def test_the_openmpi_launcher_over_a_localhost_hostfile_trains_like_one_process(tiny_shards, tmp_path, plain_losses):
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"tensor_parallel": 2, "zero_stage": 1})
    path = write_config(tmp_path / "c.yaml", config)
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    mpirun_args = "--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo"
    result = run_lm(
        "launch",
        "--config",
        str(path),
        "--hostfile",
        str(tmp_path / "hosts"),
        "--launcher",
        "openmpi",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "--launcher-args",
        mpirun_args,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "run" / "launch" / ".deepspeed_env").read_text().count("MASTER_ADDR=127.0.0.1") == 1
    assert_same_losses(tmp_path / "run", plain_losses(config))


@pytest.mark.slow
def test_tasks_started_by_srun_find_each_other_from_slurm_variables_alone(tiny_shards, tmp_path, plain_losses):
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"tensor_parallel": 2})
    path = write_config(tmp_path / "c.yaml", config)
    job = {
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_ID": str(free_port()),
    }
    tasks = [
        subprocess.Popen(
            [sys.executable, "-m", "lm.train", "--config", str(path)],
            env={**cpu_env(), **job, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [t.communicate(timeout=600)[0] for t in tasks]
    assert all(t.returncode == 0 for t in tasks), outputs[0][-2000:]
    assert_same_losses(tmp_path / "run", plain_losses(config))
    assert "MASTER_ADDR" not in os.environ  # nothing was set by hand in this process either
