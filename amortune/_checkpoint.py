"""Checkpoints: resume a batch loop after a crash from a folder that survives SIGKILL.

Owns :class:`Checkpoint` (one folder: ``manifest.json``, plus the result segments of finished
batches in ``"list"`` mode or the running aggregate in ``"reduce"`` mode) and the checkpoint
errors; re-exports the fingerprints of :mod:`amortune._fingerprint` that tell whether a resumed run
is the same run (:func:`function_fingerprint`, :func:`input_digest`). Imports the standard library,
:mod:`amortune._errors`, :mod:`amortune._files`, :mod:`amortune._fingerprint` and the segment
classes of :mod:`amortune._spill`; cloudpickle only inside functions.

Kill safety comes from the write order: a batch's data is written first, atomically and under a
name of its own, then the manifest is replaced atomically, so it lists only complete batches; a
crash between the two leaves a file it does not list, deleted on the next open. Files are loaded
with pickle, so the folder and every file must be private to the current user and are re-checked
at each read (:class:`amortune._files.PrivateDir`): a folder replaced mid-run is never read.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from amortune._errors import AmortuneError
from amortune._files import FileErrors, PrivateDir, dump_stream, file_error
from amortune._fingerprint import describe_function, function_fingerprint, input_digest
from amortune._spill import Segment, SpilledResults, SpillStore, write_segment

from ._record import asdict, record

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: concurrent runs are not detected
    fcntl = None  # type: ignore[assignment]

__all__ = ["BatchRecord", "Checkpoint", "CheckpointError", "CheckpointMismatchError",
           "CheckpointPermissionError", "describe_function", "function_fingerprint", "input_digest"]

logger = logging.getLogger("amortune")

_MANIFEST = "manifest.json"
_LOCK = ".lock"
# Format 2 stores each result's own pickle in a ``.pkl`` segment; format 1 (still read) pickled
# the whole list, and its fingerprints did not cover the values a function captures.
_VERSION = 2
_READABLE = (1, 2)
_MODES = ("list", "reduce")
_AGGREGATE_RE = re.compile(r"aggregate-(\d{8,})\.pkl\Z")
# Names this module writes, with or without the ``.<hex>.tmp`` suffix of an unfinished write;
# only such files are ever deleted from a checkpoint folder.
_OURS_RE = re.compile(
    r"(seg-\d{8,}\.(?:npy|pkl)|aggregate-\d{8,}\.pkl|manifest\.json|\.amortune-probe-\w+)"
    r"(\.\w+\.tmp)?\Z"
)
_UNSET: Any = object()


class CheckpointError(AmortuneError):
    """A checkpoint folder cannot be used (damaged manifest or file, missing file, wrong use)."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint was written by another function, mode or input than this call's."""


class CheckpointPermissionError(CheckpointError, PermissionError):
    """A checkpoint folder or file another user could alter, a symbolic link, a folder replaced
    after it was opened, or one the current user cannot read and write; it is not loaded."""


_ERRORS = FileErrors("checkpoint", CheckpointPermissionError, CheckpointError)


@record(frozen=True)
class BatchRecord:
    """A finished batch: input positions ``[start, stop)``, their digest, and its segment file."""

    seq: int
    start: int
    stop: int
    input_digest: str
    segment: str | None = None



class Checkpoint:
    """The finished batches of one run, in a folder, so a crashed run can resume.

    Made by :meth:`open`. ``"list"`` mode stores each batch's results as a segment file;
    ``"reduce"`` mode stores the running aggregate after each batch.
    """

    def __init__(self, folder: PrivateDir, fingerprint: str, mode: str, function_name: str) -> None:
        self.path = folder.path
        self.fingerprint = fingerprint
        self.mode = mode
        self.function_name = function_name
        self._folder = folder
        self._batches: list[BatchRecord] = []
        self._segments: dict[int, Segment] = {}
        self._aggregate_name: str | None = None
        self._closed = False
        self._unlock: Callable[[], object] = lambda: None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, fingerprint: str, mode: str,
             function_name: str = "") -> Checkpoint:
        """Create the checkpoint folder (mode 0700) or load its manifest.

        Raises :class:`CheckpointPermissionError` for a folder or file that is not private to
        the current user (or a symbolic link), and for a folder the current user cannot read and
        write; :class:`CheckpointMismatchError` when the stored ``fingerprint`` or ``mode``
        differ; :class:`CheckpointError` for a damaged manifest or a listed file that is missing
        or of another size than was written. Files a crash left behind (unlisted segments or
        aggregates, ``*.tmp``) are deleted.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self = cls(PrivateDir.open(path, errors=_ERRORS), fingerprint, mode, function_name)
        try:
            self._lock()
            if self._folder.exists(_MANIFEST):
                self._load()
            self._remove_unlisted()
            if not self._folder.exists(_MANIFEST):  # mark the folder as this function's
                self._write_manifest(self._batches, self._segments, None)
        except BaseException:
            self.close()
            raise
        return self

    def _lock(self) -> None:
        """Hold an ``flock`` on ``.lock`` while open: a second run would delete our new files."""
        try:
            fd = self._folder.open_file(_LOCK, os.O_RDWR | os.O_CREAT)  # refused unless private
        except OSError as exc:
            if isinstance(exc, AmortuneError):
                raise
            raise file_error(_ERRORS, self.path / _LOCK, exc) from exc
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
        self._folder.close()

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
                f"the input changed since the checkpoint at {self.path} was written, or its "
                f"items do not pickle to the same bytes in every run: batch {seq} (items "
                f"{start}-{stop - 1}) digests differently; use another path or delete it"
            )

    def record_batch(self, seq: int, start: int, stop: int, digest: str, *,
                     results: Sequence[Any] | None = None, aggregate: Any = _UNSET) -> None:
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
            segments[seq] = write_segment(self._folder, seq, results)
            segment_name: str | None = segments[seq].name
        else:
            if aggregate is _UNSET or results is not None:
                raise TypeError("a 'reduce' mode checkpoint records aggregate=..., not results=")
            aggregate_name, segment_name = f"aggregate-{seq:08d}.pkl", None
            what = f"the aggregate after batch {seq}"
            self._folder.write_atomic(aggregate_name, lambda s: dump_stream(s, aggregate, what))
        batches = [*self._batches, BatchRecord(seq, start, stop, digest, segment_name)]
        # On failure the new file stays unlisted (and is deleted at the next open): deleting it
        # here would be wrong if the manifest rename succeeded and only the folder fsync failed.
        self._write_manifest(batches, segments, aggregate_name)
        previous = self._aggregate_name
        self._batches, self._segments, self._aggregate_name = batches, segments, aggregate_name
        if previous is not None and previous != aggregate_name:
            self._folder.unlink(previous)

    def aggregate(self) -> Any:
        """The aggregate stored with the last finished batch (``"reduce"`` mode)."""
        if self.mode != "reduce":
            raise ValueError(
                f"the checkpoint at {self.path} is in {self.mode!r} mode, not 'reduce'"
            )
        if self._aggregate_name is None:
            raise LookupError(f"the checkpoint at {self.path} holds no aggregate yet")
        return self._folder.read(self._aggregate_name, pickle.load)

    def results(self) -> SpilledResults:
        """A lazy read-only sequence of every finished batch's results (``"list"`` mode).

        It has a store (and folder descriptor) of its own, so closing it leaves the checkpoint
        usable. Reading it raises :class:`CheckpointPermissionError` if the folder was replaced
        since it was opened, and :class:`CheckpointError` naming the file for a damaged segment.
        """
        if self.mode != "list":
            raise ValueError(f"the checkpoint at {self.path} is in {self.mode!r} mode, not 'list'")
        store = SpillStore.over(self._folder.dup())
        for segment in self._segments.values():
            store.adopt(segment)
        return store.results()

    def remove(self) -> None:
        """Delete the checkpoint folder and everything in it (never a folder that replaced it)."""
        self.close()
        self._folder.verify_identity()
        shutil.rmtree(self.path, ignore_errors=True)

    def __repr__(self) -> str:
        return (
            f"<Checkpoint {str(self.path)!r} mode={self.mode} batches={len(self._batches)} "
            f"next_start={self.next_start}>"
        )

    def _load(self) -> None:
        manifest = self.path / _MANIFEST
        try:
            raw = self._folder.read(_MANIFEST, lambda f: f.read())
            data = json.loads(raw.decode("utf-8"))
            version, stored_fp, stored_mode = data["version"], data["fingerprint"], data["mode"]
        except AmortuneError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint manifest {manifest} is unreadable ({exc}); delete the folder"
            ) from exc
        if version not in _READABLE:
            raise CheckpointError(f"checkpoint {self.path} has format {version}, not {_VERSION}")
        retry = "use another path or delete it"
        if stored_fp != self.fingerprint:
            stored_name = data.get("function") or "?"
            changed = ""
            if stored_name == self.function_name:
                changed = (" (the same function, but its code or the values it captures - "
                           "defaults, closure cells, globals it uses - differ from the run that "
                           "wrote it")
                changed += (", or it captures values, which format 1 checkpoints did not "
                            "fingerprint)" if version == 1 else ")")
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
        sizes = {s.name: s.nbytes for s in self._segments.values()}
        for name in [*sizes, *([self._aggregate_name] if self._aggregate_name else [])]:
            try:
                size = self._folder.stat_file(name).st_size
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint file {self.path / name} is missing") from None
            if name in sizes and size != sizes[name]:
                raise CheckpointError(
                    f"checkpoint file {self.path / name} is {size} bytes, but {sizes[name]} were "
                    "written: it was truncated or overwritten; delete the folder")

    def _parse(self, data: dict[str, Any]) -> None:
        for i, e in enumerate(data["batches"]):
            seq, start, stop = int(e["seq"]), int(e["start"]), int(e["stop"])
            digest = e["input_digest"]
            if seq != i or start != self.next_start or stop < start or not isinstance(digest, str):
                raise ValueError(f"batch {i} is out of order")
            name = None
            if self.mode == "list":
                segment = Segment.checked(seq, str(e["segment"]), int(e["count"]),
                                          int(e["nbytes"]))
                if segment.count != stop - start:
                    raise ValueError(f"batch {i} holds {segment.count} results, not {stop - start}")
                self._segments[seq], name = segment, segment.name
            self._batches.append(BatchRecord(seq, start, stop, digest, name))
        name = data.get("aggregate")
        if self.mode == "reduce" and self._batches:
            match = _AGGREGATE_RE.match(str(name))
            if match is None or int(match.group(1)) != self._batches[-1].seq:
                raise ValueError(f"bad aggregate name {name!r}")
            self._aggregate_name = str(name)

    def _write_manifest(self, batches: list[BatchRecord], segments: dict[int, Segment],
                        aggregate: str | None) -> None:
        entries = [{**asdict(b), "count": seg and seg.count,
                    "nbytes": seg and seg.nbytes} for b in batches for seg in [segments.get(b.seq)]]
        manifest = {"version": _VERSION, "fingerprint": self.fingerprint,
                    "function": self.function_name, "mode": self.mode, "batches": entries,
                    "aggregate": aggregate}
        payload = json.dumps(manifest, separators=(",", ":")).encode()
        self._folder.write_atomic(_MANIFEST, lambda sink: sink.write(payload))

    def _remove_unlisted(self) -> None:
        listed = {_MANIFEST, self._aggregate_name, *(s.name for s in self._segments.values())}
        for entry in self._folder.entries():
            match = _OURS_RE.match(entry.name)
            if (
                match
                and (match.group(2) or entry.name not in listed)
                and (entry.is_file(follow_symlinks=False) or entry.is_symlink())
            ):
                logger.info("amortune removed leftover checkpoint file %s", self.path / entry.name)
                self._folder.unlink(entry.name)
