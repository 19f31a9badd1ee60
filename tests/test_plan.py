"""`lm plan`: a rank's memory before the run, by part, following ZeRO's arithmetic.

How close the estimates come to measured memory is benchmarks/memory.py's business; these tests
pin down the arithmetic, the contract of --json, and the refusals.
"""

import json

import pytest
import yaml

from conftest import assert_one_error_line, tiny_run_config, write_config
from lm.checkpoint import size_on_disk
from lm.config import ModelConfig, RunConfig
from lm.initialization import parameter_count
from lm.plan import MemoryPlan, checkpoint_size, free_bytes, parse_bytes, plan, saved_per_block

MODEL = dict(vocab_size=2048, block_size=128, n_layer=4, n_head=8, n_embd=512, twicing_layers="all")


def config_for(**train) -> RunConfig:
    train.setdefault("batch_size", 8)
    train.setdefault("micro_batch_size", 1)
    return RunConfig.from_dict({"model": MODEL, "data": {"path": "unused"}, "train": train})


def model_states(need: MemoryPlan) -> int:
    return need.weights + need.gradients + need.optimizer


def test_zero0_holds_sixteen_bytes_per_parameter_of_model_states():
    config = config_for(zero_stage=0)
    assert model_states(plan(config, 1)) == 16 * parameter_count(config.model)


def test_zero3_model_states_fall_as_one_over_the_data_parallel_size():
    config = config_for(zero_stage=3)
    one, eight = plan(config, 1), plan(config, 8)
    assert model_states(eight) == pytest.approx(model_states(one) / 8, rel=1e-6)
    assert eight.activations == one.activations  # every rank still runs its own micro batch


def test_zero1_and_2_partition_gradients_and_adam_and_fp32_weights_are_their_own_master():
    n = parameter_count(config_for().model)
    for stage in (1, 2):
        two = plan(config_for(zero_stage=stage), 2)
        assert (two.weights, two.gradients, two.optimizer) == (4 * n, 4 * n / 2, 8 * n / 2)
    # bf16 weights: 2 bytes each, and an fp32 master copy beside Adam's state
    low = plan(config_for(zero_stage=2, precision="bf16-weights"), 2)
    assert (low.weights, low.optimizer) == (2 * n, (8 + 4) * n / 2)


def test_tensor_parallelism_divides_weights_and_activations():
    one, two = plan(config_for(zero_stage=0), 1), plan(config_for(zero_stage=0, tensor_parallel=2), 2)
    assert two.weights == pytest.approx(one.weights / 2, rel=1e-6)
    assert two.activations < one.activations


def test_activation_checkpointing_keeps_less():
    none = plan(config_for(micro_batch_size=8), 1).activations
    every2 = plan(config_for(micro_batch_size=8, activation_checkpointing="every:2"), 1).activations
    full = plan(config_for(micro_batch_size=8, activation_checkpointing="full"), 1).activations
    assert full < every2 < none


def test_a_block_keeps_what_its_projections_and_mlp_save_for_backward():
    """In units of tokens x n_embd: GPT-2's 16 (18 twicing), calibrated on benchmarks/activation_memory.py;
    grouped-query attention saves smaller keys and values, SwiGLU four hidden tensors instead of two."""
    gpt2 = ModelConfig(n_embd=512, n_head=8)
    assert saved_per_block(gpt2, twices=False) == 16 and saved_per_block(gpt2, twices=True) == 18
    llama = ModelConfig(arch="llama", n_embd=512, n_head=8, n_kv_head=2, d_ff=1536)
    assert saved_per_block(llama, twices=True) == 5 + (1 + 2 * 2 / 8) + 4 * 1536 / 512 + 2


def test_grouped_query_attention_plans_fewer_weights_and_activations():
    full = plan(config_for(zero_stage=0), 1)
    grouped = RunConfig.from_dict(
        {
            "model": {**MODEL, "n_kv_head": 2},
            "data": {"path": "unused"},
            "train": {"batch_size": 8, "micro_batch_size": 1},
        }
    )
    assert plan(grouped, 1).weights < full.weights and plan(grouped, 1).activations < full.activations


def test_offload_moves_adams_state_and_then_the_weights_off_a_gpu():
    kept = plan(config_for(zero_stage=3), 2, device="cuda")
    optimizer = plan(config_for(zero_stage=3, offload="optimizer"), 2, device="cuda")
    both = plan(config_for(zero_stage=3, offload="optimizer+params"), 2, device="cuda")
    assert optimizer.optimizer == 0 and optimizer.host >= kept.optimizer
    assert both.weights == 0 and both.host > optimizer.host
    assert both.total < optimizer.total < kept.total
    # On the CPU the host is the device: nothing leaves.
    assert plan(config_for(zero_stage=3, offload="optimizer"), 2).total >= plan(config_for(zero_stage=3), 2).total


def test_json_reports_the_total_and_each_part(tmp_path, lm_in_process):
    path = write_config(tmp_path / "run.yaml", config_for(zero_stage=3).to_dict())
    result = lm_in_process("plan", "--config", str(path), "--world", "4", "--json", "--device-memory", "80GB")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    parts = report["per_rank_bytes"]
    assert set(parts) == {"weights", "gradients", "optimizer", "buffers", "activations", "step", "runtime", "total"}
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert report["device_memory_bytes"] == 80e9 and report["fits"] is True
    assert (report["world"], report["data_parallel"], report["zero_stage"]) == (4, 4, 3)


def test_zero1_and_2_on_one_data_parallel_rank_are_planned_as_the_zero0_they_run_as(tmp_path, lm_in_process):
    path = write_config(tmp_path / "run.yaml", config_for(zero_stage=2).to_dict())
    for world, stage in ((1, 0), (2, 2)):
        result = lm_in_process("plan", "--config", str(path), "--world", str(world), "--json")
        report = json.loads(result.stdout)
        assert (report["zero_stage"], report["engine_zero_stage"]) == (2, stage)
    assert plan(config_for(zero_stage=2), 1) == plan(config_for(zero_stage=0), 1)


def test_the_table_says_whether_the_run_fits(tmp_path, lm_in_process):
    path = write_config(tmp_path / "run.yaml", config_for(zero_stage=3).to_dict())
    result = lm_in_process("plan", "--config", str(path), "--world", "2", "--device-memory", "100MB")
    assert result.returncode == 0 and "does NOT fit in 0.1 GB" in result.stdout


def test_the_plan_says_what_a_checkpoint_takes_on_disk_and_warns_when_two_do_not_fit(
    two_step_world, tmp_path, lm_in_process
):
    saved = RunConfig.from_dict(yaml.safe_load((two_step_world / "good.yaml").read_text()))
    tag = two_step_world / "run" / "checkpoints" / "step00000002"
    assert checkpoint_size(saved, 1) == pytest.approx(size_on_disk(tag), rel=0.15)
    config = config_for(zero_stage=3, out_dir=str(tmp_path / "not-yet"))
    path = write_config(tmp_path / "run.yaml", config.to_dict())
    report = json.loads(lm_in_process("plan", "--config", str(path), "--world", "2", "--json").stdout)
    assert report["checkpoint_bytes"] == checkpoint_size(config, 2) and report["out_dir_free_bytes"] > 0
    text = lm_in_process("plan", "--config", str(path), "--world", "2").stdout
    assert f"checkpoint: about 0.165 GB each; {tmp_path / 'not-yet'} has" in text and "warning" not in text
    huge = {**MODEL, "n_layer": 100, "n_embd": 16384, "n_head": 128}  # a checkpoint of about 4 TB
    path = write_config(tmp_path / "huge.yaml", {**config.to_dict(), "model": huge})
    text = lm_in_process("plan", "--config", str(path), "--world", "2").stdout
    assert free_bytes(str(tmp_path)) < 4e12 and "warning: less than two checkpoints fit there" in text


def test_a_world_the_layout_does_not_divide_is_refused(tmp_path, lm_in_process):
    path = write_config(tmp_path / "run.yaml", config_for(tensor_parallel=2).to_dict())
    result = lm_in_process("plan", "--config", str(path), "--world", "3")
    assert_one_error_line(result, "--world 3", "train.tensor_parallel=2")


def test_a_batch_the_world_does_not_divide_is_refused(tmp_path, lm_in_process):
    path = write_config(tmp_path / "run.yaml", config_for(batch_size=8).to_dict())
    result = lm_in_process("plan", "--config", str(path), "--world", "3")
    assert_one_error_line(result, "data-parallel size (3)")


@pytest.mark.parametrize("text", ["lots", "-3GB", "12 parsecs", "0"])
def test_a_device_memory_that_is_not_a_size_is_refused(tmp_path, lm_in_process, text):
    path = write_config(tmp_path / "run.yaml", config_for().to_dict())
    result = lm_in_process("plan", "--config", str(path), "--world", "1", f"--device-memory={text}")
    assert_one_error_line(result, "--device-memory", repr(text))


def test_sizes_read_in_decimal_and_binary_units():
    assert [parse_bytes(t) for t in ("24GB", "80 GiB", "512MiB", "1000")] == [24e9, 80 * 2**30, 512 * 2**20, 1000]


def test_a_run_that_cannot_fit_is_refused_before_anything_is_built(tiny_shards, tmp_path, lm_in_process):
    big = {"n_layer": 48, "n_embd": 16384, "n_head": 128, "d_ff": None}  # 155B parameters
    config = tiny_run_config(tiny_shards, tmp_path / "run", model=big)
    result = lm_in_process("train", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert_one_error_line(result, "lm plan: this run needs about", "GB per rank", "train.memory_check=false")
    assert not (tmp_path / "run").exists()


def test_offload_at_zero0_ends_with_one_clear_line(tiny_shards, tmp_path, lm_in_process):
    config = tiny_run_config(tiny_shards, tmp_path / "run", train={"offload": "optimizer"})
    result = lm_in_process("train", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert_one_error_line(result, "train.offload=optimizer needs ZeRO stage 1, 2 or 3")
