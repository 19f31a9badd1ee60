"""Attention variants head to head: correctness first, then forward and forward+backward time.

    .venv/bin/python benchmarks/attention.py [--lengths 1024 2048 4096] [--dtype bf16]

Before timing, each variant is checked against a float64 materialised reference on fresh random
inputs. Then, per sequence length: milliseconds for forward and forward+backward, the ratio to
softmax (one fused pass), and on a GPU the peak memory of forward+backward. The twicing variant
is two fused passes, A(2V - AV); the materialised (2A - A^2)V is there to show what that saves.
"""

import argparse
import time

import torch

from lm.attention import softmax_attention, twicing_attention, twicing_attention_reference

VARIANTS = {"softmax": softmax_attention, "twicing": twicing_attention, "twicing_materialised": twicing_attention_reference}


def check_correctness(device: str, dtype: torch.dtype) -> float:
    """Worst relative error of the twicing variants against float64 (2A - A^2)V."""
    g = torch.Generator(device="cpu").manual_seed(int(time.time()))
    q, k, v = (torch.randn(2, 4, 256, 64, generator=g, dtype=torch.float64) for _ in range(3))
    exact = twicing_attention_reference(q, k, v)
    worst = 0.0
    for fn in (twicing_attention, twicing_attention_reference):
        out = fn(*(x.to(device, dtype) for x in (q, k, v))).double().cpu()
        worst = max(worst, ((out - exact).norm() / exact.norm()).item())
    return worst


def timed(fn, q, k, v, backward: bool, repeats: int) -> float:
    def once():
        out = fn(q, k, v)
        if backward:
            out.backward(torch.ones_like(out))
    once()  # warm-up
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096] if cuda else [256, 512, 1024])
    p.add_argument("--batch", type=int, default=4 if cuda else 1)
    p.add_argument("--heads", type=int, default=12 if cuda else 4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if cuda else "fp32")
    p.add_argument("--repeats", type=int, default=20 if cuda else 3)
    args = p.parse_args()
    device, dtype = ("cuda" if cuda else "cpu"), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    where = torch.cuda.get_device_name() if cuda else "CPU"
    error = check_correctness(device, dtype)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    print(f"correctness on {where}, {args.dtype}: worst relative error vs float64 (2A-A^2)V = {error:.2e} "
          f"({'ok' if error < tolerance else 'FAILED'}, tolerance {tolerance:g})")
    if error >= tolerance:
        raise SystemExit(1)
    print(f"{'variant':<22} {'T':>6} {'fwd ms':>9} {'fwd+bwd ms':>11} {'vs softmax':>11} {'peak MiB':>9}")
    for t in args.lengths:
        base = None
        for name, fn in VARIANTS.items():
            q, k, v = (torch.randn(args.batch, args.heads, t, args.head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                fwd = timed(fn, q, k, v, backward=False, repeats=args.repeats)
                both = timed(fn, q, k, v, backward=True, repeats=args.repeats)
            except torch.OutOfMemoryError:
                print(f"{name:<22} {t:>6} {'out of memory':>21}")
                continue
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
            base = base or both
            print(f"{name:<22} {t:>6} {fwd:>9.3f} {both:>11.3f} {both / base:>10.2f}x {peak:>9.0f}")


if __name__ == "__main__":
    main()
