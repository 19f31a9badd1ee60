"""The one exception type a user can cause, and how the command line reports it."""

import sys
from pathlib import Path

from core.ranks import is_rank_zero


class UserError(Exception):
    """A problem in what the user gave us (config, paths, data, checkpoints, arguments).

    Raised anywhere in the project; the `lm` command line prints its message as one line
    (`error: ...`) and exits with status 2, instead of a traceback.
    """


def run_command(main, argv=None) -> int:
    """Run a command's `main(argv)`, turning a UserError into one `error: ...` line and exit 2.

    Under several processes every rank meets the same error; only rank 0 reports it.
    """
    try:
        return main(argv) or 0
    except UserError as exc:
        if is_rank_zero():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130


def refuse_non_empty(path, option: str = "--out") -> None:
    """Outputs go to new or empty directories only: nothing a user has is ever overwritten."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"output directory {path} is not empty; choose another {option}")
