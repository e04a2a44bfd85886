"""Checkpoints: resume a batch loop after a crash from a folder that survives SIGKILL.

Owns :class:`Checkpoint` (one folder: ``manifest.json``, plus the result segments of finished
batches in ``"list"`` mode or the running aggregate in ``"reduce"`` mode), the fingerprints that
tell whether a resumed run is the same run (:func:`function_fingerprint`, :func:`input_digest`) and
the checkpoint errors. Imports the standard library, :mod:`amortune._errors` and
:mod:`amortune._spill` (whose atomic writer it reuses); cloudpickle only inside functions.

Kill safety comes from the write order: a batch's data is written first, atomically and under a
name of its own, then the manifest is replaced atomically. The manifest therefore lists only
complete batches; a crash between the two leaves a file it does not list, deleted on the next open.

Files here are loaded with pickle, so a folder or file not owned by the current user, or writable
by group or others, is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import pickle
import re
import shutil
import stat
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from amortune._errors import AmortuneError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: concurrent runs are not detected
    fcntl = None  # type: ignore[assignment]
from ._spill import (
    SEGMENT_NAME_RE,
    Segment,
    SpilledResults,
    SpillStore,
    dump_pickle,
    make_private_dir,
    unlink_quietly,
    write_file_atomic,
    write_segment_file,
)

__all__ = [
    "BatchRecord",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointPermissionError",
    "describe_function",
    "function_fingerprint",
    "input_digest",
]

logger = logging.getLogger("amortune")

_MANIFEST = "manifest.json"
_LOCK = ".lock"
_VERSION = 1
_MODES = ("list", "reduce")
_AGGREGATE_RE = re.compile(r"aggregate-(\d{8,})\.pkl\Z")
# Names this module writes, with or without the ``.<hex>.tmp`` suffix of an unfinished write;
# only such files are ever deleted from a checkpoint folder.
_OURS_RE = re.compile(
    r"(seg-\d{8,}\.(?:npy|pkl)|aggregate-\d{8,}\.pkl|manifest\.json)(\.\w+\.tmp)?\Z"
)
_UNSET: Any = object()


class CheckpointError(AmortuneError):
    """A checkpoint folder cannot be used (damaged manifest, missing file, wrong mode of use)."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint was written by another function, mode or input than this call's."""


class CheckpointPermissionError(CheckpointError, PermissionError):
    """A checkpoint folder or file another user could alter; it is not loaded."""


@dataclasses.dataclass(frozen=True)
class BatchRecord:
    """A finished batch: input positions ``[start, stop)``, their digest, and its segment file."""

    seq: int
    start: int
    stop: int
    input_digest: str
    segment: str | None = None


def describe_function(func: Callable[..., Any]) -> str:
    """``module.qualname`` of a callable (of its class for a callable instance)."""
    target: Any = func.func if isinstance(func, functools.partial) else func
    if not hasattr(target, "__qualname__"):
        target = type(target)
    return f"{getattr(target, '__module__', None) or '?'}.{target.__qualname__}"


def function_fingerprint(func: Callable[..., Any]) -> str:
    """A sha256 that changes when the function's code changes, stable across processes.

    Hashes the module, qualified name and code (bytecode, names and constants, nested functions
    included; not line numbers). Closure values, defaults and the functions it calls are not
    covered. A ``functools.partial`` adds its arguments, and other callables without ``__code__``
    (callable instances, builtins) their class's ``__call__`` code and their pickled bytes.
    """
    h = hashlib.sha256(describe_function(func).encode())
    code = getattr(func, "__code__", None)
    if isinstance(code, types.CodeType):
        h.update(_code_digest(code).encode())
        return h.hexdigest()
    state: Any = func
    if isinstance(func, functools.partial):
        h.update(function_fingerprint(func.func).encode())
        state = (func.args, func.keywords)
    else:
        call_code = getattr(type(func).__call__, "__code__", None)
        if isinstance(call_code, types.CodeType):
            h.update(_code_digest(call_code).encode())
    try:
        h.update(_pickle_bytes(state))
    except Exception:  # still identified by its name and code
        logger.debug("amortune could not pickle %r for its fingerprint", state)
    return h.hexdigest()


def _code_digest(code: types.CodeType) -> str:
    parts = [code.co_code.hex(), repr(code.co_names), *map(_const_text, code.co_consts)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _const_text(const: object) -> str:
    if isinstance(const, types.CodeType):
        return f"code:{_code_digest(const)}"
    if isinstance(const, tuple):
        return f"tuple({','.join(map(_const_text, const))})"
    if isinstance(const, frozenset):  # iteration order depends on the per-process hash seed
        return f"frozenset({','.join(sorted(map(_const_text, const)))})"
    return f"{type(const).__name__}:{const!r}"


def _pickle_bytes(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        import cloudpickle

        return bytes(cloudpickle.dumps(obj, protocol=5))


def input_digest(items: Sequence[Any]) -> str:
    """A sha256 of the pickled items (cloudpickle for what pickle refuses).

    Each item is pickled on its own, so object sharing between items does not change the digest.
    Sets of strings pickle in a per-process order: an input holding them reads as changed.
    """
    h = hashlib.sha256()
    for item in items:
        try:
            data, tag = pickle.dumps(item, protocol=5), b"P"
        except Exception:
            data, tag = _pickle_bytes(item), b"C"
        h.update(b"%s%d:" % (tag, len(data)))
        h.update(data)
    return h.hexdigest()


def _check_private(path: pathlib.Path) -> None:
    """Refuse a file or folder another user owns or could write: its content is unpickled."""
    st = os.stat(path)
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    if st.st_uid != uid:
        problem = f"belongs to user id {st.st_uid}, not to the current user ({uid})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    else:
        return
    raise CheckpointPermissionError(
        f"checkpoint path {path} {problem}; checkpoints are loaded with pickle, so amortune "
        "refuses it: make it owner-only (chmod go-w) or use another path"
    )


class Checkpoint:
    """The finished batches of one run, in a folder, so a crashed run can resume.

    Made by :meth:`open`. ``"list"`` mode stores each batch's results as a segment file;
    ``"reduce"`` mode stores the running aggregate after each batch.
    """

    def __init__(self, path: pathlib.Path, fingerprint: str, mode: str, function_name: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.mode = mode
        self.function_name = function_name
        self._batches: list[BatchRecord] = []
        self._segments: dict[int, Segment] = {}
        self._aggregate_name: str | None = None
        self._closed = False
        self._unlock: Callable[[], object] = lambda: None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        fingerprint: str,
        mode: str,
        function_name: str = "",
    ) -> Checkpoint:
        """Create the checkpoint folder (mode 0700) or load its manifest.

        Raises :class:`CheckpointPermissionError` for a folder or file that is not private to
        the current user, :class:`CheckpointMismatchError` when the stored ``fingerprint`` or
        ``mode`` differ, and :class:`CheckpointError` for a damaged manifest. Files a crash left
        behind (unlisted segments or aggregates, ``*.tmp``) are deleted.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self = cls(pathlib.Path(path).absolute(), fingerprint, mode, function_name)
        make_private_dir(self.path)
        _check_private(self.path)
        self._lock()
        try:
            manifest = self.path / _MANIFEST
            if manifest.exists():
                _check_private(manifest)
                self._load(manifest)
            self._remove_unlisted()
            if not manifest.exists():  # mark the folder as this function's from the start
                self._write_manifest(self._batches, self._segments, None)
        except BaseException:
            self.close()
            raise
        return self

    def _lock(self) -> None:
        """Hold an ``flock`` on ``.lock`` while open: a second run would delete our new files."""
        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CheckpointError(
                f"checkpoint at {self.path} is in use by another run; wait for it to finish or "
                "use another path"
            ) from None
        self._unlock = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        """Release the folder for another run (also done when the object is collected)."""
        self._closed = True
        self._unlock()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def batches(self) -> list[BatchRecord]:
        """Finished batches, in order."""
        return list(self._batches)

    @property
    def next_start(self) -> int:
        """Input position to resume from: the stop of the last finished batch, 0 if none."""
        return self._batches[-1].stop if self._batches else 0

    def verify_batch(self, seq: int, start: int, stop: int, digest: str) -> None:
        """Check that finished batch ``seq`` saw the same input this run re-read for it."""
        if not 0 <= seq < len(self._batches):
            raise ValueError(f"batch {seq} is not recorded in the checkpoint at {self.path}")
        rec = self._batches[seq]
        if (rec.start, rec.stop) != (start, stop):
            raise CheckpointMismatchError(
                f"batch {seq} held items {rec.start}-{rec.stop - 1} in the checkpoint at "
                f"{self.path}, but {start}-{stop - 1} in this run; resume with the recorded "
                "batch boundaries, use another path or delete it"
            )
        if rec.input_digest != digest:
            raise CheckpointMismatchError(
                f"the input changed since the checkpoint at {self.path} was written: batch {seq} "
                f"(items {start}-{stop - 1}) differs; use another path or delete it"
            )

    def record_batch(
        self,
        seq: int,
        start: int,
        stop: int,
        digest: str,
        *,
        results: Sequence[Any] | None = None,
        aggregate: Any = _UNSET,
    ) -> None:
        """Store a finished batch (its ``results``, or the ``aggregate`` so far), then list it.

        The data file is written atomically first and the manifest atomically after it, so a
        crash at any moment leaves a manifest that lists only complete batches.
        """
        if self._closed:
            raise ValueError(f"the checkpoint at {self.path} is closed")
        if seq != len(self._batches) or start != self.next_start or stop < start:
            raise ValueError(
                f"batch {seq} [{start}, {stop}) does not follow the checkpoint at {self.path}, "
                f"which expects batch {len(self._batches)} starting at {self.next_start}"
            )
        segments = dict(self._segments)
        aggregate_name = self._aggregate_name
        if self.mode == "list":
            if results is None or aggregate is not _UNSET:
                raise TypeError("a 'list' mode checkpoint records results=..., not aggregate=")
            segments[seq] = write_segment_file(self.path, seq, results)
            segment_name: str | None = segments[seq].name
        else:
            if aggregate is _UNSET or results is not None:
                raise TypeError("a 'reduce' mode checkpoint records aggregate=..., not results=")
            aggregate_name, segment_name = f"aggregate-{seq:08d}.pkl", None
            what = f"the aggregate after batch {seq}"
            write_file_atomic(self.path, aggregate_name, lambda s: dump_pickle(s, aggregate, what))
        batches = [*self._batches, BatchRecord(seq, start, stop, digest, segment_name)]
        # On failure the new file stays unlisted (and is deleted at the next open): deleting it
        # here would be wrong if the manifest rename succeeded and only the folder fsync failed.
        self._write_manifest(batches, segments, aggregate_name)
        previous = self._aggregate_name
        self._batches, self._segments, self._aggregate_name = batches, segments, aggregate_name
        if previous is not None and previous != aggregate_name:
            unlink_quietly(self.path / previous)

    def aggregate(self) -> Any:
        """The aggregate stored with the last finished batch (``"reduce"`` mode)."""
        if self.mode != "reduce":
            raise ValueError(
                f"the checkpoint at {self.path} is in {self.mode!r} mode, not 'reduce'"
            )
        if self._aggregate_name is None:
            raise LookupError(f"the checkpoint at {self.path} holds no aggregate yet")
        with open(self.path / self._aggregate_name, "rb") as f:
            return pickle.load(f)

    def results(self) -> SpilledResults:
        """A lazy read-only sequence of every finished batch's results (``"list"`` mode).

        It has a store of its own, so closing it leaves the checkpoint usable.
        """
        if self.mode != "list":
            raise ValueError(f"the checkpoint at {self.path} is in {self.mode!r} mode, not 'list'")
        store = SpillStore(self.path, keep=True)
        for segment in self._segments.values():
            store.adopt(segment)
        return store.results()

    def remove(self) -> None:
        """Delete the checkpoint folder and everything in it."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def __repr__(self) -> str:
        return (
            f"<Checkpoint {str(self.path)!r} mode={self.mode} batches={len(self._batches)} "
            f"next_start={self.next_start}>"
        )

    def _load(self, manifest: pathlib.Path) -> None:
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            version, stored_fp, stored_mode = data["version"], data["fingerprint"], data["mode"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint manifest {manifest} is unreadable ({exc}); delete the folder"
            ) from exc
        if version != _VERSION:
            raise CheckpointError(f"checkpoint {self.path} has format {version}, not {_VERSION}")
        retry = "use another path or delete it"
        if stored_fp != self.fingerprint:
            stored_name = data.get("function") or "?"
            changed = " (its code changed)" if stored_name == self.function_name else ""
            raise CheckpointMismatchError(
                f"checkpoint at {self.path} was written by function {stored_name} (fingerprint "
                f"{str(stored_fp)[:12]}), this call runs {self.function_name or '?'} (fingerprint "
                f"{self.fingerprint[:12]}){changed}; {retry}"
            )
        if stored_mode != self.mode:
            raise CheckpointMismatchError(
                f"checkpoint at {self.path} was written in {stored_mode!r} mode, this call runs "
                f"in {self.mode!r} mode; {retry}"
            )
        try:
            self._parse(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint manifest {manifest} is damaged ({exc}); delete the folder"
            ) from exc
        for name in [*(s.name for s in self._segments.values()), self._aggregate_name]:
            if name is not None:
                if not (self.path / name).is_file():
                    raise CheckpointError(f"checkpoint file {self.path / name} is missing")
                _check_private(self.path / name)

    def _parse(self, data: dict[str, Any]) -> None:
        for i, e in enumerate(data["batches"]):
            seq, start, stop, digest = (
                int(e["seq"]),
                int(e["start"]),
                int(e["stop"]),
                e["input_digest"],
            )
            if seq != i or start != self.next_start or stop < start or not isinstance(digest, str):
                raise ValueError(f"batch {i} is out of order")
            name = None
            if self.mode == "list":
                name = str(e["segment"])
                match = SEGMENT_NAME_RE.match(name)
                if match is None or int(match.group(1)) != seq:
                    raise ValueError(f"bad segment name {name!r}")
                self._segments[seq] = Segment(seq, name, int(e["count"]), int(e["nbytes"]))
            self._batches.append(BatchRecord(seq, start, stop, digest, name))
        name = data.get("aggregate")
        if self.mode == "reduce" and self._batches:
            match = _AGGREGATE_RE.match(str(name))
            if match is None or int(match.group(1)) != self._batches[-1].seq:
                raise ValueError(f"bad aggregate name {name!r}")
            self._aggregate_name = str(name)

    def _write_manifest(
        self, batches: list[BatchRecord], segments: dict[int, Segment], aggregate: str | None
    ) -> None:
        entries = []
        for b in batches:
            seg = segments.get(b.seq)
            entries.append(
                {**dataclasses.asdict(b), "count": seg and seg.count, "nbytes": seg and seg.nbytes}
            )
        head = {
            "version": _VERSION,
            "fingerprint": self.fingerprint,
            "function": self.function_name,
        }
        manifest = {**head, "mode": self.mode, "batches": entries, "aggregate": aggregate}
        payload = json.dumps(manifest, separators=(",", ":")).encode()
        write_file_atomic(self.path, _MANIFEST, lambda sink: sink.write(payload))

    def _remove_unlisted(self) -> None:
        listed = {_MANIFEST, self._aggregate_name, *(s.name for s in self._segments.values())}
        for entry in os.scandir(self.path):
            match = _OURS_RE.match(entry.name)
            if (
                match
                and (match.group(2) or entry.name not in listed)
                and (entry.is_file(follow_symlinks=False) or entry.is_symlink())
            ):
                logger.info("amortune removed leftover checkpoint file %s", entry.path)
                unlink_quietly(entry.path)

