"""Specification of the DeepSpeed config derived from the training config (lm.ds_config): batch
arithmetic, who clips, the stage DeepSpeed runs, precision, ZeRO's buffers, offload, merged extras."""

import copy

import pytest

from conftest import one_line
from core.errors import UserError
from lm.config import ModelConfig, TrainConfig, load_config
from lm.ds_config import DERIVED, MIN_BUCKET, deepspeed_config, engine_stage, stage_name


def test_deepspeed_config_is_derived_from_the_train_config():
    train = TrainConfig(batch_size=32, micro_batch_size=4, grad_clip=0.5, zero_stage=2, precision="bf16")
    ds = deepspeed_config(train, 2, ModelConfig())
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4
    # DeepSpeed's own invariant
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["torch_autocast"]["enabled"] and ds["torch_autocast"]["dtype"] == "bfloat16"
    assert ds["bf16"] == {"enabled": False}  # fp32 weights: autocast computes in bf16
    assert "fp16" not in ds


def test_zero0_without_tp_clips_in_the_engine_and_deepspeed_clips_elsewhere():
    def clipping(dp=1, **train):
        return deepspeed_config(TrainConfig(grad_clip=0.5, batch_size=16, **train), dp, ModelConfig())[
            "gradient_clipping"
        ]

    assert clipping(zero_stage=0) == 0.0  # lm.engine clips with torch's foreach clip_grad_norm_
    assert clipping(zero_stage=0, tensor_parallel=2) == 0.5  # TP shards: DeepSpeed's norm over the mpu
    assert clipping(zero_stage=0, precision="bf16-weights") == 0.5
    assert clipping(zero_stage=1) == 0.0  # one data-parallel rank: runs as ZeRO-0
    assert clipping(zero_stage=1, dp=2) == 0.5  # partitioned gradients: DeepSpeed's norm


def test_zero1_and_2_on_one_data_parallel_rank_run_as_zero0():
    # Nothing to partition over one rank: ZeRO-0 makes the same update without flat copies.
    for stage in (1, 2):
        assert engine_stage(TrainConfig(zero_stage=stage), 1) == 0
        assert zero_section(zero_stage=stage) == {"stage": 0}
        explicit = {"zero_optimization": {"stage": stage, "overlap_comm": True}}
        assert zero_section(zero_stage=stage, deepspeed=explicit)["stage"] == 0
        assert engine_stage(TrainConfig(zero_stage=stage, batch_size=16), 2) == stage
        assert engine_stage(TrainConfig(zero_stage=stage, tensor_parallel=2), 1) == 0  # TP2 x DP1
        # Offload moves the optimizer to the host, bf16-weights keeps its fp32 master in ZeRO's optimizer.
        assert engine_stage(TrainConfig(zero_stage=stage, offload="optimizer"), 1) == stage
        assert engine_stage(TrainConfig(zero_stage=stage, precision="bf16-weights"), 1) == stage
    assert engine_stage(TrainConfig(zero_stage=3), 1) == 3  # sharded initialisation is ZeRO-3's
    assert stage_name(TrainConfig(zero_stage=2), 1) == "ZeRO-2 (runs as ZeRO-0: one data-parallel rank)"
    assert stage_name(TrainConfig(zero_stage=2, batch_size=16), 2) == "ZeRO-2"


def test_each_precision_picks_one_deepspeed_mode():
    def modes(precision):
        ds = deepspeed_config(TrainConfig(precision=precision), 1, ModelConfig())
        return ds["bf16"]["enabled"], ds["torch_autocast"]["enabled"]

    assert modes("fp32") == (False, False)
    assert modes("bf16") == (False, True)
    assert modes("bf16-weights") == (True, False)


def test_bf16_autocast_reduces_gradients_in_fp32():
    # DeepSpeed's default would all-reduce nn.Linear gradients in bf16, unlike the plain loop.
    assert (
        deepspeed_config(TrainConfig(precision="bf16", batch_size=16), 2, ModelConfig())["torch_autocast"][
            "lower_precision_safe_modules"
        ]
        == []
    )


def zero_section(model: ModelConfig | None = None, dp: int = 1, device: str = "cuda", **train) -> dict:
    train.setdefault("batch_size", 8 * dp)
    return deepspeed_config(TrainConfig(**train), dp, model or ModelConfig(), device)["zero_optimization"]


def test_zero_defaults_overlap_gradient_reduction_only_with_several_data_parallel_ranks_on_a_gpu():
    one = zero_section(zero_stage=2, offload="optimizer")  # kept at stage 2 on one rank by offload
    two = zero_section(zero_stage=2, dp=2)
    assert one["reduce_scatter"] is False and "overlap_comm" not in one  # one rank: an in-place all-reduce
    assert two["overlap_comm"] and "reduce_scatter" not in two and "contiguous_gradients" not in two
    override = zero_section(zero_stage=2, dp=2, deepspeed={"zero_optimization": {"overlap_comm": False}})
    assert override["overlap_comm"] is False


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_and_2_on_the_cpu_reduce_the_gradients_themselves_without_a_side_stream(stage):
    on_cpu = zero_section(zero_stage=stage, dp=2, device="cpu")
    assert on_cpu["contiguous_gradients"] is False and "overlap_comm" not in on_cpu


def test_zero_buffers_are_sized_to_the_model_not_to_deepspeeds_gpu_defaults():
    # A GPT-2 small block holds 12 x 768^2 = 7.1M weights: buckets of two blocks, ZeRO-3 gathering
    # at most two blocks' weights and prefetching one; DeepSpeed's 5e8 would hold the whole model.
    gpt2 = ModelConfig(n_layer=12, n_embd=768, n_head=12, vocab_size=50304, block_size=1024)
    block = 12 * 768**2
    for stage in (1, 2, 3):
        assert zero_section(gpt2, dp=2, zero_stage=stage)["reduce_bucket_size"] == 2 * block
    assert zero_section(gpt2, dp=2, zero_stage=2)["allgather_bucket_size"] == 2 * block
    three = zero_section(gpt2, dp=2, zero_stage=3)
    assert three["stage3_prefetch_bucket_size"] == block
    assert three["stage3_max_live_parameters"] == three["stage3_max_reuse_distance"] == 2 * block
    # Tensor parallelism halves a rank's block; a tiny model gets the floor, not a bucket per weight.
    assert zero_section(gpt2, dp=2, zero_stage=3, tensor_parallel=2)["reduce_bucket_size"] == block
    assert zero_section(ModelConfig(n_embd=64, n_head=2), zero_stage=3)["reduce_bucket_size"] == MIN_BUCKET
    assert zero_section(gpt2, zero_stage=0) == {"stage": 0}


def test_zero_buffer_settings_in_train_deepspeed_win():
    mine = {"reduce_bucket_size": 5e8, "stage3_max_live_parameters": 1e9}
    assert zero_section(zero_stage=3, deepspeed={"zero_optimization": mine}).items() >= mine.items()


def test_offload_maps_to_zero_offload_with_torchs_adamw():
    ds = deepspeed_config(TrainConfig(zero_stage=3, offload="optimizer+params"), 1, ModelConfig())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # the fused AdamW steps on the CPU, no C++ build
    two = zero_section(zero_stage=2, offload="optimizer")
    assert "offload_optimizer" in two and "offload_param" not in two
    assert "offload_optimizer" not in zero_section(zero_stage=2)


@pytest.mark.parametrize(
    "stage,offload,named",
    [(0, "optimizer", "needs ZeRO stage 1, 2 or 3"), (2, "optimizer+params", "needs train.zero_stage=3")],
)
def test_offload_the_stage_cannot_do_is_refused(stage, offload, named):
    with pytest.raises(UserError) as info:
        TrainConfig(zero_stage=stage, offload=offload)
    assert named in one_line(info)


def test_an_unknown_offload_is_refused_naming_the_choices(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {zero_stage: 2, offload: gpu}\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert "train.offload" in one_line(info) and "optimizer+params" in one_line(info)


def test_deepspeed_config_rejects_a_data_parallel_size_that_does_not_divide_the_batch():
    with pytest.raises(UserError, match=r"data-parallel size \(3\)"):
        deepspeed_config(TrainConfig(batch_size=8, micro_batch_size=2), 3, ModelConfig())


def test_extra_deepspeed_keys_are_merged_deeply():
    extra = {
        "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e7},
        "activation_checkpointing": {"partition_activations": True},
        "steps_per_print": 10,
    }
    train = TrainConfig(zero_stage=2, batch_size=16, deepspeed=copy.deepcopy(extra))
    ds = deepspeed_config(train, 2, ModelConfig())
    # merged over our two-rank defaults (buckets sized to the model)
    assert ds["zero_optimization"] == {
        **zero_section(zero_stage=2, dp=2),
        "overlap_comm": True,
        "reduce_bucket_size": 5e7,
    }
    assert ds["activation_checkpointing"] == {"partition_activations": True}
    assert ds["steps_per_print"] == 10  # a non-derived default of ours may be overridden
    assert ds["train_batch_size"] == train.batch_size
    assert train.deepspeed == extra  # the train config is not modified


@pytest.mark.parametrize("key", sorted(DERIVED))
def test_setting_a_derived_key_in_train_deepspeed_is_rejected(key):
    with pytest.raises(UserError) as info:
        deepspeed_config(TrainConfig(deepspeed={key: 1}), 1, ModelConfig())
    message = one_line(info)
    assert f"train.deepspeed.{key} is derived from train." in message


def test_the_derived_keys_cover_batch_accumulation_clipping_and_precision():
    assert {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "bf16",
        "fp16",
        "torch_autocast",
    } <= set(DERIVED)


def test_conflicting_zero_stage_is_rejected():
    with pytest.raises(UserError) as info:
        deepspeed_config(TrainConfig(zero_stage=1, deepspeed={"zero_optimization": {"stage": 3}}), 1, ModelConfig())
    assert "set train.zero_stage" in one_line(info)


def test_null_zero_optimization_is_a_user_error_or_ignored():
    try:
        deepspeed_config(TrainConfig(deepspeed={"zero_optimization": None}), 1, ModelConfig())
    except UserError:
        pass


def test_context_parallel_ranks_are_zero_ranks_and_deepspeed_counts_their_chunks_as_samples():
    train = TrainConfig(batch_size=8, micro_batch_size=2, zero_stage=2, context_parallel=2)
    ds = deepspeed_config(train, 1, ModelConfig())  # one data-parallel rank, two chunks per sequence
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (16, 4)
    assert ds["zero_optimization"]["stage"] == 2  # partitioned over the two CP ranks
    assert engine_stage(TrainConfig(zero_stage=2), 1) == 0  # where there is only one rank
