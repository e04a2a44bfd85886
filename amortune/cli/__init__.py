"""The ``amortune`` command (also ``python -m amortune``): plan, run, demo, bench.

The only part of amortune that prints. Argument parsing, reading and writing files, and
presentation; the work is the library's. Heavy modules (numpy, the engine) are imported only by
the commands that need them, so ``amortune --help`` and ``--version`` start fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from ._commands import _optimize, _run
from ._demo import bench, demo
from ._errors import EXIT_USAGE, UsageError, _Reported
from ._parser import _parser
from ._reporting import _as_report as _as_report
from ._reporting import _events_from_items as _events_from_items

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``amortune`` and ``python -m amortune``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return demo()
        if args.command == "bench":
            return bench(quick=args.quick, builtin=args.builtin)
        if args.command in ("optimize", "profile"):
            return _optimize(args)
        return _run(args)
    except _Reported as exc:
        _fail(str(exc))
        return 1
    except UsageError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except BrokenPipeError:  # `amortune optimize ... | head`: the reader left, nothing to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 1


def _fail(message: str) -> None:
    print(f"amortune: {message}", file=sys.stderr, flush=True)
