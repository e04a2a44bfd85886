"""Command-line errors: bad input (exit status 2), failed runs (1), the user's traceback."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

#: Exit status for bad input (a missing module or file, malformed data, bad options), as argparse.
EXIT_USAGE = 2
_ITEM_NOTE = re.compile(r"amortune: raised while processing item (\d+)")


class UsageError(Exception):
    """Bad input from the command line: printed as one ``amortune: ...`` line, exit status 2."""


class _Reported(UsageError):
    """A failure of the run (not of the command line): one line, exit status 1."""


@contextlib.contextmanager
def _user_errors(spec: str) -> Iterator[None]:
    """Turn what the run raises into a readable message: the function's own traceback, or one
    line for amortune's errors (a crashed worker, a checkpoint of another run, a full disk)."""
    from amortune import AmortuneError

    try:
        yield
    except (KeyboardInterrupt, UsageError):
        raise
    except Exception as exc:
        match = next((m for note in getattr(exc, "__notes__", ()) if (
            m := _ITEM_NOTE.search(str(note)))), None)
        if match is not None:
            _print_user_traceback(exc)
            raise _Reported(f"{spec} raised {type(exc).__name__} on item {match.group(1)}: "
                            f"{exc}") from None
        if isinstance(exc, AmortuneError):
            from amortune._checkpoint import CheckpointError

            if isinstance(exc, CheckpointError):
                raise UsageError(str(exc)) from None
            raise _Reported(str(exc)) from None
        raise


def _print_user_traceback(exc: BaseException) -> None:
    """The traceback with amortune's own frames left out: what remains is the user's code."""
    package = str(Path(__file__).resolve().parents[1]) + os.sep
    text = "".join(traceback.format_exception(exc))
    out: list[str] = []
    skipping = False
    for line in text.splitlines(keepends=True):
        frame = re.match(r'\s*File "([^"]+)", line \d+', line)
        if frame is not None:
            name = frame.group(1)
            skipping = name.startswith(package) or name.startswith("<frozen importlib")
            if skipping:
                continue
        elif skipping and line.startswith("    "):
            continue  # the source line and markers of a skipped frame
        else:
            skipping = False
        out.append(line)
    sys.stderr.write("".join(out))
    sys.stderr.flush()
