"""Shared helpers and fixtures of the test suite.

- tiny worlds: token shards, run configs, a 2-step run and a 120-step trained run (session-wide);
- a small Hugging Face tokenizer.json with its tokenizer_config.json (`hf_tokenizer_file`);
- running `lm`: in a fresh process (`run_lm`), under torchrun (`torchrun_command`, `run_torchrun`),
  or in this process for the mistakes that fail before anything global is touched (`lm_in_process`);
- checks: one error line, a run's losses, a directory's digest, relative errors, tensor sizes, copies
  an op makes of given tensors (`CopiesOf`);
- references: the plain PyTorch loop's losses, computed once per configuration (`plain_losses`);
- a session-wide watch that no run leaves DeepSpeed's shared-memory buffers behind (`shm_segments`);
- tiny float64 models and converted checkpoints for evaluation and analysis.

The Hugging Face export tests' helpers are in hf_support (its fixture is imported here).
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from data_prep.corpus import embedded_corpus, split_train_val
from data_prep.prep import prepare_shards
from data_prep.tokenizer import copy_tokenizer, tokenizer_file
from hf_support import private_modules_cache  # noqa: F401  (a fixture, visible to every test module)
from lm.config import ModelConfig, RunConfig
from lm.model import GPT
from shm_watch import SegmentWatch

REPO = Path(__file__).resolve().parent.parent

# Without a GPU, the Triton kernel's tests run under Triton's interpreter. Triton reads this when
# it is first imported, so it is set here, before any test module loads; child processes drop it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_MODEL = dict(vocab_size=384, block_size=32, n_layer=2, n_head=2, n_embd=32, d_ff=64, twicing_layers="last:1")
TINY_TRAIN = dict(
    steps=6,
    batch_size=8,
    micro_batch_size=2,
    lr=1e-2,
    min_lr=1e-3,
    warmup_steps=2,
    weight_decay=0.1,
    grad_clip=1.0,
    zero_stage=0,
    precision="fp32",
    seed=7,
    eval_interval=0,
    eval_windows=4,
    log_interval=1,
    checkpoint_interval=0,
    tensorboard=False,
)
TRAINED_STEPS = 120  # of the session's trained tiny run (trained_tiny_run)


# --------------------------------------------------------------------------- tiny worlds


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Token shards of a slice of the embedded corpus, with a 384-piece tokenizer."""
    docs = embedded_corpus()[:24]
    train, val = split_train_val(docs, val_fraction=0.2, seed=0)
    return prepare_shards(train, val, tmp_path_factory.mktemp("shards"), vocab_size=TINY_MODEL["vocab_size"])


HF_EOD = "<|endoftext|>"  # the end-of-document token of hf_tokenizer_file


@pytest.fixture(scope="session")
def hf_tokenizer_file(tmp_path_factory) -> Path:
    """tokenizer.json of a GPT-2-style byte-level BPE trained on the embedded corpus (a fraction of a
    second), in a directory that also holds its tokenizer_config.json (eos_token HF_EOD). Read-only.

    TINY_MODEL's vocabulary: 256 bytes, 127 merges, and HF_EOD added last (id 383), as GPT-2 adds it.
    Byte-level without a normalizer, it is lossless: decode(encode(text)) == text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("hf-tokenizer")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_MODEL["vocab_size"] - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(embedded_corpus(), trainer)
    tokenizer.add_special_tokens([HF_EOD])
    tokenizer.save(str(root / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": HF_EOD, "bos_token": HF_EOD}
    (root / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": TINY_MODEL["block_size"]}))
    return root / "tokenizer.json"


def tiny_run_config(shards: Path, out_dir: Path, model: dict | None = None, train: dict | None = None) -> dict:
    return {
        "model": {**TINY_MODEL, **(model or {})},
        "data": {"path": str(shards)},
        "train": {**TINY_TRAIN, "out_dir": str(out_dir), **(train or {})},
    }


@pytest.fixture(scope="session")
def mixture_shards(tiny_shards, tmp_path_factory) -> dict[str, Path]:
    """Two sources of one tokenizer: "big" (tiny_shards, 1272 training windows of TINY_MODEL's 32
    tokens) and "small" (one short document: 25 windows, so a 0.2 share of 8-row batches repeats
    it every 16 steps), whose validation text is another document than big's first. Read-only."""
    train, val = split_train_val(embedded_corpus()[:24], val_fraction=0.2, seed=0)
    small = tmp_path_factory.mktemp("small-source")
    prepare_shards(train[:1], val[1:2], small, tokenizer=tokenizer_file(tiny_shards))
    return {"big": tiny_shards, "small": small}


def mixture_run_config(sources: dict[str, tuple[Path, float]], out_dir: Path, train: dict | None = None) -> dict:
    """tiny_run_config reading data.sources {name: (path, weight)} instead of data.path."""
    config = tiny_run_config(Path("unused"), out_dir, train=train)
    config["data"] = {"sources": [{"name": n, "path": str(p), "weight": w} for n, (p, w) in sources.items()]}
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def two_step_world(tiny_shards, tmp_path_factory) -> Path:
    """A directory holding shards/, good.yaml and run/ (2 steps of `lm train` from good.yaml), made once.

    Read-only: a test that changes anything works on a copy (`copy_two_step_world`).
    """
    root = tmp_path_factory.mktemp("two-step-world")
    shutil.copytree(tiny_shards, root / "shards")
    write_config(root / "good.yaml", tiny_run_config(root / "shards", root / "run", train={"steps": 2}))
    result = run_lm("train", "--config", str(root / "good.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def copy_two_step_world(two_step_world: Path, to: Path) -> Path:
    """A private copy of the 2-step world, its good.yaml pointing into the copy."""
    shutil.copytree(two_step_world, to)
    write_config(to / "good.yaml", tiny_run_config(to / "shards", to / "run", train={"steps": 2}))
    return to


@pytest.fixture(scope="session")
def trained_tiny_run(tiny_shards, tmp_path_factory) -> Path:
    """A tiny model after TRAINED_STEPS steps of `lm train`, trained once per test session. Read-only."""
    root = tmp_path_factory.mktemp("trained-tiny")
    train = {
        "steps": TRAINED_STEPS,
        "batch_size": 8,
        "micro_batch_size": 8,
        "lr": 1e-2,
        "warmup_steps": 10,
        "log_interval": 40,
        "eval_windows": 0,
    }
    config = write_config(root / "trained-tiny.yaml", tiny_run_config(tiny_shards, root / "run", train=train))
    result = run_lm("train", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


# The mixture run of mixture_runs: 0.8 big / 0.2 small, warmup-stable-decay with a 1-sqrt decay.
MIXTURE_TRAIN = dict(
    steps=50, warmup_steps=5, schedule="wsd", decay_steps=15, decay_shape="1-sqrt", eval_interval=25, log_interval=10
)


@pytest.fixture(scope="session")
def mixture_runs(mixture_shards, tmp_path_factory) -> Path:
    """A directory with straight/ (MIXTURE_TRAIN in one go, checkpointed every 20 steps, with
    TensorBoard, wandb offline and train.peak_tflops 1) and resumed/ (steps 21 to 50 of the same
    training, resumed from straight's checkpoint of step 20, logging to metrics.jsonl only). Read-only."""
    root = tmp_path_factory.mktemp("mixture-runs")
    sources = {"big": (mixture_shards["big"], 0.8), "small": (mixture_shards["small"], 0.2)}
    logged = {"tensorboard": True, "wandb": {"project": "tests", "mode": "offline"}, "peak_tflops": 1.0}
    straight = mixture_run_config(sources, root / "straight", {**MIXTURE_TRAIN, **logged, "checkpoint_interval": 20})
    resumed = mixture_run_config(sources, root / "resumed", MIXTURE_TRAIN)
    step_20 = root / "straight" / "checkpoints" / "step00000020"
    for name, config, resume in (("straight", straight, "none"), ("resumed", resumed, str(step_20))):
        result = run_lm("train", "--config", str(write_config(root / f"{name}.yaml", config)), "--resume", resume)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


def val_text(chars: int = 20000) -> str:
    """The start of the tiny shards' val documents (about 5k tokens: enough, and quick to score)."""
    return "\n\n".join(split_train_val(embedded_corpus()[:24], val_fraction=0.2, seed=0)[1])[:chars]


# --------------------------------------------------------------------------- running `lm`


def benchmark_module(name: str):
    """benchmarks/NAME.py imported as a module (benchmarks/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_env(threads: int = 1) -> dict:
    """Environment for child processes: CPU DeepSpeed, one thread per rank, loopback only."""
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    # A script under tests/ imports this checkout's lm, not that of the editable install (a worktree's).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def torchrun_command(nproc: int, *target: str) -> list[str]:
    """The torchrun command line for `nproc` ranks on this machine; target: `-m MODULE ARGS` or `SCRIPT ARGS`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]


def mpirun_command(nproc: int, *target: str, exported: tuple[str, ...] = ()) -> list[str]:
    """Open MPI's mpirun for `nproc` ranks on this machine (as root, loopback only), passing on the
    `exported` environment variables; target: the program and its arguments."""
    local = [
        "--allow-run-as-root",
        "--oversubscribe",
        "--mca",
        "btl",
        "self,vader",
        "--mca",
        "oob_tcp_if_include",
        "lo",
    ]
    return ["mpirun", *local, "-np", str(nproc), *[a for v in exported for a in ("-x", v)], *target]


def run_torchrun(
    nproc: int, script: str, *args: str, timeout: int = 900, env: dict | None = None
) -> subprocess.CompletedProcess:
    """tests/SCRIPT ARGS under torchrun with nproc CPU ranks (not checked: the caller asserts)."""
    command = torchrun_command(nproc, str(REPO / "tests" / script), *args)
    env = {**cpu_env(), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def run_lm(
    *args: str, nproc: int = 0, timeout: int = 600, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`lm ARGS` in a fresh process; with nproc > 0, `python -m ARGS` (a module) under torchrun with nproc ranks."""
    command = torchrun_command(nproc, "-m", *args) if nproc else [sys.executable, "-m", "lm.cli", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**cpu_env(), **(env or {})}, cwd=cwd or REPO
    )


@pytest.fixture
def lm_in_process(capsys):
    """`lm ARGS` as lm.cli.main in this process, with run_lm's result shape (returncode, stdout, stderr).

    Only for commands that end before they create a process group, import DeepSpeed's engine or change
    global torch state (threads, seeds, deterministic flags): a user's mistake in a config, a path, a
    shard, a checkpoint or an argument. Everything else goes through run_lm.
    """
    from lm.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()  # output of earlier calls is not this command's
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's --help and usage errors, as a process would end
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["lm", *args], code, out, err)

    return run


@pytest.fixture(scope="session", autouse=True)
def shm_segments():
    """Watches /dev/shm all session (shm_watch); at its end no DeepSpeed buffer a run of it made is left."""
    watch = SegmentWatch()
    watch.thread.start()
    yield watch
    watch.stop.set()
    assert not watch.left_behind(), f"this session's runs left shared memory behind: {watch.left_behind()}"


# --------------------------------------------------------------------------- checks


def one_line(exc_info) -> str:
    """The message of a raised UserError (pytest.raises' info), which must be one line."""
    message = str(exc_info.value)
    assert message and "\n" not in message, f"not a single-line message: {message!r}"
    return message


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str):
    """Exit status 2 and exactly one stderr line, `error: ...`, holding every fragment."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def metric_from(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value of `key`} from a run directory's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m[key] for m in lines if key in m}


def losses_from(run_dir: Path) -> dict[int, float]:
    """{step: train loss} from a run directory's metrics.jsonl."""
    return metric_from(run_dir, "train/loss")


def tree_digest(path: Path) -> str:
    """One hash over every file's relative name and bytes: equal digests, unchanged directory."""
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return digest.hexdigest()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in the Frobenius norm."""
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- plain-loop references

# The plain loop is one process without ZeRO or tensor parallelism, eager: these settings of a
# config do not change its losses, so one reference serves every layout of the same run.
LAYOUT_KEYS = (
    "out_dir",
    "tensor_parallel",
    "sequence_parallel",
    "context_parallel",
    "context_parallel_impl",
    "zero_stage",
    "compile",
)


@pytest.fixture(scope="session")
def plain_losses():
    """plain_losses(config) -> the plain PyTorch loop's per-step losses, computed once per session and run."""
    from lm.plain_loop import train_plain

    cache = {}

    def reference(config: dict) -> list[float]:
        key = json.dumps(
            {**config, "train": {k: v for k, v in config["train"].items() if k not in LAYOUT_KEYS}}, sort_keys=True
        )
        if key not in cache:
            cache[key] = train_plain(RunConfig.from_dict(config))["losses"]
        return list(cache[key])

    return reference


# --------------------------------------------------------------------------- tiny float64 models

BOS = 0


def tiny_model(**overrides) -> GPT:
    """A seeded 50-token float64 GPT in eval mode (context 8, the last layer twicing)."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, twicing_layers="last:1")
    config = ModelConfig(**{**sizes, **overrides})
    return GPT(config).double().eval()


def token_ids(n: int) -> list[int]:
    """n seeded token ids in 1..49 (0 is BOS)."""
    return torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def converted_dir(path: Path, shards: Path, model: dict | None = None) -> Path:
    """A directory like `lm convert` writes (weights + config + the shards' tokenizer) for a seeded tiny model."""
    config = RunConfig.from_dict(tiny_run_config(shards, path / "unused", model))
    torch.manual_seed(3)
    weights = GPT(config.model).state_dict()
    path.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in weights.items() if k != "transformer.wte.weight"},
        str(path / "model.safetensors"),
    )
    (path / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    copy_tokenizer(tokenizer_file(shards), path)  # tokenizer.model, or tokenizer.json and its config
    return path
