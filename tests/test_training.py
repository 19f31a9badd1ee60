"""Specification of training under DeepSpeed: equal to plain PyTorch, exact resume, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (
    REPO,
    assert_one_error_line,
    copy_two_step_world,
    cpu_env,
    losses_from,
    metric_from,
    relative_error,
    run_lm,
    run_torchrun,
    tiny_run_config,
    torchrun_command,
    tree_digest,
    write_config,
)
from lm.inference import load_model

# Measured: every ZeRO stage, with 1 and 2 processes, stays within 6.1e-8 (relative) of the plain
# loop over these 6 steps; fp32 rounding (eps 1.2e-7) from different reduction orders is all that
# differs. 2e-6 leaves room for other BLAS builds while catching any real mistake (a wrong
# gradient scale, a missed clip, a skipped batch shifts losses by 1e-3 or more).
RELATIVE_TOLERANCE = 2e-6

# precision bf16 (DeepSpeed's torch_autocast) against the plain loop under bf16 autocast, measured
# over these 6 steps: ZeRO-0 bitwise equal, ZeRO-1/2 within 7.8e-6, ZeRO-3 within 2.8e-5 (see
# below), and
# compiled (inductor fuses differently) within 1.9e-5. bf16 rounding amplifies the fp32 differences
# above: a weight one fp32 ulp away can round to another bf16 value. 1e-4 leaves 3.5x room and
# still catches the real mistakes (1e-3 or more). The loss curve alone cannot tell bf16 from fp32
# at this size (the plain loop's two differ by 4.8e-5), so the tests also check the dtypes.
BF16_TOLERANCE = 1e-4


def run_zero_stages(config: dict, tmp_path: Path, nproc: int, *stages: str) -> dict:
    """tests/zero_stages_run.py under torchrun: {stage: losses, engine logits and dtypes}."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run_torchrun(
        nproc, "zero_stages_run.py", str(tmp_path / "config.json"), str(tmp_path / "losses.json"), *stages, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    by_stage = json.loads((tmp_path / "losses.json").read_text())
    assert sorted(by_stage) == sorted(stages)
    return by_stage


def consolidated_logits(run_dir: Path, config: dict) -> torch.Tensor:
    """Logits of the run's checkpoint merged into one GPT, computed as the engine did (autocast for bf16)."""
    model = load_model(run_dir)[0]
    ids = torch.arange(config["model"]["block_size"]).remainder(config["model"]["vocab_size"])[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=config["train"]["precision"] != "fp32"):
        return model(ids)[0].float().flatten()


@pytest.mark.slow
def test_every_zero_stage_gives_the_loss_curve_of_plain_pytorch(tiny_shards, tmp_path, plain_losses):
    """One process; 2 processes (TP1xDP2) in test_tensor_parallel.py."""
    config = tiny_run_config(tiny_shards, tmp_path / "runs")
    reference = plain_losses(config)
    by_stage = run_zero_stages(config, tmp_path, 1, "0", "1", "2", "3")
    assert reference[-1] < reference[0] - 0.5  # the run really learns
    for stage, run in by_stage.items():
        assert run["losses"] == pytest.approx(reference, rel=RELATIVE_TOLERANCE), f"ZeRO-{stage} with 1 process"
    # Nothing to partition over one rank: ZeRO-1/2 run as ZeRO-0 (no flat gradient copies), and
    # ZeRO-0 steps without DeepSpeed's wrappers, keeping the counters its checkpoints save.
    assert [by_stage[stage]["engine_stage"] for stage in "0123"] == [0, 0, 0, 3]
    assert [by_stage[stage]["direct"] for stage in "0123"] == [True, True, True, False]
    steps, batch = config["train"]["steps"], config["train"]["batch_size"]
    for stage, run in by_stage.items():
        assert (run["global_steps"], run["global_samples"]) == (steps, steps * batch), f"ZeRO-{stage}"
    # ZeRO-3 frees each gathered weight after its module: its linear keeps the weight itself for
    # backward, where F.linear (ZeRO-0 here, run first) keeps a view that would hold it.
    assert by_stage["0"]["weight_views_saved"] > 0 and by_stage["3"]["weight_views_saved"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_bf16_computes_under_autocast_over_fp32_weights_like_the_plain_loop(
    tiny_shards, tmp_path, plain_losses, compile
):
    config = tiny_run_config(tiny_shards, tmp_path / "runs", train={"precision": "bf16", "compile": compile})
    reference = plain_losses(config)  # the eager plain loop, for both
    stages = ("0", "1", "2", "3") if not compile else ("0",)  # compiling is the same at every stage, and slow on CPU
    for stage, run in run_zero_stages(config, tmp_path, 1, *stages).items():
        assert (run["logits_dtype"], run["weights_dtype"]) == ("torch.bfloat16", "torch.float32"), f"ZeRO-{stage}"
        assert run["compiled"] == compile
        assert run["losses"] == pytest.approx(reference, rel=BF16_TOLERANCE), f"ZeRO-{stage}"
        # The checkpoint (fp32 weights, plain parameter names also when compiled) computes what the
        # engine did. Not comparable under ZeRO-3: it replaces F.linear process-wide with a matmul and
        # a separate bias add, under autocast a second bf16 rounding (its weights are equal).
        if stage != "3":
            logits = consolidated_logits(tmp_path / "runs" / f"zero{stage}", config)
            assert relative_error(logits, torch.tensor(run["logits"])) <= 1e-5, f"consolidated ZeRO-{stage}"


def resume_train(stage: int, precision: str) -> dict:
    # Dropout on (in resume_config), so the restored RNG state matters too.
    return {"steps": 12, "zero_stage": stage, "eval_interval": 4, "precision": precision}


def resume_config(tiny_shards, out_dir: Path, train: dict) -> dict:
    return tiny_run_config(tiny_shards, out_dir, {"dropout": 0.1}, train)


@pytest.fixture(scope="module")
def straight_and_split_runs(tiny_shards, tmp_path_factory):
    """runs(nproc, stage, precision) -> a directory with straight/ (12 steps in one go, logged after
    every step) and split/ (stopped at step 6, then resumed with --resume auto, logged every 4 steps:
    the loop syncs only there), trained once per module and layout. Read-only."""
    made = {}

    def runs(nproc: int, stage: int, precision: str) -> Path:
        if (nproc, stage, precision) not in made:
            root = tmp_path_factory.mktemp(f"resume-{nproc}p-zero{stage}-{precision}")
            train = resume_train(stage, precision)
            straight = write_config(root / "straight.yaml", resume_config(tiny_shards, root / "straight", train))
            every_4 = {**train, "log_interval": 4}
            split = write_config(root / "split.yaml", resume_config(tiny_shards, root / "split", every_4))
            for args in (
                ["--config", str(straight)],
                ["--config", str(split), "--stop-at", "6"],
                ["--config", str(split), "--resume", "auto"],
            ):
                result = run_lm("lm.train", *args, nproc=nproc)
                assert result.returncode == 0, result.stderr[-3000:]
            made[(nproc, stage, precision)] = root
        return made[(nproc, stage, precision)]

    return runs


# Two ranks under ZeRO-2 resume bitwise in test_faults.py (after a killed rank, a SIGTERM and a full disk).
@pytest.mark.slow
@pytest.mark.parametrize("nproc,stage,precision", [(1, 3, "bf16")])
def test_resume_continues_bitwise_like_an_uninterrupted_run(straight_and_split_runs, nproc, stage, precision):
    root = straight_and_split_runs(nproc, stage, precision)
    uninterrupted, resumed = losses_from(root / "straight"), losses_from(root / "split")
    assert sorted(resumed) == list(range(1, 13))  # a line per step, also where the log waits 4 steps
    assert resumed == uninterrupted  # bitwise: float equality of every step's loss
    # Each step keeps its own gradient norm until the log is written (ours at ZeRO-0, DeepSpeed's here).
    norms = metric_from(root / "split", "train/grad_norm")
    assert norms == metric_from(root / "straight", "train/grad_norm") and len(set(norms.values())) == 12


@pytest.mark.slow
def test_a_bf16_run_does_not_resume_under_bf16_weights(tiny_shards, straight_and_split_runs, lm_in_process):
    """Autocast keeps fp32 state: DeepSpeed's bf16-weights files differ."""
    root = straight_and_split_runs(1, 3, "bf16")
    before = tree_digest(root / "split")
    other = resume_config(tiny_shards, root / "split", resume_train(3, "bf16-weights"))
    result = lm_in_process("train", "--config", str(write_config(root / "other.yaml", other)), "--resume", "auto")
    assert_one_error_line(result, "written with train.precision=bf16", "do not load under bf16-weights")
    assert tree_digest(root / "split") == before


def test_a_bad_config_key_ends_with_one_clear_line(tiny_shards, tmp_path, lm_in_process):
    config = tiny_run_config(tiny_shards, tmp_path / "run")
    config["model"]["n_layers"] = 3
    result = lm_in_process("train", "--config", str(write_config(tmp_path / "bad.yaml", config)))
    assert_one_error_line(result, "unknown key 'n_layers'", "did you mean 'n_layer'")


def test_a_missing_data_path_ends_with_one_clear_line(tmp_path, lm_in_process):
    config = tiny_run_config(tmp_path / "no-such-shards", tmp_path / "run")
    result = lm_in_process("train", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert_one_error_line(result, "no-such-shards")
    assert not (tmp_path / "run").exists()


def test_compile_without_a_compiler_ends_with_one_clear_line(tiny_shards, tmp_path, lm_in_process, monkeypatch):
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"compile": True})
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    monkeypatch.setenv("CXX", "no-such-c++")
    result = lm_in_process("train", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert_one_error_line(result, "train.compile needs a C++ compiler")


def test_too_large_a_vocabulary_for_the_model_is_refused(tiny_shards, tmp_path, lm_in_process):
    config = tiny_run_config(tiny_shards, tmp_path / "run", model={"vocab_size": 100})
    result = lm_in_process("train", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert_one_error_line(result, "vocabulary mismatch", "384", "100")


@pytest.mark.slow
def test_starting_again_into_a_run_directory_is_refused_untouched(two_step_world, tmp_path, lm_in_process):
    world = copy_two_step_world(two_step_world, tmp_path / "world")
    before = tree_digest(world / "run")
    # Starting again into the same directory would overwrite the run.
    result = lm_in_process("train", "--config", str(world / "good.yaml"))
    assert_one_error_line(result, "already holds a run", "--resume auto")
    assert tree_digest(world / "run") == before


@pytest.mark.slow
def test_resuming_with_another_architecture_is_refused_naming_the_difference(two_step_world, tmp_path, lm_in_process):
    world = copy_two_step_world(two_step_world, tmp_path / "world")
    before = tree_digest(world / "run")
    other = tiny_run_config(world / "shards", world / "run", model={"n_layer": 3})
    result = lm_in_process("train", "--config", str(write_config(tmp_path / "o.yaml", other)), "--resume", "auto")
    assert_one_error_line(result, "different model", "model.n_layer is 2 there and 3 here")
    assert tree_digest(world / "run") == before


@pytest.mark.slow
def test_loading_a_checkpoint_of_another_model_into_another_run_is_refused(two_step_world, tmp_path, lm_in_process):
    world = copy_two_step_world(two_step_world, tmp_path / "world")
    before = tree_digest(world / "run")
    elsewhere = tiny_run_config(world / "shards", tmp_path / "other-run", model={"n_embd": 64})
    result = lm_in_process(
        "train", "--config", str(write_config(tmp_path / "e.yaml", elsewhere)), "--resume", str(world / "run")
    )
    assert_one_error_line(result, "different model", "n_embd")
    assert tree_digest(world / "run") == before


@pytest.mark.slow
def test_the_plain_loop_under_ddp_is_the_same_training_as_one_process(tiny_shards, tmp_path, plain_losses):
    # The two-process reference of benchmarks/train_throughput.py: DDP over lm.train's rank rows.
    config = tiny_run_config(tiny_shards, tmp_path / "runs")
    (tmp_path / "config.json").write_text(json.dumps(config))
    worker = [str(REPO / "benchmarks" / "train_throughput.py"), "--plain-worker", str(tmp_path / "config.json")]
    command = torchrun_command(2, *worker, str(tmp_path / "out.json"))
    result = subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "out.json").read_text())["losses"]
    assert ddp == pytest.approx(plain_losses(config), rel=RELATIVE_TOLERANCE)
