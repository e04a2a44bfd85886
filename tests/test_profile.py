"""Sampling in the caller, driven by a virtual clock: budgets, reuse, read-ahead, pickling checks."""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import cloudpickle
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amortune import _profile
from amortune._config import Config
from amortune._profile import READ_AHEAD_ITEMS, count_items, result_nbytes, sample
from tests import tasks

#: Budgets large enough that only the one a test sets can stop sampling.
ROOMY = Config(sample_items=10_000, sample_seconds=1e9)


class VirtualClock:
    """Wall and CPU clocks that move only when a task says it did work."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def clock(self) -> float:
        return self.wall

    def cpu_clock(self) -> float:
        return self.cpu

    def work(self, wall_seconds: float, cpu_share: float = 1.0) -> None:
        self.wall += wall_seconds
        self.cpu += wall_seconds * cpu_share

    def task(
        self, wall_seconds: float | Callable[[Any], float], cpu_share: float = 1.0
    ) -> Callable[[Any], Any]:
        """A function that 'takes' ``wall_seconds`` (a number or a function of the item)."""

        def func(x: Any) -> Any:
            self.work(wall_seconds(x) if callable(wall_seconds) else wall_seconds, cpu_share)
            return (x, "done")

        return func


def run(
    clock: VirtualClock, func: Callable[[Any], Any], data: Any, config: Config = ROOMY, **kw: Any
) -> _profile.Sampled:
    return sample(func, data, config, clock=clock.clock, cpu_clock=clock.cpu_clock, **kw)


class Counting:
    """A one-shot iterator over ``range(n)`` that counts how many items were pulled."""

    def __init__(self, n: int, make: Callable[[int], Any] = lambda i: i) -> None:
        self.n, self.make, self.pulled = n, make, 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.pulled >= self.n:
            raise StopIteration
        self.pulled += 1
        return self.make(self.pulled - 1)


# -- budgets ------------------------------------------------------------------------------------
def test_stops_at_sample_items() -> None:
    clock = VirtualClock()
    s = run(clock, clock.task(0.25), list(range(100)), Config(sample_items=8, sample_seconds=1e9))
    assert s.profile.n_sampled == 8
    assert s.inputs == list(range(8))
    assert s.n_remaining == 92 and s.n_remaining_known


def test_stops_at_sample_seconds() -> None:
    clock = VirtualClock()
    # 0.25 s per item against a 5 s budget: the 20th item reaches the deadline.
    s = run(clock, clock.task(0.25), list(range(100)), Config(sample_items=64, sample_seconds=5.0))
    assert s.profile.n_sampled == 20
    assert s.profile.sampled_wall_seconds == 5.0
    assert clock.wall == 5.0  # nothing was run past the budget


def test_one_slow_item_is_enough() -> None:
    clock = VirtualClock()
    s = run(clock, clock.task(60.0), list(range(100)), Config(sample_seconds=0.02))
    assert s.profile.n_sampled == 1
    assert s.profile.item_wall_seconds == 60.0


def test_per_item_measurements() -> None:
    clock = VirtualClock()
    cost = {0: 0.25, 1: 0.75}
    s = run(clock, clock.task(lambda x: cost[x % 2], cpu_share=0.5), list(range(10)),
            Config(sample_items=4, sample_seconds=1e9))
    p = s.profile
    assert p.n_sampled == 4
    assert p.sampled_wall_seconds == 2.0
    assert p.item_wall_seconds == 0.5
    assert p.item_cpu_seconds == 0.25
    assert p.item_wall_cv == pytest.approx(0.5)  # pstdev 0.25 / mean 0.5
    assert p.max_item_wall_seconds == 0.75


def test_cpu_time_never_exceeds_wall_time() -> None:
    # Native code on several threads can report more CPU than wall time; the model wants a share.
    clock = VirtualClock()
    s = run(clock, clock.task(0.25, cpu_share=3.0), list(range(10)))
    assert s.profile.item_cpu_seconds == s.profile.item_wall_seconds == 0.25


# -- results and inputs are kept ----------------------------------------------------------------
@pytest.mark.parametrize("shape", ["list", "range", "tuple", "array", "generator"])
def test_results_and_inputs_equal_map_on_the_prefix(shape: str) -> None:
    values = list(range(30))
    data: Any = {
        "list": values,
        "range": range(30),
        "tuple": tuple(values),
        "array": np.arange(30),
        "generator": iter(values),
    }[shape]
    clock = VirtualClock()
    func = clock.task(0.25)
    s = run(clock, func, data, Config(sample_items=7, sample_seconds=1e9))
    assert s.inputs == values[:7]
    assert s.results == [(x, "done") for x in values[:7]]
    assert list(s.inputs) + list(s.remaining_items()) == values
    assert s.n_remaining == 23
    assert s.n_remaining_known


def test_exception_in_func_carries_the_index() -> None:
    clock = VirtualClock()
    with pytest.raises(ValueError, match="bad item 3") as info:
        run(clock, lambda x: tasks.raise_value_error_at(x, 3), list(range(10)))
    assert any("item 3" in note for note in getattr(info.value, "__notes__", []))


def test_empty_input() -> None:
    clock = VirtualClock()
    s = run(clock, clock.task(0.25), [])
    assert s.profile.n_sampled == 0
    assert s.results == [] and s.n_remaining == 0
    assert list(s.remaining_items()) == []


# -- read-ahead of length-less inputs -----------------------------------------------------------
def test_generator_read_ahead_is_bounded_by_items() -> None:
    clock = VirtualClock()
    source = Counting(100_000)
    s = run(clock, clock.task(0.0), source, Config(sample_items=4, sample_seconds=1e9))
    assert len(s.read_ahead) == READ_AHEAD_ITEMS
    assert source.pulled == 4 + READ_AHEAD_ITEMS
    assert not s.n_remaining_known
    assert s.n_remaining == READ_AHEAD_ITEMS
    rest = list(s.remaining_items())
    assert rest == list(range(4, 100_000))


def test_generator_read_ahead_is_bounded_by_bytes() -> None:
    clock = VirtualClock()
    item_bytes = 64 << 10
    source = Counting(10_000, lambda i: bytes([i % 256]) * item_bytes)
    with mock.patch.object(_profile, "READ_AHEAD_BYTES", 1 << 20):
        s = run(clock, clock.task(0.0), source, Config(sample_items=2, sample_seconds=1e9))
    assert 1 <= len(s.read_ahead) <= (1 << 20) // item_bytes
    assert source.pulled == 2 + len(s.read_ahead)
    assert not s.n_remaining_known


def test_short_generator_length_becomes_known() -> None:
    clock = VirtualClock()
    s = run(clock, clock.task(0.0), (i for i in range(50)), Config(sample_items=4))
    assert s.n_remaining_known
    assert s.n_remaining == 46
    assert list(s.remaining_items()) == list(range(4, 50))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 60),
    sample_items=st.integers(1, 12),
    read_ahead=st.integers(1, 20),
    shape=st.sampled_from(["generator", "list", "range"]),
)
def test_nothing_lost_or_duplicated(n: int, sample_items: int, read_ahead: int, shape: str) -> None:
    clock = VirtualClock()
    data: Any = {"generator": (i for i in range(n)), "list": list(range(n)), "range": range(n)}[
        shape
    ]
    with mock.patch.object(_profile, "READ_AHEAD_ITEMS", read_ahead):
        s = run(clock, clock.task(0.001), data, Config(sample_items=sample_items,
                                                       sample_seconds=1e9))
    sampled = min(n, sample_items)
    assert s.inputs == list(range(sampled))
    assert s.results == [(i, "done") for i in range(sampled)]
    assert list(s.remaining_items()) == list(range(sampled, n))
    if s.n_remaining_known:
        assert s.profile.n_sampled + s.n_remaining == n
    else:
        assert shape == "generator"
        assert s.n_remaining == read_ahead <= n - sampled


def test_cpu_that_other_threads_burn_is_not_the_items() -> None:
    """Items that wait stay waiting while another thread of the process computes (spinning
    BLAS threads after ``import numpy``, an application's own busy thread)."""
    import threading

    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            pass

    busy = threading.Thread(target=burn, daemon=True)
    busy.start()
    try:
        s = sample(tasks.sleep_then_return, [0.005] * 50, Config(sample_items=8,
                                                                 sample_seconds=1.0))
    finally:
        stop.set()
        busy.join()
    p = s.profile
    assert p.n_sampled == 8
    assert p.item_cpu_seconds < 0.3 * p.item_wall_seconds, p


def test_the_first_look_reads_ahead_as_far_as_the_sampler() -> None:  # the same bounds
    from amortune import _profile, _quick

    assert _quick.READ_AHEAD_ITEMS == _profile.READ_AHEAD_ITEMS
    assert _quick.READ_AHEAD_BYTES == _profile.READ_AHEAD_BYTES


def _first_look(data: Any) -> Any:
    from amortune._quick import quick_serial

    return quick_serial(lambda x: x, data, threshold_seconds=1e9)


@pytest.mark.parametrize("n", [0, 1, 50, READ_AHEAD_ITEMS])
def test_a_short_input_without_a_length_is_judged_as_a_list(n: int) -> None:
    got = _first_look(i for i in range(n))
    assert got.rest is None and got.results == list(range(n))


def test_a_long_input_without_a_length_is_read_a_bounded_way_and_handed_on() -> None:
    pulled: list[int] = []

    def endless() -> Iterator[int]:
        for i in itertools.count():
            pulled.append(i)
            yield i

    got = _first_look(endless())
    assert got.results == [0] and got.n_rest is None  # the planner decides, length unknown
    assert len(pulled) == 1 + READ_AHEAD_ITEMS
    assert list(itertools.islice(got.rest, READ_AHEAD_ITEMS + 100)) == list(
        range(1, READ_AHEAD_ITEMS + 101))


def test_big_items_without_a_length_are_read_ahead_by_bytes() -> None:
    from amortune._quick import READ_AHEAD_BYTES

    pulled: list[int] = []

    def arrays() -> Iterator[np.ndarray]:
        for i in range(1000):
            pulled.append(i)
            yield np.full(1 << 20, i % 256, dtype=np.uint8)  # 1 MiB each

    got = _first_look(arrays())
    assert got.n_rest is None
    assert len(pulled) == 1 + READ_AHEAD_BYTES // (1 << 20)  # 64 MiB ahead, not 1000 MiB
    assert [int(a[0]) for a in [*got.results, *got.rest]] == [i % 256 for i in range(1000)]


def test_a_first_item_that_fails_reads_no_further() -> None:
    """As in ``map``: an error on the first item leaves the rest of the input unread."""
    from amortune._quick import quick_serial

    pulled: list[int] = []

    def source() -> Iterator[int]:
        for i in range(100):
            pulled.append(i)
            yield i

    with pytest.raises(ZeroDivisionError):
        quick_serial(lambda x: 1 / x, source(), threshold_seconds=1e9)
    assert pulled == [0]


def test_an_input_that_fails_while_read_ahead_fails_in_its_place() -> None:
    """As in ``map``: the items before the failure still run, then the input's error."""

    def broken() -> Iterator[int]:
        yield from range(5)
        raise OSError("disk gone")

    got = _first_look(broken())
    assert got.results == [0]
    rest = iter(got.rest)
    assert list(itertools.islice(rest, 4)) == [1, 2, 3, 4]
    with pytest.raises(OSError, match="disk gone"):
        next(rest)


# -- pickling is measured only when parallel could pay -------------------------------------------
def test_trivial_work_skips_pickling() -> None:
    clock = VirtualClock()
    s = run(clock, clock.task(1e-7), list(range(1000)), Config(sample_items=10))
    p = s.profile
    assert s.func_bytes is None
    assert p.in_bytes == p.out_bytes == 0
    assert p.picklable


def test_all_sampled_skips_pickling() -> None:
    clock = VirtualClock()
    s = run(clock, clock.task(5.0), list(range(3)))
    assert s.n_remaining == 0
    assert s.func_bytes is None


def test_parallel_floor_is_respected() -> None:
    clock = VirtualClock()
    s = run(clock, clock.task(0.25), list(range(100)), Config(sample_items=4),
            parallel_floor_seconds=1e6)
    assert s.func_bytes is None


def test_worthwhile_work_measures_pickling() -> None:
    clock = VirtualClock()
    func = clock.task(0.25)
    s = run(clock, func, [b"x" * 1000] * 100, Config(sample_items=4))
    p = s.profile
    assert p.picklable and p.not_picklable_reason == ""
    assert s.func_bytes is not None
    assert cloudpickle.loads(s.func_bytes)(b"ab") == (b"ab", "done")
    assert p.in_bytes >= 1000
    assert p.out_bytes >= 1000


def test_numpy_results_are_measured_by_nbytes() -> None:
    clock = VirtualClock()

    def make(x: int) -> np.ndarray:
        clock.work(0.25)
        return np.full(1 << 17, x, dtype=np.float64)  # 1 MiB

    s = run(clock, make, list(range(50)), Config(sample_items=3))
    assert s.profile.result_memory_bytes >= 1 << 20
    assert s.profile.out_bytes >= 1 << 20


class UnpicklableCallable:
    def __call__(self, x: Any) -> Any:
        return x

    def __reduce__(self) -> Any:
        raise TypeError("this callable refuses to be pickled")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("function", "this callable refuses to be pickled"),
        ("input", "an input cannot be pickled"),
        ("result", "a result cannot be pickled"),
    ],
)
def test_unpicklable_sets_picklable_false_with_reason(case: str, expected: str) -> None:
    clock = VirtualClock()

    def func(x: Any) -> Any:
        clock.work(0.25)
        return tasks.Unpicklable() if case == "result" else 1

    target: Callable[[Any], Any] = _Wrapped(func) if case == "function" else func
    data: list[Any] = (
        [tasks.Unpicklable() for _ in range(20)] if case == "input" else list(range(20))
    )
    s = run(clock, target, data, Config(sample_items=4, sample_seconds=1e9))
    assert not s.profile.picklable
    assert expected in s.profile.not_picklable_reason
    assert len(s.results) == 4  # the sample still ran and is kept


class _Wrapped:
    """A callable whose pickling fails (it holds an object that refuses to be pickled)."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func
        self.guard = UnpicklableCallable()

    def __call__(self, x: Any) -> Any:
        return self.func(x)


# -- result_nbytes --------------------------------------------------------------------------------
def test_result_nbytes_counts_arrays_by_nbytes() -> None:
    a = np.zeros(1 << 20, dtype=np.uint8)
    assert (1 << 20) <= result_nbytes(a) < (1 << 20) + 4096
    view = a[: 1 << 19]
    assert result_nbytes(view) >= 1 << 19
    assert result_nbytes([a, a, a]) >= 3 << 20
    assert result_nbytes((1, [a])) >= 1 << 20
    assert result_nbytes({"k": a}) >= 1 << 20


def test_result_nbytes_duck_types_nbytes() -> None:
    class Tensorish:
        nbytes = 10**9

    assert result_nbytes(Tensorish()) >= 10**9


def test_result_nbytes_plain_objects() -> None:
    assert result_nbytes(b"x" * 10_000) >= 10_000
    assert result_nbytes("y" * 10_000) >= 10_000
    assert result_nbytes(memoryview(b"x" * 100)) > 0
    assert result_nbytes([b"x" * 1000] * 10) >= 10_000
    assert 0 < result_nbytes(3) < 100


@pytest.mark.parametrize(
    "data, expected",
    [([1, 2], 2), (range(5), 5), ((), 0), (np.arange(4), 4), (iter([1]), None),
     ((x for x in range(0)), None), (itertools.count(), None)],
)
def test_count_items(data: Any, expected: int | None) -> None:
    assert count_items(data) == expected


def test_sampled_objects_are_plain_data() -> None:
    clock = VirtualClock()
    s = run(clock, clock.task(0.25), list(range(20)), Config(sample_items=2))
    assert pickle.loads(pickle.dumps(s.profile)) == s.profile


# -- robustness of the measurements the model classifies on ------------------------------------
def test_one_preempted_item_does_not_make_cpu_work_look_io_bound() -> None:
    """A 1 us CPU-bound function whose sample was descheduled once for 10 ms stays serial.

    On a shared machine the OS can park the caller mid-sample: that item's wall time grows while
    its CPU time does not, and a mean over the sample then reads as "99% waiting".
    """
    from amortune._model import Costs, decide

    clock = VirtualClock()

    def square(x: int) -> int:  # 0.2 us of CPU, like ``x * x``; item 30 waits 10 ms for a core
        clock.work(0.010 if x == 30 else 2e-7, cpu_share=0.0 if x == 30 else 1.0)
        return x * x

    s = run(clock, square, range(200_000), Config(sample_items=64, sample_seconds=1.0))
    assert s.profile.item_cpu_seconds >= 0.5 * s.profile.item_wall_seconds, s.profile
    d = decide(s.profile, s.n_remaining, Costs(usable_cores=2, available_memory_bytes=8 << 30))
    assert d.executor == "serial", d.reasons


def test_costs_rising_along_the_input_are_measured_as_a_trend() -> None:
    clock = VirtualClock()
    s = run(clock, clock.task(lambda x: 1e-4 + 2e-6 * x), list(range(500)),
            Config(sample_items=40, sample_seconds=1e9))
    assert s.profile.item_wall_slope == pytest.approx(2e-6)
    assert s.profile.item_wall_trend_r == pytest.approx(1.0)


@pytest.mark.parametrize("cost", [lambda x: 1e-3, lambda x: 1e-3 * (1 + 0.5 * (x * 7919 % 13 == 0)),
                                  lambda x: 1e-3 * (1 + (x % 7) / 7)])
def test_flat_spiky_or_periodic_costs_show_no_trend(cost: Callable[[int], float]) -> None:
    clock = VirtualClock()
    s = run(clock, clock.task(cost), list(range(500)), Config(sample_items=40, sample_seconds=1e9))
    assert s.profile.item_wall_trend_r < 0.8
