"""Records (``amortune._record``): built like dataclasses, without generating code at import."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amortune._record import (
    COMPILE_AFTER,
    FrozenInstanceError,
    asdict,
    field,
    fields,
    record,
    replace,
)


@record(frozen=True)
class Point:
    """A frozen record with a default."""

    x: int
    y: int = 0
    label: str = field(default="", compare=False)
    cache: Any = field(default=None, repr=False, compare=False)


@record()
class Bag:
    items: list[int] = field(default_factory=list)
    name: str = "bag"


@record(frozen=True)
class Checked:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")


@record(frozen=True)
class Child(Point):
    z: int = 0


def test_positional_keyword_and_defaults() -> None:
    assert Point(1).y == 0
    assert Point(1, 2) == Point(x=1, y=2) == Point(1, y=2)
    assert Point.y == 0  # a default stays readable on the class, as on a dataclass


@pytest.mark.parametrize(("call", "message"), [
    (lambda: Point(), "missing 1 required positional argument: 'x'"),
    (lambda: Point(1, 2, "a", None, 5), "takes from 2 to 5 positional arguments but 6 were given"),
    (lambda: Point(1, x=2), "multiple values for argument 'x'"),
    (lambda: Point(1, w=2), "unexpected keyword argument 'w'"),
])
def test_bad_arguments_name_the_problem(call: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        call()


def test_a_factory_runs_once_per_instance() -> None:
    a, b = Bag(), Bag()
    a.items.append(1)
    assert b.items == [] and a.items == [1]


def test_frozen_refuses_assignment_and_deletion() -> None:
    p = Point(1)
    with pytest.raises(FrozenInstanceError, match="'x'"):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del p.x  # type: ignore[misc]
    assert isinstance(FrozenInstanceError("x"), AttributeError)
    object.__setattr__(p, "cache", 3)  # the documented escape hatch still works
    assert p.cache == 3


def test_equality_hash_and_repr_follow_the_field_options() -> None:
    assert Point(1, label="a") == Point(1, label="b")
    assert hash(Point(1, label="a")) == hash(Point(1, label="b"))
    assert Point(1) != Point(2)
    assert Point(1) != (1, 0)  # another type is never equal
    assert repr(Point(1, 2, "p", cache=object())) == "Point(x=1, y=2, label='p')"
    with pytest.raises(TypeError):
        hash(Bag())  # mutable and comparable: unhashable, as a dataclass
    assert Bag([1]) == Bag([1]) and Bag([1]) != Bag([2])


def test_post_init_validates_and_replace_runs_it_again() -> None:
    with pytest.raises(ValueError, match="n must be >= 0"):
        Checked(-1)
    assert replace(Checked(1), n=2) == Checked(2)
    with pytest.raises(ValueError):
        replace(Checked(1), n=-5)


def test_inherited_fields_come_first() -> None:
    assert [f.name for f in fields(Child)] == ["x", "y", "label", "cache", "z"]
    assert Child(1, 2, z=3).z == 3


def test_asdict_converts_nested_records() -> None:
    assert asdict(Bag([1], "b")) == {"items": [1], "name": "b"}
    nested = Bag([Point(1)])  # type: ignore[list-item]
    assert asdict(nested)["items"] == [{"x": 1, "y": 0, "label": "", "cache": None}]
    with pytest.raises(TypeError):
        asdict(3)
    with pytest.raises(TypeError):
        fields(3)


def test_a_field_takes_a_default_or_a_factory_not_both() -> None:
    with pytest.raises(ValueError):
        field(default=1, default_factory=list)


def test_a_required_field_after_a_default_is_refused_when_the_class_is_made() -> None:
    with pytest.raises(TypeError, match="'b' without a default follows 'a'"):
        @record()
        class Bad:
            a: int = 0
            b: int


def test_construction_compiles_the_class_own_init_after_a_few() -> None:
    @record(frozen=True)
    class Fresh:
        a: int
        b: list[int] = field(default_factory=list)

    generic = Fresh.__init__
    early = [Fresh(k) for k in range(COMPILE_AFTER)]
    assert Fresh.__init__ is generic  # a class built a few times compiles nothing
    late = Fresh(2, [3])
    assert Fresh.__init__ is not generic  # replaced by the compiled one
    assert (early[0].a, early[-1].a, early[0].b, late.b) == (0, COMPILE_AFTER - 1, [], [3])
    assert early[0].b is not early[1].b is not Fresh(1).b


def _fresh_point_class() -> Any:
    @record(frozen=True)
    class P:
        x: int
        y: int = 0
        tags: list[str] = field(default_factory=list)

        def __post_init__(self) -> None:
            if self.x < 0:
                raise ValueError("x < 0")

    return P


@given(x=st.integers(), y=st.one_of(st.none(), st.integers()), by_keyword=st.booleans(),
       tags=st.one_of(st.none(), st.lists(st.text(max_size=3), max_size=3)))
def test_the_generic_init_and_the_compiled_one_agree(x: int, y: int | None, by_keyword: bool,
                                                     tags: list[str] | None) -> None:
    generic, compiled = _fresh_point_class(), _fresh_point_class()
    for _ in range(COMPILE_AFTER):
        compiled(0)
    args: list[Any] = [] if by_keyword else [x]
    kwargs: dict[str, Any] = {"x": x} if by_keyword else {}
    if y is not None:
        kwargs["y"] = y
    if tags is not None:
        kwargs["tags"] = tags
    outcomes = []
    for cls in (generic, compiled):
        try:
            p = cls(*args, **kwargs)
            outcomes.append(("ok", p.x, p.y, p.tags))
        except ValueError as exc:
            outcomes.append(("raised", str(exc)))
    assert outcomes[0] == outcomes[1]


@given(x=st.integers(), y=st.integers(), label=st.text(max_size=5))
def test_pickle_and_copy_round_trip(x: int, y: int, label: str) -> None:
    p = Point(x, y, label)
    for q in (pickle.loads(pickle.dumps(p)), copy.deepcopy(p), copy.copy(p)):
        assert q == p and q.label == label
        with pytest.raises(FrozenInstanceError):
            q.x = 0  # type: ignore[misc]


def test_a_mutable_record_assigns_its_fields_as_a_dataclass_does() -> None:
    # Plain assignment, through the class's own __setattr__; a frozen record bypasses its own.
    @record()
    class Logged:
        a: int
        b: int = 2

        def __setattr__(self, name: str, value: Any) -> None:
            object.__setattr__(self, "log", [*getattr(self, "log", []), name])
            object.__setattr__(self, name, value)

    built = [Logged(k) for k in range(COMPILE_AFTER + 2)]  # the generic init, then the compiled
    assert all(r.log == ["a", "b"] for r in built)  # type: ignore[attr-defined]
    assert (built[0].a, built[-1].a, built[-1].b) == (0, COMPILE_AFTER + 1, 2)
