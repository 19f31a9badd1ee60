"""Model FLOPs utilisation: the FLOPs a token costs, the device's peak, and their ratio.

One count for the training log (train/mfu, lm.train) and benchmarks/train_throughput.py:
`GPT.flops_per_token` (forward and backward, twicing's second attention pass included), over the
dense bf16 peak of the accelerator. The peak is `train.peak_tflops` when given, else looked up by
the CUDA device's name; the CPU has no entry, so a CPU run reports tokens/s only unless told a peak.
"""

import torch

from lm.config import ModelConfig, TrainConfig
from lm.model import GPT

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s, matched as
# substrings of torch.cuda.get_device_name() in this order (the first match wins: "H100 PCIe" before
# "H100", "L40S" before "L4"). Another GPU gets no MFU unless train.peak_tflops gives its peak.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named `device_name` (torch.cuda.get_device_name), None if unknown."""
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


def device_peak_tflops(device: torch.device | str) -> float | None:
    """The peak of `device` from the table: a CUDA device by its name, None for the CPU or an unknown GPU."""
    device = torch.device(device)
    return peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def flops_per_token(model: ModelConfig) -> int:
    """Training FLOPs per token of the whole model (GPT.flops_per_token), built on the meta device: no memory."""
    with torch.device("meta"):
        return GPT(model).flops_per_token()


def mfu(tokens_per_s: float, flops: float, peak: float, devices: int = 1) -> float:
    """Model FLOPs utilisation of `devices` accelerators of `peak` TFLOP/s each, training `tokens_per_s`
    tokens per second (over all of them) at `flops` per token."""
    return tokens_per_s * flops / (peak * 1e12 * devices)


def run_peak_tflops(train: TrainConfig, device: torch.device) -> float | None:
    """The peak a run's MFU is measured against: train.peak_tflops, else the device's (None: no MFU)."""
    return train.peak_tflops if train.peak_tflops is not None else device_peak_tflops(device)
