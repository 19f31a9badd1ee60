"""Specification of what a run logs besides losses: tokens/s everywhere and MFU where a peak is
known (lm.flops, the throughput benchmark's count), and the same scalars in metrics.jsonl,
TensorBoard and Weights & Biases (train.wandb, read back from its offline run directory)."""

import json
import struct
import sys

import pytest
import torch

import lm.flops
from conftest import TINY_MODEL, assert_one_error_line, benchmark_module, metric_from, mixture_run_config, write_config
from lm.config import ModelConfig, TrainConfig
from lm.flops import flops_per_token, mfu, peak_tflops, run_peak_tflops
from lm.model import GPT

# ---- MFU arithmetic -------------------------------------------------------------------------


def test_mfu_is_tokens_per_s_times_the_benchmarks_flops_per_token_over_the_peak():
    # The benchmark's own names: one FLOP count and one GPU table for both.
    train_throughput = benchmark_module("train_throughput")
    assert train_throughput.device_peak_tflops is lm.flops.device_peak_tflops

    model = ModelConfig(**TINY_MODEL)
    assert train_throughput.flops_per_token(model) == GPT(model).flops_per_token() == flops_per_token(model)
    peak = peak_tflops("NVIDIA H100 80GB HBM3")
    assert peak == 989.0
    # the benchmark's MFU column: rate * flops / (peak * 1e12), here for one device and for 8
    rate = 123456.0
    assert mfu(rate, flops_per_token(model), peak) == rate * GPT(model).flops_per_token() / (peak * 1e12)
    assert mfu(rate, flops_per_token(model), peak, devices=8) == pytest.approx(
        rate * GPT(model).flops_per_token() / (peak * 1e12) / 8, rel=1e-15
    )


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Tesla T4", None),
    ],
)
def test_known_gpus_have_their_dense_bf16_peak(name, peak):
    assert peak_tflops(name) == peak


def test_a_run_measures_mfu_against_train_peak_tflops_else_the_gpus_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert run_peak_tflops(TrainConfig(), torch.device("cuda", 0)) == 989.0
    assert run_peak_tflops(TrainConfig(peak_tflops=500.0), torch.device("cuda", 0)) == 500.0
    assert run_peak_tflops(TrainConfig(), torch.device("cpu")) is None  # the CPU: tokens/s only
    assert run_peak_tflops(TrainConfig(peak_tflops=2.0), torch.device("cpu")) == 2.0


# ---- a real run's log (conftest.mixture_runs) ------------------------------------------------


@pytest.mark.slow
def test_tokens_per_s_always_and_mfu_where_a_peak_is_given(mixture_runs):
    straight = mixture_runs / "straight"  # train.peak_tflops: 1 TFLOP/s, one rank
    rates, mfus = metric_from(straight, "train/tokens_per_s"), metric_from(straight, "train/mfu")
    assert sorted(rates) == sorted(mfus) == list(range(1, 51)) and all(r > 0 for r in rates.values())
    flops = flops_per_token(ModelConfig(**TINY_MODEL))
    assert all(mfus[s] == pytest.approx(rates[s] * flops / 1e12, rel=1e-12) for s in rates)
    resumed = mixture_runs / "resumed"  # no peak, on the CPU: tokens/s only
    assert metric_from(resumed, "train/tokens_per_s") and not metric_from(resumed, "train/mfu")


def scalars_of_metrics(run_dir) -> set[tuple[int, str]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(m["step"], key) for m in lines if "event" not in m for key in m if key != "step"}


def wandb_records(path):
    """The protobuf records of a .wandb file: W&B's LevelDB-style log of 32 KiB blocks, each record
    a chunk (crc32c, length, type: full, first, middle, last) split where a block ends."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room for a header: the block is padded
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.slow
def test_wandb_offline_gets_what_tensorboard_gets(mixture_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    straight = mixture_runs / "straight"
    expected = scalars_of_metrics(straight)
    assert {"data/tokens/small", "val/loss/big", "train/mfu", "train/tokens_per_s"} <= {k for _, k in expected}

    events = EventAccumulator(str(straight / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tensorboard = {(e.step, key) for key in events.Tags()["scalars"] for e in events.Scalars(key)}
    assert tensorboard == expected

    (offline,) = (straight / "wandb").glob("offline-run-*/run-*.wandb")
    history = [r.history for r in wandb_records(offline) if r.WhichOneof("record_type") == "history"]
    keys = [(h.step.num, item.key or "/".join(item.nested_key)) for h in history for item in h.item]
    logged = {(step, key) for step, key in keys if not key.startswith("_")}  # _step, _runtime: wandb's own
    assert logged == expected
    run = next(r.run for r in wandb_records(offline) if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name, run.run_id) == ("tests", "straight", (straight / "wandb-run-id").read_text())


def test_train_wandb_without_the_package_is_one_line_saying_how_to_install(
    mixture_shards, tmp_path, lm_in_process, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    sources = {"big": (mixture_shards["big"], 1.0)}
    config = mixture_run_config(sources, tmp_path / "run", {"wandb": {"project": "p", "mode": "offline"}})
    result = lm_in_process("train", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert_one_error_line(result, "the wandb package is not installed: pip install wandb")
    assert not (tmp_path / "run").exists()
