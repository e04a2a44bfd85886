"""Worker faults never hang the caller.

The crash table (SIGKILL, ``os._exit``, segfault, ``SystemExit``) runs for every start method;
then timeouts, retries, exceptions from ``func``, Ctrl-C and a killed caller (no orphans),
unpicklable data, memory recycling, warm-pool reuse, and the manager-thread races of
``ProcessBackend``. Anything that could hang runs in a fresh interpreter under
``subprocess.run(..., timeout=...)`` or waits on a future with a timeout, so a hang fails the test
instead of freezing the suite. No assertion is about elapsed time except the 2 s budget the
design gives Ctrl-C and a dead caller to take every worker down.
"""

from __future__ import annotations

import collections
import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import amortune
from amortune import Config, NotPicklableError, WorkerCrashedError
from amortune._errors import RemoteTraceback, TaskTimeoutError
from amortune._schedule import ChunkPolicy, Scheduler
from amortune.backends._base import (
    Backend,
    BackendInfo,
    ChunkOutcome,
    ChunkTask,
    FunctionRef,
    Slot,
    WorkerSetup,
)
from amortune.backends._warm import peek_warm_pool
from amortune.backends.processes import ProcessBackend
from tests import tasks
from tests._fresh import fresh_json

REPO = Path(__file__).resolve().parents[1]
#: Sampling runs the first items in the caller: two items only, so item 3 and later (where the
#: faulty tasks misbehave) always run in a worker.
FAST = {"sample_items": 2, "sample_seconds": 0.001, "target_chunk_seconds": 0.001}
CRASH_KINDS = {  # crash kind -> (task that always crashes at item 5, expected exit code)
    "kill": ("kill_self", -signal.SIGKILL),
    "exit": ("exit_hard", 3),
    "segv": ("segfault", -signal.SIGSEGV),
    "sys_exit": ("sys_exit", 4),
}
PROLOGUE = """\
import json, os, signal, sys, tempfile, threading, time
# Ctrl-C must raise here even when the test run itself was started with SIGINT ignored (a
# background job of a non-interactive shell), as Python then leaves it ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
import amortune
from amortune import Config
from amortune.backends._base import ChunkTask, FunctionRef
from amortune.backends._warm import peek_warm_pool
from amortune.backends.processes import ProcessBackend
from tests import tasks
"""


def run_script(body: str, *args: str, timeout: float = 60) -> Any:
    """Run ``PROLOGUE + body`` in a fresh interpreter; return the JSON of its last output line."""
    proc = subprocess.run([sys.executable, "-c", PROLOGUE + textwrap.dedent(body), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gone(pid: int) -> bool:
    """Exited (a zombie counts: this container's init does not reap orphans)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    """Poll until every pid has exited or ``seconds`` pass; return those still alive."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [p for p in pids if not gone(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


# -- the crash table ------------------------------------------------------------------------------

_CRASH_RESULTS: dict[str, dict[str, Any]] = {}

CRASH_SCRIPT = """
from concurrent.futures.process import BrokenProcessPool
method = sys.argv[1]
cfg = Config(start_method=method, sample_items=2, sample_seconds=0.001, target_chunk_seconds=0.001)
kinds = json.loads(sys.argv[2])
out = {}
for kind, func in kinds.items():
    rec = out[kind] = {}
    try:
        amortune.execute(getattr(tasks, func), range(20), executor="processes", n_jobs=2,
                         chunksize=3, config=cfg)
        rec["error"] = None
    except BaseException as exc:
        rec["error"] = type(exc).__name__
        rec["broken_pool"] = isinstance(exc, BrokenProcessPool)
        rec["message"] = str(exc)
        rec["exitcode"] = getattr(exc, "exitcode", None)
        rec["indices"] = list(getattr(exc, "indices", ()))
    try:  # always crashes: the retry crashes again, and the error says how often it was tried
        amortune.execute(getattr(tasks, func), range(20), executor="processes", n_jobs=2,
                         chunksize=3, retries=1, config=cfg)
    except BaseException as exc:
        rec["twice"] = [type(exc).__name__, getattr(exc, "__notes__", [])]
    with tempfile.TemporaryDirectory() as d:
        rec["retried"] = amortune.execute(tasks.crash_once_how, [(d, kind, i) for i in range(20)],
                                          executor="processes", n_jobs=2, chunksize=3, retries=2,
                                          config=cfg)
    rec["after"] = amortune.execute(tasks.square, range(10), executor="processes", n_jobs=2,
                                    config=cfg)
print(json.dumps(out))
"""


def crash_results(method: str) -> dict[str, Any]:
    """The whole crash table for one start method, run once in a fresh interpreter."""
    if method not in _CRASH_RESULTS:
        kinds = {kind: func for kind, (func, _) in CRASH_KINDS.items()}
        _CRASH_RESULTS[method] = run_script(CRASH_SCRIPT, method, json.dumps(kinds), timeout=120)
    return _CRASH_RESULTS[method]


@pytest.mark.parametrize("kind", list(CRASH_KINDS))
def test_crash_without_retries_names_exit_and_items(start_method: str, kind: str) -> None:
    rec = crash_results(start_method)[kind]
    _, code = CRASH_KINDS[kind]
    assert rec["error"] == "WorkerCrashedError" and rec["broken_pool"], rec
    assert rec["exitcode"] == code
    reason = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    assert reason in rec["message"]
    assert 5 in rec["indices"] and "items " in rec["message"]
    if kind == "sys_exit":
        assert "SystemExit(4) at item 5" in rec["message"]


@pytest.mark.parametrize("kind", list(CRASH_KINDS))
def test_crash_with_retries_reruns_the_chunk(start_method: str, kind: str) -> None:
    rec = crash_results(start_method)[kind]
    assert rec["retried"] == list(range(20))
    assert rec["after"] == [x * x for x in range(10)]  # the pool is usable afterwards
    name, notes = rec["twice"]
    assert name == "WorkerCrashedError"
    assert any("failed 2 times (retries=1)" in n for n in notes)


# -- timeouts -------------------------------------------------------------------------------------

TIMEOUT_SCRIPT = """
cfg = Config(sample_items=2, sample_seconds=0.001, target_chunk_seconds=0.001)
amortune.execute(tasks.square, range(40), executor="processes", n_jobs=2, config=cfg)
before = peek_warm_pool(cfg.start_method).pids()
out = {}
try:
    amortune.execute(tasks.sleep_forever_at_3, range(8), executor="processes", n_jobs=2,
                     chunksize=1, timeout=1.0, retries=int(sys.argv[1]), config=cfg)
except BaseException as exc:
    out.update(error=type(exc).__name__, timeout_error=isinstance(exc, TimeoutError),
               message=str(exc), indices=list(getattr(exc, "indices", ())),
               notes=getattr(exc, "__notes__", []))
out["after"] = amortune.execute(tasks.square, range(10), executor="processes", n_jobs=2,
                                chunksize=1, config=cfg)
pool = peek_warm_pool(cfg.start_method)
out["before"], out["now"] = before, pool.pids()
print(json.dumps(out))
"""


@pytest.mark.parametrize("retries", [0, 1])
def test_timeout_kills_and_replaces_a_stuck_worker(retries: int) -> None:
    out = run_script(TIMEOUT_SCRIPT, str(retries))
    assert out["error"] == "TaskTimeoutError" and out["timeout_error"]
    assert out["indices"] == [3] and "item 3" in out["message"]
    if retries:  # retried once, stuck again
        assert any("failed 2 times" in n for n in out["notes"])
    assert out["after"] == [x * x for x in range(10)]
    replaced = set(out["before"]) - set(out["now"])  # the retry may run on a replacement
    assert 1 <= len(replaced) <= 1 + retries
    assert not wait_gone(sorted(replaced), 5)


def test_timeout_with_retry_recovers_an_item_slow_only_once() -> None:
    out = run_script("""
        cfg = Config(sample_items=2, sample_seconds=0.001, target_chunk_seconds=0.001)
        with tempfile.TemporaryDirectory() as d:
            got = amortune.execute(tasks.slow_once, [(d, i) for i in range(8)], timeout=1.0,
                                   retries=1, n_jobs=2, chunksize=1, config=cfg)
        print(json.dumps(got))
    """)
    assert out == list(range(8))


# -- exceptions from func -------------------------------------------------------------------------


def test_exception_keeps_type_cause_and_index(start_method: str) -> None:
    cfg = Config(start_method=start_method, **FAST)
    with pytest.raises(ValueError, match="bad item 7") as info:
        amortune.execute(tasks.fail_on_7, range(30), executor="processes", n_jobs=2, chunksize=3,
                         config=cfg)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_value_error_at" in str(info.value.__cause__)
    assert "amortune: raised while processing item 7" in info.value.__notes__


def test_retry_on_transient_error(tmp_path: Path) -> None:
    cfg = Config(**FAST)
    data = [(str(tmp_path / "a"), i) for i in range(20)]
    os.mkdir(tmp_path / "a")
    assert amortune.execute(tasks.flaky_once, data, executor="processes", n_jobs=2, chunksize=2,
                            retries=1, retry_on=(tasks.Flaky,), config=cfg) == list(range(20))
    os.mkdir(tmp_path / "b")
    data = [(str(tmp_path / "b"), i) for i in range(20)]
    with pytest.raises(tasks.Flaky):  # not listed in retry_on: not retried
        amortune.execute(tasks.flaky_once, data, executor="processes", n_jobs=2, chunksize=2,
                         retries=1, config=cfg)


# -- the scheduler against a scripted backend: every retry decision, no processes ---------------


class ScriptedBackend(Backend):
    """Runs chunks in the caller; item k fails ``fails[k]`` times first.

    A crash or a timeout loses the whole chunk (the future fails); ``func``'s own errors come
    back in the outcome with the results before the failing item, as real backends send them.
    """

    name = "scripted"

    def __init__(self, fails: dict[int, tuple[str, int]]) -> None:
        self.left = {k: n for k, (_, n) in fails.items()}
        self.how = {k: how for k, (how, _) in fails.items()}
        self.ran: collections.Counter[int] = collections.Counter()  # successful runs per item
        self.failed: collections.Counter[int] = collections.Counter()

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, tuple(Slot(i) for i in range(3)), ready_slots=3)

    def submit(self, task: ChunkTask) -> Future[ChunkOutcome]:
        fut: Future[ChunkOutcome] = Future()
        lost = [k for k in task.indices if self.how.get(k) in ("crash", "timeout")
                and self.left[k] > 0]
        if lost:
            for k in lost:
                self.left[k] -= 1
                self.failed[k] += 1
            fut.set_exception(make_error(self.how[lost[0]], task.start, len(task.items)))
            return fut
        results = []
        for k, x in zip(task.indices, task.items, strict=True):
            if self.how.get(k) in ("transient", "bad") and self.left[k] > 0:
                self.left[k] -= 1
                self.failed[k] += 1
                fut.set_result(ChunkOutcome(results, 0.001, 0.001,
                                            error=make_error(self.how[k], k, 1)))
                return fut
            self.ran[k] += 1
            results.append(x * x)
        fut.set_result(ChunkOutcome(results, 0.001, 0.001))
        return fut

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        pass


def make_error(how: str, start: int, n: int) -> BaseException:
    indices = tuple(range(start, start + n))
    if how == "crash":
        return WorkerCrashedError("worker died", exitcode=-9, indices=indices)
    if how == "timeout":
        return TaskTimeoutError("too slow", indices=indices[:1])
    if how == "transient":
        return tasks.Flaky("transient")
    return ValueError("permanent")


FAILS = st.dictionaries(st.integers(0, 59), st.tuples(
    st.sampled_from(["crash", "timeout", "transient", "bad"]), st.integers(1, 3)), max_size=5)


def _drive(backend: Backend, n: int, chunksize: int, retries: int) -> tuple[list[int], Any]:
    got: list[int] = []
    error: BaseException | None = None
    sched = Scheduler(backend, FunctionRef(tasks.square),
                      policy=ChunkPolicy(chunksize, 3, 1.0, max_size=chunksize),
                      retries=retries, retry_on=(tasks.Flaky,), retry_backoff_seconds=0.0)
    try:
        for part in sched.run(iter(range(n)), n_remaining=n):
            got.extend(part)
    except (WorkerCrashedError, TaskTimeoutError, tasks.Flaky, ValueError) as exc:
        error = exc
    return got, error


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 60), chunksize=st.integers(1, 7), retries=st.integers(0, 3), fails=FAILS)
# A retried chunk's rest comes before another chunk's permanent failure: it must still run.
@example(n=7, chunksize=2, retries=1, fails={1: ("crash", 1), 0: ("transient", 1), 2: ("bad", 1)})
def test_retries_are_per_item_and_results_stay_in_order(n: int, chunksize: int, retries: int,
                                                       fails: dict[int, tuple[str, int]]) -> None:
    fails = {k: v for k, v in fails.items() if k < n}
    backend = ScriptedBackend(fails)
    got, error = _drive(backend, n, chunksize, retries)
    assert got == [x * x for x in range(len(got))]  # a prefix, in order, whatever failed
    if error is None:
        assert len(got) == n
    else:
        index = getattr(error, "amortune_index", None)
        assert index is None or index >= len(got)
    lost_ones = {k for k, (how, _) in fails.items() if how in ("crash", "timeout")}
    for k in range(n):
        if k in fails and fails[k][0] in ("transient", "bad"):
            # A failing item is retried on its own: it fails at most retries + 1 times (once if
            # not retryable), and never makes the items around it run again.
            limit = 1 if fails[k][0] == "bad" else retries + 1
            assert backend.failed[k] <= min(fails[k][1], limit)
    if not lost_ones:
        assert all(c == 1 for c in backend.ran.values()), backend.ran  # nothing ran twice


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 60), chunksize=st.integers(1, 7), retries=st.integers(0, 3),
       flaky=st.dictionaries(st.integers(0, 59), st.integers(1, 4), max_size=6))
def test_transient_items_are_retried_alone_up_to_retries(n: int, chunksize: int, retries: int,
                                                         flaky: dict[int, int]) -> None:
    fails = {k: ("transient", c) for k, c in flaky.items() if k < n}
    backend = ScriptedBackend(fails)
    got, error = _drive(backend, n, chunksize, retries)
    fatal = sorted(k for k, (_, c) in fails.items() if c > retries)
    if not fatal:
        assert error is None and got == [x * x for x in range(n)]
    else:
        assert isinstance(error, tasks.Flaky) and got == [x * x for x in range(fatal[0])]
        assert error.amortune_index == fatal[0]  # type: ignore[attr-defined]
    for k, (_, c) in fails.items():
        if not fatal or k < fatal[0]:
            assert backend.failed[k] == min(c, retries + 1)
    assert all(c == 1 for c in backend.ran.values())  # items that succeeded ran once


# -- Ctrl-C and a killed caller: no orphans -------------------------------------------------------

BUSY_SCRIPT = """
method, folder = sys.argv[1], sys.argv[2]

def report():
    while len(os.listdir(folder)) < 2:
        time.sleep(0.01)
    print(json.dumps(sorted(int(p) for p in os.listdir(folder))), flush=True)

threading.Thread(target=report, daemon=True).start()
amortune.execute(tasks.record_pid_and_sleep, [(folder, i) for i in range(10)],
                 executor="processes", n_jobs=2, chunksize=1,
                 config=Config(start_method=method, sample_items=2, sample_seconds=0.001))
"""


def start_busy_caller(method: str, folder: Path) -> tuple[subprocess.Popen[str], list[int], list[int]]:
    """A caller whose two workers are busy; returns it, the worker pids and all its descendants.

    Its stderr goes to a file: an orphaned worker would hold a pipe open and block the reader.
    """
    (folder / "pids").mkdir()
    with open(folder / "stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", PROLOGUE + BUSY_SCRIPT, method, str(folder / "pids")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    if not line:
        reap(proc, [])
        pytest.fail(f"the caller never reported its busy workers: {(folder / 'stderr').read_text()}")
    workers = json.loads(line)
    descendants = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert set(workers) <= set(descendants)
    return proc, workers, descendants


def reap(proc: subprocess.Popen[str], descendants: list[int]) -> None:
    """Leave nothing behind, whatever the test found."""
    for pid in descendants:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


def test_ctrl_c_stops_every_worker(start_method: str, tmp_path: Path) -> None:
    proc, workers, descendants = start_busy_caller(start_method, tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert proc.returncode != 0 and "KeyboardInterrupt" in (tmp_path / "stderr").read_text()
        assert not wait_gone(workers, 2), "workers outlived a Ctrl-C"
        assert not wait_gone(descendants, 2), "helper processes outlived the caller"
    finally:
        reap(proc, descendants)


def test_killed_caller_leaves_no_orphans(start_method: str, tmp_path: Path) -> None:
    proc, workers, descendants = start_busy_caller(start_method, tmp_path)
    try:
        proc.kill()
        proc.wait(timeout=30)
        assert not wait_gone(workers, 5), "workers outlived their killed caller"
        assert not wait_gone(descendants, 5), "forkserver or tracker outlived the killed caller"
    finally:
        reap(proc, descendants)


def test_exit_stops_a_warm_pool_nothing_else_references() -> None:
    # The registry held the only reference: clearing it first freed the pool unstopped, and its
    # manager went on replacing the workers multiprocessing's exit handler killed (with spawn,
    # each replacement cut short by the exit printed "EOFError: Ran out of input").
    code = ("import json\n"
            "from amortune.backends import _warm\n"
            "pool = _warm.get_warm_pool(2, 'fork')\n"
            "thread = pool._mgr.thread\n"
            "del pool\n"
            "_warm._at_exit()\n"
            "print(json.dumps(thread.is_alive()))\n")
    assert fresh_json(code) is False, "the manager thread outlived the exit handler"


def test_exit_does_not_wait_for_abandoned_work() -> None:
    # A chunk nobody will wait for (a failed run left it behind, say) sleeps for an hour in a
    # warm worker: leaving the interpreter must kill that worker, not wait for it.
    out = run_script("""
        from amortune.backends._base import FunctionRef
        cfg = Config(sample_items=2, sample_seconds=0.001)
        amortune.execute(tasks.square, range(40), executor="processes", n_jobs=2, config=cfg)
        pool = peek_warm_pool(cfg.start_method)
        pool.submit(ChunkTask(FunctionRef(tasks.sleep_forever_at_3), [3], 3))
        time.sleep(0.2)
        print(json.dumps(pool.pids()))
    """, timeout=30)
    assert not wait_gone(out, 5)


# -- unpicklable data -----------------------------------------------------------------------------


def _warm_pids(cfg: Config) -> list[int]:
    amortune.execute(tasks.square, range(40), executor="processes", n_jobs=2, config=cfg)
    pool = peek_warm_pool(cfg.start_method)
    assert pool is not None
    return sorted(pool.pids())


@pytest.mark.parametrize("where", ["argument", "result", "argument_unpickle"])
def test_unpicklable_data_names_the_item_and_keeps_the_pool(where: str) -> None:
    cfg = Config(**FAST)
    pids = _warm_pids(cfg)
    data: list[Any] = list(range(20))
    func: Any = tasks.identity
    if where == "argument":
        data[10] = tasks.Unpicklable()
    elif where == "argument_unpickle":
        data[10] = tasks.FailsToUnpickle()
    else:
        func = tasks.return_unpicklable
    with pytest.raises(NotPicklableError) as info:
        amortune.execute(func, data, executor="processes", n_jobs=2, chunksize=2, config=cfg)
    if where == "argument_unpickle":  # the worker only knows which chunk held it
        start = int(re.search(r"chunk starting at item (\d+)", str(info.value))[1])  # type: ignore[index]
        assert start <= 10 and "cannot be unpickled in the worker" in str(info.value)
    else:
        assert ("item 10" if where == "argument" else "item 4") in str(info.value)
    assert amortune.execute(tasks.square, range(30), executor="processes", n_jobs=2,
                            config=cfg) == [x * x for x in range(30)]
    assert sorted(peek_warm_pool(cfg.start_method).pids()) == pids  # type: ignore[union-attr]


def test_unpicklable_function_fails_its_future_not_the_pool() -> None:
    lock = threading.Lock()
    backend = ProcessBackend(1, start_method="fork")
    try:
        fut = backend.submit(ChunkTask(FunctionRef(lambda x: (lock, x)), [1], 0))
        with pytest.raises(NotPicklableError, match="cannot be pickled"):
            fut.result(timeout=30)
        assert backend.submit(ChunkTask(FunctionRef(tasks.square), [3], 0)).result(timeout=30).results == [9]
    finally:
        backend.shutdown(wait=True, kill=True)


# -- memory recycling and the warm pool -----------------------------------------------------------


def test_worker_growing_past_the_limit_is_replaced_after_its_chunk() -> None:
    cfg = Config(worker_memory_growth_bytes=8 << 20, **FAST)
    out = amortune.execute(tasks.leak_mb, [(16, i) for i in range(12)], executor="processes",
                           n_jobs=2, chunksize=1, config=cfg)
    in_workers = out[2:]  # the first two items were sampled here, in the caller
    assert all(held == 1 for _, held in in_workers), out  # every chunk had a fresh worker
    assert len({pid for pid, _ in in_workers}) == len(in_workers)


def test_without_a_limit_the_same_worker_keeps_its_memory() -> None:
    # The control for the test above: the leak is real and visible when nothing recycles.
    backend = ProcessBackend(1, start_method="forkserver", memory_growth_bytes=None)
    try:
        held = [backend.submit(ChunkTask(FunctionRef(tasks.leak_mb), [(4, i)], i)).result(timeout=30).results[0]
                for i in range(3)]
    finally:
        backend.shutdown(wait=True, kill=True)
    assert [n for _, n in held] == [1, 2, 3]


def test_second_execute_reuses_the_warm_workers(start_method: str) -> None:
    from amortune._optimize import _costs
    from amortune._system import probe_system

    cfg = Config(start_method=start_method)
    data = [0.002] * 200
    assert amortune.execute(tasks.spin, data, executor="processes", n_jobs=2, config=cfg) == data
    pool = peek_warm_pool(start_method)
    assert pool is not None
    pids = sorted(pool.pids())
    # What the model is told for the next call: workers are warm, so start-up costs nothing.
    assert _costs(cfg, probe_system(cfg), None).warm_workers >= 2
    assert amortune.execute(tasks.spin, data, executor="processes", n_jobs=2, config=cfg) == data
    assert peek_warm_pool(start_method) is pool
    assert sorted(pool.pids()) == pids


# -- ProcessBackend races -------------------------------------------------------------------------


def test_cancelled_pending_tasks_do_not_stall_later_ones() -> None:
    # One worker, busy; five queued chunks are cancelled, then one more is queued. Skipping the
    # cancelled ones must still hand the last one to the worker.
    backend = ProcessBackend(1, start_method="fork")
    try:
        busy = backend.submit(ChunkTask(FunctionRef(tasks.sleep_then_return), [0.5], 0))
        queued = [backend.submit(ChunkTask(FunctionRef(tasks.square), [i], i)) for i in range(5)]
        cancelled = [f.cancel() for f in queued]
        # The manager may already have sent the first one behind the busy chunk (one chunk
        # waits in each worker's pipe, so it starts without a round trip): the worker is told,
        # and skips it or has already run it.
        assert all(cancelled[1:]), cancelled
        last = backend.submit(ChunkTask(FunctionRef(tasks.square), [7], 7))
        assert last.result(timeout=30).results == [49]
        assert busy.result(timeout=30).results == [0.5]
        if not cancelled[0]:
            try:
                assert queued[0].result(timeout=30).results == [0]
            except CancelledError:
                pass
    finally:
        backend.shutdown(wait=True, kill=True)


def test_max_tasks_per_child_is_never_reported_as_a_crash() -> None:
    backend = ProcessBackend(2, start_method="fork", max_tasks_per_child=1)
    try:
        futs = [backend.submit(ChunkTask(FunctionRef(tasks.worker_pid), [i], i)) for i in range(16)]
        pids = [f.result(timeout=60).results[0] for f in futs]
    finally:
        backend.shutdown(wait=True, kill=True)
    assert len(set(pids)) == 16


def test_initializer_errors_fail_the_work_not_hang_it() -> None:
    raising = ProcessBackend(2, start_method="fork", setup=WorkerSetup(tasks.init_raises))
    exiting = ProcessBackend(2, start_method="fork", setup=WorkerSetup(tasks.init_exits))
    try:
        with pytest.raises(ValueError, match="init failed") as info:
            raising.submit(ChunkTask(FunctionRef(tasks.square), [1], 0)).result(timeout=30)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        with pytest.raises(WorkerCrashedError, match="exit code 7 before it was ready"):
            exiting.submit(ChunkTask(FunctionRef(tasks.square), [1], 0)).result(timeout=30)
        assert not raising.alive and not exiting.alive
    finally:
        raising.shutdown(wait=True, kill=True)
        exiting.shutdown(wait=True, kill=True)


def test_a_fresh_forked_pool_gives_each_worker_its_own_first_chunk() -> None:
    # Chunks submitted the moment the pool exists wait in the pipes of forked workers that are
    # still starting, one each: never two behind one worker while the other sits idle.
    for _ in range(3):
        backend = ProcessBackend(2, start_method="fork")
        try:
            futs = [backend.submit(ChunkTask(FunctionRef(tasks.pid_after), [0.3], i))
                    for i in range(2)]
            pids = [f.result(timeout=60).results[0] for f in futs]
        finally:
            backend.shutdown(wait=True, kill=True)
        assert len(set(pids)) == 2


def test_a_chunk_sent_to_a_worker_that_dies_starting_runs_on_the_next(tmp_path: Path) -> None:
    # The chunk sat in the pipe of a worker whose start failed: it never began, so it is not a
    # crash of that chunk; the replacement worker runs it.
    marker = str(tmp_path / "started")
    backend = ProcessBackend(1, start_method="fork",
                             setup=WorkerSetup(tasks.init_exits_first_time, (marker,)))
    try:
        fut = backend.submit(ChunkTask(FunctionRef(tasks.square), [6], 0))
        assert fut.result(timeout=60).results == [36]
        assert os.path.exists(marker)
    finally:
        backend.shutdown(wait=True, kill=True)


def test_worker_dying_while_the_manager_sends_to_it() -> None:
    # The worker is stopped, so the manager blocks writing a 64 MiB chunk to it. Killing the
    # worker must fail that write (EPIPE) and the chunk goes to a fresh worker; a stopped worker
    # must not keep shutdown(kill=True) waiting either.
    out = run_script("""
        import signal
        from amortune.backends._base import FunctionRef
        big = b"x" * (64 << 20)
        out = {}
        for how in ("kill_worker", "shutdown"):
            backend = ProcessBackend(1, start_method="fork")
            assert backend.submit(ChunkTask(FunctionRef(len), [b"ab"], 0)).result(timeout=30).results == [2]
            pid = backend.pids()[0]
            os.kill(pid, signal.SIGSTOP)
            fut = backend.submit(ChunkTask(FunctionRef(len), [big], 0))
            time.sleep(0.3)
            if how == "kill_worker":
                os.kill(pid, signal.SIGKILL)
                out[how] = fut.result(timeout=30).results
                backend.shutdown(wait=True)
            else:
                backend.shutdown(wait=True, kill=True)
                out[how] = type(fut.exception(timeout=30)).__name__
        print(json.dumps(out))
    """)
    assert out == {"kill_worker": [64 << 20], "shutdown": "CancelledError"}


def test_crash_error_is_a_broken_process_pool() -> None:
    assert issubclass(WorkerCrashedError, BrokenProcessPool)
    assert issubclass(TaskTimeoutError, TimeoutError)
