"""Docs build extension: show a record's constructor as the API reference shows a dataclass's.

``Config`` and ``OptimizationResult`` are records (``amortune._record``), declared like
dataclasses; the reference reads their source, so this gives each record class the ``__init__``
its fields imply, defaults included.
"""

from __future__ import annotations

from typing import Any

from griffe import (
    Attribute,
    Class,
    Expr,
    ExprCall,
    ExprKeyword,
    Extension,
    Function,
    Module,
    Parameter,
    ParameterKind,
    Parameters,
)

_RECORD = "amortune._record.record"


def _is_record(cls: Class) -> bool:
    return any(isinstance(d.value, Expr) and (
        d.value.canonical_path == _RECORD
        or (isinstance(d.value, ExprCall) and d.value.function.canonical_path == _RECORD))
        for d in cls.decorators)


def _default(attribute: Attribute) -> str | Expr | None:
    value = attribute.value
    if isinstance(value, ExprCall) and value.function.canonical_path.endswith("_record.field"):
        for arg in value.arguments:
            if isinstance(arg, ExprKeyword) and arg.name == "default":
                return arg.value
            if isinstance(arg, ExprKeyword) and arg.name == "default_factory":
                return ExprCall(function=arg.value, arguments=[])
        return None
    return value


def _init(cls: Class) -> Function:
    params = [Parameter("self", kind=ParameterKind.positional_or_keyword)]
    for member in cls.members.values():
        if isinstance(member, Attribute) and member.annotation is not None and (
                "instance-attribute" in member.labels or "class-attribute" in member.labels):
            params.append(Parameter(member.name, annotation=member.annotation,
                                    kind=ParameterKind.positional_or_keyword,
                                    default=_default(member), docstring=member.docstring))
    return Function("__init__", lineno=0, endlineno=0, parent=cls,
                    parameters=Parameters(*params), returns="None")


def _walk(obj: Module | Class, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if isinstance(obj, Class) and "__init__" not in obj.members and _is_record(obj):
        obj.set_member("__init__", _init(obj))
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, (Module, Class)):
            _walk(member, seen)


class RecordsExtension(Extension):
    """Adds the implied ``__init__`` to every ``@record`` class of a loaded package."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        _walk(pkg, set())
