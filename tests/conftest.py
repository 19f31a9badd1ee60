"""Shared fixtures: tiny token shards, tiny run configs, and running `lm` in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data_prep.corpus import embedded_corpus, split_train_val
from data_prep.prep import prepare_shards

REPO = Path(__file__).resolve().parent.parent

# Without a GPU, the Triton kernel's tests run under Triton's interpreter. Triton reads this when
# it is first imported, so it is set here, before any test module loads; child processes drop it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_MODEL = dict(vocab_size=384, block_size=32, n_layer=2, n_head=2, n_embd=32, d_ff=64, twicing_layers="last:1")
TINY_TRAIN = dict(
    steps=6, batch_size=8, micro_batch_size=2, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1,
    grad_clip=1.0, zero_stage=0, precision="fp32", seed=7, eval_interval=0, eval_windows=4, log_interval=1,
    checkpoint_interval=0, tensorboard=False,
)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Token shards of a slice of the embedded corpus, with a 384-piece tokenizer."""
    docs = embedded_corpus()[:24]
    train, val = split_train_val(docs, val_fraction=0.2, seed=0)
    return prepare_shards(train, val, tmp_path_factory.mktemp("shards"), vocab_size=TINY_MODEL["vocab_size"])


def tiny_run_config(shards: Path, out_dir: Path, model: dict | None = None, train: dict | None = None) -> dict:
    return {
        "model": {**TINY_MODEL, **(model or {})},
        "data": {"path": str(shards)},
        "train": {**TINY_TRAIN, "out_dir": str(out_dir), **(train or {})},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cpu_env(threads: int = 1) -> dict:
    """Environment for child processes: CPU DeepSpeed, one thread per rank, loopback only."""
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    return env


def run_lm(*args: str, nproc: int = 0, timeout: int = 600, cwd: Path | None = None,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """`lm ARGS` in a fresh process; with nproc > 0, `lm train` under torchrun with nproc ranks."""
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", *args]
    else:
        command = [sys.executable, "-m", "lm.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**cpu_env(), **(env or {})}, cwd=cwd or REPO)
