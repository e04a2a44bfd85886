"""One engine, one backend contract: the same behaviour on every backend.

The conformance suite runs over serial, threads, processes and :class:`InlineBackend`, a backend
defined here and not in amortune: it plugs into the scheduler through the public contract alone.
Then the behaviours the engine promises across entry points: per-worker set-up, call styles,
n_jobs limits, the caller's environment, nothing starting after an error, Ctrl-C and forks
leaving other calls alone, and serial runs that move to workers.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import operator
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amortune
from amortune import Config
from amortune.backends import (
    Backend,
    BackendInfo,
    ChunkOutcome,
    ChunkTask,
    FunctionRef,
    Slot,
    register_backend,
)
from tests import tasks
from tests._fresh import fresh_json

ROOT = Path(__file__).resolve().parents[1]
FAST = Config(sample_items=2, sample_seconds=0.001, target_chunk_seconds=0.002)


class InlineBackend(Backend):
    """A backend written against the contract only: runs chunks in this thread, 3 fake slots."""

    name = "inline"

    def __init__(self) -> None:
        self.submitted = 0

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, tuple(Slot(i) for i in range(3)), dispatch_seconds=1e-5,
                           ready_slots=3)

    def submit(self, task: ChunkTask) -> Future[ChunkOutcome]:
        from amortune._worker import run_chunk

        self.submitted += 1
        fut: Future[ChunkOutcome] = Future()
        t0 = time.perf_counter()
        results, error = run_chunk(task.fn.func, task.items, task.style)
        t1 = time.perf_counter()
        fut.set_result(ChunkOutcome(results, t1 - t0, t1 - t0, 0, self.submitted % 3, t0, t1,
                                    error=error))
        return fut

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        pass


register_backend("inline", lambda n_jobs, config: InlineBackend())

BACKENDS = ["serial", "threads", "processes", "inline"]


def run(func: Any, data: Any, backend: str, **kw: Any) -> list[Any]:
    kw.setdefault("config", FAST)
    n_jobs = None if backend in ("serial", "inline") else 2
    return amortune.execute(func, data, backend=backend, n_jobs=n_jobs, **kw)


# -- conformance: the same results and semantics on every backend ----------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(xs=st.lists(st.integers(-1000, 1000), max_size=80),
       kind=st.sampled_from(["list", "tuple", "range", "generator", "empty"]))
def test_results_equal_map_on_every_backend(backend: str, xs: list[int], kind: str) -> None:
    data: Any = {"list": xs, "tuple": tuple(xs), "range": range(len(xs)),
                 "generator": (x for x in xs), "empty": []}[kind]
    expected = list(map(tasks.square, {"list": xs, "tuple": xs, "range": range(len(xs)),
                                       "generator": xs, "empty": []}[kind]))
    assert run(tasks.square, data, backend) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_styles_on_every_backend(backend: str) -> None:
    pairs = [(i, i + 1) for i in range(50)]
    assert run(tasks.add, pairs, backend, star=True) == [a + b for a, b in pairs]
    assert run(tasks.square_all, range(60), backend, per_chunk=True,
               chunksize=7) == [i * i for i in range(60)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_keep_type_and_index_on_every_backend(backend: str) -> None:
    with pytest.raises(ValueError, match="bad item 7") as info:
        run(tasks.fail_on_7, range(30), backend)
    assert "amortune: raised while processing item 7" in getattr(info.value, "__notes__", [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_iteration_is_an_error_on_every_backend(backend: str) -> None:
    with pytest.raises(RuntimeError, match="StopIteration") as info:
        run(tasks.stop_at_5, range(30), backend)
    assert "amortune: raised while processing item 5" in info.value.__notes__


def test_stop_iteration_in_the_quick_serial_path() -> None:
    with pytest.raises(RuntimeError, match="StopIteration") as info:
        amortune.execute(tasks.stop_at_5, range(30))
    assert "amortune: raised while processing item 5" in info.value.__notes__


def test_the_first_look_tells_waiting_items_from_busy_ones() -> None:
    from amortune._quick import quick_serial

    for cpu_per_item, waiting in ((0.0, True), (0.0009, False)):
        clocks = {"wall": 0.0, "cpu": 0.0}

        def item(x: int, c: dict[str, float] = clocks, per: float = cpu_per_item) -> int:
            c["wall"] += 0.001
            c["cpu"] += per
            return x

        got = quick_serial(item, range(10_000), clock=functools.partial(clocks.get, "wall"),
                           cpu_clock=functools.partial(clocks.get, "cpu"))
        assert got is not None and got.rest is not None and got.cpu_share is not None
        assert (got.cpu_share < 0.3) is waiting
        assert got.seconds == pytest.approx(0.001 * len(got.results))  # what the planner skips


def test_the_planner_samples_only_what_the_first_look_has_not_timed() -> None:
    import amortune._execute as execute_module
    from amortune._config import Config
    from amortune._quick import WAITING_SAMPLE_SECONDS

    seen: list[float] = []
    real = execute_module._run

    def spy(func: Any, data: Any, options: dict[str, Any], *args: Any, **kw: Any) -> Any:
        seen.append(options["sample_seconds"])
        return real(func, data, options, *args, **kw)

    with patch.object(execute_module, "_run", spy), \
            patch("amortune._quick.SERIAL_CERTAIN_FACTOR", 0.0):
        assert amortune.execute(tasks.spin, [0.002] * 40) == [0.002] * 40
    assert len(seen) == 1
    assert WAITING_SAMPLE_SECONDS <= seen[0] < Config.sample_seconds  # the first look's time off


@pytest.mark.parametrize("backend", BACKENDS)
def test_retries_retry_on_and_progress_mean_the_same_on_every_backend(
        backend: str, tmp_path: Path) -> None:
    """Every item x % 10 == 3 fails once: each is retried alone; the others run once."""
    folder = tmp_path / "marks"
    folder.mkdir()
    seen: list[tuple[str, float]] = []
    func = functools.partial(tasks.fail_once_where_3, str(folder))
    got = run(func, range(60), backend, retries=2, retry_on=(tasks.Flaky,),
              progress_callback=lambda phase, frac: seen.append((phase, frac)))
    assert got == list(range(60))
    runs = collections.Counter(int(p.name.split(".")[0]) for p in folder.iterdir())
    assert all(runs[i] == (2 if i % 10 == 3 else 1) for i in range(60)), runs
    assert seen[-1] == ("execute", 1.0)
    assert [f for p, f in seen if p == "execute"] == sorted(f for p, f in seen if p == "execute")


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_resume_on_every_backend(backend: str, tmp_path: Path) -> None:
    marks, ckpt = tmp_path / "marks", tmp_path / "ckpt"
    marks.mkdir()
    n_jobs = None if backend in ("serial", "inline") else 2
    func = functools.partial(tasks.fail_at_7_until_allowed, str(tmp_path), str(marks))
    kw: dict[str, Any] = dict(batch_size=4, checkpoint=ckpt, backend=backend, n_jobs=n_jobs,
                              config=FAST)
    with pytest.raises(ValueError, match="not yet"):
        amortune.process_in_batches(func, range(20), **kw)
    first = collections.Counter(int(p.name.split(".")[0]) for p in marks.iterdir())
    (tmp_path / "allowed").touch()
    assert list(amortune.process_in_batches(func, range(20), **kw)) == list(range(20))
    runs = collections.Counter(int(p.name.split(".")[0]) for p in marks.iterdir())
    assert all(runs[i] == 1 for i in range(4)), runs  # batch 0 was recorded: never rerun
    assert first[7] == 1 and runs[7] == 2


def test_a_new_backend_plugs_in_without_touching_the_scheduler() -> None:
    backend = InlineBackend()
    assert amortune.execute(tasks.square, range(100), backend=backend,
                            config=FAST) == [i * i for i in range(100)]
    assert backend.submitted > 1  # the scheduler cut chunks and fed them to it
    plan = amortune.optimize(tasks.spin, [0.002] * 100, backend=backend)
    assert plan.executor in ("inline", "serial")
    assert list(amortune.imap(tasks.square, iter(range(10)), backend=backend)) == [
        i * i for i in range(10)]


def test_unknown_backends_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of .*processes.*serial.*threads"):
        amortune.execute(tasks.square, range(3), backend="nope")
    with pytest.raises(ValueError, match="built-in"):
        register_backend("serial", lambda n, c: InlineBackend())


# -- per-worker set-up ---------------------------------------------------------------------------
INIT_SCRIPT = textwrap.dedent("""
    import collections, json, os, sys
    import amortune

    STATE = {}

    def init(k):
        STATE["k"] = k
        with open(os.path.join(sys.argv[1], str(os.getpid())), "a") as f:
            f.write("init\\n")

    def work(x):
        with open(os.path.join(sys.argv[1], str(os.getpid())), "a") as f:
            f.write("item\\n")
        total = 0
        for i in range(20000):
            total += i % 7
        return x * STATE["k"]

    if __name__ == "__main__":
        out = amortune.execute(work, range(400), initializer=init, initargs=(3,))
        print(json.dumps({"ok": out == [3 * x for x in range(400)], "caller": os.getpid()}))
""")


def test_initializer_in_main_runs_once_in_every_process_that_ran_items(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(INIT_SCRIPT)
    marks = tmp_path / "marks"
    marks.mkdir()
    out = subprocess.run([sys.executable, str(script), str(marks)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"]
    for path in marks.iterdir():
        lines = path.read_text().split()
        if "item" in lines:
            assert lines.count("init") == 1 and lines[0] == "init", (path.name, lines)
    assert len(list(marks.iterdir())) >= 2  # the caller sampled, and workers ran the rest


@pytest.mark.parametrize("entry", ["execute", "imap", "process_in_batches", "pool"])
def test_every_entry_point_takes_an_initializer(entry: str) -> None:
    data = range(30)
    if entry == "execute":
        got = amortune.execute(tasks.read_init, data, initializer=tasks.set_init,
                               initargs=(5,), backend="processes", n_jobs=2, config=FAST)
    elif entry == "imap":
        got = list(amortune.imap(tasks.read_init, data, initializer=tasks.set_init,
                                 initargs=(5,), backend="processes", n_jobs=2, config=FAST))
    elif entry == "process_in_batches":
        got = amortune.process_in_batches(tasks.read_init, data, batch_size=7,
                                          initializer=tasks.set_init, initargs=(5,),
                                          executor="processes", n_jobs=2, config=FAST)
    else:
        with amortune.Pool(2, initializer=tasks.set_init, initargs=(5,)) as pool:
            got = pool.map(tasks.read_init, data)
    assert got == [x + 5 for x in data]


# -- limits, environment, stopping ---------------------------------------------------------------
def test_n_jobs_bounds_items_in_flight_even_on_a_bigger_warm_pool(tmp_path: Path) -> None:
    amortune.execute(tasks.spin, [0.001] * 40, backend="processes", n_jobs=2, config=FAST)
    spans = amortune.execute(tasks.timed_spin, [0.01] * 12, backend="processes", n_jobs=1,
                             chunksize=1, config=FAST)
    spans.sort()
    overlaps = [a for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1] - 1e-4]
    assert not overlaps, spans


def test_workers_see_the_callers_environment_as_of_the_call() -> None:
    amortune.execute(tasks.spin, [0.001] * 40, backend="processes", n_jobs=2, config=FAST)
    os.environ["AMORTUNE_TEST_VALUE"] = "first"
    try:
        got = set(amortune.execute(tasks.read_env, ["AMORTUNE_TEST_VALUE"] * 40,
                                   backend="processes", n_jobs=2, chunksize=1, config=FAST))
        assert got == {"first"}
        os.environ["AMORTUNE_TEST_VALUE"] = "second"
        got = set(amortune.execute(tasks.read_env, ["AMORTUNE_TEST_VALUE"] * 40,
                                   backend="processes", n_jobs=2, chunksize=1, config=FAST))
        assert got == {"second"}
        del os.environ["AMORTUNE_TEST_VALUE"]
        got = set(amortune.execute(tasks.read_env, ["AMORTUNE_TEST_VALUE"] * 40,
                                   backend="processes", n_jobs=2, chunksize=1, config=FAST))
        assert got == {None}
    finally:
        os.environ.pop("AMORTUNE_TEST_VALUE", None)


def test_nothing_starts_after_a_call_raised(tmp_path: Path) -> None:
    folder = tmp_path / "started"
    folder.mkdir()
    func = functools.partial(tasks.record_start_fail_at_40, str(folder))
    with pytest.raises(ValueError, match="item 40"):
        amortune.execute(func, range(400), backend="processes", n_jobs=2, chunksize=1,
                         config=FAST)
    raised_at = time.time()
    time.sleep(0.3)
    starts = [float(p.read_text()) for p in folder.iterdir()]
    late = [t for t in starts if t > raised_at]
    assert not late, f"{len(late)} items started after the call raised"


def test_reduce_folds_strictly_in_input_order_whatever_the_batch_size() -> None:
    for batch_size in (1, 7, 30, 100):
        got = amortune.process_in_batches(operator.neg, range(100), batch_size=batch_size,
                                          reduce=operator.sub)
        assert got == functools.reduce(operator.sub, map(operator.neg, range(100)))


@settings(max_examples=25, deadline=None)
@given(xs=st.lists(st.integers(-50, 50), min_size=1, max_size=60), batch=st.integers(1, 20))
def test_reduce_equals_functools_reduce(xs: list[int], batch: int) -> None:
    def fold(a: int, b: int) -> int:
        return 3 * a - b

    got = amortune.process_in_batches(abs, xs, batch_size=batch, reduce=fold)
    assert got == functools.reduce(fold, map(abs, xs))


CTRL_C_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    import amortune
    from tests import tasks

    if __name__ == "__main__":
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the run ignores it
        amortune.execute(tasks.spin, [0.001] * 40, backend="processes", n_jobs=2)
        other = {}
        def b():
            other["out"] = amortune.execute(tasks.spin, [0.02] * 60, backend="processes",
                                            n_jobs=2, chunksize=1)
        t = threading.Thread(target=b)
        t.start()
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            amortune.execute(tasks.spin, [0.05] * 200, backend="processes", n_jobs=2,
                             chunksize=1)
            main = "finished"
        except KeyboardInterrupt:
            main = "interrupted"
        t.join(60)
        print(json.dumps({"main": main, "other_ok": other.get("out") == [0.02] * 60}))
""")


def test_ctrl_c_in_one_thread_leaves_other_threads_calls_alone() -> None:
    out = subprocess.run([sys.executable, "-c", CTRL_C_SCRIPT], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"main": "interrupted", "other_ok": True}


CTRL_C_STOPS_SCRIPT = textwrap.dedent("""
    import functools, json, os, signal, sys, tempfile, threading, time
    import amortune
    from tests import tasks

    if __name__ == "__main__":
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the run ignores it
        folder = tempfile.mkdtemp()
        func = functools.partial(tasks.spin_square_failing, marks=folder)
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            amortune.execute(func, range(5000), backend="processes", n_jobs=2)
        except KeyboardInterrupt:
            done = len(os.listdir(folder))
            time.sleep(0.3)
            print(json.dumps({"done": done, "later": len(os.listdir(folder)) - done}))
""")


def test_ctrl_c_stops_the_calls_workers_before_it_raises() -> None:
    out = subprocess.run([sys.executable, "-c", CTRL_C_STOPS_SCRIPT], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["done"] > 0 and got["later"] == 0, got  # no item finished after the raise


def test_keyboard_interrupt_raised_by_func_fails_only_its_call() -> None:
    other: dict[str, Any] = {}

    def b() -> None:
        other["out"] = amortune.execute(tasks.spin, [0.01] * 40, backend="processes",
                                        n_jobs=2, chunksize=1, config=FAST)

    amortune.execute(tasks.spin, [0.001] * 40, backend="processes", n_jobs=2, config=FAST)
    t = threading.Thread(target=b)
    t.start()
    with pytest.raises(KeyboardInterrupt):
        amortune.execute(tasks.interrupt_at_5, range(20), backend="processes", n_jobs=2,
                         chunksize=1, config=FAST)
    t.join(60)
    assert other["out"] == [0.01] * 40


FORK_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading
    import amortune
    from tests import tasks

    if __name__ == "__main__":
        amortune.execute(tasks.spin, [0.001] * 40, backend="processes", n_jobs=2)
        parent = {}
        t = threading.Thread(target=lambda: parent.update(out=amortune.execute(
            tasks.spin, [0.01] * 100, backend="processes", n_jobs=2, chunksize=1)))
        t.start()
        pid = os.fork()
        if pid == 0:
            try:
                ok = amortune.execute(tasks.square, range(300), backend="processes",
                                      n_jobs=2) == [i * i for i in range(300)]
            except BaseException as exc:
                ok = repr(exc)
            os.write(1, (json.dumps({"child": ok}) + "\\n").encode())
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        t.join(60)
        print(json.dumps({"parent": parent.get("out") == [0.01] * 100, "status": status}))
""")


def test_a_forked_child_gets_its_own_pool_and_leaves_the_parents_alone() -> None:
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert {"child": True} in lines
    assert {"parent": True, "status": 0} in lines


# -- the plan the run corrects, and native threads ---------------------------------------------
@pytest.mark.parametrize("config", [None, Config()], ids=["first-look", "planned-serial"])
def test_a_serial_run_moves_to_workers_when_costs_grow_along_the_input(
        config: Config | None) -> None:
    """Cheap at the head, expensive later: the run starts serial and moves to workers.

    Without options the first look (``_quick``) runs the cheap head in the caller; with a
    ``config`` the plan from the sample is serial and the serial run re-plans after each chunk.
    """
    with amortune.report() as rep:
        got = amortune.execute(tasks.late_spin, range(300), config=config)
    assert got == list(range(300))
    changes = [c.what for _, stats in rep.runs for c in stats.changes]
    assert any("moved to processes" in c for c in changes), changes
    if config is not None:
        assert rep.runs[0][0].executor == "serial"  # the plan said serial; the run changed it


def test_a_tiny_map_settles_serial_without_heavy_imports() -> None:
    code = ("import sys, json, amortune\n"
            "amortune.execute(lambda x: x * x, range(200000))\n"
            "print(json.dumps(sorted(m for m in ('numpy', 'psutil', 'multiprocessing', "
            "'concurrent.futures.process', 'cloudpickle', 'dataclasses') if m in sys.modules)))")
    assert fresh_json(code, timeout=60) == []


def test_a_parallel_call_of_an_importable_function_skips_dataclasses_and_openssl() -> None:
    """What a one-shot script pays before its first worker starts: no ``dataclasses`` (and its
    ``inspect``), no ``hashlib`` (OpenSSL), no cloudpickle for a function importable by name."""
    code = ("import sys, json, amortune\n"
            "from tests import tasks\n"
            "if __name__ == '__main__':\n"
            "    assert amortune.execute(tasks.spin, [0.002] * 400) == [0.002] * 400\n"
            "    print(json.dumps([sorted(m for m in ('dataclasses', 'inspect', 'hashlib', "
            "'cloudpickle') if m in sys.modules), 'amortune.backends.processes' in sys.modules]))")
    assert fresh_json(code) == [[], True]


BLAS_SCRIPT = textwrap.dedent("""
    import json
    import numpy  # at the top of the script, before amortune
    import amortune
    from tests import tasks

    if __name__ == "__main__":
        counts = amortune.execute(tasks.blas_threads, range(8), backend="processes",
                                  n_jobs=2, chunksize=1,
                                  config=amortune.Config(sample_in_caller=False))
        print(json.dumps(counts))
""")


def test_native_threads_are_capped_in_workers_whatever_was_imported_first() -> None:
    pytest.importorskip("threadpoolctl")
    out = subprocess.run([sys.executable, "-c", BLAS_SCRIPT], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    cores = amortune.probe_system().usable_cores
    assert all(c <= max(1, cores // 2) for c in counts if c is not None), counts


def test_a_one_off_first_call_is_not_taken_for_the_item_cost() -> None:
    plan = amortune.optimize(tasks.slow_first_call, range(2000))
    assert plan.profile.first_call_seconds > 0.05
    assert plan.profile.item_wall_seconds < 0.01
    assert plan.executor == "serial"


def test_planning_starts_no_process_and_a_pool_leaves_the_warm_pool_alone() -> None:
    import psutil

    from amortune.backends._warm import all_warm_pools

    def children() -> set[int]:
        return {c.pid for c in psutil.Process().children(recursive=True)
                if c.status() != psutil.STATUS_ZOMBIE}

    warm_before = {id(p): set(p.pids()) for p in all_warm_pools()}
    before = children()
    amortune.optimize(tasks.spin, [0.002] * 300, backend="processes")
    assert children() - before == set()
    with amortune.Pool(2) as pool:
        assert pool.map(tasks.square, range(10)) == [i * i for i in range(10)]
    assert {id(p): set(p.pids()) for p in all_warm_pools()} == warm_before


def test_imap_streams_an_endless_generator() -> None:
    assert list(itertools.islice(amortune.imap(abs, itertools.count(-3)), 5)) == [3, 2, 1, 0, 1]


def test_large_results_that_cost_more_to_move_than_to_make_stay_serial() -> None:
    from amortune._quick import quick_serial

    # 8 MiB of zeros costs microseconds to make (the pages are mapped lazily) and ~8 ms to send.
    # A virtual clock (20 µs an item) keeps the decision from depending on this machine's load.
    now = [0.0]

    def timed(make: Any) -> Any:
        def item(x: int) -> Any:
            now[0] += 20e-6
            return make(x)
        return item

    small = quick_serial(timed(tasks.square), range(300), threshold_seconds=0.0,
                         clock=lambda: now[0], cpu_clock=lambda: now[0])
    assert small is not None and small.rest is not None  # small results: workers could pay
    import numpy as np

    big_inputs = [np.zeros(1 << 20) for _ in range(300)]  # 8 MiB each, summed in microseconds
    stayed = quick_serial(timed(np.sum), big_inputs, threshold_seconds=0.0,
                          clock=lambda: now[0], cpu_clock=lambda: now[0])
    assert stayed is not None and stayed.rest is None  # sending the inputs costs more
    got = quick_serial(timed(tasks.zeros_8mb), range(300), threshold_seconds=0.0,
                       clock=lambda: now[0], cpu_clock=lambda: now[0])
    assert got is not None and got.rest is None  # every item ran here: moving them costs more
    assert len(got.results) == 300


def test_the_thread_backend_refuses_bad_sizes_and_work_after_shutdown() -> None:
    from amortune.backends.threads import ThreadBackend

    with pytest.raises(ValueError, match="n_threads"):
        ThreadBackend(0)
    backend = ThreadBackend(4)
    outcome = backend.submit(ChunkTask(FunctionRef(tasks.square), [1, 2, 3], 0)).result(30)
    assert outcome.results == [1, 4, 9] and outcome.error is None
    backend.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        backend.submit(ChunkTask(FunctionRef(tasks.square), [1], 0))


def test_the_thread_backend_grows_to_its_size_while_every_thread_is_busy() -> None:
    from amortune.backends.threads import ThreadBackend

    n = 8
    barrier = threading.Barrier(n, timeout=20)  # passes only once n items run at the same time
    starters: list[str] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        starters.append(threading.current_thread().name)
        real_start(self)

    def meet(x: int) -> int:
        barrier.wait()
        return x

    backend = ThreadBackend(n)
    with patch.object(threading.Thread, "start", start):
        futures = [backend.submit(ChunkTask(FunctionRef(meet), [i], i)) for i in range(n)]
        outcomes = [f.result(30) for f in futures]
    backend.shutdown()
    assert [o.results for o in outcomes] == [[i] for i in range(n)]
    assert sorted(o.slot for o in outcomes) == list(range(n))  # one slot id each
    assert len(starters) == n  # never more threads than its size
    assert not [t for t in threading.enumerate() if t.name.startswith("amortune_")]


EARLY_SCRIPT = textwrap.dedent("""
    import json, sys
    import amortune
    from amortune import _optimize
    from tests import tasks

    seen, reasons = [], []
    decide, sample = _optimize.decide, _optimize.sample

    def watch(*args, **kwargs):  # the model decides once the sample is done
        warm = sys.modules.get("amortune.backends._warm")
        seen.append(warm is not None and warm.peek_warm_pool(None) is not None)
        decision = decide(*args, **kwargs)
        reasons.extend(decision.reasons)
        return decision

    def count(*args, **kwargs):
        sampled = sample(*args, **kwargs)
        seen.append(len(sampled.results))
        return sampled

    _optimize.decide, _optimize.sample = watch, count
    if __name__ == "__main__":
        func = {"spin": tasks.spin, "sleep": tasks.sleep_then_return,
                "rising": tasks.rising_spin}[sys.argv[1]]
        n, seconds = int(sys.argv[2]), float(sys.argv[3])
        items = list(range(n)) if sys.argv[1] == "rising" else [seconds] * n
        data = items if sys.argv[4] == "list" else (x for x in items)
        assert amortune.execute(func, data) == items
        print(json.dumps(seen + [any("grow along the input" in r for r in reasons)]))
""")


@pytest.mark.parametrize(("func", "n", "seconds", "early", "shape"), [
    ("spin", 400, 0.002, True, "list"),  # ~0.8 s of computing left: processes all but certain
    ("spin", 400, 0.002, True, "generator"),  # the same, once the read-ahead knows the length
    ("spin", 150, 0.002, False, "list"),  # ~0.3 s: the planner decides before workers start
    ("spin", 150, 0.002, False, "generator"),
    ("sleep", 200, 0.005, False, "list"),  # items that wait: threads, no process
    ("sleep", 200, 0.005, False, "generator"),
    # costs 0 -> 8 ms: the cheap head's rate predicts ~0.2 s left, its rise ~1.6 s
    ("rising", 400, 0.0, True, "list"),
    ("rising", 400, 0.0, True, "generator"),
])
def test_workers_start_before_the_planner_only_when_processes_are_all_but_certain(
        tmp_path: Path, func: str, n: int, seconds: float, early: bool, shape: str) -> None:
    script = tmp_path / "early.py"
    script.write_text(EARLY_SCRIPT)
    for _attempt in range(2):  # a decision from timings: one preempted chunk may sway one run
        out = subprocess.run([sys.executable, str(script), func, str(n), str(seconds), shape],
                             capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr
        sampled, started, rising = json.loads(out.stdout)
        if started is early and rising is (func == "rising"):
            break
    assert started is early
    # A sample of ~3 items cannot fit a trend: the first look's projection is the plan's.
    assert rising is (func == "rising"), rising
    if early:  # the workers wait for the plan: the sample stops ~5 ms after the fork (2-4
        # items of 1-2 ms; the full sample, without an early start, takes 8 or more)
        assert sampled <= 5, sampled


def _watch_prelaunch(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record what the first look handed to early-forked workers, and where the sample began."""
    from amortune import _execute, _optimize

    seen: dict[str, Any] = {"sent": [], "sample_at": []}
    prelaunch, sample = _execute._prelaunch, _optimize.sample

    def watched(*args: Any, **kwargs: Any) -> Any:
        out = prelaunch(*args, **kwargs)
        seen["start"] = args[2]
        seen["sent"] = [(start, len(items)) for start, items, _, _ in out[1]]
        return out

    def sampled(*args: Any, **kwargs: Any) -> Any:
        seen["sample_at"].append(kwargs.get("start_index"))
        return sample(*args, **kwargs)

    monkeypatch.setattr(_execute, "_prelaunch", watched)
    monkeypatch.setattr(_optimize, "sample", sampled)
    return seen


def _needs_two_cores() -> None:
    if amortune.probe_system().usable_cores < 2:
        pytest.skip("workers start early only with two usable cores")


def test_early_workers_compute_the_items_after_the_first_look_while_the_caller_plans(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_two_cores()
    seen = _watch_prelaunch(monkeypatch)
    data = list(range(300))  # ~0.6 s of computing: workers fork right after the first look
    assert amortune.execute(tasks.spin_square_failing, data) == [x * x for x in data]
    sent = seen["sent"]
    assert sent, "no chunk went to the workers before the plan"
    assert sent[0][0] == seen["start"] > 0  # right after the first look's items
    ends = [start + n for start, n in sent]
    assert [start for start, _ in sent[1:]] == ends[:-1]  # contiguous, in input order
    assert seen["sample_at"] == [ends[-1]]  # the sample begins after them
    assert sum(n for _, n in sent) <= len(data) // 4


@pytest.mark.parametrize(("in_worker_at", "in_caller_from", "expected"), [
    (3, None, KeyError),  # an item the workers got early fails; the run goes on to it
    (None, 2, ValueError),  # the sample fails after the workers' chunks all succeeded
    (3, 2, KeyError),  # both: the earlier item's error wins, as in list(map(...))
])
def test_errors_before_and_in_the_sample_raise_in_input_order_with_early_workers(
        monkeypatch: pytest.MonkeyPatch, in_worker_at: int | None, in_caller_from: int | None,
        expected: type[BaseException]) -> None:
    _needs_two_cores()
    seen = _watch_prelaunch(monkeypatch)
    func = functools.partial(tasks.spin_square_failing, in_worker_at=in_worker_at,
                             in_caller_from=in_caller_from)
    with pytest.raises(expected) as info:
        amortune.execute(func, range(300))
    assert seen["sent"] and seen["sent"][0][0] == 2  # the first look ran items 0 and 1
    index = in_worker_at if expected is KeyError else seen["sample_at"][0]
    assert info.value.amortune_index == index  # type: ignore[attr-defined]
    assert f"item {index}" in " ".join(getattr(info.value, "__notes__", []))
    if expected is KeyError:
        assert isinstance(info.value.__cause__, Exception)  # the worker's traceback


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(at=st.lists(st.integers(2, 150), min_size=1, max_size=3, unique=True))
def test_with_early_workers_the_first_failing_item_in_input_order_raises(
        monkeypatch: pytest.MonkeyPatch, at: list[int]) -> None:
    _needs_two_cores()
    func = functools.partial(tasks.spin_square_failing, at=tuple(at))
    with monkeypatch.context() as patches:  # one example's spies, undone before the next
        seen = _watch_prelaunch(patches)
        with pytest.raises(LookupError) as info:  # a worker's early chunk, the sample, or later
            amortune.execute(func, range(300))
    assert info.value.args == (min(at),)
    assert info.value.amortune_index == min(at)  # type: ignore[attr-defined]
    assert seen["sent"]


def test_an_interrupted_plan_stops_the_early_workers_chunks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_two_cores()
    from amortune import _execute

    seen = _watch_prelaunch(monkeypatch)
    monkeypatch.setattr(_execute, "PRELAUNCH_SECONDS", 2.0)  # chunks that run on for ~1 s

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    from amortune import _optimize

    monkeypatch.setattr(_optimize, "sample", interrupted)
    func = functools.partial(tasks.spin_square_failing, marks=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        amortune.execute(func, range(3000))
    assert seen["sent"]
    stopped = len(list(tmp_path.iterdir()))
    time.sleep(0.3)
    assert len(list(tmp_path.iterdir())) == stopped  # nothing of the call ran on after it
    assert stopped < sum(n for _, n in seen["sent"])


def test_items_that_cannot_travel_are_not_sent_early(monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_two_cores()
    seen = _watch_prelaunch(monkeypatch)
    data = [(i, threading.Lock()) if 2 <= i < 40 else (i, None) for i in range(300)]
    with pytest.warns(amortune.AmortuneWarning, match="an input cannot be pickled"):
        out = amortune.execute(_spin_first, data)
    assert out == list(range(300))
    assert seen["sent"] == [] and seen["sample_at"] == [2]  # the planner met them, as always


def _spin_first(item: tuple[int, Any]) -> int:
    tasks.spin(0.002)
    return item[0]


class _FailsWhileRead:
    """A sized input whose iteration fails at item ``at`` (a file that turns out unreadable)."""

    def __init__(self, n: int, at: int) -> None:
        self.n, self.at = n, at

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        for i in range(self.n):
            if i == self.at:
                raise OSError(f"cannot read item {i}")
            yield i


def test_an_input_that_fails_while_read_for_the_early_workers_fails_in_its_place(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_two_cores()
    seen = _watch_prelaunch(monkeypatch)
    with pytest.raises(OSError, match="cannot read item 5") as info:
        amortune.execute(tasks.spin_square_failing, _FailsWhileRead(300, 5))
    assert seen["sent"] == [] and seen["sample_at"] == [2]
    assert info.value.amortune_index == 5  # type: ignore[attr-defined]
