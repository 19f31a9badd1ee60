"""Specification of the model and data sections beyond their types: architectures and their presets,
which layers twice, data mixtures, LR schedules and wandb settings."""

import copy
from pathlib import Path

import pytest

from config_support import VALID, load_error, with_value, write_yaml
from conftest import one_line
from core.errors import UserError
from lm.attention import ATTENTION
from lm.config import DataSource, ModelConfig, RunConfig, TrainConfig, WandbConfig, load_config

# --------------------------------------------------------------------------- architectures


def test_gpt2_is_the_default_architecture_with_its_options():
    model = ModelConfig()
    assert (model.arch, model.position, model.norm, model.mlp, model.bias, model.tie_embeddings) == (
        "gpt2",
        "learned",
        "layernorm",
        "gelu",
        True,
        True,
    )
    assert model.n_kv_head == model.n_head and model.ffn_dim == 4 * model.n_embd


def test_the_llama_preset_sets_its_options_and_explicit_keys_override_it(tmp_path):
    llama = load_config(write_yaml(tmp_path, with_value("model", "arch", "llama"))).model
    assert (llama.position, llama.norm, llama.mlp, llama.bias, llama.tie_embeddings) == (
        "rope",
        "rmsnorm",
        "swiglu",
        False,
        False,
    )
    overridden = load_config(
        write_yaml(tmp_path, with_value("model", "arch", "llama")),
        ["model.position=learned", "model.tie_embeddings=true", "model.n_kv_head=2"],
    ).model
    assert (overridden.position, overridden.tie_embeddings, overridden.norm, overridden.n_kv_head) == (
        "learned",
        True,
        "rmsnorm",
        2,
    )


def test_swiglu_defaults_to_two_thirds_of_four_n_embd_rounded_up_to_64():
    assert ModelConfig(arch="llama", n_embd=768).ffn_dim == 2048  # 8/3 * 768 = 2048
    assert ModelConfig(arch="llama", n_embd=64, n_head=4).ffn_dim == 192  # 170.7 rounded up
    assert ModelConfig(arch="llama", n_embd=64, n_head=4, d_ff=100).ffn_dim == 100


def test_a_saved_config_without_the_architecture_keys_reads_as_gpt2():
    """Configs written before model.arch existed load as the GPT-2 they describe."""
    saved = {k: v for k, v in RunConfig().to_dict()["model"].items()}
    for key in ("arch", "position", "norm", "mlp", "n_kv_head", "tie_embeddings", "rope_theta"):
        del saved[key]
    assert RunConfig.from_dict({"model": saved}).model == ModelConfig()


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("n_kv_head", 3, "model.n_head (4) must be divisible by model.n_kv_head (3)"),
        ("n_kv_head", 0, "model.n_kv_head must be positive, got 0"),
        ("rope_theta", 1, "model.rope_theta must be greater than 1"),
        ("arch", "mamba", "model.arch: expected one of 'gpt2', 'llama'"),
        ("norm", "batchnorm", "model.norm: expected one of 'layernorm', 'rmsnorm'"),
        ("mlp", "relu", "model.mlp: expected one of 'gelu', 'swiglu'"),
    ],
)
def test_bad_architecture_values_are_one_line_naming_the_key(tmp_path, key, value, named):
    assert named in load_error(tmp_path, with_value("model", key, value))


def test_rotary_positions_need_an_even_head_size(tmp_path):
    config = with_value("model", "position", "rope")
    config["model"].update(n_embd=36, n_head=4)  # head size 9
    assert "the head size (9) must be even" in load_error(tmp_path, config)


def test_tensor_parallelism_must_divide_the_kv_heads(tmp_path):
    config = with_value("model", "n_kv_head", 1)
    assert "model.n_kv_head (1) is not divisible by train.tensor_parallel (2)" in load_error(
        tmp_path, config, ["train.tensor_parallel=2"]
    )


@pytest.mark.parametrize(
    "section, key", [("model", "n_layer"), ("model", "vocab_size"), ("train", "steps"), ("train", "batch_size")]
)
def test_sizes_must_be_positive(tmp_path, section, key):
    assert f"{section}.{key} must be positive, got 0" in load_error(tmp_path, with_value(section, key, 0))


def test_batch_size_must_be_a_multiple_of_micro_batch_size(tmp_path):
    config = copy.deepcopy(VALID)
    config["train"].update(batch_size=10, micro_batch_size=4)
    message = load_error(tmp_path, config)
    assert "train.batch_size (10) must be a multiple of train.micro_batch_size (4)" in message


def test_min_lr_may_not_exceed_lr(tmp_path):
    assert "train.min_lr" in load_error(tmp_path, with_value("train", "min_lr", 1.0))


@pytest.mark.parametrize("dp, accum", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_grad_accum_steps_fills_the_global_batch(dp, accum):
    train = TrainConfig(batch_size=32, micro_batch_size=4)
    assert train.grad_accum_steps(dp) == accum
    assert train.micro_batch_size * train.grad_accum_steps(dp) * dp == train.batch_size


@pytest.mark.parametrize("dp", [3, 16])
def test_grad_accum_steps_error_names_the_numbers(dp):
    with pytest.raises(UserError) as info:
        TrainConfig(batch_size=32, micro_batch_size=4).grad_accum_steps(dp)
    message = one_line(info)
    assert "train.batch_size (32)" in message
    assert "micro_batch_size (4)" in message
    assert f"data-parallel size ({dp})" in message


# --------------------------------------------------------------------------- twicing layer selection


@pytest.mark.parametrize(
    "selector, n_layer, expected",
    [
        ("none", 16, []),
        ("all", 4, [0, 1, 2, 3]),
        ("last:2", 16, [14, 15]),  # the paper's language model
        ("last:0", 16, []),
        ("last:16", 16, list(range(16))),
        ([3, 0, 3], 16, [0, 3]),  # sorted, duplicates dropped
        ([], 16, []),
    ],
)
def test_twicing_layer_indices(selector, n_layer, expected):
    assert ModelConfig(n_layer=n_layer, twicing_layers=selector).twicing_layer_indices() == expected


def test_layer_attention_of_the_papers_language_model():
    config = ModelConfig(n_layer=16, twicing_layers="last:2")
    assert config.layer_attention() == ["softmax"] * 14 + ["twicing"] * 2


@pytest.mark.parametrize("selector", [[16], [-1], [0, 99], "last:17", "last:-1", "last:", "first:2", "ALL", "", "2"])
def test_invalid_twicing_selector_is_rejected_at_construction(selector):
    with pytest.raises(UserError) as info:
        ModelConfig(n_layer=16, twicing_layers=selector)
    assert "model.twicing_layers" in one_line(info)


def test_out_of_range_layer_is_named():
    with pytest.raises(UserError, match="layer 16 is out of range for n_layer=16"):
        ModelConfig(n_layer=16, twicing_layers=[2, 16])


def test_sdpa_impl_keeps_twicing_off_the_triton_kernel():
    config = ModelConfig(n_layer=3, twicing_layers=[1], attention_impl="sdpa")
    assert config.layer_attention() == ["softmax", "twicing_sdpa", "softmax"]


def test_reference_impl_selects_the_reference_variants():
    config = ModelConfig(n_layer=3, twicing_layers=[1], attention_impl="reference")
    assert config.layer_attention() == ["softmax_reference", "twicing_reference", "softmax_reference"]
    fused = ModelConfig(n_layer=3, twicing_layers=[1]).layer_attention()
    assert fused == ["softmax", "twicing", "softmax"]
    assert set(config.layer_attention() + fused) <= set(ATTENTION)


# --------------------------------------------------------------------------- mixtures, schedules, wandb


def with_sources(*sources, **data):
    """VALID reading data.sources (mappings) instead of data.path."""
    config = copy.deepcopy(VALID)
    config["data"] = {"sources": list(sources), **data}
    return config


A = {"name": "web", "path": "shards/web", "weight": 0.8}
B = {"name": "code", "path": "shards/code", "weight": 0.2}


def test_data_sources_build_typed_entries_that_round_trip(tmp_path):
    config = load_config(write_yaml(tmp_path, with_sources(A, {"name": "code", "path": "shards/code", "weight": 1})))
    assert [(s.name, s.path, s.weight) for s in config.data.sources] == [
        ("web", "shards/web", 0.8),
        ("code", "shards/code", 1.0),
    ]
    assert isinstance(config.data.sources[0], DataSource) and isinstance(config.data.sources[1].weight, float)
    assert config.data.path == ""
    assert RunConfig.from_dict(config.to_dict()) == config
    overridden = load_config(write_yaml(tmp_path, VALID), ["data.path=''", f"data.sources=[{A}, {B}]"])
    assert [s.name for s in overridden.data.sources] == ["web", "code"]


@pytest.mark.parametrize(
    "sources,data,named",
    [
        ([A, {**B, "weight": -1}], {}, "data.sources[1].weight (code) must be a positive number, got -1.0"),
        (
            [{**A, "weight": 0}, {**B, "weight": 0}],
            {},
            "data.sources[0].weight (web) must be a positive number, got 0.0",
        ),
        ([A, {**B, "weight": "heavy"}], {}, "data.sources[1].weight: expected float, got 'heavy'"),
        ([A, B], {"path": "shards/demo"}, "data.path and data.sources are alternatives: give one of them"),
        ([A, {**B, "name": "web"}], {}, "data.sources[1].name 'web' is used twice"),
        ([A, {**B, "name": ""}], {}, "data.sources[1].name must be letters, digits"),
        ([A, {**B, "name": "a/b"}], {}, "data.sources[1].name must be letters, digits, '_', '.' or '-', got 'a/b'"),
        ([A, {"name": "code", "weight": 1}], {}, "data.sources[1] (code) needs a path"),
        ([A, {**B, "wieght": 1}], {}, "data.sources[1]: unknown key 'wieght' (did you mean 'weight'?)"),
        ([A, "shards/code"], {}, "data.sources: expected a list of a mapping of name, path, weight, got"),
    ],
)
def test_bad_data_sources_are_one_line_naming_the_entry(tmp_path, sources, data, named):
    assert named in load_error(tmp_path, with_sources(*sources, **data))


@pytest.mark.parametrize(
    "train,named",
    [
        ({"schedule": "wsd"}, "train.schedule=wsd needs train.decay_steps from 1 to train.steps - train.warmup_steps"),
        ({"schedule": "wsd", "decay_steps": 11}, "(10 - 0 = 10), got 11"),
        ({"schedule": "wsd", "decay_steps": 0}, "got 0"),
        ({"schedule": "wsd", "decay_steps": 8, "warmup_steps": 4}, "(10 - 4 = 6), got 8"),
        ({"decay_steps": 5}, "train.decay_steps is wsd's; train.schedule is cosine"),
        ({"schedule": "linear"}, "train.schedule: expected one of 'cosine', 'wsd', 'constant'"),
        ({"schedule": "wsd", "decay_steps": 5, "decay_shape": "sqrt"}, "expected one of 'linear', '1-sqrt'"),
        ({"peak_tflops": 0}, "train.peak_tflops must be positive, got 0.0"),
        ({"wandb": {"project": "p", "mode": "online-ish"}}, "train.wandb.mode: expected one of 'online', 'offline'"),
        ({"wandb": {"projekt": "p"}}, "train.wandb: unknown key 'projekt' (did you mean 'project'?)"),
        ({"wandb": "p"}, "train.wandb: expected a mapping of project, entity, name, mode or null, got 'p'"),
    ],
)
def test_bad_schedule_mfu_and_wandb_settings_are_one_line_naming_the_key(tmp_path, train, named):
    config = copy.deepcopy(VALID)
    config["train"].update({"warmup_steps": 0, **train})
    assert named in load_error(tmp_path, config)


def test_the_shipped_mixture_demo_config_loads():
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "mixture-demo.yaml")
    assert [(s.name, s.weight) for s in config.data.sources] == [("docs", 0.8), ("code", 0.2)]
    assert (config.train.schedule, config.train.decay_shape) == ("wsd", "1-sqrt")


def test_schedule_and_wandb_settings_load_and_default_to_cosine_without_wandb(tmp_path):
    default = load_config(write_yaml(tmp_path, VALID)).train
    assert (default.schedule, default.decay_steps, default.wandb, default.peak_tflops) == ("cosine", None, None, None)
    config = copy.deepcopy(VALID)
    wandb = {"project": "p", "mode": "offline"}
    config["train"].update(schedule="wsd", warmup_steps=2, decay_steps=3, decay_shape="1-sqrt", wandb=wandb)
    t = load_config(write_yaml(tmp_path, config)).train
    assert (t.schedule, t.decay_steps, t.decay_shape) == ("wsd", 3, "1-sqrt")
    assert t.wandb == WandbConfig(project="p", mode="offline")
    assert RunConfig.from_dict(load_config(write_yaml(tmp_path, config)).to_dict()).train == t
