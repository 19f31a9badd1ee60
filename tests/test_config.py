"""Specification of the run configuration: loading and validating YAML (lm.config); the DeepSpeed
config derived from it is test_ds_config.py's.

Every mistake a user can make in a config file or a `--set section.key=value` override must end
in a `UserError` whose message is one line and names the offending key.
"""

import copy
from pathlib import Path

import pytest

from config_support import VALID, load_error, with_value, write_yaml
from conftest import one_line
from core.errors import UserError
from lm.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config

# --------------------------------------------------------------------------- loading a valid file


def test_valid_file_builds_typed_run_config_with_defaults_for_missing_keys(tmp_path):
    config = load_config(write_yaml(tmp_path, VALID))
    assert isinstance(config, RunConfig)
    assert isinstance(config.model, ModelConfig)
    assert isinstance(config.data, DataConfig)
    assert isinstance(config.train, TrainConfig)
    assert (config.model.n_layer, config.model.n_embd, config.model.twicing_layers) == (4, 32, "last:2")
    assert config.data.path == "shards/demo"
    assert (config.train.zero_stage, config.train.precision, config.train.lr) == (2, "bf16", 1.0e-3)
    # keys the file leaves out keep the dataclass defaults
    assert config.train.seed == TrainConfig().seed
    assert config.data.verify_checksums is True
    assert config.model.dropout == 0.0


def test_empty_file_and_empty_sections_give_the_default_config(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == RunConfig()
    assert load_config(write_yaml(tmp_path, "model:\ndata:\ntrain:\n")) == RunConfig()


def test_to_dict_round_trips_through_yaml(tmp_path):
    """The dict a checkpoint stores loads back into an equal config."""
    config = load_config(write_yaml(tmp_path, VALID))
    assert load_config(write_yaml(tmp_path, config.to_dict(), name="again.yaml")) == config
    assert RunConfig.from_dict(config.to_dict()) == config


def test_shipped_demo_config_loads():

    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    config = load_config(demo)
    assert config.model.layer_attention()[-2:] == ["twicing", "twicing"]


def test_the_llama_1b_configs_are_twins_that_differ_in_their_last_two_layers_only():

    from lm.initialization import parameter_count

    configs = Path(__file__).resolve().parent.parent / "configs"
    twicing, softmax = (load_config(configs / f"llama-1b-{kind}.yaml").model for kind in ("twicing", "softmax"))
    assert twicing.arch == "llama" and (twicing.n_head, twicing.n_kv_head) == (32, 4)
    assert twicing.layer_kinds() == ["softmax"] * 20 + ["twicing"] * 2 and softmax.layer_kinds() == ["softmax"] * 22
    assert parameter_count(twicing) == parameter_count(softmax) == 1_100_048_384  # TinyLlama's 1.1B


# --------------------------------------------------------------------------- unknown names


def test_unknown_section_is_named_with_the_close_match(tmp_path):
    config = copy.deepcopy(VALID)
    config["modle"] = config.pop("model")
    message = load_error(tmp_path, config)
    assert "unknown section 'modle'" in message
    assert "did you mean 'model'?" in message


@pytest.mark.parametrize(
    "section, wrong, right",
    [
        ("model", "n_layers", "n_layer"),
        ("model", "twicing_layer", "twicing_layers"),
        ("train", "micro_batch", "micro_batch_size"),
        ("data", "pth", "path"),
    ],
)
def test_unknown_key_is_named_with_the_close_match(tmp_path, section, wrong, right):
    message = load_error(tmp_path, with_value(section, wrong, 1))
    assert f"{section}: unknown key '{wrong}'" in message
    assert f"did you mean '{right}'?" in message


def test_unknown_key_without_a_close_match_gets_no_suggestion(tmp_path):
    message = load_error(tmp_path, with_value("train", "qqqqqq", 1))
    assert "unknown key 'qqqqqq'" in message
    assert "did you mean" not in message


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("model", "n_layer", "two"),  # string for int
        ("model", "n_layer", True),  # bool is not an int here
        ("model", "n_layer", 2.0),  # float for int, even a whole one
        ("model", "d_ff", 4.5),
        ("train", "lr", "fast"),
        ("train", "lr", True),  # bool is not a float either
        ("model", "bias", 1),  # int for bool
        ("data", "path", 5),
        ("model", "twicing_layers", 2),
        ("model", "twicing_layers", [1.0]),
        ("model", "twicing_layers", [True]),
        ("train", "deepspeed", [1, 2]),
    ],
)
def test_wrong_type_is_rejected_naming_the_key(tmp_path, section, key, value):
    message = load_error(tmp_path, with_value(section, key, value))
    assert f"{section}.{key}: expected" in message
    assert repr(value) in message


def test_int_is_accepted_for_float_and_converted(tmp_path):
    config = load_config(write_yaml(tmp_path, with_value("train", "lr", 1)))
    assert config.train.lr == 1.0 and type(config.train.lr) is float
    config = load_config(write_yaml(tmp_path, with_value("model", "init_std", 0)))
    assert type(config.model.init_std) is float


def test_null_is_accepted_for_optional_d_ff_and_means_four_times_n_embd(tmp_path):
    config = load_config(write_yaml(tmp_path, with_value("model", "d_ff", None)))
    assert config.model.d_ff is None
    assert config.model.ffn_dim == 4 * 32


@pytest.mark.parametrize(
    "key, value",
    [("zero_stage", 4), ("zero_stage", "2"), ("zero_stage", True), ("precision", "fp16"), ("precision", "BF16")],
)
def test_literal_fields_reject_values_outside_their_choices(tmp_path, key, value):
    message = load_error(tmp_path, with_value("train", key, value))
    assert f"train.{key}: expected one of" in message


@pytest.mark.parametrize(
    "key, value", [("zero_stage", 0), ("zero_stage", 3), ("precision", "fp32"), ("precision", "bf16-weights")]
)
def test_literal_fields_accept_their_choices(tmp_path, key, value):
    assert getattr(load_config(write_yaml(tmp_path, with_value("train", key, value))).train, key) == value


def test_yaml_float_without_a_dot_is_read_as_the_number(tmp_path):
    """PyYAML reads `6e-4` as a string (YAML 1.1); a float field takes it as the number it means."""
    assert load_config(write_yaml(tmp_path, "train:\n  lr: 6e-4\n")).train.lr == 6.0e-4
    assert load_config(write_yaml(tmp_path, "train:\n  lr: 6.0e-4\n")).train.lr == 6.0e-4
    assert "train.lr: expected float, got 'fast'" in load_error(tmp_path, "train:\n  lr: fast\n")


# --------------------------------------------------------------------------- values


def test_n_embd_must_be_divisible_by_n_head(tmp_path):
    config = with_value("model", "n_embd", 30)
    message = load_error(tmp_path, config)
    assert "model.n_embd (30) must be divisible by model.n_head (4)" in message
    assert message.startswith(str(tmp_path / "run.yaml") + ": ")


# --------------------------------------------------------------------------- overrides


def test_overrides_are_parsed_as_yaml_and_win_over_the_file(tmp_path):
    overrides = [
        "model.n_layer=2",
        "model.twicing_layers=[0, 1]",
        "model.d_ff=null",
        "train.lr=0.5",
        "train.tensorboard=false",
        "data.path=other/dir",
    ]
    config = load_config(write_yaml(tmp_path, VALID), overrides)
    assert config.model.n_layer == 2 and type(config.model.n_layer) is int
    assert config.model.twicing_layers == [0, 1]
    assert config.model.d_ff is None
    assert config.train.lr == 0.5
    assert config.train.tensorboard is False
    assert config.data.path == "other/dir"
    assert config.model.n_embd == 32  # untouched keys stay as in the file


def test_later_override_wins_and_value_may_contain_equals_sign(tmp_path):
    config = load_config(write_yaml(tmp_path, VALID), ["model.n_layer=2", "model.n_layer=3", "data.path=a=b"])
    assert config.model.n_layer == 3
    assert config.data.path == "a=b"


def test_override_may_add_a_section_the_file_lacks(tmp_path):
    config = load_config(write_yaml(tmp_path, {"model": VALID["model"]}), ["train.steps=3"])
    assert config.train.steps == 3


def test_overrides_are_validated_like_the_file(tmp_path):
    assert "model.n_layer: expected int, got 'two'" in load_error(tmp_path, VALID, ["model.n_layer=two"])
    assert "did you mean 'n_layer'?" in load_error(tmp_path, VALID, ["model.n_layers=2"])
    assert "did you mean 'model'?" in load_error(tmp_path, VALID, ["modle.n_layer=2"])
    assert "must be divisible" in load_error(tmp_path, VALID, ["model.n_head=3"])


@pytest.mark.parametrize("override", ["model.n_layer", "n_layer=2", "model.=2", "=2", ""])
def test_override_not_of_the_form_section_key_value_is_rejected(tmp_path, override):
    message = load_error(tmp_path, VALID, [override])
    assert "is not of the form section.key=value" in message


def test_override_into_a_scalar_is_rejected(tmp_path):
    assert "'data' is not a section" in load_error(tmp_path, "data: 3\n", ["data.path=x"])


def test_override_value_that_is_not_valid_yaml_is_a_user_error(tmp_path):
    message = load_error(tmp_path, VALID, ["model.twicing_layers=[1,"])
    assert "model.twicing_layers" in message


def test_override_into_an_empty_section_works(tmp_path):
    assert load_config(write_yaml(tmp_path, "model:\n"), ["model.n_layer=2"]).model.n_layer == 2


# --------------------------------------------------------------------------- files


def test_missing_file_is_a_user_error_naming_the_path(tmp_path):
    with pytest.raises(UserError) as info:
        load_config(tmp_path / "nope.yaml")
    assert f"config file not found: {tmp_path / 'nope.yaml'}" == one_line(info)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path)  # a directory is not a config file


def test_invalid_yaml_is_a_user_error_with_the_line(tmp_path):
    message = load_error(tmp_path, "model:\n  n_layer: 2\n  twicing_layers: [1,\n")
    assert "not valid YAML" in message
    assert "(line " in message


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "42\n", "just text\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    assert "expected a mapping with sections model, data, train" in load_error(tmp_path, text)


def test_section_must_be_a_mapping(tmp_path):
    assert "model: expected a mapping, got list" in load_error(tmp_path, "model: [1, 2]\n")


def test_non_string_section_name_is_a_user_error(tmp_path):
    assert "unknown section 1" in load_error(tmp_path, "1: {}\n")


def test_value_error_names_a_path_containing_a_colon(tmp_path):
    path = write_yaml(tmp_path, "model:\n  n_layer: 0\n", name="run:v2.yaml")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: model.n_layer must be positive")
