"""The config tests' shared pieces: a valid run config and how to load a variant of it (used by
test_config.py and test_config_model.py)."""

import copy

import pytest
import yaml

from conftest import one_line
from core.errors import UserError
from lm.config import load_config

VALID = {
    "model": {
        "vocab_size": 97,
        "block_size": 16,
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 32,
        "d_ff": 48,
        "twicing_layers": "last:2",
    },
    "data": {"path": "shards/demo"},
    "train": {
        "steps": 10,
        "batch_size": 8,
        "micro_batch_size": 2,
        "lr": 1.0e-3,
        "min_lr": 1.0e-4,
        "zero_stage": 2,
        "precision": "bf16",
    },
}


def write_yaml(tmp_path, config, name="run.yaml"):
    """Write `config` (a dict, or raw YAML text) to a file and return its path."""
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return path


def with_value(section, key, value):
    """VALID with one key of one section replaced."""
    config = copy.deepcopy(VALID)
    config[section][key] = value
    return config


def load_error(tmp_path, config, overrides=()) -> str:
    """The single-line message of the UserError raised by loading `config` with `overrides`."""
    with pytest.raises(UserError) as info:
        load_config(write_yaml(tmp_path, config), list(overrides))
    return one_line(info)
