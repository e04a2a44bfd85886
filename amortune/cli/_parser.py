"""The command line's arguments: ``amortune``, its commands and their options."""

from __future__ import annotations

import argparse
import re
from typing import NoReturn

from ._errors import EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors in the ``amortune: ...`` form."""

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"argument COMMAND: invalid choice: '(.*?)'", message)
        if unknown is not None:
            message = (f"unknown command {unknown.group(1)!r}; the commands are optimize, run, "
                       "demo and bench")
        self.exit(EXIT_USAGE, f"amortune: {message} (see '{self.prog} --help')\n")


_DESCRIPTION = """\
amortune maps a Python function over data the fastest safe way this machine allows:
it measures the function on a few items, reads the machine, and picks serial, processes
or threads with n_jobs, chunksize and a memory-safe batch size."""

_EPILOG = """\
examples:
  amortune optimize mywork:score --range 10000
  amortune run mywork:score --data items.jsonl --out scores.jsonl --progress
  amortune run mywork:render --data ids.txt --out tiles.npy --spill --checkpoint run.ckpt
  amortune run mywork:score --data items.jsonl --out scores.jsonl --report run.html

MODULE:FUNC names a function in a module: mywork:score imports mywork.py from the
current folder (searched first) or from the Python path; path/to/mywork.py:score
names a file.
Run 'amortune COMMAND --help' for a command's options."""

_DATA_HELP = ("the items: a .jsonl (or .json) file with one JSON value per line (a .json file "
              "may also hold one JSON array), a .txt file with one string per line, or a .npy "
              "array (one item per row); blank lines are skipped")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_input(p: argparse.ArgumentParser, *, legacy: bool = False) -> None:
    p.add_argument("function", metavar="MODULE:FUNC", help="the function to map, e.g. mywork:score")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--range", type=int, metavar="N", help="map over the numbers 0 to N-1")
    src.add_argument("--data", metavar="FILE", help=_DATA_HELP)
    if legacy:  # the earlier spelling of --data, kept working
        src.add_argument("--json-lines", dest="data", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--n-jobs", type=_positive, metavar="N",
                   help="use exactly N workers instead of the measured choice")
    p.add_argument("--executor", choices=("serial", "processes", "threads"),
                   help="run this way instead of the measured choice")


def _parser() -> _Parser:
    import amortune

    parser = _Parser(prog="amortune", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"amortune {amortune.__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser, title="commands")

    plan_help = ("Measure FUNC on the first items (in this process, a few milliseconds at "
                 "most), read the machine, and print the plan: serial, processes or threads, "
                 "n_jobs, chunksize, batch_size, the predicted speedup and the reasons. Nothing "
                 "else runs.")
    opt = sub.add_parser("optimize", help="print the plan for MODULE:FUNC over the data",
                         description=plan_help)
    _add_input(opt)
    opt.add_argument("--json", action="store_true", help="print the plan as JSON, for programs")
    # The command's earlier name; not listed, still accepted.
    prof = sub.add_parser("profile", description=plan_help)
    _add_input(prof, legacy=True)
    prof.add_argument("--json", action="store_true", help="print the plan as JSON, for programs")

    run = sub.add_parser(
        "run", help="map MODULE:FUNC over a data file and write the results",
        description="Map FUNC over every item and write the results, in input order, to "
                    "--out: one JSON value per line (.jsonl or .json), or one array (.npy, "
                    "when every result is an array or number of one shape). The output file "
                    "appears only when the whole run succeeded.",
        epilog="With --spill or --checkpoint the run goes through process_in_batches: results "
               "are written to disk batch by batch within a memory budget, and with "
               "--checkpoint the same command after a crash resumes after the last finished "
               "batch.")
    _add_input(run)
    run.add_argument("--out", required=True, metavar="FILE",
                     help="where to write the results (.jsonl, .json or .npy)")
    run.add_argument("--spill", action="store_true",
                     help="keep results on disk while the run lasts, not in memory")
    run.add_argument("--checkpoint", metavar="PATH",
                     help="record finished batches in PATH (a folder); rerun to resume")
    run.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    run.add_argument("--report", metavar="FILE",
                     help="write a report of the run: a timeline page (.html), a picture "
                          "(.png, needs matplotlib) or text (.txt)")

    sub.add_parser("demo", help="plan and run built-in workloads beside a loop and Pool.map",
                   description="Plan and run four built-in workloads (tiny items, 2 ms CPU "
                               "items, 5 ms waits, rising costs); show each plan beside a plain "
                               "loop and multiprocessing.Pool, and check the results match.")
    bench = sub.add_parser(
        "bench", help="time amortune against a loop and multiprocessing.Pool",
        description="In a source checkout this runs benchmarks/run.py (amortune against a "
                    "loop, multiprocessing.Pool, ProcessPoolExecutor and joblib). Installed "
                    "without the benchmarks folder, it runs a built-in comparison against a "
                    "loop and multiprocessing.Pool.")
    bench.add_argument("--quick", action="store_true", help="smaller inputs and one repeat")
    bench.add_argument("--builtin", action="store_true",
                       help="run the built-in comparison even in a source checkout")
    return parser
