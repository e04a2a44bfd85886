"""The command's input: the function named ``MODULE:FUNC`` and the items to map it over."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from ._errors import UsageError, _print_user_traceback

DATA_FORMATS = (".jsonl", ".json", ".txt", ".npy")


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
