"""Disk spill: a per-run owner-only folder of atomic segment files, read back lazily.

Owns :func:`resolve_spill_target` (what ``spill=`` may be), :class:`SpillStore` (one folder and
its cleanup) and :class:`SpilledResults` (the lazy sequence ``process_in_batches`` returns when it
spills); the segment file format is :mod:`amortune._segments`. Folders and files go through
:class:`amortune._files.PrivateDir`: the caller's own, no symbolic links, nothing group or world
writable, each segment opened relative to the checked folder (else :class:`SpillPermissionError`).
Imports the standard library, :mod:`amortune._files` and :mod:`amortune._segments`; numpy and
cloudpickle only inside functions, so ``import amortune`` stays light.

Segment files are written to a temporary name and renamed into place; a kept folder's are also
fsynced, with the folder.

A temporary folder is removed by :meth:`SpillStore.close`, by a ``weakref.finalize`` (garbage
collection, interpreter exit, Ctrl-C) and, after SIGKILL or the OOM killer, by the next store made
in the same parent: a live store holds an ``flock`` on its ``.lock`` file.
"""
from __future__ import annotations

import bisect
import collections
import itertools
import logging
import operator
import os
import pathlib
import pickle
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Literal, overload

from amortune._files import PrivateDir, SpillError, SpillPermissionError
from amortune._segments import Segment, write_segment
from amortune._segments import read_segment as _read_segment

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no stale-folder sweep
    fcntl = None  # type: ignore[assignment]

__all__ = ["Segment", "SpillError", "SpillPermissionError", "SpillStore", "SpilledResults",
           "resolve_spill_target", "write_segment"]

logger = logging.getLogger("amortune")

_PREFIX = "amortune-spill-"
_LOCK_NAME = ".lock"
_CACHED_SEGMENTS = 2  # segments a reader holds (a batch is sized to the memory budget)


def resolve_spill_target(spill: object) -> Literal["disk"] | pathlib.Path | None:
    """Check a ``spill=`` value: ``None``, ``"disk"`` or a folder path (returned as a Path).

    A string must be ``"disk"`` or clearly a path: it contains a path separator, starts with
    ``.`` or ``~`` (expanded), is absolute, or names an existing folder. Anything else (``"ram"``,
    ``"Disk"``, ``""``) raises ``ValueError`` instead of quietly making a folder of that name.

    >>> resolve_spill_target("disk"), resolve_spill_target("./out")
    ('disk', PosixPath('out'))
    """
    if spill is None or (isinstance(spill, str) and spill == "disk"):
        return "disk" if spill else None
    text = os.fspath(spill) if isinstance(spill, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise TypeError(f"spill must be 'disk', a folder path or None, got {spill!r}")
    separators = [os.sep, *([os.altsep] if os.altsep else [])]
    if isinstance(spill, str) and not (any(c in text for c in separators) or os.path.isabs(text)
                                       or text.startswith((".", "~")) or os.path.isdir(text)):
        raise ValueError(
            f"spill={spill!r} is neither 'disk' nor a folder path; choose spill='disk' (a "
            "temporary folder removed with the results), a folder path (with a path separator, "
            f"e.g. './{spill or 'results'}', or an existing folder), or None (results in memory)")
    return pathlib.Path(os.path.expanduser(text))


def _cleanup(folder: PrivateDir, remove_folder: bool, written: list[str] | None, lock_fd: int,
             owner_pid: int) -> None:
    """Finalizer body; holds no reference to the store, and skips forked children."""
    if os.getpid() != owner_pid:
        return
    try:
        if lock_fd >= 0:
            os.close(lock_fd)
        try:
            folder.verify_identity()
            moved = False
        except Exception:
            moved = True
        if remove_folder and not moved:
            shutil.rmtree(folder.path, ignore_errors=True)
            if os.path.exists(folder.path):
                logger.warning("amortune could not remove its spill folder %s", folder.path)
        elif not folder.closed:  # a folder moved away is emptied where it is, through its fd
            names = os.listdir(folder.fd) if remove_folder and folder.fd >= 0 else written or ()
            for name in names:
                folder.unlink(name)
            if moved and remove_folder:
                logger.warning("amortune's spill folder %s was moved or replaced; its files were "
                               "removed, the folder was not", folder.path)
    except Exception:  # pragma: no cover - a finalizer must not raise
        logger.exception("amortune could not clean up its spill folder %s", folder.path)
    finally:
        folder.close()


def _sweep_stale_folders(parent: str) -> None:
    """Remove temp spill folders of dead processes (their ``.lock`` can be taken)."""
    if fcntl is None:  # pragma: no cover
        return
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(_PREFIX)]
    except OSError:
        return
    for entry in entries:
        try:
            folder = PrivateDir.open(entry.path, create=False, writable=False)
        except Exception:  # a link, not ours, not private: not a folder amortune left
            continue
        try:
            fd = folder.open_file(_LOCK_NAME)
        except Exception:  # no lock file: kept on purpose (keep=True) or not ours
            folder.close()
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner is alive
        finally:
            os.close(fd)
            folder.close()
        logger.info("amortune removed stale spill folder %s", entry.path)
        shutil.rmtree(entry.path, ignore_errors=True)


class SpillStore:
    """Owns one spill folder: writes one segment per batch, reads them back lazily.

    ``SpillStore()`` (``spill="disk"``) makes a private folder (``amortune-spill-*``, mode 0700)
    under ``parent`` or ``tempfile.gettempdir()``, removed on :meth:`close`, on garbage collection
    and at interpreter exit. ``SpillStore(path)`` uses a user folder, created 0700 if missing and
    kept after close unless ``keep=False`` (then a folder created here is removed, and in a folder
    that already existed only the segments written here are). An existing folder must be the
    caller's own, not a symbolic link and not writable by group or others, or
    :class:`SpillPermissionError` is raised. Files are mode 0600.

    Examples
    --------
    >>> with SpillStore() as store:
    ...     _ = store.write_segment(0, ["a", "b"])
    ...     _ = store.write_segment(1, ["c"])
    ...     list(store.results())
    ['a', 'b', 'c']
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, keep: bool | None = None,
                 parent: str | None = None) -> None:
        keep = (path is not None) if keep is None else keep
        if path is not None:
            folder = PrivateDir.open(path)
            self._setup(folder, keep=keep, remove_folder=folder.created and not keep)
            return
        parent = parent or tempfile.gettempdir()
        _sweep_stale_folders(parent)
        lock_fd, made, opened = -1, "", None
        try:
            made = tempfile.mkdtemp(prefix=_PREFIX, dir=parent)
            opened = PrivateDir.open(made, create=False)
            if not keep and fcntl is not None:
                # Locked before it gets the name a sweeper looks for: no window to lose it.
                lock_fd = opened.open_file(f"{_LOCK_NAME}.tmp", os.O_RDWR | os.O_CREAT)
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                opened.rename(f"{_LOCK_NAME}.tmp", _LOCK_NAME)
        except BaseException as exc:
            if lock_fd >= 0:
                os.close(lock_fd)
            if opened is not None:
                opened.close()
            if made:
                shutil.rmtree(made, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, SpillError):
                raise SpillError(f"could not create a spill folder in {parent}: {exc}",
                                 exc.errno) from exc
            raise
        self._setup(opened, keep=keep, remove_folder=not keep, lock_fd=lock_fd)

    @classmethod
    def over(cls, folder: PrivateDir) -> SpillStore:
        """A kept store over an open folder (a checkpoint's); closing it closes ``folder``."""
        store = cls.__new__(cls)
        store._setup(folder, keep=True, remove_folder=False)
        return store

    def _setup(self, folder: PrivateDir, *, keep: bool, remove_folder: bool,
               lock_fd: int = -1) -> None:
        self.keep, self.directory, self._folder = keep, folder.path, folder
        self._segments: dict[int, Segment] = {}
        self._written: list[str] = []
        self._closed = False
        self._finalizer = weakref.finalize(
            self, _cleanup, folder, remove_folder, None if keep else self._written, lock_fd,
            os.getpid())

    def write_segment(self, seq: int, results: Sequence[Any]) -> Segment:
        """Write batch ``seq``'s results atomically; raises :class:`SpillError` on a full disk."""
        if self._closed:
            raise ValueError(f"spill store at {self.directory} is closed")
        if seq in self._segments:
            raise ValueError(f"segment {seq} was already written to {self.directory}")
        self._written.extend(Segment.file_name(seq, is_array) for is_array in (True, False))
        # A private temporary folder dies with the run, so its segments need not survive a
        # power loss; a folder the user keeps gets durable writes.
        segment = write_segment(self._folder, seq, results, durable=self.keep)
        self._segments[seq] = segment
        return segment

    def adopt(self, segment: Segment) -> None:
        """Register a segment already in the folder (a checkpoint being resumed)."""
        segment = Segment.checked(segment.seq, segment.name, segment.count, segment.nbytes)
        try:
            self._folder.stat_file(segment.name)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"segment file {self.directory / segment.name} is missing") from None
        self._segments[segment.seq] = segment

    def segments(self) -> list[Segment]:
        """The segments written (or adopted) so far, in ``seq`` order."""
        return [self._segments[k] for k in sorted(self._segments)]

    def results(self) -> SpilledResults:
        """A lazy read-only sequence over the segments written so far, in ``seq`` order."""
        return SpilledResults(self, self.segments())

    def close(self) -> None:
        """Stop writing; remove the folder unless it is kept. Safe to call twice."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> SpillStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._segments)} segments"
        return f"<SpillStore {str(self.directory)!r} ({state}, keep={self.keep})>"


class SpilledResults(Sequence[Any]):
    """Results spilled to disk, as a lazy read-only sequence in input order.

    ``len`` is known without reading; indexing reads only the segment holding the item (at most
    two segments are cached) and slicing returns a list.

    Every read returns a copy of its own, decoded from the stored bytes: ``r[5] is r[5]`` is
    false, and changing an item you got (``r[5]["x"] = -1``) never changes what the sequence
    holds, so ``r[5]["x"]`` reads the stored value again, whatever was read in between (a cache
    of decoded objects would show the change until the segment is evicted, then silently drop
    it). The sequence cannot be assigned to; for results you can change, take ``list(r)``.
    Objects shared between results come back as separate copies. Items of array segments are
    read-only views of a memory-mapped file (changing one raises ``ValueError``): copy one
    (``np.array(x)``) to modify it.

    It keeps its :class:`SpillStore` alive, and closing it closes the store (removing a temporary
    folder). It cannot be pickled (the files belong to this process): send ``list(results)``.
    """

    def __init__(self, store: SpillStore, segments: Sequence[Segment]) -> None:
        self._store = store
        self._directory = store.directory
        self._segments = tuple(sorted(segments, key=operator.attrgetter("seq")))
        self._ends = list(itertools.accumulate(s.count for s in self._segments))
        self._cache: collections.OrderedDict[int, tuple[str, Any]] = collections.OrderedDict()
        self._closed = False

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"spilled results index {index} out of range for {n} items")
        return self._item(i)

    def __iter__(self) -> Iterator[Any]:
        for pos, segment in enumerate(self._segments):
            if segment.count:
                loaded = self._load(pos)
                for j in range(segment.count):
                    yield self._decode(pos, loaded, j)

    def _item(self, i: int) -> Any:
        pos = bisect.bisect_right(self._ends, i)
        start = self._ends[pos - 1] if pos else 0
        return self._decode(pos, self._load(pos), i - start)

    def _decode(self, pos: int, loaded: tuple[str, Any], j: int) -> Any:
        kind, payload = loaded
        if kind == "npy":
            return payload[j, ...]  # ``[j, ...]`` keeps 0-d items 0-d (``[j]`` gives scalars)
        try:
            return pickle.loads(payload[j])
        except MemoryError:
            raise
        except Exception as exc:
            raise self._store._folder.damaged(
                self._segments[pos].name, f"result {j}: {type(exc).__name__}: {exc}") from exc

    def _load(self, pos: int) -> tuple[str, Any]:
        if self._closed or self._store._closed:
            raise ValueError("I/O operation on closed spilled results")
        if pos in self._cache:
            self._cache.move_to_end(pos)
            return self._cache[pos]
        while len(self._cache) >= _CACHED_SEGMENTS:  # evict first: bounds the segments held
            self._cache.popitem(last=False)
        loaded = _read_segment(self._store._folder, self._segments[pos])
        self._cache[pos] = loaded
        return loaded

    def close(self) -> None:
        """Drop cached segments and close the store (removing a temporary folder)."""
        self._closed = True
        self._cache.clear()
        self._store.close()

    def __enter__(self) -> SpilledResults:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError("SpilledResults reads files in this process's spill folder and cannot be "
                        "pickled; send list(results) instead")

    def __repr__(self) -> str:
        return (f"<SpilledResults: {len(self)} items in {len(self._segments)} segments at "
                f"{str(self._directory)!r}{', closed' if self._closed else ''}>")
