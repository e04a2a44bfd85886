"""execute() returns exactly list(map(func, data)) for every input shape and executor."""

from __future__ import annotations

import functools
import itertools
import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amortune
from amortune import Config
from tests import tasks

EXECUTORS = ["serial", "threads", "processes"]
FAST = Config(sample_items=3, sample_seconds=0.001, target_chunk_seconds=0.001)


def shapes(values: list[int]):
    """The same values as a list, tuple, range-like, numpy array and a generator."""
    return {
        "list": values,
        "tuple": tuple(values),
        "array": np.array(values, dtype=np.int64),
        "generator": (v for v in values),
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.integers(-10**6, 10**6), max_size=300),
       executor=st.sampled_from(EXECUTORS),
       shape=st.sampled_from(["list", "tuple", "array", "generator"]),
       chunksize=st.one_of(st.none(), st.integers(1, 50)))
def test_execute_equals_map(values, executor, shape, chunksize):
    data = shapes(values)[shape]
    expected = list(map(tasks.square, shapes(values)[shape]))
    got = amortune.execute(tasks.square, data, executor=executor, chunksize=chunksize, config=FAST)
    assert got == expected


@settings(max_examples=15, deadline=None)
@given(start=st.integers(-50, 50), stop=st.integers(-50, 400), step=st.integers(1, 7))
def test_ranges(start, stop, step):
    r = range(start, stop, step)
    assert amortune.execute(tasks.square, r, executor="processes", config=FAST) == [x * x for x in r]


@pytest.mark.parametrize("executor", EXECUTORS + [None])
@pytest.mark.parametrize("data", [[], (), range(0), np.array([]), iter(())], ids=repr)
def test_empty_input(executor, data):
    assert amortune.execute(tasks.square, data, executor=executor) == []


@pytest.mark.parametrize("executor", EXECUTORS)
def test_lambda_and_closure(executor):
    k = 3
    assert amortune.execute(lambda x: x * k, range(50), executor=executor, config=FAST) == [
        x * 3 for x in range(50)]


def test_numpy_rows_match_map():
    arr = np.arange(60.0).reshape(20, 3)
    got = amortune.execute(np.sum, arr, executor="processes", config=FAST)
    assert got == list(map(np.sum, arr))


@pytest.mark.parametrize("executor", EXECUTORS)
def test_func_never_called_twice(tmp_path, executor):
    data = [(str(tmp_path), i) for i in range(200)]
    assert amortune.execute(tasks.once_per_item, data, executor=executor, config=FAST) == list(range(200))
    assert sorted(int(n) for n in os.listdir(tmp_path)) == list(range(200))


def test_generator_with_auto_plan_is_not_lost_or_duplicated(tmp_path):
    gen = ((str(tmp_path), i) for i in range(500))
    assert amortune.execute(tasks.once_per_item, gen) == list(range(500))


@pytest.mark.parametrize("executor", EXECUTORS)
def test_exception_keeps_type_traceback_and_index(executor):
    with pytest.raises(ValueError, match="bad item 7") as info:
        amortune.execute(tasks.fail_on_7, range(40), executor=executor, chunksize=4, config=FAST)
    exc = info.value
    assert any("item 7" in note for note in getattr(exc, "__notes__", []))
    if executor == "processes":
        assert "raise_value_error_at" in str(exc.__cause__)


def test_first_error_in_input_order_wins():
    def f(x):
        if x in (13, 90):
            raise KeyError(x)
        return x

    with pytest.raises(KeyError) as info:
        amortune.execute(f, range(200), executor="processes", chunksize=5, config=FAST)
    assert info.value.args == (13,)


def test_unpicklable_function_runs_serially_with_warning():
    import threading

    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            time.sleep(0.001)
            return x + 1

    with pytest.warns(amortune.AmortuneWarning, match="cannot"):
        got = amortune.execute(uses_lock, range(60), executor="processes")
    assert got == list(range(1, 61))
    plan = amortune.optimize(uses_lock, range(60))
    assert plan.executor != "processes"
    assert any("pickle" in r for r in plan.reasons + tuple(plan.warnings))


def test_pool_is_reused_between_calls():
    from amortune.backends._warm import peek_warm_pool

    amortune.execute(tasks.spin, [0.002] * 60, executor="processes", n_jobs=2)
    pool = peek_warm_pool(Config().start_method)
    assert pool is not None
    pids = set(pool.pids())
    amortune.execute(tasks.spin, [0.002] * 60, executor="processes", n_jobs=2)
    assert peek_warm_pool(Config().start_method) is pool
    assert set(pool.pids()) == pids


def test_progress_callback_reaches_one():
    seen = []
    amortune.execute(tasks.square, range(300), executor="processes", config=FAST,
                     progress_callback=lambda phase, frac: seen.append((phase, frac)))
    assert seen[0] == ("optimize", 1.0)
    assert seen[-1] == ("execute", 1.0)
    fracs = [f for p, f in seen if p == "execute"]
    assert fracs == sorted(fracs)


def test_progress_bar_counts_every_item():
    import io

    from tqdm import tqdm

    bar = tqdm(total=None, file=io.StringIO())
    amortune.execute(tasks.square, range(123), executor="threads", progress=bar, config=FAST)
    assert bar.n == 123
    bar.close()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="n_jobs"):
        amortune.execute(tasks.square, range(3), n_jobs=0)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        amortune.execute(tasks.square, range(3), executor="nope")
    with pytest.raises(TypeError, match="backend must be"):
        amortune.execute(tasks.square, range(3), backend=object())
    with pytest.raises(TypeError, match="callable"):
        amortune.execute(42, range(3))


def test_endless_generator_stays_bounded():
    """An endless input is read only a bounded way ahead of what the consumer took."""
    taken = []

    def gen():
        for i in itertools.count():
            taken.append(i)
            yield i

    stream = amortune.imap(tasks.square, gen(), backend="processes", config=FAST)
    got = list(itertools.islice(stream, 3000))
    stream.close()
    assert got == [i * i for i in range(3000)]
    # The read-ahead (4096 items at most) plus a bounded window of chunks, whose size follows
    # the measured item time: far from the endless whole, and nothing is read after close().
    read = len(taken)
    assert read < 2_000_000, read
    time.sleep(0.2)
    assert len(taken) == read


def test_execute_runs_a_plan_without_sampling_again(tmp_path):
    marks = tmp_path / "calls"
    marks.mkdir()

    plan = amortune.optimize(functools.partial(tasks.touch_and_square, str(marks)), range(50))
    sampled = len(list(marks.iterdir()))
    assert sampled >= 1
    got = amortune.execute(functools.partial(tasks.touch_and_square, str(marks)), plan.data,
                           plan=plan)
    assert got == [i * i for i in range(50)]
    assert sorted(int(p.name.split(".")[0]) for p in marks.iterdir()) == list(range(50))


@pytest.mark.parametrize("n_jobs", [-1, -2])
def test_negative_n_jobs_count_from_the_usable_cores(n_jobs):
    plan = amortune.optimize(tasks.spin, [0.002] * 200, n_jobs=n_jobs, executor="processes")
    cores = amortune.probe_system().usable_cores
    assert plan.n_jobs == max(1, cores + 1 + n_jobs)
