"""Specification of tensor parallelism: TP x DP layouts equal to the unsplit model, under every ZeRO stage,
and sequence parallelism equal to both."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (
    REPO,
    assert_one_error_line,
    cpu_env,
    losses_from,
    mpirun_command,
    relative_error,
    run_lm,
    run_torchrun,
    tiny_run_config,
    write_config,
)
from core.ranks import free_port
from lm.inference import load_model

# Measured on this machine: TP2xDP1, TP1xDP2 and TP2xDP2 stay within 1.2e-7 (relative) of the plain
# single-process loop over 10 steps for ZeRO 0-3; without the mpu the same run is off by 1.1e-1.
TRAINING_TOLERANCE = 1e-5


def torchrun(nproc: int, script: str, *args: str) -> subprocess.CompletedProcess:
    result = run_torchrun(nproc, script, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_tp2_logits_loss_and_gradients_equal_the_full_model(tmp_path):
    torchrun(2, "tp_equivalence_run.py", str(tmp_path / "tp.json"))
    results = json.loads((tmp_path / "tp.json").read_text())
    # softmax everywhere, twicing everywhere; twicing with grouped-query attention in either layout
    parameters = {"none": 3 * 12 + 4, "all": 3 * 12 + 4, "llama-gqa": 3 * 9 + 3, "gpt2-gqa-rope-swiglu": 3 * 10 + 3}
    for model, count in parameters.items():
        errors = results[model]["errors"]
        assert errors["logits"] <= 1e-5 and errors["loss"] <= 1e-5 and errors["grads"] <= 1e-5, (model, errors)
        assert results[model]["parameters_checked"] == count  # every parameter's gradient
        assert results[model]["init_is_exact_slice"]  # TP=2 starts as the exact slice of TP=1
    # Twicing adds no communication: its second pass needs only the local heads.
    assert results["all"]["all_reduces"] == results["none"]["all_reduces"]
    check_sequence_parallel(results, parameters)


def check_sequence_parallel(results: dict, parameters: dict) -> None:
    """Sequence parallelism computes the same, from other collectives, and keeps the state dict."""
    n_layer, n_embd = 3, 32
    for model, count in parameters.items():
        plain, split = results[model], results[f"{model}/sp"]
        errors = split["errors"]
        assert errors["logits"] <= 1e-5 and errors["loss"] <= 1e-5 and errors["grads"] <= 1e-5, (model, errors)
        assert split["parameters_checked"] == count and split["state_dict_keys_unchanged"]
        # TP all-reduces activations at every region, both ways; SP only in the embedding. Instead,
        # forward: an all-gather into each region (2 per block, the head's), a reduce-scatter out of
        # each block's 2; backward: the reverse, and the all-gather of the embeddings' split, and
        # per region one more all-gather, of the shard its column-parallel layers kept.
        assert plain["activation_all_reduces"] >= 4 * n_layer and plain["all_gathers"] == plain["reduce_scatters"] == 0
        assert split["activation_all_reduces"] == 1
        assert split["all_gathers"] == (2 * n_layer + 1) + (2 * n_layer + 1) + (2 * n_layer + 1)
        assert split["reduce_scatters"] == 2 * n_layer + (2 * n_layer + 1)
        # What remains: the cross-entropy's two (as under TP) and the gradient sums of the parameters
        # used on a shard, one per norm (gain and bias together) and per row-parallel bias.
        grad_sums = split["other_all_reduce_sizes"][2:]
        assert split["other_all_reduce_sizes"][:2] == plain["other_all_reduce_sizes"]
        row_biases = 2 * n_layer if model != "llama-gqa" else 0
        assert len(grad_sums) == (2 * n_layer + 1) + row_biases and max(grad_sums) <= 2 * n_embd
    # Activation checkpointing recomputes the blocks' collectives, and the same gradients.
    recomputed = results["none/sp+recompute"]
    assert recomputed["errors"]["grads"] <= 1e-5 and recomputed["all_gathers"] > results["none/sp"]["all_gathers"]
    # Dropout: under TP the ranks drop the replicated activations alike; under SP each rank's shard
    # draws its own mask (lm.parallel.dropout_stream). Either way they agree on the loss and on the
    # gradients of the parameters every rank holds.
    tp, sp = results["dropout"]["tp"], results["dropout"]["sp"]
    assert tp["streams_equal"] and tp["masks_equal"]
    assert not sp["streams_equal"] and not sp["masks_equal"]
    assert tp["loss_equal"] and sp["loss_equal"] and tp["replicated_grads_equal"] and sp["replicated_grads_equal"]
    # Plain TP keeps the norms' outputs whole for the column-parallel layers' backward (and the norms'
    # inputs); SP keeps no (B, T, n_embd) tensor, only shards, and gets bitwise the same gradients.
    for model, kept in results["kept_whole"].items():
        assert kept["tp"] >= 4 * n_layer + 2 and kept["sp"] == 0, (model, kept)
        assert results["sp_exact"][model] == {"fp32": True, "bf16": True}, model


def run_stages(config: dict, tmp_path, nproc: int, *extra: str) -> dict:
    (tmp_path / "config.json").write_text(json.dumps(config))
    torchrun(nproc, "zero_stages_run.py", str(tmp_path / "config.json"), str(tmp_path / "losses.json"), *extra)
    return json.loads((tmp_path / "losses.json").read_text())


# Llama's layout with grouped-query attention (one kv head per TP rank at TP2) and twicing in every layer.
LLAMA_GQA = dict(arch="llama", n_head=4, n_kv_head=2, twicing_layers="all")


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,nproc,model",
    [(2, 2, LLAMA_GQA), (1, 2, LLAMA_GQA), (2, 4, {})],
    ids=["TP2xDP1-llama-gqa", "TP1xDP2-llama-gqa", "TP2xDP2-gpt2"],
)
def test_training_layouts_give_the_loss_curve_of_the_unsplit_model_under_every_zero_stage(
    tiny_shards, tmp_path, plain_losses, tp, nproc, model
):
    config = tiny_run_config(tiny_shards, tmp_path / "runs", model, {"steps": 10, "tensor_parallel": tp})
    reference = plain_losses(config)
    # Buckets of 20k gradients: several fill during backward, and ZeRO-1/2 on gloo reduce those asynchronously.
    config["train"]["deepspeed"] = {"zero_optimization": {"reduce_bucket_size": 20000}}
    # With two data-parallel ranks also ZeRO-Offload: Adam's state and step, then the weights, on the CPU.
    offloaded = ["2:optimizer", "3:optimizer+params"] if tp == 1 else []
    by_stage = run_stages(config, tmp_path, nproc, "0", "1", "2", "3", *offloaded)
    assert sorted(by_stage) == sorted(["0", "1", "2", "3", *offloaded])
    # One data-parallel rank (TP2xDP1) runs ZeRO-1/2 as ZeRO-0; two keep their stage.
    ran = [by_stage[stage]["engine_stage"] for stage in "0123"]
    assert ran == ([0, 0, 0, 3] if nproc == tp else [0, 1, 2, 3])
    assert not any(run["direct"] for run in by_stage.values())  # DeepSpeed's own step: TP or several ranks
    if nproc > tp:  # ZeRO-1/2's gradient norm in one all-reduce (lm.engine): DeepSpeed's to the bit
        for stage in "12":
            norms = by_stage[stage]["norms"]
            assert len(norms) == config["train"]["steps"] and all(ours == its for ours, its in norms), f"ZeRO-{stage}"
    # Gradient buckets reduced during backward (gloo, ZeRO-1/2 over several data-parallel ranks, not offloaded).
    assert {name for name, run in by_stage.items() if run["reduces_async"]} == ({"1", "2"} if nproc > tp else set())
    for stage, run in by_stage.items():
        assert run["losses"] == pytest.approx(reference, rel=TRAINING_TOLERANCE), f"ZeRO-{stage}"
        # The checkpoint, consolidated into one model, computes what the trained engine did.
        model = load_model(Path(run["run_dir"]))[0]
        ids = torch.arange(config["model"]["block_size"])[None]
        with torch.no_grad():
            logits = model(ids)[0].flatten()
        assert relative_error(logits, torch.tensor(run["logits"])) <= 1e-5, f"consolidated ZeRO-{stage}"
    if offloaded:  # what DeepSpeed's engine moved to the CPU: [optimizer, weights]
        assert [by_stage[name]["offloaded"] for name in ("2", *offloaded)] == [
            [False, False],
            [True, False],
            [True, True],
        ]


@pytest.mark.slow
def test_the_comparison_catches_a_run_that_forgets_the_mpu(tiny_shards, tmp_path, plain_losses):
    config = tiny_run_config(tiny_shards, tmp_path / "runs", train={"steps": 10, "tensor_parallel": 2})
    reference = plain_losses(config)
    losses = run_stages(config, tmp_path, 2, "1", "--without-mpu")["1"]["losses"]
    assert losses != pytest.approx(reference, rel=TRAINING_TOLERANCE)


TP2_TRAIN = {"steps": 10, "tensor_parallel": 2, "zero_stage": 1, "eval_interval": 5}


def tp2_config(shards, out_dir, **train) -> dict:
    return tiny_run_config(shards, out_dir, {"dropout": 0.1}, {**TP2_TRAIN, **train})


@pytest.fixture(scope="module")
def tp2_runs(tiny_shards, tmp_path_factory):
    """straight/: 10 TP=2 steps under the deepspeed launcher; split/: the same, stopped at step 5 and
    resumed, under torchrun. Read-only."""
    from launch.local import deepspeed_local_command

    root = tmp_path_factory.mktemp("tp2-runs")
    straight = write_config(root / "straight.yaml", tp2_config(tiny_shards, root / "straight"))
    split = write_config(root / "split.yaml", tp2_config(tiny_shards, root / "split"))
    result = subprocess.run(
        deepspeed_local_command(2, "lm.train", ["--config", str(straight)]),
        capture_output=True,
        text=True,
        env=cpu_env(),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for args in (["--config", str(split), "--stop-at", "5"], ["--config", str(split), "--resume", "auto"]):
        result = run_lm("lm.train", *args, nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.slow
def test_tp2_resume_continues_like_an_uninterrupted_run_across_launchers(tp2_runs):
    assert losses_from(tp2_runs / "split") == losses_from(tp2_runs / "straight")


@pytest.mark.slow
def test_tp2_weights_re_split_to_tp1_and_back_are_exact_and_training_resumes_from_them(
    tp2_runs, tmp_path, lm_in_process
):
    assert (
        lm_in_process(
            "convert",
            "--checkpoint",
            str(tp2_runs / "split"),
            "--out",
            str(tmp_path / "tp1"),
            "--to",
            "checkpoint",
            "--tensor-parallel",
            "1",
        ).returncode
        == 0
    )
    assert (
        lm_in_process(
            "convert",
            "--checkpoint",
            str(tmp_path / "tp1"),
            "--out",
            str(tmp_path / "tp2"),
            "--to",
            "checkpoint",
            "--tensor-parallel",
            "2",
        ).returncode
        == 0
    )
    original, round_trip = load_model(tp2_runs / "split")[0].state_dict(), load_model(tmp_path / "tp2")[0].state_dict()
    assert all(torch.equal(original[name], round_trip[name]) for name in original)
    result = run_lm(
        "lm.train",
        "--config",
        str(tmp_path / "tp2" / "config.yaml"),
        "--resume",
        "auto",
        "--set",
        "train.steps=12",
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses_from(tmp_path / "tp2")) == [11, 12]


@pytest.mark.parametrize(
    "model,message",
    [
        ({"n_head": 3, "n_embd": 48}, "model.n_head (3) is not divisible by train.tensor_parallel (2)"),
        ({"vocab_size": 385}, "model.vocab_size (385) is not divisible by train.tensor_parallel (2)"),
        ({"d_ff": 63}, "model.d_ff (63) is not divisible by train.tensor_parallel (2)"),
    ],
)
def test_sizes_that_tensor_parallelism_cannot_split_are_refused_before_training(
    tiny_shards, tmp_path, lm_in_process, model, message
):
    config = tiny_run_config(tiny_shards, tmp_path / "run", model, {"tensor_parallel": 2})
    assert_one_error_line(lm_in_process("train", "--config", str(write_config(tmp_path / "c.yaml", config))), message)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_world_size_that_tp_does_not_divide_is_refused(tiny_shards, tmp_path):
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"tensor_parallel": 2})
    result = run_lm("train", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert_one_error_line(result, "train.tensor_parallel (2) must divide the number of processes (1)")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("mpirun") is None, reason="needs mpirun (scripts/bootstrap.sh --mpi installs Open MPI)"
)
def test_mpirun_alone_trains_tp2_like_the_unsplit_model(tiny_shards, tmp_path, plain_losses):
    """No deepspeed launcher, no torchrun: the ranks find each other from Open MPI's variables."""
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"tensor_parallel": 2, "zero_stage": 2})
    reference = plain_losses(config)
    path = write_config(tmp_path / "c.yaml", config)
    env = cpu_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    exported = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "DS_ACCELERATOR")
    command = mpirun_command(2, sys.executable, "-m", "lm.train", "--config", str(path), exported=exported)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = losses_from(tmp_path / "run")
    assert [losses[s] for s in sorted(losses)] == pytest.approx(reference, rel=TRAINING_TOLERANCE)
