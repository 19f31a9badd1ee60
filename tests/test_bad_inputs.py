"""Every mistake a user can make ends in one clear line, exit status 2, and no file changed.

One table: each row sets up its mistake in a fresh copy of a small world (shards, a trained run,
texts), runs one `lm` command, and expects a fragment of the error line. The commands run in this
process (lm.cli.main), as they end before any process group or global torch state; the cases in
THROUGH_A_PROCESS run as a real `lm` process, which proves the command line's path too.
"""

import shutil
import socket

import pytest
import yaml

from conftest import REPO, assert_one_error_line, copy_two_step_world, run_lm, tree_digest, write_config
from lm.convert import convert

pytestmark = pytest.mark.slow
HARNESS_TASKS = REPO / "tests" / "harness_task"


@pytest.fixture(scope="module")
def world_template(two_step_world, tmp_path_factory):
    """Shards, a config, a 2-step run and a text file, made once and copied per case."""
    root = copy_two_step_world(two_step_world, tmp_path_factory.mktemp("world") / "world")
    (root / "text.txt").write_text("Some text to score. " * 20)
    return root


def edit_config(world, name, section, key, value, out_dir="new-run"):
    """The good config, pointing into this copy of the world, with one value changed."""
    config = yaml.safe_load((world / "good.yaml").read_text())
    config["data"]["path"], config["train"]["out_dir"] = str(world / "shards"), str(world / out_dir)
    config[section][key] = value
    return str(write_config(world / name, config))


def flip_byte(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    busy_port.held = s  # kept open for the test's duration
    return str(s.getsockname()[1])


def train_with(world, section, key, value, *extra, out_dir="new-run"):
    """`lm train` of the good config with one value changed (edit_config), then extra arguments."""
    return ["train", "--config", edit_config(world, "c.yaml", section, key, value, out_dir), *extra]


def train_mixture(world, weights, path=None, **train):
    """`lm train` of the good config reading data.sources {name: weight} (each the world's shards, but
    a name "gone": a missing directory), beside data.path when `path` is given, and train changes."""
    config = yaml.safe_load((world / "good.yaml").read_text())
    sources = [
        {"name": n, "path": str(world / ("no-shards" if n == "gone" else "shards")), "weight": w}
        for n, w in weights.items()
    ]
    config["data"] = {"sources": sources, **({"path": path} if path else {})}
    config["train"].update(out_dir=str(world / "new-run"), **train)
    return ["train", "--config", str(write_config(world / "mixture.yaml", config))]


def harness(world, *args):
    """`lm harness` of the 2-step run with these arguments."""
    return ["harness", "--checkpoint", str(world / "run"), *args]


def truncate(path, by=2):
    shutil.copyfile(path, path.parent.parent / "t")
    path.write_bytes((path.parent.parent / "t").read_bytes()[:-by])


def checkpoint_file(world, name):
    """A file of the 2-step run's checkpoint."""
    return world / "run" / "checkpoints" / "step00000002" / name


def converted(world, to):
    """The 2-step run as `lm convert --to TO` writes it (safetensors: a converted directory,
    checkpoint: a run with one weights-only checkpoint), and its model.safetensors."""
    out = convert(str(world / "run"), world / to, to=to)
    return out, (out / "model.safetensors" if to == "safetensors" else next(out.rglob("model.safetensors")))


# case: (setup(world) -> argv, a fragment of the error line); a setup may first spoil a file.
CASES = {
    "misspelt config key": (
        lambda w: train_with(w, "model", "n_layers", 2),
        "unknown key 'n_layers' (did you mean 'n_layer'?)",
    ),
    "wrong type": (lambda w: train_with(w, "model", "n_layer", "four"), "model.n_layer: expected int, got 'four'"),
    "bad choice": (
        lambda w: train_with(w, "train", "precision", "fp8"),
        "train.precision: expected one of 'fp32', 'bf16'",
    ),
    "batch not a multiple of micro batch": (
        lambda w: train_with(w, "train", "batch_size", 7),
        "must be a multiple of train.micro_batch_size",
    ),
    "TP not dividing heads": (
        lambda w: train_with(w, "train", "tensor_parallel", 3),
        "model.n_head (2) is not divisible by train.tensor_parallel (3)",
    ),
    "sequence parallelism without TP": (
        lambda w: train_with(w, "train", "sequence_parallel", True),
        "train.sequence_parallel splits activations over the tensor-parallel group and needs train.tensor_parallel > 1",
    ),
    "all_to_all over more ranks than heads": (
        lambda w: train_with(w, "train", "context_parallel", 4, "--set", "train.context_parallel_impl=all_to_all"),
        "model.n_head / (tensor_parallel x context_parallel) heads: 2 / (1 x 4) is not whole",
    ),
    "ring zigzag not dividing the block": (
        lambda w: train_with(w, "train", "context_parallel", 3),
        "model.block_size (32) is not divisible by 2 x 3",
    ),
    "ring with an attention it cannot run": (
        lambda w: train_with(w, "model", "attention_impl", "reference", "--set", "train.context_parallel=2"),
        "train.context_parallel_impl=ring cannot run model.attention_impl=reference",
    ),
    "missing config file": (lambda w: ["train", "--config", str(w / "nope.yaml")], "config file not found"),
    "invalid YAML": (
        lambda w: ((w / "bad.yaml").write_text("model: [1\n"), ["train", "--config", str(w / "bad.yaml")])[-1],
        "not valid YAML",
    ),
    "bad override": (
        lambda w: ["train", "--config", str(w / "good.yaml"), "--set", "n_layer=2"],
        "is not of the form section.key=value",
    ),
    "missing data path": (lambda w: train_with(w, "data", "path", str(w / "no-shards")), "no-shards"),
    "truncated shard": (
        lambda w: (truncate(w / "shards" / "train-00000.bin"), train_with(w, "train", "steps", 3))[-1],
        "train-00000.bin",
    ),
    "altered shard (checksum)": (
        lambda w: (flip_byte(w / "shards" / "train-00000.bin"), train_with(w, "train", "steps", 3))[-1],
        "train-00000.bin",
    ),
    "vocabulary mismatch": (lambda w: train_with(w, "model", "vocab_size", 100), "vocabulary mismatch"),
    "negative mixture weight": (
        lambda w: train_mixture(w, {"a": 0.8, "b": -0.2}),
        "data.sources[1].weight (b) must be a positive number, got -0.2",
    ),
    "mixture weights summing to zero": (
        lambda w: train_mixture(w, {"a": 0, "b": 0}),
        "data.sources[0].weight (a) must be a positive number, got 0.0",
    ),
    "missing mixture source": (
        lambda w: train_mixture(w, {"a": 0.8, "gone": 0.2}),
        "data.sources gone: token shard directory",
    ),
    "both data.path and data.sources": (
        lambda w: train_mixture(w, {"a": 1}, path=str(w / "shards")),
        "data.path and data.sources are alternatives",
    ),
    "wsd decay longer than the run": (
        lambda w: train_with(
            w, "train", "schedule", "wsd", "--set", "train.decay_steps=3", "--set", "train.warmup_steps=0"
        ),
        "train.schedule=wsd needs train.decay_steps from 1 to train.steps - train.warmup_steps (2 - 0 = 2), got 3",
    ),
    "existing run without --resume": (
        lambda w: train_with(w, "train", "steps", 2, out_dir="run"),
        "already holds a run",
    ),
    "checkpoint of another model": (
        lambda w: train_with(w, "model", "n_embd", 64, "--resume", str(w / "run")),
        "different model",
    ),
    "port already in use": (lambda w: train_with(w, "train", "steps", 3), "already in use"),
    "empty corpus": (
        lambda w: ((w / "empty.txt").write_text(""), ["prep", "--input", str(w / "empty.txt"), "--out", str(w / "p")])[
            -1
        ],
        "empty",
    ),
    "non-UTF-8 corpus": (
        lambda w: (
            (w / "bad.txt").write_bytes(b"caf\xe9 au lait\n"),
            ["prep", "--input", str(w / "bad.txt"), "--out", str(w / "p")],
        )[-1],
        "UTF-8",
    ),
    "prep into existing shards": (
        lambda w: ["prep", "--input", str(w / "text.txt"), "--out", str(w / "shards")],
        "shards",
    ),
    "non-UTF-8 text to evaluate": (
        lambda w: (
            (w / "bad.txt").write_bytes(b"\xff\xfe"),
            ["eval", "--checkpoint", str(w / "run"), "--text", str(w / "bad.txt")],
        )[-1],
        "not valid UTF-8",
    ),
    "stride longer than the context": (
        lambda w: [
            "eval",
            "--checkpoint",
            str(w / "run"),
            "--text",
            str(w / "text.txt"),
            "--context",
            "8",
            "--stride",
            "9",
        ],
        "stride must be in 1..context (8), got 9",
    ),
    "missing checkpoint": (
        lambda w: ["generate", "--checkpoint", str(w / "no-run"), "--prompt", "x"],
        "checkpoint path not found",
    ),
    "prompt longer than the context": (
        lambda w: ["generate", "--checkpoint", str(w / "run"), "--prompt", "Some text to score. " * 20],
        "longer than the model's context of 32",
    ),
    "top-p out of range": (
        lambda w: ["generate", "--checkpoint", str(w / "run"), "--prompt", "x", "--top-p", "1.5"],
        "--top-p must be in (0, 1]",
    ),
    "unknown lm-eval task": (
        lambda w: harness(w, "--tasks", "twicing_choice", "--include-path", str(HARNESS_TASKS)),
        "unknown lm-eval task 'twicing_choice' (did you mean 'twicing_choices'",
    ),
    "harness of a missing checkpoint": (
        lambda w: ["harness", "--checkpoint", str(w / "no-run"), "--tasks", "twicing_choices"],
        "checkpoint path not found",
    ),
    "harness limit of zero": (lambda w: harness(w, "--tasks", "hellaswag", "--limit", "0"), "--limit must be positive"),
    "harness negative limit": (lambda w: harness(w, "--tasks", "hellaswag", "--limit", "-3"), "got -3"),
    "harness negative few-shot": (
        lambda w: harness(w, "--tasks", "hellaswag", "--num-fewshot", "-1"),
        "--num-fewshot must be 0 or more, got -1",
    ),
    "harness few-shot not a number": (
        lambda w: harness(w, "--tasks", "hellaswag", "--num-fewshot", "two"),
        "argument --num-fewshot: invalid int value: 'two'",
    ),
    "convert into a non-empty directory": (
        lambda w: ["convert", "--checkpoint", str(w / "run"), "--out", str(w / "shards")],
        "is not empty",
    ),
    "re-split to an impossible TP size": (
        lambda w: [
            "convert",
            "--checkpoint",
            str(w / "run"),
            "--out",
            str(w / "r"),
            "--to",
            "checkpoint",
            "--tensor-parallel",
            "3",
        ],
        "not divisible by train.tensor_parallel (3)",
    ),
    "malformed node list": (
        lambda w: ["launch", "--config", str(w / "good.yaml"), "--nodes", "gpu[01-", "--dry-run"],
        "bad node list",
    ),
    "batch the allocation cannot split": (
        lambda w: ["launch", "--config", str(w / "good.yaml"), "--nodes", "a,b,c", "--dry-run"],
        "data-parallel size (3)",
    ),
    "empty checkpoint marker": (
        lambda w: (
            checkpoint_file(w, "complete.json").write_text(""),
            ["eval", "--checkpoint", str(w / "run"), "--text", str(w / "text.txt")],
        )[-1],
        "step00000002/complete.json: unreadable checkpoint marker",
    ),
    "checkpoint marker without a step": (
        lambda w: (
            checkpoint_file(w, "complete.json").write_text("{}"),
            train_with(w, "train", "steps", 4, "--resume", "auto", out_dir="run"),
        )[-1],
        "step00000002/complete.json: not a checkpoint marker (no integer 'step')",
    ),
    "truncated DeepSpeed checkpoint file": (
        lambda w: (
            truncate(checkpoint_file(w, "mp_rank_00_model_states.pt"), by=100),
            train_with(w, "train", "steps", 4, "--resume", "auto", out_dir="run"),
        )[-1],
        "mp_rank_00_model_states.pt holds",
    ),
    "truncated RNG file": (
        lambda w: (
            truncate(checkpoint_file(w, "rng_rank0.pt")),
            train_with(w, "train", "steps", 4, "--resume", "auto", out_dir="run"),
        )[-1],
        "rng_rank0.pt holds",
    ),
    "truncated converted weights": (
        lambda w: (
            truncate(converted(w, "safetensors")[1]),
            ["generate", "--checkpoint", str(w / "safetensors"), "--prompt", "x"],
        )[-1],
        "safetensors/model.safetensors: not a readable safetensors file",
    ),
    "truncated weights-only checkpoint": (
        lambda w: (
            truncate(converted(w, "checkpoint")[1]),
            ["eval", "--checkpoint", str(w / "checkpoint"), "--text", str(w / "text.txt")],
        )[-1],
        "model.safetensors holds",
    ),
    "demo into a non-empty directory": (lambda w: ["demo", "--out", str(w / "shards")], "not empty"),
    "unknown command": (lambda w: ["trian"], "unknown command 'trian'"),
}


# The port check runs as the process group is set up, which writes RANK, MASTER_PORT, ... into the
# environment: it needs a process of its own. The other cases here run as processes too, to prove
# that a real `lm` reports what lm.cli.main does.
THROUGH_A_PROCESS = {
    "port already in use",
    "misspelt config key",
    "truncated shard",
    "checkpoint of another model",
    "non-UTF-8 text to evaluate",
    "unknown command",
}
assert THROUGH_A_PROCESS <= set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_mistake_is_one_clear_line_and_changes_nothing(case, world_template, tmp_path, lm_in_process):
    world = tmp_path / "world"
    shutil.copytree(world_template, world)
    setup, expected = CASES[case]
    args = setup(world)
    before = tree_digest(world)
    if case in THROUGH_A_PROCESS:
        result = run_lm(*args, env={"MASTER_PORT": busy_port()} if case == "port already in use" else {})
    else:
        result = lm_in_process(*args)
    assert_one_error_line(result, expected)
    assert tree_digest(world) == before
