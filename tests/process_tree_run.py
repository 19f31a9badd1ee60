"""A stand-in launcher and its rank, for launch.processes' tests (no torch, starts in milliseconds).

    python tests/process_tree_run.py launcher THEN RANK_KIND DIR
    python tests/process_tree_run.py rank RANK_KIND DIR          (started by the launcher, LOCAL_RANK=0)

The launcher starts one rank and waits for DIR/ready, then does THEN: `die` (SIGKILL itself, as a
user's kill -9 of the runner) or `signal-parent` (SIGTERM the process that started it, as a user
would the top process); after that it waits for its rank and exits with its status. RANK_KIND:
`saves` (on SIGTERM it writes DIR/stopped-by-SIGTERM and exits 0) or `ignores` (SIGTERM does
nothing to it). A signal the launcher itself gets kills it: it has no handler.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def rank(kind: str, out: Path) -> None:
    def stopped(signum, frame):
        (out / f"stopped-by-{signal.Signals(signum).name}").write_text(str(os.getpid()))
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stopped if kind == "saves" else signal.SIG_IGN)
    (out / "ready").write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)


def launcher(then: str, kind: str, out: Path) -> None:
    child = subprocess.Popen([sys.executable, __file__, "rank", kind, str(out)], env={**os.environ, "LOCAL_RANK": "0"})
    while not (out / "ready").exists():
        time.sleep(0.02)
    if then == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    os.kill(os.getppid(), signal.SIGTERM)
    raise SystemExit(child.wait())


if __name__ == "__main__":
    if sys.argv[1] == "rank":
        rank(sys.argv[2], Path(sys.argv[3]))
    else:
        launcher(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
