"""Records: classes declared like dataclasses, with no code generated while modules import.

``dataclasses`` compiles an ``__init__``, ``__repr__``, ``__eq__`` and more for every class as
its module is imported (0.5-2 ms a class on the reference machine, over 20 ms for the records a
parallel call loads), and imports ``inspect`` (about 8 ms) the first time. A one-shot script
pays both before its first worker starts. A record gets the same behaviour from methods written
once here: keyword or positional construction with defaults and ``default_factory``,
``__post_init__``, a field-by-field ``repr`` and equality, and, with ``frozen=True``,
immutability and a hash. Only ``__init__`` is compiled, per class, once it has been
constructed a few times.
Type checkers read the fields as they read a dataclass's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

__all__ = ["FrozenInstanceError", "asdict", "field", "fields", "record", "replace"]

_T = TypeVar("_T")
_F = TypeVar("_F")

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:
    def dataclass_transform(**_: Any) -> Callable[[_F], _F]:
        """Tells type checkers that ``record`` makes dataclass-like classes; nothing at run time."""
        return lambda f: f


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class FrozenInstanceError(AttributeError):
    """Assigning to a field of a frozen record."""


class Field:
    """One declared field: its name, default (or factory) and whether repr and == use it."""

    __slots__ = ("name", "default", "default_factory", "repr", "compare")

    def __init__(self, default: Any = MISSING, default_factory: Any = MISSING,
                 repr: bool = True, compare: bool = True) -> None:
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("a field cannot have both a default and a default_factory")
        self.name = ""
        self.default, self.default_factory = default, default_factory
        self.repr, self.compare = repr, compare

    def __repr__(self) -> str:
        return f"Field({self.name!r})"


def field(*, default: Any = MISSING, default_factory: Callable[[], Any] | Any = MISSING,
          repr: bool = True, compare: bool = True) -> Any:
    """A field with options, as ``dataclasses.field``."""
    return Field(default, default_factory, repr, compare)


@dataclass_transform(field_specifiers=(field,))
def record(*, frozen: bool = False, eq: bool = True, repr: bool = True
           ) -> Callable[[type[_T]], type[_T]]:
    """Make a class with annotated fields a record (``@record(frozen=True)``)."""

    def build(cls: type[_T]) -> type[_T]:
        _build(cls, frozen=frozen, eq=eq, repr=repr)
        return cls

    return build


def fields(obj: Any) -> tuple[Field, ...]:
    """The fields of a record class or instance, in declaration order."""
    found: tuple[Field, ...] | None = getattr(obj, "__record_fields__", None)
    if found is None:
        raise TypeError(f"{obj!r} is not a record")
    return found


def replace(obj: _T, /, **changes: Any) -> _T:
    """A copy of the record ``obj`` with some fields changed (``__post_init__`` runs again)."""
    for f in fields(obj):
        if f.name not in changes:
            changes[f.name] = getattr(obj, f.name)
    return type(obj)(**changes)


def asdict(obj: Any) -> dict[str, Any]:
    """The record's fields as a dict, records inside lists, tuples and dicts converted too."""
    out = _plain(obj)
    if not isinstance(out, dict):
        raise TypeError(f"{obj!r} is not a record")
    return out


def _plain(value: Any) -> Any:
    if hasattr(type(value), "__record_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _build(cls: type, *, frozen: bool, eq: bool, repr: bool) -> None:
    declared: list[Field] = []
    for name in cls.__dict__.get("__annotations__", {}):
        value = cls.__dict__.get(name, MISSING)
        f = value if isinstance(value, Field) else Field(default=value)
        f.name = name
        if f.default is MISSING:
            if isinstance(value, Field):
                delattr(cls, name)
        else:
            setattr(cls, name, f.default)
        declared.append(f)
    inherited = [f for base in reversed(cls.__mro__[1:])
                 for f in getattr(base, "__record_fields__", ())]
    by_name = {f.name: f for f in [*inherited, *declared]}
    all_fields = tuple(by_name.values())
    seen_default = ""
    for f in all_fields:
        if f.default is not MISSING or f.default_factory is not MISSING:
            seen_default = f.name
        elif seen_default:
            raise TypeError(f"{cls.__qualname__}: field {f.name!r} without a default follows "
                            f"{seen_default!r}, which has one")
    cls.__record_fields__ = all_fields  # type: ignore[attr-defined]
    cls.__init__ = _make_init(  # type: ignore[misc]
        cls, all_fields, hasattr(cls, "__post_init__"), frozen)
    if repr:
        cls.__repr__ = _record_repr  # type: ignore[assignment,method-assign]
    if eq:
        cls.__eq__ = _record_eq  # type: ignore[assignment,method-assign]
        cls.__hash__ = _record_hash if frozen else None  # type: ignore[assignment,method-assign]
    if frozen:
        cls.__setattr__ = _frozen_setattr  # type: ignore[assignment,method-assign]
        cls.__delattr__ = _frozen_delattr  # type: ignore[assignment,method-assign]


#: A record class runs the generic ``__init__`` this many times before it compiles its own: a
#: class a run constructs once or twice never pays the ~0.1 ms a compilation costs.
COMPILE_AFTER = 32


def _make_init(cls: type, all_fields: tuple[Field, ...], post_init: bool, frozen: bool = False
               ) -> Callable[..., None]:
    """An ``__init__`` that binds arguments to fields generically, and compiles the class's own
    after :data:`COMPILE_AFTER` constructions.

    The compiled one is as fast as a dataclass's (the generic loop takes about three times as
    long). A call the generic loop cannot bind (an argument missing, unknown or given twice)
    goes to the compiled one, so the error is Python's own.
    """
    names = frozenset(f.name for f in all_fields)
    calls = [0]

    def compiled(self: Any, *args: Any, **kwargs: Any) -> None:
        init = _compile_init(cls, all_fields, post_init, frozen)
        cls.__init__ = init  # type: ignore[misc]
        init(self, *args, **kwargs)

    assign = object.__setattr__ if frozen else setattr

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] > COMPILE_AFTER or len(args) > len(all_fields):
            return compiled(self, *args, **kwargs)
        values = dict(zip((f.name for f in all_fields), args, strict=False))
        for name, value in kwargs.items():
            if name in values or name not in names:
                return compiled(self, *args, **kwargs)
            values[name] = value
        for f in all_fields[len(args):]:
            if f.name not in values:
                if f.default is not MISSING:
                    values[f.name] = f.default
                elif f.default_factory is not MISSING:
                    values[f.name] = f.default_factory()
                else:
                    return compiled(self, *args, **kwargs)
        for f in all_fields:
            assign(self, f.name, values[f.name])
        if post_init:
            self.__post_init__()
        return None

    return __init__


def _compile_init(cls: type, all_fields: tuple[Field, ...], post_init: bool,
                  frozen: bool = False) -> Callable[..., None]:
    """The class's own ``__init__``: a frozen record sets its fields with
    ``object.__setattr__``, any other with plain assignment (three times as fast), as a
    dataclass does."""
    env: dict[str, Any] = {"_set": object.__setattr__, "_MISSING": MISSING}
    params, body = [], []

    def assign(name: str, value: str) -> str:
        return f"    _set(self, {name!r}, {value})" if frozen else f"    self.{name} = {value}"

    for k, f in enumerate(all_fields):
        if f.default is not MISSING:
            env[f"_default_{k}"] = f.default
            params.append(f"{f.name}=_default_{k}")
            body.append(assign(f.name, f.name))
        elif f.default_factory is not MISSING:
            env[f"_factory_{k}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            body.append(assign(f.name, f"_factory_{k}() if {f.name} is _MISSING else {f.name}"))
        else:
            params.append(f.name)
            body.append(assign(f.name, f.name))
    if post_init:
        body.append("    self.__post_init__()")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or ["    pass"])
    exec(compile(source, f"<record {cls.__qualname__}>", "exec"), env)
    init: Callable[..., None] = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def _record_repr(self: Any) -> str:
    shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.__record_fields__
                      if f.repr)
    return f"{type(self).__qualname__}({shown})"


def _compared(self: Any) -> tuple[Any, ...]:
    return tuple(getattr(self, f.name) for f in self.__record_fields__ if f.compare)


def _record_eq(self: Any, other: Any) -> Any:
    if type(other) is not type(self):
        return NotImplemented
    return _compared(self) == _compared(other)


def _record_hash(self: Any) -> int:
    return hash(_compared(self))


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r} of a frozen "
                              f"{type(self).__qualname__}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r} of a frozen "
                              f"{type(self).__qualname__}")
