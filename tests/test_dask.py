"""The Dask backend: chunks as tasks on one two-worker local cluster, shared by the module.

First the backend alone, through ``submit(ChunkTask(...))``: order, call styles, ``func``'s
failure with the results before it, set-up (initializer once per worker, the caller's
environment), cancel, shutdown, an address that does not answer and a worker that dies. Then the
engine on top of it: ``execute``, ``imap`` and ``process_in_batches`` with ``backend=``.

Every wait has its own timeout, so a hang fails one test instead of freezing the suite; no
assertion is about elapsed time. The cluster's processes outlive each test by design, so this
module replaces the suite-wide leak check with one that knows them (see ``no_leaks``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

distributed = pytest.importorskip("distributed")

import amortune  # noqa: E402
from amortune import NotPicklableError, WorkerCrashedError  # noqa: E402
from amortune._errors import RemoteTraceback  # noqa: E402
from amortune.backends import (  # noqa: E402
    ChunkTask,
    FunctionRef,
    WorkerSetup,
    resolve_backend,
)
from amortune.backends._base import environment_snapshot  # noqa: E402
from amortune.backends.dask import DaskBackend, DaskConnectionError  # noqa: E402

pytestmark = pytest.mark.dask

#: Seconds any single wait may take before the test fails (a stuck cluster, not slowness).
WAIT = 60.0
T = TypeVar("T")


# -- the cluster and a leak check that knows it ----------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One local cluster of two single-threaded worker processes for the whole module.

    ``allowed_failures=0``: a task whose worker dies fails at once (``KilledWorker``), so
    amortune's own retries are what runs a lost chunk again.
    """
    cl = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, silence_logs=logging.ERROR,
        scheduler_kwargs={"allowed_failures": 0})
    try:
        yield cl
    finally:
        cl.close(timeout=WAIT)


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    cl = distributed.Client(cluster, set_as_default=True)
    try:
        cl.wait_for_workers(2, timeout=WAIT)
        warm = DaskBackend(cl)  # start the client's callback thread before any test looks
        warm.submit(ChunkTask(FunctionRef(square), [1], 0)).result(WAIT)
        warm.shutdown()
        yield cl
    finally:
        cl.close(timeout=WAIT)


@pytest.fixture
def backend(client: Any) -> Iterator[DaskBackend]:
    b = DaskBackend(client)
    try:
        yield b
    finally:
        b.shutdown(kill=True)


#: Threads Dask starts in this process as it goes (callbacks, offloading big messages, watching a
#: restarted worker process); they belong to the module's client and cluster, not to a test.
_DASK_THREADS = ("Dask-", "AsyncProcess", "QueueFeederThread", "TCP-Executor", "asyncio_")


def _cluster_pids(cluster: Any) -> set[int]:
    pids: set[int] = set()
    for nanny in list(cluster.workers.values()):
        pid = getattr(nanny, "pid", None)
        if not pid:
            continue
        pids.add(pid)
        try:
            pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    return pids


def _warm_pools() -> list[Any]:
    """amortune's reusable local worker pools (they outlive a test on purpose)."""
    try:
        from amortune.backends._warm import all_warm_pools
    except ImportError:
        return []
    return list(all_warm_pools())


def _warm_pool_pids() -> set[int]:
    return {pid for pool in _warm_pools() for pid in pool.pids()}


def _stray_processes(cluster: Any) -> list[psutil.Process]:
    allowed = _cluster_pids(cluster) | _warm_pool_pids()
    out = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in allowed:
            continue
        try:
            cmd = " ".join(child.cmdline())
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if "forkserver" in cmd or "resource_tracker" in cmd:
            continue
        out.append(child)
    return out


@pytest.fixture(autouse=True)
def no_leaks(cluster: Any, client: Any) -> Iterator[None]:
    """The suite's leak check, knowing the module's cluster: its worker processes (also ones
    restarted after a kill) and Dask's own threads are expected; anything else a test leaves
    behind (a process, a thread, a spill folder) fails it."""
    threads_before = {t.ident for t in threading.enumerate()}
    tmp = os.environ.get("TMPDIR", "/tmp")
    spill_before = {n for n in os.listdir(tmp) if n.startswith("amortune-")}
    yield
    deadline = time.monotonic() + 5
    while True:
        stray = _stray_processes(cluster)
        pool_threads = {getattr(getattr(getattr(p, "_mgr", None), "thread", None), "ident", None)
                        for p in _warm_pools()}
        threads = [t for t in threading.enumerate()
                   if t.ident not in threads_before and t.is_alive()
                   and not t.name.startswith(_DASK_THREADS)
                   and t.ident not in pool_threads]
        spill = {n for n in os.listdir(tmp) if n.startswith("amortune-")} - spill_before
        if not (stray or threads or spill) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in stray:
        p.kill()
    assert not stray, f"child processes left behind: {stray}"
    assert not threads, f"threads left behind: {threads}"
    assert not spill, f"spill folders left behind: {spill}"


# -- tasks (module level: workers import them by reference) ----------------------------------------


class Oops(Exception):
    """An exception of the test's own, to see its type survive the trip."""


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def scale(x: int, *, by: int = 1) -> int:
    return x * by


def double_all(xs: list[int]) -> list[int]:
    return [2 * x for x in xs]


def fail_at_13(x: int) -> int:
    if x == 13:
        raise Oops(f"item {x} is unlucky")
    return x + 1


def unpicklable_at_4(x: int) -> Any:
    return threading.Lock() if x == 4 else x


def pid_of(_: Any) -> int:
    return os.getpid()


def env_of(name: str) -> str | None:
    return os.environ.get(name)


def record_init(folder: str) -> None:
    with open(os.path.join(folder, f"init-{os.getpid()}"), "a") as f:
        f.write("x\n")


def saw_init(folder: str) -> tuple[int, bool]:
    """(this worker's pid, whether the initializer already ran in it)."""
    return os.getpid(), os.path.exists(os.path.join(folder, f"init-{os.getpid()}"))


def hold(folder: str) -> int:
    """Say it started, then wait for the test's ``release`` file (at most ``WAIT`` seconds)."""
    Path(folder, f"started-{os.getpid()}").touch()
    deadline = time.monotonic() + WAIT
    while not os.path.exists(os.path.join(folder, "release")) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def mark(folder: str) -> None:
    Path(folder, "ran").touch()


def die_once(x: int, folder: str = "") -> int:
    """Kill this worker process the first time item 5 runs (a file remembers), else succeed."""
    if x == 5:
        flag = os.path.join(folder, "died")
        if not os.path.exists(flag):
            Path(flag).touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return x * 3


def die(_: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _task(func: Any, items: list[Any], start: int = 0, **kw: Any) -> ChunkTask:
    return ChunkTask(FunctionRef(func), items, start, **kw)


def _scheduler_has(client: Any, key: str) -> bool:
    return bool(client.run_on_scheduler(lambda dask_scheduler: key in dask_scheduler.tasks))


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- the backend alone -------------------------------------------------------------------------


def test_info_lists_one_slot_per_worker_thread(backend: DaskBackend, client: Any) -> None:
    info = backend.info()
    assert info.name == "dask"
    assert info.n_slots == 2 and info.ready_slots == 2
    assert len({s.id for s in info.slots}) == 2
    assert all(s.memory_bytes and s.memory_bytes > 0 for s in info.slots)
    assert 0 < info.dispatch_seconds < 0.1
    assert info.start_seconds == 0 and not info.can_interrupt and not info.in_caller
    assert backend.ready() and backend.capacity() == 2
    assert backend.info().slots == info.slots  # the ids stay
    assert DaskBackend(client, n_jobs=1).info().n_slots == 1


def test_chunks_come_back_in_order(backend: DaskBackend) -> None:
    data = list(range(200))
    bounds = [(0, 1), (1, 40), (40, 41), (41, 130), (130, 200)]
    futures = [backend.submit(_task(square, data[a:b], a)) for a, b in bounds]
    outcomes = [f.result(WAIT) for f in futures]
    assert [r for o in outcomes for r in o.results] == [x * x for x in data]
    slot_ids = {s.id for s in backend.info().slots}
    for o in outcomes:
        assert o.error is None and o.slot in slot_ids
        assert o.wall_seconds >= 0 and o.cpu_seconds >= 0 and o.rss_bytes > 0
        assert o.finished >= o.started > 0  # one machine: the worker's clock is comparable


def test_call_styles(backend: DaskBackend) -> None:
    assert backend.submit(_task(square, [3, 4], 0, style="item")).result(WAIT).results == [9, 16]
    assert backend.submit(_task(add, [(1, 2), (3, 4)], 0, style="star")).result(
        WAIT).results == [3, 7]
    assert backend.submit(_task(double_all, [1, 2, 3], 0, style="chunk")).result(
        WAIT).results == [2, 4, 6]
    assert backend.submit(_task(scale, [((2,), {"by": 5}), ((3,), {})], 0, style="apply")).result(
        WAIT).results == [10, 3]
    offset = 7  # a closure travels by value
    assert backend.submit(_task(lambda x: x + offset, [1], 0)).result(WAIT).results == [8]
    with pytest.raises(ValueError, match="call style"):
        backend.submit(_task(square, [1], 0, style="nope"))


def test_func_error_comes_back_with_the_results_before_it(backend: DaskBackend) -> None:
    outcome = backend.submit(_task(fail_at_13, list(range(10, 20)), 10)).result(WAIT)
    assert outcome.results == [11, 12, 13]
    err = outcome.error
    assert type(err) is Oops and "item 13 is unlucky" in str(err)
    assert getattr(err, "amortune_index", None) == 13
    assert "amortune: raised while processing item 13" in getattr(err, "__notes__", [])
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "fail_at_13" in str(err.__cause__) and "Oops" in str(err.__cause__)


def test_chunk_style_error_and_wrong_length(backend: DaskBackend) -> None:
    outcome = backend.submit(_task(lambda xs: xs[:1], [1, 2], 4, style="chunk")).result(WAIT)
    assert outcome.results == [] and isinstance(outcome.error, ValueError)
    assert outcome.error.amortune_index == 4  # type: ignore[attr-defined]


def test_unpicklable_result_is_that_items_error(backend: DaskBackend) -> None:
    outcome = backend.submit(_task(unpicklable_at_4, list(range(2, 8)), 2)).result(WAIT)
    assert outcome.results == [2, 3]
    assert isinstance(outcome.error, NotPicklableError)
    assert outcome.error.amortune_index == 4  # type: ignore[attr-defined]


def test_unpicklable_item_fails_the_future_naming_it(backend: DaskBackend) -> None:
    future = backend.submit(_task(square, [1, threading.Lock()], 10))
    with pytest.raises(NotPicklableError, match="item 11"):
        future.result(WAIT)


def test_large_function_is_scattered_once_per_token(backend: DaskBackend) -> None:
    blob = b"x" * (100 << 10)  # captured by value: a 100 KiB function
    fn = FunctionRef(lambda x: len(blob) + x)
    futures = [backend.submit(ChunkTask(fn, [i], i)) for i in range(6)]
    assert [f.result(WAIT).results for f in futures] == [[len(blob) + i] for i in range(6)]
    assert [k for k in backend._shared if k.startswith("fn:")] == [f"fn:{fn.token}"]
    small = [backend.submit(_task(square, [i], i)) for i in range(3)]  # travels inside tasks
    assert [f.result(WAIT).results for f in small] == [[0], [1], [4]]
    assert len(backend._shared) == 1


def test_large_chunks_travel_scattered(backend: DaskBackend) -> None:
    blob = b"x" * (3 << 19)  # 1.5 MiB per item: the chunk's items are scattered first
    out = backend.submit(_task(len, [blob, blob], 0)).result(WAIT)
    assert out.results == [len(blob)] * 2


def test_initializer_runs_once_per_worker_before_its_first_item(
        backend: DaskBackend, tmp_path: Path) -> None:
    setup = WorkerSetup(initializer=record_init, initargs=(str(tmp_path),))
    fn = FunctionRef(saw_init)
    futures = [backend.submit(ChunkTask(fn, [str(tmp_path)] * 3, 3 * i, setup=setup))
               for i in range(8)]
    seen = [r for f in futures for r in f.result(WAIT).results]
    assert all(ran_before for _, ran_before in seen)
    files = sorted(tmp_path.glob("init-*"))
    assert len(files) == 2  # both workers, also one that got no chunk (the plugin)
    assert all(f.read_text() == "x\n" for f in files)
    assert {pid for pid, _ in seen} <= {int(f.name.split("-")[1]) for f in files}


def test_initializer_failure_fails_the_chunk(backend: DaskBackend) -> None:
    setup = WorkerSetup(initializer=fail_at_13, initargs=(13,))
    future = backend.submit(_task(square, [1], 0, setup=setup))
    with pytest.raises(Oops) as info:
        future.result(WAIT)
    assert any("initializer" in n for n in getattr(info.value, "__notes__", []))
    assert isinstance(info.value.__cause__, RemoteTraceback)


def test_caller_environment_crosses_but_machine_paths_stay(
        backend: DaskBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    worker_home = backend.submit(_task(env_of, ["HOME"], 0)).result(WAIT).results[0]
    fn = FunctionRef(env_of)
    names = ["AMORTUNE_DASK_TEST", "AMORTUNE_DASK_GONE", "HOME"]

    def run() -> list[str | None]:
        setup = WorkerSetup(env=environment_snapshot())
        futures = [backend.submit(ChunkTask(fn, names, 0, setup=setup)) for _ in range(4)]
        results = [f.result(WAIT).results for f in futures]
        assert all(r == results[0] for r in results)  # every worker agrees
        return results[0]

    monkeypatch.setenv("AMORTUNE_DASK_TEST", "one")
    monkeypatch.setenv("AMORTUNE_DASK_GONE", "soon")
    monkeypatch.setenv("HOME", "/nonexistent/caller-home")
    assert run() == ["one", "soon", worker_home]
    monkeypatch.setenv("AMORTUNE_DASK_TEST", "two")
    monkeypatch.delenv("AMORTUNE_DASK_GONE")
    assert run() == ["two", None, worker_home]


def test_thread_cap_reaches_the_worker(backend: DaskBackend) -> None:
    setup = WorkerSetup(thread_cap=3)
    futures = [backend.submit(_task(env_of, ["OMP_NUM_THREADS"], 0, setup=setup))
               for _ in range(4)]
    assert [f.result(WAIT).results for f in futures] == [["3"]] * 4


def test_cancel_keeps_a_queued_chunk_from_starting(backend: DaskBackend, tmp_path: Path) -> None:
    folder = str(tmp_path)
    blockers = [backend.submit(_task(hold, [folder], i)) for i in range(2)]
    _wait_for(lambda: len(list(tmp_path.glob("started-*"))) == 2, "both workers to be busy")
    queued = backend.submit(_task(mark, [folder], 2))
    key = queued.dask_future.key  # type: ignore[attr-defined]
    _wait_for(lambda: _scheduler_has(backend.client, key), "the scheduler to know the chunk")
    assert queued.cancel() is False  # already sent: the hook cancels the Dask task
    assert queued.cancel_requested  # type: ignore[attr-defined]
    with pytest.raises(CancelledError):
        queued.result(WAIT)
    _wait_for(lambda: not _scheduler_has(backend.client, key), "the scheduler to drop it")
    (tmp_path / "release").touch()
    for f in blockers:
        f.result(WAIT)
    after = [backend.submit(_task(square, [i], i)) for i in range(4)]  # queued after it
    for f in after:
        f.result(WAIT)
    assert not (tmp_path / "ran").exists()


def test_shutdown_kill_cancels_outstanding_but_keeps_the_users_client(
        client: Any, tmp_path: Path) -> None:
    folder = str(tmp_path)
    b = DaskBackend(client)
    blockers = [b.submit(_task(hold, [folder], i)) for i in range(2)]
    _wait_for(lambda: len(list(tmp_path.glob("started-*"))) == 2, "both workers to be busy")
    queued = b.submit(_task(mark, [folder], 2))
    key = queued.dask_future.key  # type: ignore[attr-defined]
    _wait_for(lambda: _scheduler_has(client, key), "the scheduler to know the chunk")
    b.shutdown(kill=True)
    for f in [*blockers, queued]:
        with pytest.raises(CancelledError):
            f.result(WAIT)
    _wait_for(lambda: not _scheduler_has(client, key), "the scheduler to drop it")
    (tmp_path / "release").touch()
    with pytest.raises(RuntimeError, match="shut down"):
        b.submit(_task(square, [1], 0))
    assert client.status == "running"
    again = DaskBackend(client)
    try:
        assert again.submit(_task(square, [5], 0)).result(WAIT).results == [25]
    finally:
        again.shutdown()
    assert not (tmp_path / "ran").exists()


def test_registry_recognises_clients_addresses_and_the_name(client: Any, cluster: Any) -> None:
    by_client = resolve_backend(client, n_jobs=None, config=None)
    by_name = resolve_backend("dask", n_jobs=None, config=None)  # the module's default client
    assert isinstance(by_client, DaskBackend) and by_client.client is client
    assert isinstance(by_name, DaskBackend) and by_name.client is client
    by_address = resolve_backend(cluster.scheduler_address, n_jobs=None, config=None)
    assert isinstance(by_address, DaskBackend) and by_address.client is not client
    try:
        assert by_address.submit(_task(square, [4], 0)).result(WAIT).results == [16]
    finally:
        by_address.shutdown()
    assert by_address.client.status == "closed"  # its own client, closed
    assert client.status == "running"
    by_cluster = resolve_backend(cluster, n_jobs=1, config=None)
    assert isinstance(by_cluster, DaskBackend) and by_cluster.info().n_slots == 1
    by_cluster.shutdown()
    assert by_cluster.client.status == "closed" and cluster.status.name == "running"
    for b in (by_client, by_name):
        b.shutdown()
    assert client.status == "running"  # never the user's


def test_unreachable_address_raises_naming_it() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    with pytest.raises(DaskConnectionError, match=address) as info:
        DaskBackend(address, connect_timeout=1.0)
    assert isinstance(info.value, amortune.AmortuneError)


@pytest.mark.filterwarnings("ignore:Port .* is already in use")  # another program's dashboard
def test_tls_address_with_dask_security() -> None:
    pytest.importorskip("cryptography")
    from distributed.security import Security

    security = Security.temporary()  # type: ignore[no-untyped-call,unused-ignore]
    with distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, protocol="tls://",
            security=security, host="127.0.0.1", dashboard_address=None,
            worker_dashboard_address=None,
            silence_logs=logging.ERROR) as tls_cluster:
        address = tls_cluster.scheduler_address
        assert address.startswith("tls://")
        b = DaskBackend(address, security=security, connect_timeout=WAIT)
        try:
            assert b.submit(_task(square, [7], 0)).result(WAIT).results == [49]
        finally:
            b.shutdown()
        with pytest.raises(DaskConnectionError, match="security"):
            DaskBackend(address, connect_timeout=5.0)  # no certificates: refused, clearly


def test_no_client_for_the_name_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def none() -> Any:
        raise ValueError("No clients found")

    monkeypatch.setattr(distributed.Client, "current", staticmethod(none))
    with pytest.raises(DaskConnectionError, match="distributed.Client"):
        DaskBackend()


def test_killed_worker_is_a_lost_chunk(backend: DaskBackend, client: Any, cluster: Any) -> None:
    future = backend.submit(_task(die, [0, 1, 2], 40))
    exc = future.exception(WAIT)
    assert isinstance(exc, WorkerCrashedError) and exc.indices == (40, 41, 42)
    assert isinstance(exc.__cause__, distributed.KilledWorker)
    assert backend.is_lost(exc) and backend.is_lost(exc.__cause__)
    from distributed.comm.core import CommClosedError

    assert backend.is_lost(CommClosedError("gone")) and not backend.is_lost(Oops("no"))
    client.wait_for_workers(2, timeout=WAIT)  # the nanny replaces it
    _wait_for(lambda: len(backend.info().slots) == 2, "the replacement worker")
    assert backend.submit(_task(square, [6], 0)).result(WAIT).results == [36]


def test_timeouts_are_refused(backend: DaskBackend) -> None:
    future = backend.submit(_task(square, [1], 0, timeout_seconds=1.0))
    with pytest.raises(amortune.AmortuneError, match="timeout"):
        future.result(WAIT)


def test_resources_shape_the_slots(client: Any) -> None:
    b = DaskBackend(client, gpu=True)  # these workers advertise no GPU
    try:
        info = b.info()
        assert info.ready_slots == 0 and not b.ready() and info.n_slots == 1
    finally:
        b.shutdown()


# -- the engine on the cluster ---------------------------------------------------------------------

#: Sampling runs the first items in the caller: keep it to a couple, so the items these tests
#: make misbehave run on the cluster.
FEW_SAMPLES = amortune.Config(sample_items=2, sample_seconds=0.001)


def in_dask_worker() -> bool:
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


def die_in_worker_once(x: int, folder: str) -> int:
    """Kill the Dask worker running item 150, the first time only (never the caller)."""
    if x == 150 and in_dask_worker():
        flag = os.path.join(folder, "died")
        if not os.path.exists(flag):
            Path(flag).touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return x * 3


def fail_at_150(x: int) -> int:
    if x == 150:
        raise Oops(f"item {x} is unlucky")
    return x


def generated(data: Any) -> Iterator[Any]:
    yield from data


def bounded(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` in a helper thread, failing the test after ``WAIT`` seconds
    instead of hanging it; exceptions come back as they were raised."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = func(*args, **kwargs)
        except BaseException as exc:  # noqa: B036 - handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="bounded-call", daemon=True)
    thread.start()
    thread.join(WAIT)
    if thread.is_alive():
        pytest.fail(f"{getattr(func, '__name__', func)} did not finish within {WAIT:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("make", [list, tuple, generated], ids=["list", "tuple", "generator"])
def test_execute_on_the_cluster_equals_map(client: Any, make: Any) -> None:
    data = list(range(300))
    assert bounded(amortune.execute, square, make(data), backend=client) == [x * x for x in data]


def test_execute_empty_and_by_name(client: Any) -> None:
    assert bounded(amortune.execute, square, [], backend=client) == []
    assert bounded(amortune.execute, square, range(50), backend="dask") == [
        x * x for x in range(50)]


def test_execute_by_address_shares_one_connection(cluster: Any) -> None:
    from amortune.backends import dask as dask_backend

    try:
        for _ in range(2):
            out = bounded(amortune.execute, square, range(40),
                          backend=cluster.scheduler_address)
            assert out == [x * x for x in range(40)]
        assert len(dask_backend._CONNECTIONS) <= 1
    finally:
        dask_backend.close_connections()


def test_star_per_chunk_and_initializer(client: Any, tmp_path: Path) -> None:
    pairs = [(i, i + 1) for i in range(100)]
    assert bounded(amortune.execute, add, pairs, star=True, backend=client) == [
        a + b for a, b in pairs]
    doubled = bounded(amortune.execute, double_all, range(100), per_chunk=True, backend=client)
    assert doubled == [2 * x for x in range(100)]
    out = bounded(amortune.execute, saw_init, [str(tmp_path)] * 200, backend=client,
                  initializer=record_init, initargs=(str(tmp_path),), config=FEW_SAMPLES)
    assert all(ran for _, ran in out)
    workers = {int(f.name.split("-")[1]) for f in tmp_path.glob("init-*")}
    assert {pid for pid, _ in out} <= workers | {os.getpid()}
    assert all(f.read_text() == "x\n" for f in tmp_path.glob("init-*"))


def test_imap_and_batches_on_the_cluster(client: Any) -> None:
    assert bounded(lambda: list(amortune.imap(square, range(200), backend=client))) == [
        x * x for x in range(200)]
    unordered = bounded(lambda: list(amortune.imap(square, range(200), backend=client,
                                                   ordered=False)))
    assert sorted(unordered) == sorted(x * x for x in range(200))
    out = bounded(amortune.process_in_batches, square, range(500), batch_size=120,
                  backend=client)
    assert list(out) == [x * x for x in range(500)]
    total = bounded(amortune.process_in_batches, square, range(500), batch_size=120,
                    backend=client, reduce=lambda a, b: a + b)
    assert total == sum(x * x for x in range(500))


def nap(x: int) -> int:
    time.sleep(0.005)
    return x


def _amortune_tasks(client: Any) -> list[str]:
    return list(client.run_on_scheduler(lambda dask_scheduler: [
        str(k) for k in dask_scheduler.tasks if str(k).startswith("amortune-chunk")]))


def test_closing_imap_early_leaves_nothing_on_the_cluster(client: Any) -> None:
    def first_few() -> list[int]:
        stream: Any = amortune.imap(nap, range(5000), backend=client)
        try:
            return [next(stream) for _ in range(300)]
        finally:
            stream.close()  # the rest is cancelled where it waits; running chunks finish

    assert bounded(first_few) == list(range(300))
    _wait_for(lambda: not _amortune_tasks(client), "the cluster to drop the call's chunks")


def test_worker_killed_mid_run_is_retried(client: Any, tmp_path: Path) -> None:
    from functools import partial

    func = partial(die_in_worker_once, folder=str(tmp_path))
    try:
        out = bounded(amortune.execute, func, range(300), backend=client, retries=2,
                      config=FEW_SAMPLES)
        assert (tmp_path / "died").exists()  # a worker did die mid-run
        assert out == [3 * x for x in range(300)]
    finally:
        client.wait_for_workers(2, timeout=WAIT)


def test_worker_killed_without_retries_names_the_items(client: Any, tmp_path: Path) -> None:
    from functools import partial

    func = partial(die_in_worker_once, folder=str(tmp_path))
    try:
        with pytest.raises(WorkerCrashedError, match="died") as info:
            bounded(amortune.execute, func, range(300), backend=client, config=FEW_SAMPLES)
        # The chunk of item 150 or one queued behind it on the same worker (Dask fails both)
        assert info.value.indices and isinstance(info.value.__cause__, distributed.KilledWorker)
    finally:
        client.wait_for_workers(2, timeout=WAIT)


def test_execute_error_keeps_type_index_and_traceback(client: Any) -> None:
    with pytest.raises(Oops) as info:
        bounded(amortune.execute, fail_at_150, range(300), backend=client, config=FEW_SAMPLES)
    assert getattr(info.value, "amortune_index", None) == 150
    assert "amortune: raised while processing item 150" in getattr(info.value, "__notes__", [])
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_at_150" in str(info.value.__cause__)
