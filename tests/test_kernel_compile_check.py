"""Specification of benchmarks/kernel_compile_check.py, the kernels' compile check for sm_90a and sm_80.

CI runs the whole check (every program and shape, with triton 3.7.1); here its rules are checked
on rows made by hand, and one real compile (with whatever Triton this venv has) shows that a
compiled row is read back and that an overflow fails the check.
"""

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO, cpu_env

SCRIPT = REPO / "benchmarks" / "kernel_compile_check.py"
spec = importlib.util.spec_from_file_location("kernel_compile_check", SCRIPT)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

PTXAS_LOG = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_bwd_dkdv' for 'sm_90a'
ptxas info    : Function properties for _bwd_dkdv
    232 bytes stack frame, 248 bytes spill stores, 244 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 232 bytes cumulative stack size
"""
TTGIR = """
    %s = ttng.warp_group_dot %k, %qT, %cst {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<64x128xbf16>
    %w = ttng.warp_group_dot_wait %s {pendings = 0 : i32} : tensor<64x32xf32, #mma>
    %d = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<64x16xbf16> * tensor<16x64xbf16> -> tensor<64x64xf32>
"""


def row(**fields) -> "check.Row":
    base = dict(program="_pass1_fwd", shape=(128, 64, 8, 3), target="sm_90a", d=64, dtype="bf16")
    base.update(shared=65536, estimate=98304, registers=123, wgmma=4)
    return check.Row(**{**base, **fields})


LIMITS = {"sm_90a": 232448, "sm_80": 166912}


def test_reads_registers_and_spills_from_ptxas_and_dots_from_the_ttgir():
    assert check.parse_ptxas(PTXAS_LOG) == (255, 248)
    assert check.count_dots(TTGIR) == (1, 1)  # the wait is not a dot


def test_counts_the_wgmma_dots_that_two_warp_groups_compute_alike():
    ttgir = """#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2]}>
    %a = ttng.warp_group_dot %k, %q, %c {isAsync = 1} : !memdesc<64x128> * !memdesc<128x32> -> tensor<64x32xf32, #mma>
    %b = ttng.warp_group_dot %p, %x, %d {isAsync = true} : tensor<64x32> * !memdesc<32x128> -> tensor<64x128xf32, #mma1>
"""
    assert check.replicated_dots(ttgir) == 1  # 8 warps cover 128 rows of a 64-row tile; [4, 2] covers 64


def test_a_clean_row_passes_and_each_rule_fails_its_row():
    assert check.judge(row(), LIMITS).problems == []
    assert check.judge(row(shared=232449, estimate=240000), LIMITS).problems == ["shared memory 232449 B > 232448 B"]
    assert check.judge(row(target="sm_80", shared=170000, estimate=180000, wgmma=0, mma=4), LIMITS).problems == [
        "shared memory 170000 B > 166912 B"
    ]
    assert check.judge(row(estimate=60000), LIMITS).problems == ["estimate 60000 B < 65536 B allocated"]
    assert check.judge(row(spills=8), LIMITS).problems == ["8 B of register spills"]
    assert check.judge(row(wgmma=3, mma=1), LIMITS).problems == ["1 dots not on wgmma"]
    assert check.judge(row(target="sm_80", wgmma=0, mma=4), LIMITS).problems == []  # mma.sync is Ampere's
    assert check.judge(row(error="PTXASError: out of registers"), LIMITS).problems == ["PTXASError: out of registers"]


def test_a_spill_passes_only_where_the_allow_list_justifies_it_and_within_its_bytes():
    (program, shape, target, d), (allowance, why) = next(iter(check.ALLOWED_SPILLS.items()))
    allowed = check.judge(row(program=program, shape=shape, target=target, d=d, spills=allowance), LIMITS)
    assert allowed.problems == [] and allowed.allowed == why and why
    over = check.judge(row(program=program, shape=shape, target=target, d=d, spills=allowance + 4), LIMITS)
    assert over.problems == [f"{allowance + 4} B of register spills"]
    assert "allowed spill" not in check.table([over]) and "spill allowed" in check.table([allowed])


def test_every_program_and_shape_is_compiled_for_both_targets_head_sizes_and_dtypes():
    work = check.jobs(list(check.VARIANTS), [64, 128], ["bf16", "fp16"], list(check.TARGETS))
    from lm.kernels.twicing_jit import SHAPES

    expected = sum(len(SHAPES[kernel][d]) for kernel, _ in check.VARIANTS.values() for d in (64, 128)) * 2 * 2
    assert len(work) == len(set(work)) == expected
    assert {j[2] for j in work} == {"sm_90a", "sm_80"} and {j[0] for j in work} == set(check.VARIANTS)


@pytest.mark.parametrize("limit, status", [(0, 0), (1000, 1)], ids=["real limits", "a forced 1000 B limit"])
def test_one_real_compile_is_tabled_and_an_overflow_fails_the_check(limit, status):
    pytest.importorskip("triton")  # the compile needs Triton's compiler and its ptxas, not a GPU
    command = [sys.executable, str(SCRIPT), "--any-triton", "--programs", "_pass1_fwd", "--dims", "64"]
    command += ["--dtypes", "bf16", "--targets", "sm_90a", "--max-shapes", "1", "--jobs", "1"]
    command += ["--shared-limit", str(limit)] if limit else []
    result = subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=120)
    assert result.returncode == status, result.stdout + result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("| _pass1_fwd")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:5] == ["sm_90a", "64", "bf16"] and int(cells[5]) > 0 and int(cells[7]) > 0  # shared, registers
    assert cells[9:12] == ["4", "0", "0"]  # all four dots of pass 1 on wgmma, none computed twice
    assert ("shared memory" in cells[12]) == bool(limit)
