"""amortune.Pool is a drop-in for multiprocessing.Pool.

The parity suite runs the same scenarios against both classes (same start method) and asserts the
same observable results; the amortune-only tests cover what the stdlib cannot do: a dead worker
raises instead of hanging, lambdas travel, chunk sizes are tuned without running an item twice,
``imap`` streams an endless generator.
"""

from __future__ import annotations

import gc
import io
import itertools
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amortune
from amortune._errors import RemoteTraceback
from tests import tasks

START = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stdlib_pool(*args: Any, **kwargs: Any) -> Any:
    return mp.get_context(START).Pool(*args, **kwargs)


def _amortune_pool(*args: Any, **kwargs: Any) -> Any:
    return amortune.Pool(*args, context=START, **kwargs)


@pytest.fixture(params=["multiprocessing", "amortune"])
def make_pool(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Each parity test runs once with multiprocessing.Pool and once with amortune.Pool."""
    return {"multiprocessing": _stdlib_pool, "amortune": _amortune_pool}[request.param]


def chunk_kw(chunksize: int | None) -> dict[str, int]:
    """multiprocessing's imap takes no chunksize=None; leaving it out means each one's default."""
    return {} if chunksize is None else {"chunksize": chunksize}


def inputs(values: list[int]) -> dict[str, Callable[[], Any]]:
    return {
        "list": lambda: list(values),
        "tuple": lambda: tuple(values),
        "range-like array": lambda: np.array(values, dtype=np.int64),
        "generator": lambda: (v for v in values),
    }


VALUES = [list(range(37)), [], [5], list(range(-20, 230, 3))]


# -- parity: results --------------------------------------------------------------------------

@pytest.mark.parametrize("chunksize", [None, 1, 3, 100])
def test_map_starmap_match_builtin_map(make_pool, chunksize):
    with make_pool(2) as pool:
        for values in VALUES:
            for kind, make in inputs(values).items():
                expected = [v * v for v in values]
                assert pool.map(tasks.square, make(), **chunk_kw(chunksize)) == expected, kind
                assert pool.map_async(tasks.square, make(), **chunk_kw(chunksize)).get(30) == expected
            pairs = [(v, v + 1) for v in values]
            assert pool.starmap(tasks.add, pairs, **chunk_kw(chunksize)) == [a + b for a, b in pairs]
            assert pool.starmap(tasks.add, iter(pairs), **chunk_kw(chunksize)) == [
                a + b for a, b in pairs]
            assert pool.starmap_async(tasks.add, pairs, **chunk_kw(chunksize)).get(30) == [
                a + b for a, b in pairs]


@pytest.mark.parametrize("chunksize", [None, 1, 7])
def test_imap_and_imap_unordered(make_pool, chunksize):
    with make_pool(2) as pool:
        for values in VALUES:
            for kind, make in inputs(values).items():
                expected = [v * v for v in values]
                assert list(pool.imap(tasks.square, make(), **chunk_kw(chunksize))) == expected, kind
                got = list(pool.imap_unordered(tasks.square, make(), **chunk_kw(chunksize)))
                assert sorted(got) == sorted(expected), kind


def test_apply_with_args_and_kwargs(make_pool):
    with make_pool(2) as pool:
        assert pool.apply(tasks.add, (1,), {"b": 2}) == 3
        assert pool.apply(tasks.kwargs_echo, (1, "a"), {"k": [1, 2]}) == ((1, "a"), {"k": [1, 2]})
        assert pool.apply(tasks.kwargs_echo) == ((), {})
        results = [pool.apply_async(tasks.add, (i,), {"b": 10}) for i in range(20)]
        assert [r.get(30) for r in results] == [i + 10 for i in range(20)]


def test_callbacks_get_the_same_values(make_pool):
    ok: list[Any] = []
    errors: list[BaseException] = []
    with make_pool(2) as pool:
        r1 = pool.apply_async(tasks.add, (1, 2), callback=ok.append, error_callback=errors.append)
        assert r1.get(30) == 3
        r2 = pool.map_async(tasks.square, range(5), callback=ok.append, error_callback=errors.append)
        assert r2.get(30) == [0, 1, 4, 9, 16]
        r3 = pool.starmap_async(tasks.add, [(1, 1)], callback=ok.append)
        assert r3.get(30) == [2]
        assert ok == [3, [0, 1, 4, 9, 16], [2]] and errors == []
        r4 = pool.apply_async(tasks.fail_on_7, (7,), callback=ok.append, error_callback=errors.append)
        r5 = pool.map_async(tasks.fail_on_7, range(10), callback=ok.append,
                            error_callback=errors.append)
        for r in (r4, r5):
            with pytest.raises(ValueError, match="bad item 7"):
                r.get(30)
        assert len(ok) == 3
        assert [type(e) for e in errors] == [ValueError, ValueError]
        assert [e.args for e in errors] == [("bad item 7",), ("bad item 7",)]


def test_get_timeout_raises_multiprocessing_timeout_error(make_pool):
    with make_pool(2) as pool:
        slow = pool.apply_async(tasks.sleep_then_return, (30,))
        slow_map = pool.map_async(tasks.sleep_then_return, [30])
        for r in (slow, slow_map):
            with pytest.raises(mp.TimeoutError):
                r.get(timeout=0.05)
            r.wait(0.01)
            assert not r.ready()
            with pytest.raises(ValueError):
                r.successful()


@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_exceptions_keep_their_type(make_pool, chunksize):
    with make_pool(2) as pool:
        with pytest.raises(ValueError, match="bad item 7"):
            pool.map(tasks.fail_on_7, range(20), **chunk_kw(chunksize))
        with pytest.raises(ValueError, match="bad item 7"):
            pool.starmap(tasks.raise_value_error_at, [(i, 7) for i in range(20)],
                         **chunk_kw(chunksize))
        with pytest.raises(ValueError, match="bad item 7"):
            list(pool.imap(tasks.fail_on_7, range(20), **chunk_kw(chunksize)))
        with pytest.raises(ValueError, match="bad item 7"):
            list(pool.imap_unordered(tasks.fail_on_7, range(20), **chunk_kw(chunksize)))
        with pytest.raises(ValueError, match="bad item 7"):
            pool.apply(tasks.fail_on_7, (7,))
        with pytest.raises(ValueError, match="bad item 7"):
            pool.map_async(tasks.fail_on_7, range(20), **chunk_kw(chunksize)).get(30)
        assert pool.map(tasks.square, range(3)) == [0, 1, 4]  # the pool still works


def test_successful(make_pool):
    with make_pool(2) as pool:
        good = pool.apply_async(tasks.square, (3,))
        bad = pool.apply_async(tasks.fail_on_7, (7,))
        good.wait(30)
        bad.wait(30)
        assert good.ready() and bad.ready()
        assert good.successful() is True
        assert bad.successful() is False


@pytest.mark.parametrize("chunksize", [None, 1, 5])
def test_initializer_sets_worker_state(make_pool, chunksize):
    with make_pool(2, initializer=tasks.set_initialized, initargs=(42,)) as pool:
        assert pool.map(tasks.get_initialized, range(30), **chunk_kw(chunksize)) == [
            (i, 42) for i in range(30)]
        assert list(pool.imap(tasks.get_initialized, range(30), **chunk_kw(chunksize))) == [
            (i, 42) for i in range(30)]
        assert pool.apply(tasks.get_initialized, ("x",)) == ("x", 42)


def test_maxtasksperchild_replaces_workers(make_pool):
    with make_pool(2, maxtasksperchild=1) as pool:
        pids = pool.map(tasks.worker_pid, range(6), chunksize=1)
        assert len(set(pids)) == 6
        # One chunk is one task: a chunk of 3 runs in one worker, the next chunk in a fresh one.
        pids = pool.map(tasks.worker_pid, range(9), chunksize=3)
        assert [len(set(pids[i:i + 3])) for i in (0, 3, 6)] == [1, 1, 1]
        assert len(set(pids)) == 3
        assert len({pool.apply(tasks.worker_pid, (i,)) for i in range(4)}) == 4


def test_close_lets_submitted_work_finish(make_pool):
    pool = make_pool(2)
    r = pool.map_async(tasks.sleep_then_return, [0.05] * 4, chunksize=1)
    a = pool.apply_async(tasks.add, (1, 2))
    with pytest.raises(ValueError):
        pool.join()  # join before close
    pool.close()
    for call in (lambda: pool.map(tasks.square, [1]), lambda: pool.apply_async(tasks.square, (1,)),
                 lambda: pool.imap(tasks.square, [1]), lambda: pool.map_async(tasks.square, [1]),
                 lambda: pool.starmap(tasks.add, [(1, 2)]), lambda: pool.apply(tasks.square, (1,))):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    pool.close()  # closing twice is harmless
    pool.join()
    assert r.ready() and r.get(0) == [0.05] * 4
    assert a.get(0) == 3


def test_terminate_and_context_manager(make_pool):
    pool = make_pool(2)
    assert pool.map(tasks.square, range(4)) == [0, 1, 4, 9]
    pool.terminate()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(tasks.square, [1])
    pool.join()  # allowed after terminate
    with make_pool(1) as pool:
        assert pool.apply(tasks.square, (5,)) == 25
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply(tasks.square, (5,))
    with pytest.raises(ValueError), pool:  # a terminated pool cannot be entered
        pass


def test_pool_refuses_to_pickle(make_pool):
    with make_pool(1) as pool, pytest.raises(NotImplementedError):
        pickle.dumps(pool)


@pytest.mark.parametrize("kwargs, error", [
    ({"processes": 0}, ValueError),
    ({"processes": -1}, ValueError),
    ({"maxtasksperchild": 0}, ValueError),
    ({"maxtasksperchild": 1.5}, ValueError),
    ({"initializer": 5}, TypeError),
])
def test_invalid_arguments(make_pool, kwargs, error):
    with pytest.raises(error):
        make_pool(**kwargs)


# -- amortune only ----------------------------------------------------------------------------

CRASH_SCRIPT = textwrap.dedent("""
    import amortune
    from concurrent.futures.process import BrokenProcessPool
    from tests import tasks

    if __name__ == "__main__":
        with amortune.Pool(2) as pool:
            calls = {
                "map": lambda: pool.map(tasks.kill_self, range(10), chunksize=1),
                "apply": lambda: pool.apply(tasks.kill_self, (5,)),
                "imap": lambda: list(pool.imap(tasks.kill_self, range(10), chunksize=2)),
                "imap_unordered": lambda: list(pool.imap_unordered(tasks.kill_self, range(10), 3)),
                "map_async": lambda: pool.map_async(tasks.kill_self, range(10)).get(60),
            }
            for name, call in calls.items():
                try:
                    call()
                except amortune.WorkerCrashedError as exc:
                    assert isinstance(exc, BrokenProcessPool)
                    print(name, "crashed", exc.exitcode, flush=True)
            print("after", pool.map(tasks.square, range(5), chunksize=1), flush=True)
""")


def test_killed_worker_raises_instead_of_hanging():
    # kill_self SIGKILLs whoever runs item 5, so chunksize is explicit (map_async samples
    # nothing): sampling would run the first items in this process. A hang fails the test
    # through the subprocess timeout.
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [f"{name} crashed -9" for name in
                     ("map", "apply", "imap", "imap_unordered", "map_async")] + [
        "after [0, 1, 4, 9, 16]"]


def test_remote_exception_has_cause_and_item_index():
    with amortune.Pool(2, context=START) as pool:
        with pytest.raises(ValueError) as info:
            pool.map(tasks.fail_on_7, range(20), chunksize=2)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "fail_on_7" in str(info.value.__cause__)
        assert "amortune: raised while processing item 7" in info.value.__notes__
        with pytest.raises(ValueError) as info:
            pool.apply(tasks.fail_on_7, (7,))
        assert isinstance(info.value.__cause__, RemoteTraceback)


def test_lambdas_and_closures():
    k = 3

    def times_k(x: int) -> int:
        return x * k

    with amortune.Pool(2, context=START) as pool:
        assert pool.map(lambda x: x + 1, range(50), chunksize=4) == list(range(1, 51))
        assert pool.map(times_k, range(50)) == [x * 3 for x in range(50)]
        assert pool.starmap(lambda a, b: a - b, [(5, 1), (7, 2)]) == [4, 5]
        assert pool.apply(lambda a, *, b: (a, b), (1,), {"b": k}) == (1, 3)
        assert pool.apply_async(times_k, (2,)).get(30) == 6
        assert list(pool.imap(times_k, range(10))) == [x * 3 for x in range(10)]
        assert sorted(pool.imap_unordered(lambda x: -x, range(10))) == sorted(-x for x in range(10))
        assert pool.map_async(lambda x: x * 2, range(5)).get(30) == [0, 2, 4, 6, 8]


def test_map_equals_builtin_map_property():
    with amortune.Pool(2, context=START) as pool:

        @settings(max_examples=30, deadline=None)
        @given(xs=st.lists(st.integers(-10**9, 10**9), max_size=200),
               chunksize=st.one_of(st.none(), st.integers(1, 60)))
        def check(xs: list[int], chunksize: int | None) -> None:
            expected = list(map(tasks.square, xs))
            assert pool.map(tasks.square, xs, chunksize=chunksize) == expected
            assert list(pool.imap(tasks.square, iter(xs), chunksize=chunksize)) == expected
            assert sorted(pool.imap_unordered(tasks.square, xs, chunksize=chunksize)) == sorted(
                expected)

        check()


@pytest.mark.parametrize("chunksize", [None, 5])
def test_imap_over_an_endless_generator(chunksize):
    pulled = itertools.count()

    def endless():
        for i in itertools.count():
            next(pulled)
            yield i

    with amortune.Pool(2, context=START) as pool:
        it = pool.imap(tasks.square, endless(), chunksize=chunksize)
        assert next(pulled) == 0  # imap is lazy: nothing is read before iteration starts
        first = list(itertools.islice(it, 100))
        assert first == [i * i for i in range(100)]
        it.close()
        got = set(itertools.islice(pool.imap_unordered(tasks.square, endless(), chunksize), 100))
        assert len(got) == 100 and all(int(v**0.5) ** 2 == v for v in got)


def test_imap_reads_an_endless_input_only_a_bounded_way_ahead():
    pulled = []

    def gen():
        for i in itertools.count():
            pulled.append(i)
            yield i

    with amortune.Pool(2, context=START) as pool:
        pool.map(tasks.square, range(4))  # both workers up: a booting one must not hold item 0
        it = pool.imap(tasks.square, gen())
        assert next(it) == 0
        # Chunks start at one item and grow; at most 2 * processes + 1 are unfinished, and the
        # reorder window holds a bounded number of them: far from the endless whole.
        assert len(pulled) < 5000
        it.close()


def test_every_item_runs_in_a_worker_process():
    """As with multiprocessing.Pool: nothing runs in the caller, not even to sample."""
    with amortune.Pool(2, context=START) as pool:
        pids = pool.map(tasks.worker_pid, range(40))
        assert os.getpid() not in pids
        assert os.getpid() not in set(pool.imap(tasks.worker_pid, range(40)))
        assert os.getpid() not in set(pool.starmap(tasks.worker_pid_of, [(i,) for i in range(9)]))


def test_tuned_chunksize_never_runs_an_item_twice(tmp_path):
    items = [(str(tmp_path / name), i) for name in ("map", "star", "imap", "unordered", "async")
             for i in range(300)]
    for name in ("map", "star", "imap", "unordered", "async"):
        (tmp_path / name).mkdir()
    with amortune.Pool(2, context=START) as pool:
        n = 300
        assert pool.map(tasks.once_per_item, items[:n]) == list(range(n))
        assert pool.starmap(tasks.once_per_item, [(a,) for a in items[n:2 * n]]) == list(range(n))
        assert list(pool.imap(tasks.once_per_item, items[2 * n:3 * n])) == list(range(n))
        assert sorted(pool.imap_unordered(tasks.once_per_item, items[3 * n:4 * n])) == list(range(n))
        assert pool.map_async(tasks.once_per_item, items[4 * n:]).get(60) == list(range(n))
    for name in ("map", "star", "imap", "unordered", "async"):
        assert len(os.listdir(tmp_path / name)) == n


def test_progress_bar_counts_every_item():
    from tqdm import tqdm

    with amortune.Pool(2, context=START) as pool:
        bar = tqdm(file=io.StringIO())
        assert pool.map(tasks.square, range(500), progress=bar) == [i * i for i in range(500)]
        assert bar.n == 500
        bar.close()
        bar = tqdm(file=io.StringIO())
        assert list(pool.imap(tasks.square, range(300), chunksize=7, progress=bar)) == [
            i * i for i in range(300)]
        assert bar.n == 300
        bar.close()


def test_terminate_fails_pending_results_instead_of_hanging():
    pool = amortune.Pool(1, context=START)
    slow = pool.apply_async(tasks.sleep_then_return, (30,))
    queued = pool.map_async(tasks.sleep_then_return, [30, 30])
    pool.terminate()
    for r in (slow, queued):
        r.wait(30)
        assert r.ready() and not r.successful()
        with pytest.raises(Exception) as info:
            r.get(0)
        assert not isinstance(info.value, mp.TimeoutError)


@pytest.mark.parametrize("with_callback", [False, True])
def test_a_pending_result_keeps_its_pool_alive(with_callback: bool) -> None:
    got: list[Any] = []
    kw: dict[str, Any] = {"callback": got.append} if with_callback else {}
    r = amortune.Pool(1, context=START).apply_async(tasks.sleep_then_return, (0.2,), **kw)
    gc.collect()  # nothing else refers to the pool: the pending result must keep it running
    with pytest.warns(ResourceWarning, match="^unclosed running multiprocessing pool"):
        assert r.get(30) == 0.2 and r.successful()
        gc.collect()  # read, the result lets go of it
    assert got == ([0.2] if with_callback else [])


def test_unclosed_pool_warns_and_is_terminated():
    pool = amortune.Pool(1, context=START)
    assert pool.apply(tasks.square, (3,)) == 9
    with pytest.warns(ResourceWarning, match="^unclosed running multiprocessing pool"):
        del pool
        gc.collect()
    # the autouse leak check proves its worker and manager thread are gone


def test_processes_default_and_context_forms():
    with amortune.Pool() as pool:
        assert pool._processes == amortune.probe_system().usable_cores
    with amortune.Pool(1, context=mp.get_context("spawn")) as pool:
        assert pool.apply(tasks.square, (4,)) == 16
    with pytest.raises(ValueError, match="start_method"):
        amortune.Pool(1, context="no-such-method")


def test_unpicklable_function_fails_before_running_anything():
    import threading

    lock = threading.Lock()
    with amortune.Pool(1, context=START) as pool:
        with pytest.raises(TypeError, match="cannot pickle") as info:  # the pickler's own error
            pool.map(lambda x: (lock, x)[1], range(10))
        assert any("cannot be pickled to send it" in n for n in info.value.__notes__)
        r = pool.apply_async(lambda: lock)
        with pytest.raises(TypeError):
            r.get(30)


_OFFSET = 1
_add_offset = lambda x: x + _OFFSET  # noqa: E731 - a lambda travels by value


def test_apply_async_repickles_a_function_whose_captured_state_was_rebound():
    # A function sent by value is pickled once for many calls, and again as soon as a global
    # it reads, a closure cell or a default is rebound: workers never run stale state.
    global _OFFSET
    scale = 1

    def times(x: int, k: int = 1) -> int:
        return x * scale * k

    with amortune.Pool(1, context=START) as pool:
        assert pool.apply(times, (2,)) == 2
        scale = 3
        assert pool.apply(times, (2,)) == 6
        times.__defaults__ = (10,)
        assert pool.apply(times, (2,)) == 60
        assert pool.apply(_add_offset, (1,)) == 2
        _OFFSET = 100
        try:
            assert pool.apply(_add_offset, (1,)) == 101
        finally:
            _OFFSET = 1


def test_a_function_sent_by_value_is_pickled_once_while_nothing_changes():
    from amortune._sendable import function_ref as _function_ref

    k = 2

    def times_k(x: int) -> int:
        return x * k

    assert _function_ref(times_k) is _function_ref(times_k)
    first = _function_ref(times_k)
    k = 5
    assert _function_ref(times_k) is not first
    assert _function_ref(tasks.square) is _function_ref(tasks.square)  # by reference


def test_tasks_waiting_behind_a_crashed_one_run_elsewhere():
    # Tiny tasks wait in a worker's backlog; when the running one kills its worker, only that
    # task fails and every task behind it runs on the replacement, once.
    with amortune.Pool(1, context=START) as pool:
        pool.apply(tasks.square, (1,))
        rs = [pool.apply_async(tasks.kill_self, (5,)) if i == 150 else
              pool.apply_async(tasks.square, (i,)) for i in range(300)]
        for i, r in enumerate(rs):
            if i == 150:
                with pytest.raises(amortune.WorkerCrashedError):
                    r.get(60)
            else:
                assert r.get(60) == i * i


def test_the_backlog_behind_a_running_task_follows_the_measured_task_time():
    from types import SimpleNamespace

    from amortune.backends._manager import _MAX_BACKLOG, Manager

    depth = Manager._backlog_depth
    assert depth(SimpleNamespace(task_seconds=None)) == 1  # nothing measured yet
    assert depth(SimpleNamespace(task_seconds=1e-6)) == _MAX_BACKLOG
    assert depth(SimpleNamespace(task_seconds=0.0005)) == 4
    assert depth(SimpleNamespace(task_seconds=0.5)) == 1


def test_maxtasksperchild_counts_the_backlog():
    with amortune.Pool(1, maxtasksperchild=7, context=START) as pool:
        pids = [pool.apply_async(os.getpid) for _ in range(70)]
        seen = [r.get(60) for r in pids]
    runs = [len(list(g)) for _, g in itertools.groupby(seen)]
    assert max(runs) <= 7 and len(set(seen)) >= 10


def _pickler_error_type(obj: Any) -> type[BaseException]:
    try:
        pickle.dumps(obj)
    except Exception as exc:
        return type(exc)
    raise AssertionError("expected an unpicklable object")


def test_an_unpicklable_argument_raises_the_picklers_own_exception(make_pool):
    import threading

    lock = threading.Lock()
    expected = _pickler_error_type(lock)
    with make_pool(2) as pool:
        with pytest.raises(expected) as info:
            pool.apply_async(tasks.identity, (lock,)).get(30)
        assert type(info.value) is expected
        with pytest.raises(expected) as info:
            pool.map(tasks.identity, [1, lock, 3])
        assert type(info.value) is expected
        assert pool.map(tasks.square, range(4)) == [0, 1, 4, 9]  # the pool stays usable


def test_an_unsendable_result_raises_maybe_encoding_error(make_pool):
    from multiprocessing.pool import MaybeEncodingError

    errors: list[BaseException] = []
    with make_pool(2) as pool:
        r = pool.apply_async(tasks.return_lock, (1,), error_callback=errors.append)
        with pytest.raises(MaybeEncodingError) as info:
            r.get(30)
        assert "lock" in info.value.value and "pickle" in info.value.exc
        assert str(info.value).startswith("Error sending result: ")
        assert errors and isinstance(errors[0], MaybeEncodingError)
        with pytest.raises(MaybeEncodingError):
            pool.map(tasks.return_lock, range(3), chunksize=1)
        assert pool.apply(tasks.square, (3,)) == 9


def test_a_lambda_result_comes_back_where_the_stdlib_would_fail():
    # Results plain pickle refuses travel with cloudpickle (documented in the guide).
    with amortune.Pool(1, context=START) as pool:
        g = pool.apply(lambda: (lambda y: y + 1))
    assert g(1) == 2
