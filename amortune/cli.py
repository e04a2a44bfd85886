"""The ``amortune`` command (also ``python -m amortune``): plan, run, demo, bench.

The only module that prints. Argument parsing, reading and writing files, and presentation;
the work is the library's. Heavy modules (numpy, the engine) are imported only by the commands
that need them, so ``amortune --help`` and ``--version`` start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import multiprocessing
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

__all__ = ["main"]

#: Exit status for bad input (a missing module or file, malformed data, bad options), as argparse.
EXIT_USAGE = 2
DATA_FORMATS = (".jsonl", ".json", ".txt", ".npy")
OUT_FORMATS = (".jsonl", ".json", ".npy")
REPORT_FORMATS = (".html", ".htm", ".png", ".txt")
_ITEM_NOTE = re.compile(r"amortune: raised while processing item (\d+)")


class UsageError(Exception):
    """Bad input from the command line: printed as one ``amortune: ...`` line, exit status 2."""


# -- argument parsing ------------------------------------------------------------------------
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


# -- entry point -----------------------------------------------------------------------------
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


def _optimize(args: argparse.Namespace) -> int:
    func, spec = _load(args.function)
    data = _input(args)
    import amortune

    with _user_errors(spec):
        plan = amortune.optimize(func, data, n_jobs=args.n_jobs, executor=args.executor)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.explain(), flush=True)
    return 0


# -- loading the function --------------------------------------------------------------------
def _load(spec: str) -> tuple[Callable[[Any], Any], str]:
    """``MODULE:FUNC`` (or ``path/to/file.py:FUNC``) -> the function, the current folder first."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise UsageError(f"expected MODULE:FUNC (for example mywork:score), got {spec!r}")
    cwd = os.getcwd()
    if not sys.path or sys.path[0] != cwd:
        sys.path.insert(0, cwd)
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise UsageError(f"no such file: {module}")
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module = path.stem
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            raise UsageError(f"no module named {missing!r} (looked in the current folder, "
                             f"{cwd}, and on the Python path)") from None
        raise UsageError(f"cannot import {module}: {exc}") from None
    except SyntaxError as exc:
        where = f" ({exc.filename}, line {exc.lineno})" if exc.filename else ""
        raise UsageError(f"cannot import {module}: {exc.msg}{where}") from None
    except Exception as exc:
        _print_user_traceback(exc)
        raise UsageError(f"importing {module} raised {type(exc).__name__}: {exc}") from None
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = module if i == 0 else f"{module}:{'.'.join(attr.split('.')[:i])}"
            raise UsageError(f"{owner} has no attribute {part!r}{_did_you_mean(obj, part)}"
                             ) from None
    if not callable(obj):
        raise UsageError(f"{spec} is a {type(obj).__name__}, not a function")
    return obj, spec


def _did_you_mean(obj: Any, name: str) -> str:
    import difflib

    names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# -- reading the input -----------------------------------------------------------------------
class DataFile:
    """The items of a data file, read lazily each time it is iterated; ``len`` is known.

    The file is checked once when opened (every JSON line parsed, so a malformed line is
    reported before anything runs); iterating reads it again, so only the batch in flight is
    held in memory.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.suffix = Path(path).suffix.lower()
        if Path(path).is_dir():
            raise UsageError(f"{path} is a folder, not a data file")
        if self.suffix not in DATA_FORMATS:
            raise UsageError(f"cannot tell the format of {path} from its name; --data takes "
                             f"{', '.join(DATA_FORMATS)} files")
        _check_readable(path)
        self._items: list[Any] | None = None  # a .json file holding one array
        self._array: Any = None
        if self.suffix == ".npy":
            self._array = _open_npy(path)
            self.n = int(self._array.shape[0])
        else:
            self.n = self._scan()
        if self.n == 0:
            raise UsageError(f"{path} holds no items (it is empty or has only blank lines)")

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        if self._items is not None:
            return iter(self._items)
        if self._array is not None:
            return self._rows()
        return self._values()

    def _rows(self) -> Iterator[Any]:
        import numpy as np

        arr = self._array
        for i in range(arr.shape[0]):
            row = arr[i]
            # A private copy, not a view of the mapped file: it pickles as a plain array.
            yield np.array(row) if isinstance(row, np.ndarray) else row

    def _lines(self) -> Iterator[tuple[int, str]]:
        with _open_text(self.path) as f:
            for number, line in enumerate(f, start=1):
                text = line.rstrip("\r\n")
                if text.strip():
                    yield number, text

    def _values(self) -> Iterator[Any]:
        if self.suffix == ".txt":
            for _, text in self._lines():
                yield text
            return
        for _, text in self._lines():
            yield json.loads(text)

    def _scan(self) -> int:
        try:
            if self.suffix == ".txt":
                return sum(1 for _ in self._lines())
            if self.suffix == ".json":
                whole = self._whole_document()
                if whole is not None:
                    return whole
            count = 0
            for number, text in self._lines():
                try:
                    json.loads(text)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{self.path}, line {number}: not valid JSON ({exc.msg} at "
                                     f"column {exc.colno}); --data expects one JSON value per "
                                     "line") from None
                count += 1
            return count
        except UnicodeDecodeError as exc:
            raise UsageError(f"{self.path} is not UTF-8 text (byte {exc.start} cannot be "
                             "decoded)") from None
        except OSError as exc:
            raise UsageError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def _whole_document(self) -> int | None:
        with _open_text(self.path) as f:
            text = f.read()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            return None  # not one document: read it as JSON lines
        if isinstance(doc, list):
            self._items = doc
            return len(doc)
        if len(text.strip().splitlines()) > 1:
            raise UsageError(f"{self.path} holds one JSON {type(doc).__name__}; --data needs a "
                             "JSON array, or one JSON value per line")
        return None  # a single line: one item


def _open_text(path: str) -> IO[str]:
    return open(path, encoding="utf-8-sig", newline="")


def _check_readable(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{path} is a folder, not a data file")
    if not p.exists():
        raise UsageError(f"data file not found: {path}")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except PermissionError:
        raise UsageError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _open_npy(path: str) -> Any:
    import numpy as np

    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(f"{path} is not a readable .npy array: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise UsageError(f"{path} is not a .npy array")
    if arr.ndim == 0:
        raise UsageError(f"{path} holds a single value, not rows of items")
    return arr


def _input(args: argparse.Namespace) -> Sequence[Any] | DataFile:
    if args.data is not None:
        return DataFile(args.data)
    n = args.range
    if n < 0:
        raise UsageError(f"--range must be a number of items (1 or more), got {n}")
    if n == 0:
        raise UsageError("--range 0 gives no items to map")
    return range(n)


# -- errors from the user's function ---------------------------------------------------------
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


class _Reported(UsageError):
    """A failure of the run (not of the command line): one line, exit status 1."""


def _print_user_traceback(exc: BaseException) -> None:
    """The traceback with amortune's own frames left out: what remains is the user's code."""
    package = str(Path(__file__).resolve().parent) + os.sep
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


# -- run -------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    func, spec = _load(args.function)
    out = _OutFile(args.out)
    report_path = _check_report_path(args.report) if args.report else None
    data = _input(args)
    import amortune

    batched = args.spill or args.checkpoint is not None
    kwargs: dict[str, Any] = {"n_jobs": args.n_jobs, "executor": args.executor,
                              "progress": bool(args.progress)}
    if batched:
        call: Callable[..., Any] = amortune.process_in_batches
        kwargs.update(spill="disk" if args.spill else None, checkpoint=args.checkpoint)
    else:
        call = amortune.execute
    results: Any = None
    try:
        t0 = time.perf_counter()
        with _user_errors(spec):
            if report_path is None:
                results, report = call(func, data, **kwargs), None
            else:
                results, report = _run_with_report(call, func, data, kwargs,
                                                   checkpoint=args.checkpoint is not None)
        seconds = time.perf_counter() - t0
        out.write(results)
    except BaseException:
        out.discard()
        raise
    finally:
        close = getattr(results, "close", None)
        if callable(close):
            close()  # spilled results: remove their folder now
    print(f"wrote {len(out)} results to {args.out} in {seconds:.2f} s", flush=True)
    if report is not None and report_path is not None:
        _write_report(report, report_path)
        print(f"report: {report_path}", flush=True)
    return 0


class _OutFile:
    """The output, written to a temporary file beside it and renamed once complete."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.path.is_dir():
            raise UsageError(f"--out {path} is a folder; give a file name")
        if self.suffix not in OUT_FORMATS:
            raise UsageError(f"--out must end in {', '.join(OUT_FORMATS)}, got {path}")
        folder = self.path.resolve().parent
        if not folder.is_dir():
            raise UsageError(f"cannot write {path}: folder {folder} does not exist")
        self.tmp = folder / f".{self.path.name}.{os.getpid()}.tmp"
        try:  # fail now, not after the run, when the folder is not writable
            self.tmp.touch()
            self.tmp.unlink()
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def write(self, results: Sequence[Any]) -> None:
        if self.suffix == ".npy":
            self.count = _write_npy(self.tmp, results)
        else:
            self.count = _write_json_lines(self.tmp, results)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def _json_default(obj: Any) -> Any:
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    raise TypeError(type(obj).__name__)


def _write_json_lines(path: Path, results: Iterable[Any]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for n, value in enumerate(results, start=1):
            try:
                line = json.dumps(value, default=_json_default, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise _Reported(f"result {n - 1} cannot be written as JSON (a {exc} value); "
                                "return numbers, strings, lists, dicts or numpy arrays, or "
                                "write .npy") from None
            f.write(line + "\n")
    return n


def _write_npy(path: Path, results: Sequence[Any]) -> int:
    import numpy as np

    n = len(results)
    shape: tuple[int, ...] | None = None
    dtypes: list[Any] = []
    for i, value in enumerate(results):  # first pass: one shape, a common dtype
        arr = np.asarray(value)
        if arr.dtype == object:
            raise _Reported(f"result {i} is a {type(value).__name__}, which .npy cannot hold; "
                            "write .jsonl instead")
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise _Reported(f"result {i} has shape {arr.shape}, result 0 has {shape}: .npy "
                            "needs one shape for all results; write .jsonl instead")
        if not dtypes or arr.dtype != dtypes[-1]:
            dtypes.append(arr.dtype)
    dtype = np.result_type(*dtypes) if dtypes else np.dtype(float)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, *(shape or ())))
    try:
        for i, value in enumerate(results):
            out[i] = value
        out.flush()
    finally:
        del out
    return n


# -- run reports -----------------------------------------------------------------------------
def _check_report_path(path: str) -> str:
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in REPORT_FORMATS:
        raise UsageError(f"--report must end in {', '.join(REPORT_FORMATS)}, got {path}")
    if p.is_dir():
        raise UsageError(f"--report {path} is a folder; give a file name")
    if not p.resolve().parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {p.resolve().parent} does not exist")
    if suffix == ".png":
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("a .png report needs matplotlib: pip install 'amortune[plot]' "
                             "(or write --report run.html, which needs nothing)")
    return path


def _write_report(report: Any, path: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix in (".html", ".htm"):
        report.to_html(path)
    elif suffix == ".png":
        report.to_png(path)
    else:
        Path(path).write_text(report.explain() + "\n", encoding="utf-8")


def _run_with_report(call: Callable[..., Any], func: Callable[[Any], Any], data: Any,
                     kwargs: dict[str, Any], *, checkpoint: bool) -> tuple[Any, Any]:
    """Run and collect a :class:`~amortune._report.RunReport`.

    The engine's own record is used when it keeps one (``amortune.report()`` as a context
    manager, or ``report=True`` with ``amortune.last_report()``). Otherwise this command records
    when and where each item ran, and rebuilds the chunks from that.
    """
    import amortune
    from amortune._report import RunReport

    engine_cm = getattr(amortune, "report", None)
    last = getattr(amortune, "last_report", None)
    if callable(engine_cm):
        with engine_cm() as rep:
            results = call(func, data, **kwargs)
        return results, _as_report(rep)
    if callable(last):
        if _accepts(call, "report"):
            kwargs = {**kwargs, "report": True}
        results = call(func, data, **kwargs)
        return results, _as_report(last())

    from amortune._stats import RunStats

    stats = RunStats()
    sampler = _MemorySampler(stats)
    kwargs = {**kwargs, "progress_callback": sampler}
    if checkpoint:
        # Wrapping the function would change its fingerprint, and a resumed run would refuse
        # the checkpoint: record the run's length and memory only.
        with sampler:
            stats.started_at = time.perf_counter()
            results = call(func, data, **kwargs)
            stats.finished_at = time.perf_counter()
        stats.items = len(results) if hasattr(results, "__len__") else 0
        note = "per-chunk events are not recorded for a run with --checkpoint"
        return results, RunReport(stats, None, notes=(note,))
    timed = _Timed(func)
    with sampler:
        stats.started_at = time.perf_counter()
        wrapped = call(timed, data, **kwargs)
        stats.finished_at = time.perf_counter()
    _events_from_items(stats, wrapped)
    note = ("recorded by the command line from the time and place of each item: a chunk here is "
            "a run of items one worker ran back to back; dispatch times and worker start-up are "
            "not recorded")
    return _Unwrapped(wrapped), RunReport(stats, None, notes=(note,))


def _accepts(call: Callable[..., Any], name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False


def _as_report(obj: Any) -> Any:
    from amortune._report import RunReport, build_report
    from amortune._stats import RunStats

    if isinstance(obj, RunReport):
        return obj
    if isinstance(obj, RunStats):
        return build_report(obj, None)
    stats = getattr(obj, "stats", None)
    if isinstance(stats, RunStats):
        return build_report(stats, getattr(obj, "plan", None))
    return build_report(RunStats(), None)


class _Timed:
    """``func`` returning ``(result, started, finished, cpu, pid, thread)`` for each item."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func

    def __call__(self, item: Any) -> tuple[Any, float, float, float, int, int]:
        c0 = time.thread_time()
        t0 = time.perf_counter()
        value = self.func(item)
        t1 = time.perf_counter()
        return value, t0, t1, time.thread_time() - c0, os.getpid(), threading.get_ident()


class _Unwrapped(Sequence[Any]):
    """The results of a timed run, without the timings (lazily, for spilled results)."""

    def __init__(self, wrapped: Sequence[Any]) -> None:
        self.wrapped = wrapped

    def __len__(self) -> int:
        return len(self.wrapped)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [r[0] for r in self.wrapped[i]]
        return self.wrapped[i][0]

    def __iter__(self) -> Iterator[Any]:
        return (r[0] for r in self.wrapped)

    def close(self) -> None:
        close = getattr(self.wrapped, "close", None)
        if callable(close):
            close()


#: Items of one worker that ran closer together than this count as one chunk. A rebuilt chunk is
#: a run of back-to-back items: a worker handed the next chunk before it finished the last one
#: starts it within microseconds, so adjacent chunks of one worker may merge.
_SAME_CHUNK_GAP = 1e-3


def _events_from_items(stats: Any, wrapped: Iterable[Any]) -> None:
    from amortune._stats import ChunkEvent

    me, main_thread = os.getpid(), threading.main_thread().ident
    slots: dict[tuple[int, int], int] = {}
    events: list[ChunkEvent] = []
    run: list[Any] = []

    def flush() -> None:
        if not run:
            return
        _, t0, _, _, pid, tid = run[0]
        caller = pid == me and tid == main_thread
        if caller:
            slot, backend = 0, "serial"
        else:
            slot = slots.setdefault((pid, tid), len(slots))
            backend = "processes" if pid != me else "threads"
        start = len_before[0]
        events.append(ChunkEvent(
            start_index=start, n_items=len(run), slot=slot, backend=backend, submitted=0.0,
            received=run[-1][2], started=t0, finished=run[-1][2],
            wall_seconds=sum(r[2] - r[1] for r in run), cpu_seconds=sum(r[3] for r in run)))
        stats.chunk_sizes.append((t0, len(run)))
        len_before[0] += len(run)
        run.clear()

    len_before = [0]
    for r in wrapped:
        if run and ((r[4], r[5]) != (run[-1][4], run[-1][5]) or
                    r[1] - run[-1][2] > _SAME_CHUNK_GAP):
            flush()
        run.append(r)
    flush()
    stats.events = events
    stats.chunks = len(events)
    stats.items = len_before[0]
    stats.caller_item_seconds = sum(e.wall_seconds for e in events if e.backend == "serial")
    stats.chunk_sizes.sort()


class _MemorySampler:
    """Records the caller's resident memory at the start, at each progress step and at the end.

    It rides on ``progress_callback`` (called in the caller's thread after each chunk) instead
    of a thread of its own: a second thread would change how workers start (amortune forks the
    first workers only from a single-threaded process) and so change the run being reported.
    """

    MAX_SAMPLES = 5000

    def __init__(self, stats: Any) -> None:
        import psutil

        self.stats = stats
        self.proc = psutil.Process()

    def sample(self) -> None:
        samples = self.stats.memory
        with contextlib.suppress(Exception):
            samples.append((time.perf_counter(), int(self.proc.memory_info().rss)))
        if len(samples) >= self.MAX_SAMPLES:
            del samples[1:-1:2]

    def __call__(self, phase: str, fraction: float) -> None:
        self.sample()

    def __enter__(self) -> _MemorySampler:
        self.sample()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()


# -- demo and bench --------------------------------------------------------------------------
# Module-level, so worker processes import them by reference.
def tiny(x: int) -> int:
    """A 0.1 µs item: no pool can beat a plain loop here."""
    return x * x


def cpu_2ms(x: int) -> int:
    """About 2 ms of pure-Python arithmetic (a CPU-bound item)."""
    total = 0
    for i in range(55_000):
        total += (i * x) % 7
    return total


def sleepy(x: float) -> float:
    """Waits 5 ms, like a network or disk call (an I/O-bound item)."""
    time.sleep(0.005)
    return x


def skewed(x: int) -> int:
    """Cost grows with the index: the last items are ~10x the first (0.3 to 3 ms)."""
    n = 10_000 + 250 * x
    return sum(i % 3 for i in range(n))


def _loop(func: Callable[[Any], Any], data: Sequence[Any]) -> list[Any]:
    return list(map(func, data))


def _time(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _pool_context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else None)


def _compare(workloads: Sequence[tuple[str, Callable[[Any], Any], Sequence[Any]]],
             out: Any, *, plans: bool, repeats: int | None = None) -> int:
    """Time a loop, ``multiprocessing.Pool.map`` (pool creation included) and amortune."""
    import amortune

    print(amortune.probe_system().describe(), file=out)
    print(file=out)
    rows = []
    for name, func, data in workloads:
        plan = amortune.optimize(func, data)
        if plans:
            print(f"== {name}", file=out)
            print(plan.explain(), file=out)
            print(file=out)
        t_loop, expected = _time(functools.partial(_loop, func, data))
        reps = repeats if repeats is not None else (3 if t_loop < 0.5 else 1)
        if reps > 1:  # best of several where one run is too short to trust
            t_loop = min(t_loop, _time(functools.partial(_loop, func, data), reps - 1)[0])

        def with_pool(func: Callable[[Any], Any] = func, data: Sequence[Any] = data) -> Any:
            with _pool_context().Pool() as pool:
                return pool.map(func, data)

        t_pool, got_pool = _time(with_pool, reps)
        t_am, got = _time(functools.partial(amortune.execute, func, data), reps)
        ok = got == expected and got_pool == expected
        rows.append((name, t_loop, t_pool, t_am, plan, ok))
        out.flush()
    print(f"{'workload':28} {'loop':>8} {'Pool.map':>9} {'amortune':>9} {'vs loop':>8} "
          f"{'predicted':>9}  correct", file=out)
    for name, t_loop, t_pool, t_am, plan, ok in rows:
        print(f"{name:28} {t_loop:7.3f}s {t_pool:8.3f}s {t_am:8.3f}s {t_loop / t_am:7.2f}x "
              f"{plan.estimated_speedup:8.2f}x  {'yes' if ok else 'NO'}", file=out)
    print("\nvs loop: the loop's time over amortune's (above 1 is faster); Pool.map includes "
          "starting the pool, as a script pays it.", file=out)
    return 0 if all(r[-1] for r in rows) else 1


def demo(out: Any = sys.stdout) -> int:
    """Optimize and run built-in workloads; show each plan beside a plain loop and Pool.map."""
    return _compare([
        ("tiny x*x, 200k items", tiny, range(200_000)),
        ("2 ms CPU items x 600", cpu_2ms, range(600)),
        ("5 ms sleep items x 300", sleepy, [0.0] * 300),
        ("rising cost x 400", skewed, range(400)),
    ], out, plans=True)


def _source_benchmark() -> Path | None:
    """``benchmarks/run.py`` when amortune runs from a source checkout."""
    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "run.py"
    return script if script.is_file() and (root / "pyproject.toml").is_file() else None


def bench(*, quick: bool = False, builtin: bool = False, out: Any = sys.stdout) -> int:
    """``benchmarks/run.py`` in a source checkout, else a built-in comparison."""
    script = None if builtin else _source_benchmark()
    if script is not None:
        import subprocess

        cmd = [sys.executable, str(script), *(["--quick"] if quick else [])]
        print(f"running {script}{' --quick' if quick else ''}", file=sys.stderr, flush=True)
        return subprocess.call(cmd, cwd=script.parent.parent)
    scale = 4 if quick else 1
    return _compare([
        (f"tiny x*x, {200_000 // scale // 1000}k items", tiny, range(200_000 // scale)),
        (f"2 ms CPU items x {600 // scale}", cpu_2ms, range(600 // scale)),
        (f"5 ms sleep items x {300 // scale}", sleepy, [0.0] * (300 // scale)),
        (f"rising cost x {400 // scale}", skewed, range(400 // scale)),
    ], out, plans=False, repeats=1 if quick else None)
