"""Files amortune writes and reads back: private folders, atomic writes, checked opens, pickling.

Owns :func:`dump_stream` (the streaming form of :func:`amortune._serde.dumps`, same cloudpickle
fallback) and :func:`canonical_pickles` (bytes that do not depend on the hash seed; for digests,
never loaded), and re-exports :class:`PrivateDir`, the atomic writer and the spill errors of
:mod:`amortune._safedir`. Imports the standard library, :mod:`amortune._errors`,
:mod:`amortune._safedir` and :mod:`amortune._serde` only.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from amortune._errors import NotPicklableError
from amortune._safedir import (
    SPILL_ERRORS,
    FileErrors,
    PrivateDir,
    Sink,
    SpillError,
    SpillPermissionError,
    file_error,
)
from amortune._serde import dumps

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["SPILL_ERRORS", "FileErrors", "PrivateDir", "Sink", "SpillError", "SpillPermissionError",
           "canonical_digest", "canonical_dumps", "canonical_pickles", "dump_stream", "dumps_item",
           "file_error"]

_DIGEST_PROTOCOL = 5  # pinned: a newer default protocol would silently change every digest


def dump_stream(sink: Sink, obj: Any, what: str) -> None:
    """:func:`amortune._serde.dumps` streamed into ``sink``: pickle, retrying with cloudpickle."""
    try:
        pickle.Pickler(sink, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        return
    except OSError:
        raise
    except Exception:
        sink.reset()
    import cloudpickle

    try:
        cloudpickle.CloudPickler(sink, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except OSError:
        raise
    except Exception as exc:
        raise NotPicklableError(f"{what} cannot be pickled to disk: {exc}") from exc


def dumps_item(obj: Any, what: str) -> bytes:
    """:func:`amortune._serde.dumps`, raising :class:`NotPicklableError` naming ``what``."""
    try:
        return dumps(obj)
    except Exception as exc:
        raise NotPicklableError(f"{what} cannot be pickled to disk: {exc}") from exc


_ACTIVE = threading.local()  # ids of the sets being canonicalised (a set reached from itself)


def _set_token(obj: set[Any] | frozenset[Any]) -> tuple[Any, ...]:
    active: set[int] = _ACTIVE.__dict__.setdefault("ids", set())
    if id(obj) in active:
        return ("amortune.set-cycle",)
    active.add(id(obj))
    try:
        elements = sorted(canonical_dumps(e) for e in obj)
        extra = canonical_dumps(vars(obj)) if hasattr(obj, "__dict__") else b""
    finally:
        active.discard(id(obj))
    return ("amortune.set", type(obj).__module__, type(obj).__qualname__, elements, extra)


class _CanonicalPickler(pickle.Pickler):
    """Writes each set or frozenset as its elements' canonical pickles, sorted (never loaded)."""

    def persistent_id(self, obj: Any) -> Any:
        return _set_token(obj) if isinstance(obj, (set, frozenset)) else None


@functools.cache
def _canonical_cloud_pickler() -> type[pickle.Pickler]:
    import cloudpickle

    class _CanonicalCloudPickler(cloudpickle.CloudPickler):  # type: ignore[misc]
        persistent_id = _CanonicalPickler.persistent_id

    return _CanonicalCloudPickler


def canonical_dumps(obj: Any) -> bytes:
    """Pickled bytes of ``obj`` that do not depend on the hash seed (for digests, never loaded).

    Equal to ``pickle.dumps(obj, protocol=5)`` (cloudpickle's when pickle refuses) unless ``obj``
    holds sets or frozensets: those are written as their elements' canonical bytes, sorted.
    """
    return next(canonical_pickles([obj]))[0]


class _HashWriter:
    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: ReadableBuffer) -> None:
        self.hash.update(data)


def canonical_digest(obj: Any) -> bytes:
    """The sha256 of :func:`canonical_dumps`, streamed: a large value is never held as bytes."""
    for pickler in (_CanonicalPickler, None):
        sink = _HashWriter()
        try:
            (pickler or _canonical_cloud_pickler())(sink, protocol=_DIGEST_PROTOCOL).dump(obj)
            break
        except Exception:  # what pickle refuses (lambdas, closures), then what cloudpickle does
            if pickler is None:
                raise
    return sink.hash.digest()


def canonical_pickles(items: Iterable[Any]) -> Iterator[tuple[bytes, bool]]:
    """``(canonical bytes, whether cloudpickle was needed)`` of each item, pickled on its own."""
    buf = io.BytesIO()
    pickler = _CanonicalPickler(buf, protocol=_DIGEST_PROTOCOL)
    for item in items:
        buf.seek(0)
        buf.truncate()
        pickler.clear_memo()
        try:
            pickler.dump(item)
            data, cloud = buf.getvalue(), False
        except Exception:  # what pickle refuses (lambdas, closures)
            pickler, out = _CanonicalPickler(buf, protocol=_DIGEST_PROTOCOL), io.BytesIO()
            _canonical_cloud_pickler()(out, protocol=_DIGEST_PROTOCOL).dump(item)
            data, cloud = out.getvalue(), True
        yield data, cloud
