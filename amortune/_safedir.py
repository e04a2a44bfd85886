"""Private folders: atomic writes and checked opens of files that are loaded with pickle.

Owns :class:`PrivateDir`, the atomic writer's :class:`Sink` and the spill errors. Imports the
standard library and :mod:`amortune._errors` only.

Files are loaded with pickle, so a folder or file another user owns or could write, or a symbolic
link in its place, is refused. A folder is opened once (``O_NOFOLLOW``); its files are opened
relative to that descriptor (``O_NOFOLLOW``) and checked with ``fstat``, so what is read is what
was checked; and before each operation the path must still lead to the opened folder (same
``st_dev``/``st_ino``), so a folder renamed away and replaced mid-run is detected.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pathlib
import secrets
import stat
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from amortune._errors import AmortuneError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["SPILL_ERRORS", "FileErrors", "PrivateDir", "Sink", "SpillError", "SpillPermissionError",
           "file_error"]

T = TypeVar("T")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_FLAGS = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block
# Relative opens need openat() and friends (Linux, macOS, BSD); elsewhere full paths are used.
_DIR_FD = bool(_O_DIRECTORY) and os.open in os.supports_dir_fd and os.scandir in os.supports_fd
_BUFFER_BYTES = 1 << 20  # smaller writes are gathered in memory, larger go straight to the fd
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


class SpillError(AmortuneError, OSError):
    """Writing to the spill or checkpoint folder failed (disk full, quota, permissions), or a
    spilled file cannot be read back. ``errno`` is the operating system's error number, if any."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class SpillPermissionError(SpillError, PermissionError):
    """A spill folder or file another user owns or could alter, a symbolic link in its place, a
    folder replaced after it was opened, or one the current user cannot write; nothing is read."""


class FileErrors(NamedTuple):
    """How a folder's problems are reported: its name in messages and the two error types."""

    what: str
    permission: Callable[[str], Exception]
    failure: Callable[[str], Exception]


SPILL_ERRORS = FileErrors("spill folder", SpillPermissionError, SpillError)


def _privacy_problem(st: os.stat_result, *, folder: bool) -> str | None:
    """What makes ``st`` unsafe to load pickles from, or None."""
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not (stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)):
        return "is not a folder" if folder else "is not a regular file"
    if st.st_uid != uid:
        return f"belongs to user id {st.st_uid}, not to the current user ({uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


_FIXES = {"symbolic link": "give the real folder instead of the link, or use another path",
          "belongs to user": "use another path, one of your own",
          "moved, removed": "use another path, and find out what moved it (nothing of what is "
                            "there now was read)"}


def _refusal(errors: FileErrors, path: pathlib.Path, problem: str) -> Exception:
    fix = next((f for key, f in _FIXES.items() if key in problem), "make it owner-only "
               f"(chmod go-w {path}) or use another path" if "writable by" in problem
               else "use another path")
    return errors.permission(f"{errors.what} path {path} {problem}; amortune loads these files "
                             f"with pickle, so it refuses it: {fix}")


def _os_error(errors: FileErrors, path: pathlib.Path, exc: OSError, what: str,
              chmod: str = "u+rwx") -> Exception:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno in _DENIED:
        return errors.permission(f"{errors.what} {path} {what} by the current user ({reason}); "
                                 f"give yourself access (chmod {chmod} {path}) or use another path")
    return errors.failure(f"{errors.what} {path} {what} ({reason})")


def file_error(errors: FileErrors, path: pathlib.Path, exc: OSError) -> Exception:
    """The typed error for an ``OSError`` opening file ``path`` (permission or failure)."""
    return _os_error(errors, path, exc, "cannot be opened", "u+rw")


class Sink:
    """A file-like ``write`` over a raw descriptor; every byte goes through ``os.write``."""

    def __init__(self, fd: int) -> None:
        self.fd, self.nbytes, self._buffer = fd, 0, bytearray()

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
        self._buffer, self.nbytes = bytearray(), 0
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)

    def _write_all(self, view: memoryview) -> None:
        while view:
            written = os.write(self.fd, view)
            self.nbytes += written
            view = view[written:]


class PrivateDir:
    """An open folder checked to be private to the current user, and the files in it.

    Made by :meth:`open` (``created`` says whether it made the folder). Every method that touches
    a file first checks that ``path`` still is the opened folder and that it is still private.
    """

    def __init__(self, path: pathlib.Path, fd: int, st: os.stat_result, errors: FileErrors,
                 created: bool = False) -> None:
        self.path, self.fd, self.errors, self.created = path, fd, errors, created
        self._identity = (st.st_dev, st.st_ino)
        self._finalizer = weakref.finalize(self, os.close, fd) if fd >= 0 else None
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, errors: FileErrors = SPILL_ERRORS,
             create: bool = True, writable: bool = True) -> PrivateDir:
        """Open the folder ``path`` (made 0700 if missing and ``create``); check it is private.

        ``writable`` also creates and removes a file there, so a folder the user cannot write
        fails here rather than after a batch was computed.
        """
        path, created, fd = pathlib.Path(path).absolute(), False, -1
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, 0o700)
                    created = True
            before = os.stat(path, follow_symlinks=False)
            if stat.S_ISLNK(before.st_mode):
                raise _refusal(errors, path, "is a symbolic link")
            if not stat.S_ISDIR(before.st_mode):
                raise errors.failure(f"{errors.what} {path} exists and is not a folder; use "
                                     "another path")
            if _DIR_FD:
                fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_FLAGS)
        except OSError as exc:
            if isinstance(exc, AmortuneError):
                raise
            raise _os_error(errors, path, exc, "cannot be opened") from exc
        self = cls(path, fd, before, errors, created)
        try:
            st = os.fstat(fd) if fd >= 0 else before
            if (st.st_dev, st.st_ino) != self._identity:
                raise _refusal(errors, path, "was replaced while it was opened")
            if created:  # mkdir's mode is reduced by the umask
                os.fchmod(fd, 0o700) if fd >= 0 else os.chmod(path, 0o700)
            self.verify()
            if writable:
                probe = f".amortune-probe-{secrets.token_hex(4)}"
                try:
                    os.close(self.open_file(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
                except OSError as exc:
                    if isinstance(exc, AmortuneError):
                        raise
                    raise _os_error(errors, path, exc, "is not writable") from exc
                self.unlink(probe)
        except BaseException:
            self.close()
            raise
        return self

    def verify(self) -> None:
        """Raise unless ``path`` still is the opened folder and it is still private."""
        if self._closed:
            raise ValueError(f"{self.errors.what} {self.path} is closed")
        now = self.verify_identity()
        problem = _privacy_problem(os.fstat(self.fd) if self.fd >= 0 else now, folder=True)
        if problem:
            raise _refusal(self.errors, self.path, problem)

    def verify_identity(self) -> os.stat_result:
        """Raise unless ``path`` still leads to the folder that was opened (also once closed)."""
        try:
            now: os.stat_result | None = os.stat(self.path, follow_symlinks=False)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != self._identity:
            raise _refusal(self.errors, self.path, "was moved, removed or replaced by another "
                                                   "folder after amortune opened it")
        return now

    def open_file(self, name: str, flags: int = os.O_RDONLY) -> int:
        """A descriptor of file ``name``, opened ``O_NOFOLLOW`` and checked private with ``fstat``
        (new files get mode 0600); the caller closes it."""
        self.verify()
        target, dir_fd = self._at(name)
        try:
            fd = os.open(target, flags | _O_NOFOLLOW | _O_FLAGS, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EMLINK):  # EMLINK: the BSDs' answer
                raise
            raise _refusal(self.errors, self.path / name, "is a symbolic link") from None
        problem = _privacy_problem(os.fstat(fd), folder=False)
        if problem:
            os.close(fd)
            raise _refusal(self.errors, self.path / name, problem)
        return fd

    def stat_file(self, name: str) -> os.stat_result:
        """``lstat`` of file ``name``, refused unless it is a private regular file."""
        self.verify()
        target, dir_fd = self._at(name)
        st = os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
        problem = _privacy_problem(st, folder=False)
        if problem:
            raise _refusal(self.errors, self.path / name, problem)
        return st

    def exists(self, name: str) -> bool:
        self.verify()
        target, dir_fd = self._at(name)
        try:
            os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def read(self, name: str, decode: Callable[[io.BufferedReader], T], *,
             size: int | None = None) -> T:
        """``decode`` the opened, checked file ``name``; a file of another ``size`` than was
        written, or one that fails to decode, raises ``errors.failure`` naming it."""
        try:
            fd = self.open_file(name)
        except OSError as exc:
            if isinstance(exc, AmortuneError):
                raise
            raise file_error(self.errors, self.path / name, exc) from exc
        with os.fdopen(fd, "rb") as f:
            actual = os.fstat(f.fileno()).st_size
            if size is not None and actual != size:
                raise self.damaged(name, f"it is {actual} bytes, {size} were written")
            try:
                return decode(f)
            except (AmortuneError, MemoryError):
                raise
            except Exception as exc:
                raise self.damaged(name, f"{type(exc).__name__}: {exc}") from exc

    def damaged(self, name: str, reason: str) -> Exception:
        """The error for file ``name`` that cannot be read back."""
        return self.errors.failure(
            f"{self.errors.what} file {self.path / name} cannot be read back ({reason}); it is "
            "damaged, or was written by code this process cannot import")

    def write_atomic(self, name: str, fill: Callable[[Sink], object], *,
                     durable: bool = True) -> int:
        """Write file ``name`` so that after a crash it is either complete or absent.

        ``fill`` writes to a sink on a temporary file (mode 0600), which is fsynced and renamed
        over ``name``, and the folder fsynced so the rename itself survives power loss; on any
        error the temporary file is removed, and an ``OSError`` (``ENOSPC`` ...) becomes a
        :class:`SpillError` naming the folder. Returns the bytes written. ``durable=False``
        skips the fsyncs (still atomic): for a private folder deleted at the end anyway.
        """
        tmp, sink = f"{name}.{secrets.token_hex(4)}.tmp", Sink(-1)
        try:
            sink.fd = self.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                fill(sink)
                sink.flush()
                if durable:
                    os.fsync(sink.fd)
            finally:
                os.close(sink.fd)
            self.rename(tmp, name)
            if durable:  # make the rename itself durable
                fd = self.fd if self.fd >= 0 else os.open(self.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    if fd != self.fd:  # pragma: no cover - no openat()
                        os.close(fd)
        except BaseException as exc:
            if sink.fd >= 0:
                self.unlink(tmp)
            if isinstance(exc, OSError) and not isinstance(exc, AmortuneError):
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise SpillError(f"could not write {name} in {self.path}: {reason}",
                                 exc.errno) from exc
            raise
        return sink.nbytes

    def rename(self, src: str, dst: str) -> None:
        """Rename file ``src`` to ``dst`` (replacing it) in the folder."""
        (old, dir_fd), (new, _) = self._at(src), self._at(dst)
        os.replace(old, new, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def unlink(self, name: str) -> None:
        """Remove file ``name`` if it is there (errors ignored)."""
        target, dir_fd = self._at(name)
        with contextlib.suppress(OSError):
            os.unlink(target, dir_fd=dir_fd)

    def entries(self) -> list[os.DirEntry[str]]:
        """The folder's entries, read through the opened descriptor."""
        self.verify()
        if self.fd < 0:  # pragma: no cover - no openat()
            with os.scandir(self.path) as by_path:
                return list(by_path)
        with os.scandir(self.fd) as it:
            return list(it)

    def dup(self) -> PrivateDir:
        """Another handle on the same checked folder, closed independently."""
        self.verify()
        fd = os.dup(self.fd) if self.fd >= 0 else -1
        twin = PrivateDir(self.path, fd, os.fstat(fd) if fd >= 0 else os.stat(self.path),
                          self.errors)
        twin._identity = self._identity
        return twin

    def close(self) -> None:
        """Close the descriptor; safe to call twice. The folder itself stays."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def _at(self, name: str) -> tuple[str, int | None]:
        if not name or name in (".", "..") or "/" in name or (os.altsep and os.altsep in name):
            raise ValueError(f"not a plain file name: {name!r}")
        if self._closed:  # never a descriptor number that may have been reused since
            raise ValueError(f"{self.errors.what} {self.path} is closed")
        if self.fd >= 0:
            return name, self.fd
        return str(self.path / name), None  # pragma: no cover - no openat()

    def __repr__(self) -> str:
        return f"<PrivateDir {str(self.path)!r}{' closed' if self._closed else ''}>"
