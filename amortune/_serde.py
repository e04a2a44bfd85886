"""Pickling with the cloudpickle fallback, and the item-index note, in one place.

Everything that crosses a process boundary or lands on disk goes through :func:`dumps` (data) or
:func:`dumps_function` (functions); every exception that names an item gets its note from
:func:`note_item`. Imports the standard library only (cloudpickle lazily, when plain pickle
refuses), so workers, the spill files and the checkpoint share one behaviour.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["digest", "dumps", "dumps_function", "first_unpicklable", "global_names", "item_note",
           "note_item", "script_function"]

#: The note added to an exception raised while processing an item (tests and the Pool look for it).
ITEM_NOTE = "amortune: raised while processing item"
INPUT_NOTE = "amortune: raised by the input while reading item"


def dumps(obj: Any) -> bytes:
    """Pickle with the fast stdlib pickler; fall back to cloudpickle for lambdas and closures."""
    import pickle  # here, not at the top: a serial first look never pickles (~3 ms import)

    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]


def digest(data: bytes) -> str:
    """A short digest naming ``data`` (the token a function or an environment is cached under).

    ``_blake2`` is the C module behind ``hashlib.blake2b``; importing it directly skips loading
    OpenSSL, about 5 ms of a one-shot script's start.
    """
    try:
        from _blake2 import blake2b
    except ImportError:  # an interpreter without the module: hashlib has another
        from hashlib import blake2b

    return blake2b(data, digest_size=10).hexdigest()


def script_function(func: Any) -> bool:
    """Whether ``func`` is a plain function defined at the top level of the running script
    (``__main__``, found there under its name) whose reach cloudpickle surely pickles.

    What it reaches, found without pickling it: the globals its code reads, its defaults and
    attributes, and the same for the script's functions among them. Each must be a module, a
    function or class importable by name, or plain data (numbers, strings, bytes, ``None`` and
    containers of them). An open file, a socket, a lock, a connection or any other object means
    ``False``: the function must then be pickled to know it can travel.
    """
    main = sys.modules.get("__main__")
    budget = [_SCAN_BUDGET]
    seen: set[int] = set()

    def plain(obj: Any) -> bool:
        budget[0] -= 1
        if budget[0] < 0:
            return False
        kind = type(obj)
        if obj is None or kind in _ATOMS:
            return True
        if kind in (tuple, list, set, frozenset):
            return all(map(plain, obj))
        if kind is dict:
            return all(plain(k) and plain(v) for k, v in obj.items())
        if kind is _MODULE:
            return True
        if _in_script(obj, main):
            return kind is _FUNCTION and reaches_plain(obj)
        return isinstance(obj, (type, _FUNCTION, _BUILTIN)) and _by_reference(obj)

    def reaches_plain(f: Any) -> bool:
        if id(f) in seen:
            return True
        seen.add(id(f))
        if f.__closure__ or f.__code__.co_freevars:
            return False
        glb = f.__globals__
        return (all(plain(glb[n]) for n in global_names(f.__code__) if n in glb)
                and plain(f.__defaults__ or ()) and plain(f.__kwdefaults__ or {})
                and plain(getattr(f, "__dict__", {})))

    if type(func) is not _FUNCTION or not _in_script(func, main):
        return False
    try:
        return reaches_plain(func)
    except RecursionError:  # data nested deeper than the interpreter's stack: pickle it to see
        return False


def global_names(code: Any) -> tuple[str, ...]:
    """The names ``code`` and the code nested in it (lambdas, comprehensions, inner functions)
    look up, sorted: its globals are among them."""
    found: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        found.update(c.co_names)
        stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    return tuple(sorted(found))


_FUNCTION = type(dumps)
_BUILTIN = type(len)
_MODULE = type(sys)
_ATOMS = frozenset({bool, int, float, complex, str, bytes})
#: Objects :func:`script_function` looks at before it gives up (a function reading a big list).
_SCAN_BUDGET = 2000


def _in_script(obj: Any, main: Any) -> bool:
    name = getattr(obj, "__qualname__", None)
    return (main is not None and getattr(obj, "__module__", None) == "__main__"
            and isinstance(name, str) and "." not in name and "<" not in name
            and getattr(main, name, None) is obj)


def _by_reference(func: Any) -> bool:
    """True when ``func`` can be found again by module and qualified name in another process."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return False
    obj: Any = sys.modules.get(module)
    if obj is None:
        return False
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    if obj is func:
        return True
    # Bound methods and classmethods compare equal but are new objects on every access.
    return bool(getattr(obj, "__func__", None) is getattr(func, "__func__", object()))


def pickled_by_reference(func: Any) -> bool:
    """Whether :func:`dumps_function` sends ``func`` by module and name (not by value)."""
    return _by_reference(func)


def dumps_function(func: Any) -> bytes:
    """A function as workers receive it: by reference when importable, by value otherwise.

    By reference (plain pickle) the worker imports the real module, so tracebacks show the real
    file and source line. ``__main__`` functions, lambdas, closures and locally defined classes'
    methods travel by value with cloudpickle.
    """
    import pickle

    if _by_reference(func):
        try:
            return pickle.dumps(func, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            pass
    import cloudpickle

    return cloudpickle.dumps(func, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]


def first_unpicklable(objs: Sequence[Any], start: int) -> int:
    """Input index of the first of ``objs`` (indices from ``start``) that cannot be pickled."""
    for i, obj in enumerate(objs):
        try:
            dumps(obj)
        except Exception:
            return start + i
    return start


def item_note(index: int, *, by_input: bool = False) -> str:
    """The note naming the item an exception belongs to."""
    return f"{INPUT_NOTE if by_input else ITEM_NOTE} {index}"


def note_item(exc: BaseException, index: int, *, by_input: bool = False) -> None:
    """Attach the item's index to ``exc`` (a note, and ``exc.amortune_index``), once."""
    note = item_note(index, by_input=by_input)
    notes = getattr(exc, "__notes__", None) or ()
    if note not in notes:
        add_note(exc, note)
    try:
        exc.amortune_index = index  # type: ignore[attr-defined]
    except Exception:
        pass


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note`` on Python 3.11+, the same ``__notes__`` list on 3.10."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
        return
    notes: Any = getattr(exc, "__notes__", None)  # pragma: no cover - Python 3.10
    if notes is None:
        notes = []
        try:
            exc.__notes__ = notes  # type: ignore[attr-defined]
        except Exception:
            return
    notes.append(note)
