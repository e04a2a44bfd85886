"""Records: classes declared like dataclasses, built without generating code.

``dataclasses`` compiles an ``__init__``, ``__repr__``, ``__eq__`` and more for every class as
its module is imported (0.5-2 ms a class on the reference machine, over 20 ms for the records a
parallel call loads), and imports ``inspect`` (about 8 ms) the first time. A one-shot script
pays both before its first worker starts. A record gets the same behaviour from methods written
once here: keyword or positional construction with defaults and ``default_factory``,
``__post_init__``, a field-by-field ``repr`` and equality, and, with ``frozen=True``,
immutability and a hash. Type checkers read the fields as they read a dataclass's.
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
    cls.__record_fields__ = all_fields  # type: ignore[attr-defined]
    cls.__init__ = _make_init(cls.__qualname__, all_fields,  # type: ignore[misc]
                              hasattr(cls, "__post_init__"))
    if repr:
        cls.__repr__ = _record_repr  # type: ignore[assignment,method-assign]
    if eq:
        cls.__eq__ = _record_eq  # type: ignore[assignment,method-assign]
        cls.__hash__ = _record_hash if frozen else None  # type: ignore[assignment,method-assign]
    if frozen:
        cls.__setattr__ = _frozen_setattr  # type: ignore[assignment,method-assign]
        cls.__delattr__ = _frozen_delattr  # type: ignore[assignment,method-assign]


def _make_init(owner: str, all_fields: tuple[Field, ...], post_init: bool
               ) -> Callable[..., None]:
    names = tuple(f.name for f in all_fields)
    defaults = {f.name: f.default for f in all_fields if f.default is not MISSING}
    factories = {f.name: f.default_factory for f in all_fields
                 if f.default_factory is not MISSING}
    n = len(names)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > n:
            raise TypeError(f"{owner}() takes {n} positional arguments but {len(args)} "
                            "were given")
        values = self.__dict__  # a frozen record's own __setattr__ refuses
        values.update(zip(names, args, strict=False))
        if kwargs or len(args) < n:
            for name in names[len(args):]:
                if name in kwargs:
                    values[name] = kwargs.pop(name)
                elif name in defaults:
                    values[name] = defaults[name]
                elif name in factories:
                    values[name] = factories[name]()
                else:
                    raise TypeError(f"{owner}() missing required argument: {name!r}")
            if kwargs:
                extra = next(iter(kwargs))
                why = "multiple values for argument" if extra in names else \
                    "an unexpected keyword argument"
                raise TypeError(f"{owner}() got {why} {extra!r}")
        if post_init:
            self.__post_init__()

    return __init__


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
