"""Which twicing implementation `model.attention_impl: fused` runs on a GPU: the one the benchmarks
measured fastest there, read from benchmarks/measured_fastest.json (a copy of figures in
benchmarks/RESULTS.md), never a preference written into the code.

The record is keyed by a GPU class (a name such as "H200", matched inside the device's name) and a
head size. The Triton kernel ("triton") is chosen only where the entry records it faster than two
SDPA passes ("sdpa") in both the attention benchmark (fwd+bwd time, lower is faster) and the
training benchmark (tokens/s, higher is faster). Anything else (no entry, an unmeasured figure, a
GPU of another class, no record file in an installed copy) runs two SDPA passes, the path that has
been measured. Importing this module needs neither torch nor a GPU.
"""

import json
from pathlib import Path

RECORD = Path(__file__).resolve().parents[1] / "benchmarks" / "measured_fastest.json"
KERNEL, TWO_PASSES = "triton", "sdpa"


def load_record(path: Path = RECORD) -> dict:
    """The record as a mapping; {} where the file is absent (an installed copy without benchmarks/)."""
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    if not isinstance(record.get("gpus"), dict):
        raise ValueError(f"{path}: expected an object with a 'gpus' mapping")
    return record


def gpu_class(device_name: str, record: dict) -> str | None:
    """The record's GPU class inside `device_name` ("NVIDIA H200" -> "H200"), the longest if several."""
    found = [name for name in record.get("gpus", {}) if name.lower() in device_name.lower()]
    return max(found, key=len) if found else None


def fastest_twicing(device_name: str, head_dim: int, record: dict) -> str:
    """KERNEL where the record has the kernel faster on this GPU class and head size in both
    benchmarks, else TWO_PASSES."""
    entry = record.get("gpus", {}).get(gpu_class(device_name, record), {}).get(str(head_dim), {})
    attention = entry.get("attention_fwd_bwd_x_softmax", {})
    training = entry.get("training_tokens_per_s", {})
    figures = [attention.get(KERNEL), attention.get(TWO_PASSES), training.get(KERNEL), training.get(TWO_PASSES)]
    if any(not isinstance(x, (int, float)) for x in figures):
        return TWO_PASSES  # unmeasured: keep what has been measured
    kernel_time, passes_time, kernel_rate, passes_rate = figures
    return KERNEL if kernel_time < passes_time and kernel_rate > passes_rate else TWO_PASSES
