"""Specification of training under DeepSpeed: equal to plain PyTorch, exact resume, clear errors."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, cpu_env, run_lm, tiny_run_config, write_config
from lm.inference import load_model
from lm.config import RunConfig
from lm.plain_loop import train_plain

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


def losses_from(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return digest.hexdigest()


def run_zero_stages(config: dict, tmp_path: Path, nproc: int, *stages: str) -> dict:
    """tests/zero_stages_run.py under torchrun: {stage: losses, engine logits and dtypes}."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "tests" / "zero_stages_run.py"), str(tmp_path / "config.json"), str(tmp_path / "losses.json"),
               *stages]
    result = subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=600)
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


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1])  # 2 processes: TP1xDP2 in test_tensor_parallel.py
def test_every_zero_stage_gives_the_loss_curve_of_plain_pytorch(tiny_shards, tmp_path, nproc):
    config = tiny_run_config(tiny_shards, tmp_path / "runs")
    reference = train_plain(RunConfig.from_dict(config))["losses"]
    by_stage = run_zero_stages(config, tmp_path, nproc, "0", "1", "2", "3")
    assert reference[-1] < reference[0] - 0.5  # the run really learns
    for stage, run in by_stage.items():
        assert run["losses"] == pytest.approx(reference, rel=RELATIVE_TOLERANCE), f"ZeRO-{stage} with {nproc} process(es)"


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_bf16_computes_under_autocast_over_fp32_weights_like_the_plain_loop(tiny_shards, tmp_path, compile):
    config = tiny_run_config(tiny_shards, tmp_path / "runs", train={"precision": "bf16", "compile": compile})
    reference = train_plain(RunConfig.from_dict(config))["losses"]
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


@pytest.mark.slow
@pytest.mark.parametrize("nproc,stage,precision", [(2, 2, "fp32"), (1, 3, "bf16")])
def test_resume_continues_bitwise_like_an_uninterrupted_run(tiny_shards, tmp_path, nproc, stage, precision):
    # Dropout on, so the restored RNG state matters too.
    train = {"steps": 12, "zero_stage": stage, "eval_interval": 4, "precision": precision}
    straight = write_config(tmp_path / "straight.yaml", tiny_run_config(tiny_shards, tmp_path / "straight", {"dropout": 0.1}, train))
    split = write_config(tmp_path / "split.yaml", tiny_run_config(tiny_shards, tmp_path / "split", {"dropout": 0.1}, train))
    for args in (["--config", str(straight)], ["--config", str(split), "--stop-at", "6"],
                 ["--config", str(split), "--resume", "auto"]):
        result = run_lm("lm.train", *args, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted, resumed = losses_from(tmp_path / "straight"), losses_from(tmp_path / "split")
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == uninterrupted  # bitwise: float equality of every step's loss
    if precision == "bf16":  # autocast keeps fp32 state: DeepSpeed's bf16-weights files differ
        other = tiny_run_config(tiny_shards, tmp_path / "split", {"dropout": 0.1}, {**train, "precision": "bf16-weights"})
        result = run_lm("train", "--config", str(write_config(tmp_path / "other.yaml", other)), "--resume", "auto")
        assert_one_error_line(result, "written with train.precision=bf16", "do not load under bf16-weights")


def test_a_bad_config_key_ends_with_one_clear_line(tiny_shards, tmp_path):
    config = tiny_run_config(tiny_shards, tmp_path / "run")
    config["model"]["n_layers"] = 3
    result = run_lm("train", "--config", str(write_config(tmp_path / "bad.yaml", config)))
    assert_one_error_line(result, "unknown key 'n_layers'", "did you mean 'n_layer'")


def test_a_missing_data_path_ends_with_one_clear_line(tiny_shards, tmp_path):
    config = tiny_run_config(tmp_path / "no-such-shards", tmp_path / "run")
    result = run_lm("train", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert_one_error_line(result, "no-such-shards")
    assert not (tmp_path / "run").exists()


def test_compile_without_a_compiler_ends_with_one_clear_line(tiny_shards, tmp_path):
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"compile": True})
    no_compiler = {"PATH": str(Path(sys.executable).parent), "CXX": "no-such-c++"}
    result = run_lm("train", "--config", str(write_config(tmp_path / "c.yaml", config)), env=no_compiler)
    assert_one_error_line(result, "train.compile needs a C++ compiler")


def test_too_large_a_vocabulary_for_the_model_is_refused(tiny_shards, tmp_path):
    config = tiny_run_config(tiny_shards, tmp_path / "run", model={"vocab_size": 100})
    result = run_lm("train", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert_one_error_line(result, "vocabulary mismatch", "384", "100")


@pytest.mark.slow
def test_checkpoints_of_another_model_and_existing_runs_are_refused_untouched(tiny_shards, tmp_path):
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"steps": 2})
    path = write_config(tmp_path / "c.yaml", config)
    assert run_lm("train", "--config", str(path)).returncode == 0
    before = tree_digest(tmp_path / "run")

    # Starting again into the same directory would overwrite the run.
    assert_one_error_line(run_lm("train", "--config", str(path)), "already holds a run", "--resume auto")

    # Resuming with another architecture names the difference.
    other = tiny_run_config(tiny_shards, tmp_path / "run", model={"n_layer": 3})
    result = run_lm("train", "--config", str(write_config(tmp_path / "o.yaml", other)), "--resume", "auto")
    assert_one_error_line(result, "different model", "model.n_layer is 2 there and 3 here")

    # So does loading it into another run directory.
    elsewhere = tiny_run_config(tiny_shards, tmp_path / "other-run", model={"n_embd": 64})
    result = run_lm("train", "--config", str(write_config(tmp_path / "e.yaml", elsewhere)), "--resume", str(tmp_path / "run"))
    assert_one_error_line(result, "different model", "n_embd")
    assert tree_digest(tmp_path / "run") == before
