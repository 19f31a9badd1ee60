"""Attention variants head to head: correctness first, then forward and forward+backward time.

    .venv/bin/python benchmarks/attention.py [--lengths 1024 2048 4096] [--head-dims 64 128] [--dtype bf16]

Before timing, every variant's output and gradients are checked against a float64 materialised
(2A - A^2)V on fresh random inputs, per head size. Then, per head size and sequence length:
milliseconds for forward and for forward+backward, both as ratios to softmax (one fused SDPA
pass), and on a GPU the peak memory of forward+backward (inputs included) and its ratio to
softmax's. These are the attention figures benchmarks/measured_fastest.json records. Variants:
  softmax               F.scaled_dot_product_attention, causal
  twicing_triton        the fused Triton kernel, lm.kernels.twicing_triton (GPU, bf16/fp16 only)
  twicing_sdpa          A(2V - AV) as two SDPA passes (what CPUs run)
  twicing_materialised  (2A - A^2)V with A formed: what the fused variants save
"""

import argparse
import itertools
import time

import torch

from lm.attention import TRITON_KERNELS, softmax_attention, twicing_attention_reference, twicing_attention_sdpa


def variants(cuda: bool, dtype: torch.dtype) -> dict:
    found = {"softmax": softmax_attention}
    if cuda and TRITON_KERNELS is not None and dtype != torch.float32:  # fp32: the kernel declines it
        found["twicing_triton"] = TRITON_KERNELS.twicing_attention_triton
    return {**found, "twicing_sdpa": twicing_attention_sdpa, "twicing_materialised": twicing_attention_reference}


def worst_error(fn, device: str, dtype: torch.dtype, head_dim: int) -> float:
    """Worst relative error of output and input gradients against float64 (2A - A^2)V."""
    g = torch.Generator().manual_seed(time.time_ns() % 2**31)  # fresh inputs every run
    q, k, v, dout = (torch.randn(2, 4, 256, head_dim, generator=g, dtype=torch.float64) for _ in range(4))

    def run(f, tensors):
        x = [t.detach().requires_grad_() for t in tensors[:3]]
        out = f(*x)
        return [out, *torch.autograd.grad(out, x, tensors[3])]

    exact = run(twicing_attention_reference, (q, k, v, dout))
    got = run(fn, [t.to(device, dtype) for t in (q, k, v, dout)])
    return max(((a.double().cpu() - b).norm() / b.norm()).item() for a, b in zip(got, exact))


def timed(fn, q, k, v, backward: bool, repeats: int) -> float:
    def once():
        out = fn(q, k, v)
        if backward:
            out.backward(torch.ones_like(out))

    once()  # warm-up (and Triton's compilation)
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
    p.add_argument("--head-dims", type=int, nargs="+", default=[64])
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16" if cuda else "fp32")
    p.add_argument("--repeats", type=int, default=20 if cuda else 3)
    args = p.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    device, dtype = ("cuda" if cuda else "cpu"), dtypes[args.dtype]
    where = torch.cuda.get_device_name() if cuda else "CPU"
    tolerance = {torch.bfloat16: 2e-2, torch.float16: 5e-3}.get(dtype, 1e-5)
    chosen = variants(cuda, dtype)
    failed = False
    for head_dim, (name, fn) in itertools.product(args.head_dims, chosen.items()):
        if name == "softmax":
            continue
        error = worst_error(fn, device, dtype, head_dim)
        failed |= error >= tolerance
        print(
            f"correctness of {name} on {where}, {args.dtype}, D={head_dim}: worst relative error of output and "
            f"gradients vs float64 (2A-A^2)V = {error:.2e} ({'ok' if error < tolerance else 'FAILED'}, "
            f"tolerance {tolerance:g})"
        )
    if failed:
        raise SystemExit(1)
    print(
        f"{'variant':<22} {'D':>4} {'T':>6} {'fwd ms':>9} {'x softmax':>10} {'fwd+bwd ms':>11} {'x softmax':>10} "
        f"{'peak MiB':>9} {'x softmax':>10}"
    )
    for head_dim, t in itertools.product(args.head_dims, args.lengths):
        base = None
        for name, fn in chosen.items():
            q, k, v = (
                torch.randn(args.batch, args.heads, t, head_dim, device=device, dtype=dtype, requires_grad=True)
                for _ in range(3)
            )
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                fwd = timed(fn, q, k, v, backward=False, repeats=args.repeats)
                both = timed(fn, q, k, v, backward=True, repeats=args.repeats)
            except torch.OutOfMemoryError:
                print(f"{name:<22} {head_dim:>4} {t:>6} {'out of memory':>21}")
                continue
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
            base = base or (fwd, both, peak)
            print(
                f"{name:<22} {head_dim:>4} {t:>6} {fwd:>9.3f} {fwd / base[0]:>9.2f}x {both:>11.3f} "
                f"{both / base[1]:>9.2f}x {peak:>9.0f} {peak / base[2]:>9.2f}x"
            )


if __name__ == "__main__":
    main()
