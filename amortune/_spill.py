"""Disk spill: a per-run owner-only folder of atomic segment files, read back lazily.

Owns :class:`SpillStore` (one folder and its cleanup), :class:`Segment`, :class:`SpilledResults`
(the lazy sequence ``process_in_batches`` returns when it spills) and the atomic file writer that
:mod:`amortune._checkpoint` reuses. Imports the standard library and :mod:`amortune._errors`
only; numpy and cloudpickle are imported inside functions, so ``import amortune`` stays light.

A batch of plain ``numpy.ndarray`` results of one dtype and shape is one ``.npy`` file of the
stacked array, streamed item by item (the batch is never copied) and read back with
``mmap_mode="r"``: its items return as *read-only* views of a memory map. Any other batch is one
pickle (protocol 5; cloudpickle when pickle refuses). Files go to a temporary name and are
renamed into place: a crash leaves a whole file or a ``*.tmp``, never half. Files that must
outlive the process (a kept folder, checkpoints) are also fsynced, with their folder.

A temporary folder is removed by :meth:`SpillStore.close`, by a ``weakref.finalize`` holding only
its path (garbage collection, interpreter exit, Ctrl-C) and, after SIGKILL or the OOM killer, by
the next store made in the same parent: a live store holds an ``flock`` on its ``.lock`` file.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import itertools
import logging
import operator
import os
import pathlib
import pickle
import re
import secrets
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from amortune._errors import AmortuneError, NotPicklableError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no stale-folder sweep
    fcntl = None  # type: ignore[assignment]

__all__ = ["Segment", "SpillError", "SpillStore", "SpilledResults", "write_file_atomic"]

logger = logging.getLogger("amortune")

_PREFIX = "amortune-spill-"
_LOCK_NAME = ".lock"
SEGMENT_NAME_RE = re.compile(r"seg-(\d{8,})\.(npy|pkl)\Z")
# Writes below this size are gathered in memory; larger ones go straight to the descriptor.
_BUFFER_BYTES = 1 << 20
# At most this many decoded segments are held by a reader (a batch is sized to the memory budget).
_CACHED_SEGMENTS = 2
# numpy kinds that ``.npy`` stores without pickling: bool, ints, floats, complex, datetimes,
# bytes, str and plain structured records (object fields are excluded via ``hasobject``).
_NPY_KINDS = frozenset("biufcmMSUV")


class SpillError(AmortuneError, OSError):
    """Writing to the spill or checkpoint folder failed (disk full, quota, permissions).

    ``errno`` is the operating system's error number when there is one.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclasses.dataclass(frozen=True)
class Segment:
    """One batch's results on disk: file ``name`` in the folder, ``count`` items, ``nbytes``."""

    seq: int
    name: str
    count: int
    nbytes: int

    @property
    def is_array(self) -> bool:
        """True for a stacked ``.npy`` segment (items read back as read-only memmap views)."""
        return self.name.endswith(".npy")


class _Sink:
    """A file-like ``write`` over a raw descriptor; every byte goes through ``os.write``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.nbytes = 0
        self._buffer = bytearray()

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= _BUFFER_BYTES:
            self.flush()
            self._write_all(view)
        else:
            self._buffer += view
            if len(self._buffer) >= _BUFFER_BYTES:
                self.flush()
        return len(view)

    def flush(self) -> None:
        if self._buffer:
            self._write_all(memoryview(self._buffer))
            self._buffer = bytearray()

    def reset(self) -> None:
        """Forget everything written so far (before retrying with another encoder)."""
        self._buffer = bytearray()
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.nbytes = 0

    def _write_all(self, view: memoryview) -> None:
        while view:
            written = os.write(self.fd, view)
            self.nbytes += written
            view = view[written:]


def write_file_atomic(directory: pathlib.Path, name: str, fill: Callable[[_Sink], object],
                      *, durable: bool = True) -> int:
    """Write ``directory/name`` so that after a crash it is either complete or absent.

    ``fill`` writes the content to a sink on a temporary file (mode 0600) in the same folder, which
    is then fsynced and renamed over ``name``, and the folder fsynced so the rename itself survives
    power loss. On any error the temporary file is removed; an ``OSError`` (``ENOSPC`` ...) becomes
    a :class:`SpillError` naming the folder and the reason. Returns the bytes written.
    ``durable=False`` skips both fsyncs (still atomic, not crash-durable): for a private spill
    folder that is deleted at the end anyway, fsync only made the disk the bottleneck (a 1 GB
    spill took 2-3x the in-RAM loop on the reference machine).
    """
    tmp = directory / f"{name}.{secrets.token_hex(4)}.tmp"
    sink = _Sink(-1)
    try:
        sink.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fill(sink)
            sink.flush()
            if durable:
                os.fsync(sink.fd)
        finally:
            os.close(sink.fd)
        os.replace(tmp, directory / name)
        if durable:
            dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException as exc:
        unlink_quietly(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, SpillError):
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise SpillError(f"could not write {name} in {directory}: {reason}", exc.errno) from exc
        raise
    return sink.nbytes


def write_segment_file(directory: pathlib.Path, seq: int, results: Sequence[Any],
                       *, durable: bool = True) -> Segment:
    """Write one batch's results as segment ``seq`` in ``directory`` (see the module docstring)."""
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    layout = _array_layout(results)
    name = f"seg-{seq:08d}.{'npy' if layout else 'pkl'}"
    if layout is not None:
        nbytes = write_file_atomic(directory, name, lambda sink: _write_npy(sink, results, *layout),
                                   durable=durable)
    else:
        nbytes = write_file_atomic(directory, name, lambda sink: dump_pickle(sink, results, name),
                                   durable=durable)
    return Segment(seq, name, len(results), nbytes)


def dump_pickle(sink: _Sink, obj: Any, what: str) -> None:
    """Pickle ``obj`` into ``sink`` (protocol 5), retrying with cloudpickle if pickle refuses."""
    try:
        pickle.Pickler(sink, protocol=5).dump(obj)
        return
    except OSError:
        raise
    except Exception:
        sink.reset()
    import cloudpickle

    try:
        cloudpickle.CloudPickler(sink, protocol=5).dump(obj)
    except OSError:
        raise
    except Exception as exc:
        raise NotPicklableError(f"{what} cannot be pickled to disk: {exc}") from exc


def _array_layout(results: Sequence[Any]) -> tuple[Any, tuple[int, ...]] | None:
    """``(dtype, shape)`` if every result is a plain ndarray of that dtype and shape, else None."""
    np = sys.modules.get("numpy")  # no numpy loaded means no arrays to stack: never import it here
    if np is None or not results or type(results[0]) is not np.ndarray:
        return None
    dtype, shape = results[0].dtype, results[0].shape
    if dtype.hasobject or dtype.kind not in _NPY_KINDS or dtype.itemsize == 0 or 0 in shape:
        return None
    for item in results:
        if type(item) is not np.ndarray or item.dtype != dtype or item.shape != shape:
            return None
    return dtype, shape


def _write_npy(sink: _Sink, results: Sequence[Any], dtype: Any, shape: tuple[int, ...]) -> None:
    """Stream ``np.save(np.stack(results))`` without building the stacked array."""
    import numpy as np

    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": (len(results), *shape),
    }
    # Format 2.0 (numpy >= 1.9) has no 64 KiB header limit, which large record dtypes can hit.
    np.lib.format.write_array_header_2_0(sink, header)
    for item in results:
        # Viewed as bytes: datetime64 arrays do not export the buffer protocol themselves.
        sink.write(np.ascontiguousarray(item).reshape(-1).view(np.uint8).data)


def _read_segment(path: pathlib.Path, is_array: bool) -> Any:
    """Decode one segment into a list: read-only views over a memory map, or the pickled items."""
    if is_array:
        import numpy as np

        stacked = np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
        # ``[j, ...]`` keeps 0-d items as 0-d arrays (``[j]`` would give numpy scalars).
        return [stacked[j, ...] for j in range(len(stacked))]
    with open(path, "rb") as f:
        return pickle.load(f)


def make_private_dir(path: pathlib.Path) -> bool:
    """Create ``path`` (mode 0700) if missing; True if it was created here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a folder") from None
        return False
    os.chmod(path, 0o700)  # mkdir's mode is reduced by the umask
    return True


def unlink_quietly(path: str | pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _cleanup(path: str, created: bool, written: list[str], lock_fd: int, owner_pid: int) -> None:
    """Finalizer body; holds no reference to the store, and skips forked children."""
    if os.getpid() != owner_pid:
        return
    if lock_fd >= 0:
        os.close(lock_fd)
    if created:
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(path):
            logger.warning("amortune could not remove its spill folder %s", path)
    else:
        for name in written:
            unlink_quietly(os.path.join(path, name))


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
            if entry.is_symlink() or entry.stat().st_uid != os.getuid():
                continue
            fd = os.open(os.path.join(entry.path, _LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no lock file: kept on purpose (keep=True) or not ours
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner is alive
        finally:
            os.close(fd)
        logger.info("amortune removed stale spill folder %s", entry.path)
        shutil.rmtree(entry.path, ignore_errors=True)


class SpillStore:
    """Owns one spill folder: writes one segment per batch, reads them back lazily.

    ``SpillStore()`` (``spill="disk"``) makes a private folder (``amortune-spill-*``, mode 0700)
    under ``parent`` or ``tempfile.gettempdir()``, removed on :meth:`close`, on garbage collection
    and at interpreter exit. ``SpillStore(path)`` uses a user folder, created 0700 if missing and
    kept after close unless ``keep=False`` (then a folder created here is removed, and in a folder
    that already existed only the segments written here are). Files are mode 0600.

    Examples
    --------
    >>> with SpillStore() as store:
    ...     _ = store.write_segment(0, ["a", "b"])
    ...     _ = store.write_segment(1, ["c"])
    ...     list(store.results())
    ['a', 'b', 'c']
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        keep: bool | None = None,
        parent: str | None = None,
    ) -> None:
        self.keep = (path is not None) if keep is None else keep
        self._segments: dict[int, Segment] = {}
        self._written: list[str] = []
        self._closed = False
        lock_fd = -1
        created = False
        try:
            if path is None:
                parent = parent or tempfile.gettempdir()
                _sweep_stale_folders(parent)
                self.directory = pathlib.Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))
                self.directory = self.directory.absolute()
                created = True
                if not self.keep and fcntl is not None:
                    # Locked before it gets the name a sweeper looks for: no window to lose it.
                    tmp_lock = self.directory / f"{_LOCK_NAME}.tmp"
                    lock_fd = os.open(tmp_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.rename(tmp_lock, self.directory / _LOCK_NAME)
            else:
                self.directory = pathlib.Path(path).absolute()
                created = make_private_dir(self.directory)
        except OSError as exc:
            if path is None and created:
                _cleanup(str(self.directory), True, [], lock_fd, os.getpid())
            where = path if path is not None else parent
            raise SpillError(
                f"could not create a spill folder in {where}: {exc}", exc.errno
            ) from exc
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if not self.keep:
            self._finalizer = weakref.finalize(
                self, _cleanup, str(self.directory), created, self._written, lock_fd, os.getpid()
            )

    def write_segment(self, seq: int, results: Sequence[Any]) -> Segment:
        """Write batch ``seq``'s results atomically; raises :class:`SpillError` on a full disk."""
        if self._closed:
            raise ValueError(f"spill store at {self.directory} is closed")
        if seq in self._segments:
            raise ValueError(f"segment {seq} was already written to {self.directory}")
        self._written.append(f"seg-{seq:08d}.npy")
        self._written.append(f"seg-{seq:08d}.pkl")
        # A private temporary folder dies with the run, so its segments need not survive a
        # power loss; a folder the user keeps gets durable writes.
        segment = write_segment_file(self.directory, seq, results, durable=self.keep)
        self._segments[seq] = segment
        return segment

    def adopt(self, segment: Segment) -> None:
        """Register a segment already in the folder (a checkpoint being resumed)."""
        if not SEGMENT_NAME_RE.match(segment.name) or int(segment.name[4:-4]) != segment.seq:
            raise ValueError(f"not a segment file name for seq {segment.seq}: {segment.name!r}")
        if not (self.directory / segment.name).is_file():
            raise FileNotFoundError(f"segment file {self.directory / segment.name} is missing")
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
        if self._finalizer is not None:
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
    two decoded segments are cached) and slicing returns a list. Items of array segments are
    read-only views of a memory-mapped file: copy one (``np.array(x)``) to modify it. The sequence
    keeps its :class:`SpillStore` alive, and closing it closes the store, which removes a temporary
    folder. It cannot be pickled (the files belong to this process): send ``list(results)``.
    """

    def __init__(self, store: SpillStore, segments: Sequence[Segment]) -> None:
        self._store = store
        self._directory = store.directory
        self._segments = tuple(sorted(segments, key=operator.attrgetter("seq")))
        self._ends = list(itertools.accumulate(s.count for s in self._segments))
        self._cache: collections.OrderedDict[int, Any] = collections.OrderedDict()
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
                decoded = self._load(pos)
                for j in range(segment.count):
                    yield decoded[j]

    def _item(self, i: int) -> Any:
        pos = bisect.bisect_right(self._ends, i)
        start = self._ends[pos - 1] if pos else 0
        return self._load(pos)[i - start]

    def _load(self, pos: int) -> Any:
        if self._closed:
            raise ValueError("I/O operation on closed spilled results")
        if pos in self._cache:
            self._cache.move_to_end(pos)
            return self._cache[pos]
        while len(self._cache) >= _CACHED_SEGMENTS:  # evict first: bounds decoded batches held
            self._cache.popitem(last=False)
        segment = self._segments[pos]
        decoded = _read_segment(self._directory / segment.name, segment.is_array)
        self._cache[pos] = decoded
        return decoded

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
        raise TypeError(
            "SpilledResults reads files in this process's spill folder and cannot be pickled; "
            "send list(results) instead"
        )

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (
            f"<SpilledResults: {len(self)} items in {len(self._segments)} segments at "
            f"{str(self._directory)!r}{state}>"
        )
