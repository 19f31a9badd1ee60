"""The throughput benchmark's rows take turns: one row's interval at a time, round-robin."""

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, benchmark_module

Turns = benchmark_module("turns").Turns

# A row: before each of its intervals it takes the next turn, then notes when the interval ran.
ROW = """
import sys, time
sys.path.insert(0, {repo!r})
from benchmarks.turns import Gate
gate, name, intervals, log = Gate.from_environment(), sys.argv[1], int(sys.argv[2]), sys.argv[3]
for i in range(intervals):
    gate.next_turn()
    start = time.monotonic(); time.sleep(0.02)
    with open(log, "a") as f:
        f.write(f"{{name}} {{i}} {{start}} {{time.monotonic()}}\\n")
    if name == "dies" and i == 1:
        sys.exit(3)
"""


def start_rows(tmp_path, turns: Turns, names: list[str], intervals: int) -> dict[str, subprocess.Popen]:
    script = tmp_path / "row.py"
    script.write_text(textwrap.dedent(ROW.format(repo=str(REPO))))
    log = tmp_path / "intervals.log"
    return {
        name: subprocess.Popen(
            [sys.executable, str(script), name, str(intervals), str(log)], env=turns.environment(name, 1)
        )
        for name in names
    }


def test_rows_run_one_interval_each_in_turn_never_two_at_once(tmp_path):
    turns = Turns(tmp_path / "turns", timeout=60)
    processes = start_rows(tmp_path, turns, ["a", "b", "c"], intervals=3)
    try:
        turns.run(processes, intervals=3)
    finally:
        turns.close()
    ran = [line.split() for line in (tmp_path / "intervals.log").read_text().splitlines()]
    assert [(name, int(i)) for name, i, _, _ in ran] == [(n, i) for i in range(3) for n in "abc"]
    spans = [(float(start), float(end)) for _, _, start, end in ran]
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_a_row_that_exits_before_its_turn_is_over_is_named(tmp_path):
    turns = Turns(tmp_path / "turns", timeout=60)
    processes = start_rows(tmp_path, turns, ["fine", "dies"], intervals=4)
    try:
        with pytest.raises(RuntimeError, match="row dies exited"):
            turns.run(processes, intervals=4)
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
        turns.close()
