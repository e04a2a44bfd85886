"""The results file of ``amortune run``: JSON lines or one ``.npy`` array, written whole."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ._errors import UsageError, _Reported

OUT_FORMATS = (".jsonl", ".json", ".npy")


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
