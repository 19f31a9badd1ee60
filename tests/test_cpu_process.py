"""A training process on the CPU is set up to step as fast as a plain PyTorch process, or faster.

Each check runs in a fresh interpreter: thread settings and malloc's thresholds are process-wide.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import cpu_env

# MKL's dynamic threading, read through the MKL service function libtorch_cpu exports.
MKL_DYNAMIC = """
import ctypes, os, torch
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
def mkl_dynamic():
    return lib.mkl_serv_get_dynamic() if hasattr(lib, "mkl_serv_get_dynamic") else None
"""

# Bytes glibc holds in mmapped blocks (mallinfo2's hblkhd), while a 4 MiB tensor is alive.
MMAPPED = """
import ctypes, torch
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
def mmapped_by_a_4_mib_tensor():
    before = libc.mallinfo2().hblkhd
    block = torch.ones(2**20)
    return libc.mallinfo2().hblkhd - before
"""


def run_python(code: str, **env_changes: str | None) -> dict:
    env = cpu_env()
    for name, value in env_changes.items():
        env.pop(name, None) if value is None else env.__setitem__(name, value)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_lone_cpu_rank_keeps_torchs_thread_count_and_mkls_dynamic_threading():
    # torch.set_num_threads turns MKL's dynamic threading off even when the count does not change,
    # and small GEMMs then run on every thread: the demo stepped 8% slower than a plain process.
    code = (
        MKL_DYNAMIC
        + """
import json
from lm.distributed import close_distributed, init_distributed
before = (torch.get_num_threads(), mkl_dynamic())
init_distributed()
print(json.dumps({"before": before, "after": (torch.get_num_threads(), mkl_dynamic())}))
close_distributed()
"""
    )
    seen = run_python(code, OMP_NUM_THREADS=None)
    if seen["before"][1] is None:
        pytest.skip("this torch build has no MKL")
    assert seen["after"] == seen["before"] and seen["after"][1] == 1


def test_holding_the_heap_serves_activation_sized_blocks_from_reused_pages():
    seen = run_python(
        MMAPPED
        + """
import json
from lm.host_heap import hold_heap
default = mmapped_by_a_4_mib_tensor()
held = hold_heap()
print(json.dumps({"default": default, "held": held, "after": mmapped_by_a_4_mib_tensor()}))
"""
    )
    assert seen["default"] >= 4 * 2**20  # glibc's default: a fresh mapping, zero-filled again on every use
    assert seen["held"] is True and seen["after"] == 0  # the heap's own pages, kept from step to step


@pytest.mark.parametrize("setting", ["MALLOC_TRIM_THRESHOLD_=0", "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536"])
def test_a_users_own_malloc_settings_are_left_alone(setting):
    # Memory measurements set them so that RSS follows the live tensors (benchmarks/memory.py).
    name, value = setting.split("=", 1)
    code = (
        MMAPPED
        + """
import json
from lm.host_heap import hold_heap
print(json.dumps({"held": hold_heap(), "mmapped": mmapped_by_a_4_mib_tensor()}))
"""
    )
    seen = run_python(code, **{name: value})
    assert seen["held"] is False and seen["mmapped"] >= 4 * 2**20
