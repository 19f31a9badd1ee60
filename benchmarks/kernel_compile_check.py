"""Compile every twicing kernel for sm_90a and sm_80 without a GPU, and check what the compiler made.

    python benchmarks/kernel_compile_check.py [--jobs 2] [--dims 64 128] [--dtypes bf16 fp16]

Every program of lm.kernels (the forward passes, dW, dK/dV with and without the fused dQ, and
the deterministic dQ) x each of its autotune shapes for that head size x D in {64, 128} x {bf16,
fp16} x {sm_90a, sm_80} goes through triton.compile for that target (no driver is touched) and its
PTX through the ptxas in Triton's wheel, with the flags Triton itself uses. One table row each:
shared memory (and the estimate the autotuner prunes by), registers, spill bytes, and the dots as
Hopper wgmma (`ttng.warp_group_dot` in the TTGIR) or as mma/FMA `tt.dot`, and how many wgmma dots
are computed twice over (a 64-row tile on 8 warps: two warp groups, the same rows; shown for a GPU
run to weigh, not failed) and whether ptxas serialised wgmma (C7515). The check fails (exit 1)
on shared memory over the target's limit (sm_90: 232448 B, sm_80: 166912 B), on an estimate below
what the compiler allocated (the prune would let an overflow through), on any register spill not in
ALLOWED_SPILLS (printed with its reason), and on sm_90 on any dot that is not wgmma.

It runs with the Triton that the CUDA build of our pinned torch (2.13.0) requires: triton==3.7.1
(the torch wheel's METADATA). Where another Triton is installed (the CPU venv has 3.9, which the
interpreter tests need), the script makes its own environment, once, outside the repository
(TWICING_TRITON_ENV, default ~/.cache/twicing-lm/triton-3.7.1: a venv with only triton, no torch:
the kernel modules import nothing else) and runs itself there. Compiles go to a fresh temporary
Triton cache, so nothing is reused between runs, and nothing is written to the repository.
"""

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRITON_VERSION = "3.7.1"  # torch 2.13.0's CUDA wheel: Requires-Dist triton==3.7.1
ENV = Path(os.environ.get("TWICING_TRITON_ENV", Path.home() / ".cache" / "twicing-lm" / f"triton-{TRITON_VERSION}"))
TARGETS = {"sm_90a": (90, 232448), "sm_80": (80, 166912)}  # capability, shared memory per block (opt-in)
DTYPES = {"bf16": "bf16", "fp16": "fp16"}
# (program, (BLOCK_M, BLOCK_N, warps, stages), target, D) -> (most spill bytes allowed, why)
ALLOWED_SPILLS = {
    ("_bwd_dkdv[dq]", (16, 64, 8, 2), "sm_80", 128): (
        64,
        "Ampere only: mma.sync keeps the D=128 dK and dV accumulators and the dQ atomics' 64-bit "
        "pointers in 255 registers but for a few words; every shape tried spills there, and the "
        "unfused dQ (3 more matmuls per tile) costs more than a few local stores per tile",
    ),
}
# The programs, by the name the table shows: (kernel, the compile-time flags of this variant).
VARIANTS = {
    "_pass1_fwd": ("_pass1_fwd", {}),
    "_pass2_fwd": ("_pass2_fwd", {}),
    "_bwd_dw": ("_bwd_dw", {}),
    "_bwd_dkdv[dq]": ("_bwd_dkdv", {"FUSE_DQ": True}),
    "_bwd_dkdv": ("_bwd_dkdv", {"FUSE_DQ": False}),
    "_bwd_dq": ("_bwd_dq", {}),
}
FP32_POINTERS = ("LSE", "DELTA", "DQ32")
SCALARS = {"qk_scale": "fp32", "sm_scale": "fp32"}


@dataclass
class Row:
    program: str
    shape: tuple
    target: str
    d: int
    dtype: str
    shared: int = 0
    estimate: int = 0
    registers: int = 0
    spills: int = 0
    wgmma: int = 0
    mma: int = 0
    replicated: int = 0  # wgmma dots computed by more than one warp group (see replicated_dots)
    serialized: bool = False  # ptxas C7515: wgmma waits for a non-wgmma write of its accumulator
    error: str = ""
    problems: list[str] = field(default_factory=list)
    allowed: str = ""


def ensure_triton() -> None:
    """Run under triton==TRITON_VERSION: as we are, or re-executed in ENV (made on first use)."""
    try:
        import triton

        if triton.__version__ == TRITON_VERSION:
            return
    except ImportError:
        pass
    python = ENV / "bin" / "python"
    if not python.exists() or subprocess.run([python, "-c", "import triton"], capture_output=True).returncode:
        print(f"compile check: installing triton=={TRITON_VERSION} into {ENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(ENV)
        pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"triton=={TRITON_VERSION}"]
        if subprocess.run(pip).returncode:
            raise SystemExit(f"error: could not install triton=={TRITON_VERSION} into {ENV}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    os.execve(python, [str(python), __file__, *sys.argv[1:]], env)


def signature(fn, dtype: str, constexprs: dict):
    """ASTSource's signature and attributes: tensors as pointers (16-byte aligned), strides as i32
    divisible by 16 (every head size here is), sizes as plain i32."""
    sig, attrs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in SCALARS:
            sig[name] = SCALARS[name]
        elif name in ("H", "GROUP", "T", "TK"):
            sig[name] = "i32"
        elif name[0].isupper():
            sig[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # a stride
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(constexprs) - set(sig)
    assert not missing, missing
    return sig, attrs


def parse_ptxas(log: str) -> tuple[int, int]:
    """(registers, spill-store bytes) from `ptxas -v`."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return int(registers.group(1)) if registers else -1, int(spills.group(1)) if spills else 0


def count_dots(ttgir: str) -> tuple[int, int]:
    """(wgmma dots, other dots) in a TTGIR listing."""
    return len(re.findall(r"\bttng\.warp_group_dot\s", ttgir)), len(re.findall(r"\btt\.dot\s", ttgir))


def replicated_dots(ttgir: str) -> int:
    """wgmma dots whose result has fewer rows than its layout's warps cover (16 rows a warp): every
    warp group then computes the same rows, as 8 warps on a 64-row tile do. Shown, not failed: the
    shapes that avoid it spill at D = 128; a GPU run weighs the two."""
    warps = {
        name: int(m)
        for name, m in re.findall(
            r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = 3.*?warpsPerCTA = \[(\d+)", ttgir, re.M
        )
    }
    results = re.findall(r"ttng\.warp_group_dot\s.*-> tensor<(\d+)x\d+xf32, (#mma\d*)>", ttgir)
    return sum(int(rows) < 16 * warps.get(layout, 0) for rows, layout in results)


def compile_row(job: tuple) -> Row:
    program, shape, target, d, dtype = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lm.kernels import twicing_bwd_jit, twicing_jit

    kernel_name, flags = VARIANTS[program]
    kernel = getattr(twicing_jit, kernel_name, None) or getattr(twicing_bwd_jit, kernel_name)
    m, n, warps, stages = shape
    row = Row(program, shape, target, d, dtype)
    row.estimate = twicing_jit.shared_memory_estimate(kernel_name, m, n, stages, d)
    constexprs = dict(BLOCK_M=m, BLOCK_N=n, D=d, PRECISION="tf32", **flags)
    sig, attrs = signature(kernel.fn, DTYPES[dtype], constexprs)
    capability = TARGETS[target][0]
    try:
        compiled = triton.compile(
            ASTSource(kernel.fn, sig, constexprs, attrs),
            target=GPUTarget("cuda", capability, 32),
            options=dict(num_warps=warps, num_stages=stages),
        )
    except Exception as error:  # the table names it; the check fails on it
        row.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        return row
    row.shared = compiled.metadata.shared
    row.wgmma, row.mma = count_dots(compiled.asm["ttgir"])
    row.replicated = replicated_dots(compiled.asm["ttgir"])
    ptxas = ptxas_for(capability)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        command = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", ptx, "-o", Path(tmp) / "k.o"]
        log = subprocess.run(command, capture_output=True, text=True).stderr
    row.registers, row.spills = parse_ptxas(log)
    row.serialized = "C7515" in log
    if row.registers < 0:
        row.error = "ptxas: " + (log.strip().splitlines() or ["no output"])[-1]
    return row


def ptxas_for(capability: int) -> str:
    """The ptxas Triton itself runs for this target (its wheel ships one per CUDA generation)."""
    from triton.backends.nvidia import compiler

    return compiler.get_ptxas(capability).path


def judge(row: Row, limits: dict[str, int]) -> Row:
    """Fill row.problems: what makes the check fail."""
    if row.error:
        row.problems.append(row.error)
        return row
    if row.shared > limits[row.target]:
        row.problems.append(f"shared memory {row.shared} B > {limits[row.target]} B")
    if row.estimate < row.shared:
        row.problems.append(f"estimate {row.estimate} B < {row.shared} B allocated")
    if row.spills:
        allowance, why = ALLOWED_SPILLS.get((row.program, row.shape, row.target, row.d), (0, ""))
        if row.spills > allowance:
            row.problems.append(f"{row.spills} B of register spills")
        else:
            row.allowed = why
    if row.target == "sm_90a" and (row.mma or not row.wgmma):
        row.problems.append(f"{row.mma} dots not on wgmma")
    return row


def jobs(programs, dims, dtypes, targets) -> list[tuple]:
    from lm.kernels.twicing_jit import SHAPES

    found = []
    for program, d, dtype, target in itertools.product(programs, dims, dtypes, targets):
        for shape in SHAPES[VARIANTS[program][0]].get(d, ()):
            found.append((program, shape, target, d, dtype))
    return found


def table(rows: list[Row]) -> str:
    header = "| program | BLOCK_M, BLOCK_N, warps, stages | target | D | dtype | shared B | estimate B | registers | spill B | wgmma | mma | replicated | verdict |"  # noqa: E501
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        verdict = "; ".join(r.problems) or ("ok, spill allowed (see below)" if r.allowed else "ok")
        verdict += ", wgmma serialized (C7515)" if r.serialized else ""
        shape = ", ".join(map(str, r.shape))
        lines.append(
            f"| {r.program} | {shape} | {r.target} | {r.d} | {r.dtype} | {r.shared} | {r.estimate} | {r.registers} "
            f"| {r.spills} | {r.wgmma} | {r.mma} | {r.replicated} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--programs", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiles at once")
    p.add_argument("--max-shapes", type=int, default=0, help="only the first N shapes of each (for tests)")
    p.add_argument("--shared-limit", type=int, default=0, help="a lower shared-memory limit, bytes (for tests)")
    p.add_argument("--any-triton", action="store_true", help="use the installed Triton, whatever its version")
    args = p.parse_args(argv)
    if not args.any_triton:
        ensure_triton()
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would replace the programs being compiled
    import triton

    work = jobs(args.programs, args.dims, args.dtypes, args.targets)
    if args.max_shapes:
        per = itertools.groupby(work, key=lambda j: (j[0], j[2], j[3], j[4]))
        work = [j for _, group in per for j in list(group)[: args.max_shapes]]
    limits = {t: min(limit, args.shared_limit or limit) for t, (_, limit) in TARGETS.items()}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # fresh: every row is compiled now, nothing kept
        if args.jobs > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
                rows = pool.map(compile_row, work, chunksize=1)
        else:
            rows = [compile_row(job) for job in work]
    rows = [judge(r, limits) for r in rows]
    seconds = time.perf_counter() - start
    print(f"Triton {triton.__version__}, {len(rows)} compiles in {seconds:.0f} s on {args.jobs} processes")
    print(f"shared-memory limits: {', '.join(f'{t} {limit} B' for t, limit in limits.items())}")
    print(table(rows))
    allowed = sorted({(r.program, r.shape, r.target, r.d, r.allowed) for r in rows if r.allowed})
    for program, shape, target, d, why in allowed:
        print(f"allowed spill: {program} {shape} {target} D={d}: {why}")
    failed = [r for r in rows if r.problems]
    print(f"compile check: {len(rows) - len(failed)} of {len(rows)} ok" + (f", {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
