"""Fingerprints that tell whether a resumed run is the same run: of the function, of the input.

Both are sha256 hex digests, stable across processes and hash seeds. Imports the standard library
and the canonical pickling of :mod:`amortune._files`; cloudpickle only inside functions.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

from amortune._files import canonical_digest, canonical_dumps, canonical_pickles

__all__ = ["describe_function", "function_fingerprint", "input_digest"]

logger = logging.getLogger("amortune")


def describe_function(func: Callable[..., Any]) -> str:
    """``module.qualname`` of a callable (of its class for a callable instance)."""
    target: Any = func.func if isinstance(func, functools.partial) else func
    if not hasattr(target, "__qualname__"):
        target = type(target)
    return f"{getattr(target, '__module__', None) or '?'}.{target.__qualname__}"


def function_fingerprint(func: Callable[..., Any]) -> str:
    """A sha256 that changes when the function or what it captures changes, stable across
    processes and hash seeds.

    Hashes the module, qualified name and code (bytecode, names and constants, nested functions
    included; not line numbers) and what the function captures: defaults, keyword-only defaults,
    closure cells, a bound method's ``self`` and the globals its code names. Captured functions of
    the same module, of ``__main__`` or local ones are covered the same way, recursively; other
    functions and classes by qualified name, modules by name, other values by their pickled bytes
    (sets canonicalised; an unpicklable value by its type). So a mutable global the function uses
    (a cache dict) counts too. A ``functools.partial`` adds its arguments, and other callables
    without ``__code__`` their class's ``__call__`` and their pickled bytes.
    """
    return _fingerprint(func, {})


def _fingerprint(func: Any, seen: dict[int, Any]) -> str:
    h = hashlib.sha256(describe_function(func).encode())
    code = getattr(func, "__code__", None)
    if isinstance(code, types.CodeType):
        h.update(_code_digest(code).encode())
        captured = _captures(func, seen)  # nothing captured: the fingerprint of format 1
        h.update(b"\x00captures:" + captured if captured else b"")
        return h.hexdigest()
    state: Any = func
    if isinstance(func, functools.partial):
        h.update(_fingerprint(func.func, seen).encode())
        state = (func.args, func.keywords)
    elif isinstance(getattr(type(func).__call__, "__code__", None), types.CodeType):
        call = type(func).__call__
        h.update(_code_digest(call.__code__).encode())
        captured = _captures(call, seen)
        h.update(b"\x00captures:" + captured if captured else b"")
    try:
        h.update(canonical_dumps(state))
    except Exception:  # still identified by its name and code
        logger.debug("amortune could not pickle %r for its fingerprint", state)
    return h.hexdigest()


def _captures(func: Any, seen: dict[int, Any]) -> bytes:
    """A digest of the values ``func`` captures, or ``b""`` when it captures none (or was seen:
    ``seen`` keeps what it holds alive, so an id is never reused meanwhile)."""
    if id(func) in seen:
        return b""
    seen[id(func)] = func
    home = getattr(func, "__module__", None)
    parts: list[bytes] = []
    for label, values in (("default", func.__defaults__ or ()),
                          ("kwdefault", sorted((func.__kwdefaults__ or {}).items()))):
        parts += [label.encode() + _value_digest(v, home, seen) for v in values]
    for cell in func.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # a cell not yet filled
            parts.append(b"cell:empty")
        else:
            parts.append(b"cell:" + _value_digest(contents, home, seen))
    namespace = getattr(func, "__globals__", {})
    for name in sorted(_global_names(func.__code__)):
        if name in namespace:
            parts.append(f"global:{name}=".encode() + _value_digest(namespace[name], home, seen))
    if isinstance(func, types.MethodType):
        parts.append(b"self:" + _value_digest(func.__self__, home, seen))
    return hashlib.sha256(b"\x00".join(parts)).digest() if parts else b""


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _value_digest(value: Any, home: str | None, seen: dict[int, Any]) -> bytes:
    if isinstance(value, types.ModuleType):
        return b"module:" + value.__name__.encode()
    try:
        inner = getattr(value, "__wrapped__", None)
    except Exception:  # a proxy that answers every attribute
        inner = None
    if not isinstance(value, types.FunctionType) and isinstance(inner, types.FunctionType):
        value = inner  # a decorator's wrapper (functools.lru_cache ...): the function inside
    if isinstance(value, (types.FunctionType, types.MethodType)):
        module, qualname = getattr(value, "__module__", None), value.__qualname__
        if module in (home, "__main__", None) or "<" in qualname or module not in sys.modules:
            return b"function:" + _fingerprint(value, seen).encode()
        return b"ref:" + describe_function(value).encode()
    if isinstance(value, (type, types.BuiltinFunctionType)):
        return b"ref:" + describe_function(value).encode()
    try:
        return b"value:" + canonical_digest(value)
    except Exception:
        return b"unpicklable:" + describe_function(type(value)).encode()


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


def input_digest(items: Sequence[Any]) -> str:
    """A sha256 of the pickled items (cloudpickle for what pickle refuses), whatever the hash seed.

    Each item is pickled on its own, so object sharing between items does not change the digest.
    Sets and frozensets, at any depth, are hashed with their elements in a canonical order (see
    :func:`amortune._files.canonical_pickles`), so sets of strings digest the same in every
    process; dicts keep their insertion order.
    """
    h = hashlib.sha256()
    for data, cloud in canonical_pickles(items):
        h.update(b"%s%d:" % (b"C" if cloud else b"P", len(data)))
        h.update(data)
    return h.hexdigest()
