"""What ``amortune.Pool`` sends to workers, and its pickling failures as the stdlib reports them.

:func:`function_ref` pickles a function once for many ``apply_async`` calls (again when what a
by-value function captures is rebound); :func:`as_stdlib` turns amortune's
:class:`~amortune.NotPicklableError` into the pickler's own exception or
``multiprocessing.pool.MaybeEncodingError``. Imports ``_errors``, ``_serde`` and
``backends._base``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from ._errors import NotPicklableError, RemoteTraceback
from ._serde import add_note, global_names, pickled_by_reference
from .backends._base import FunctionRef

__all__ = ["as_stdlib", "function_ref"]


#: Recently sent functions: ``apply_async`` in a loop pickles its function once, not per call.
#: A function sent by value is pickled again when what its pickled form captures is rebound
#: (its code, defaults, closure cells, the globals it reads); see :func:`_captured`.
_REFS: dict[int, tuple[Any, Any, FunctionRef]] = {}
_REFS_SIZE = 16


def function_ref(func: Callable[..., Any]) -> FunctionRef:
    """The function as workers receive it; fails here, before any item runs, if it cannot travel."""
    key = None if pickled_by_reference(func) else _captured(func)
    hit = _REFS.get(id(func))
    if hit is not None and hit[0] is func and (key is None or _same(hit[1], key)):
        return hit[2]
    ref = FunctionRef(func)
    try:
        ref.payload  # noqa: B018 - pickle now
    except Exception as exc:
        raise NotPicklableError(
            f"{func!r} cannot be pickled to send it to worker processes: {exc}") from exc
    if key is not _UNCACHEABLE:
        if len(_REFS) >= _REFS_SIZE:
            _REFS.pop(next(iter(_REFS)))
        _REFS[id(func)] = (func, key, ref)
    return ref


_UNCACHEABLE = object()
_NAMES: dict[Any, tuple[str, ...]] = {}  # code object -> the global names it (or nested code) reads


def _captured(func: Any) -> Any:
    """What a by-value function's pickled form holds (compared by identity), or ``_UNCACHEABLE``.

    Rebinding any of them (a global, a closure cell, a default) gives a new key, so the function
    is pickled again; an object changed in place keeps its identity and is not noticed, the way
    a fork-started stdlib worker never sees it either.
    """
    code = getattr(func, "__code__", None)
    if code is None or not hasattr(func, "__globals__") or getattr(func, "__dict__", None):
        return _UNCACHEABLE  # a callable object, partial, bound method: always pickled anew
    glb = func.__globals__
    names = _NAMES.get(code)
    if names is None:
        if len(_NAMES) >= _REFS_SIZE:
            _NAMES.pop(next(iter(_NAMES)))
        names = _NAMES[code] = global_names(code)
    cells = tuple(c.cell_contents if _filled(c) else _UNCACHEABLE for c in func.__closure__ or ())
    return (code, func.__defaults__, func.__kwdefaults__, *cells,
            *(glb.get(n, _UNCACHEABLE) for n in names))


def _same(a: Any, b: Any) -> bool:
    """Two :func:`_captured` keys hold the very same objects (identity, not equality)."""
    return (a is not _UNCACHEABLE and b is not _UNCACHEABLE and len(a) == len(b)
            and all(map(operator.is_, a, b)))


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def as_stdlib(exc: BaseException) -> BaseException:
    """A pickling failure as ``multiprocessing.Pool`` reports it.

    A result that cannot be sent back becomes ``multiprocessing.pool.MaybeEncodingError`` (with
    ``.exc`` and ``.value``, the worker's traceback as ``__cause__``); a function or argument
    that cannot be sent is the pickler's own exception, with amortune's message as a note.
    Anything else is returned as it is.
    """
    if not isinstance(exc, NotPicklableError):
        return exc
    unsendable = getattr(exc, "amortune_unsendable", None)
    out: BaseException
    if unsendable is not None:
        import multiprocessing.pool

        cls: Any = getattr(multiprocessing.pool, "MaybeEncodingError")  # noqa: B009 - no stub
        enc: Any = cls.__new__(cls)
        enc.exc, enc.value = unsendable
        enc.args = tuple(unsendable)
        enc.__cause__ = exc.__cause__
        out = enc
    elif isinstance(exc.__cause__, BaseException) and not isinstance(exc.__cause__,
                                                                      RemoteTraceback):
        out = exc.__cause__
        add_note(out, f"amortune: {exc}")
    else:
        return exc
    for note in getattr(exc, "__notes__", ()):
        if note not in getattr(out, "__notes__", ()):
            add_note(out, note)
    if hasattr(exc, "amortune_index"):
        out.amortune_index = exc.amortune_index  # type: ignore[attr-defined]
    return out

