"""Edge cases: input errors in order, nested calls, timeouts and retries on sampled items."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import amortune
from amortune import Config
from amortune._errors import TaskTimeoutError
from tests import tasks

FAST = Config(sample_items=3, sample_seconds=0.001, target_chunk_seconds=0.001)
EXECUTORS = ["serial", "threads", "processes"]


def failing_input(n: int, fail_at: int):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError(f"input failed at {i}")
        yield i


@pytest.mark.parametrize("executor", EXECUTORS + [None])
@pytest.mark.parametrize(("func_fails", "input_fails"), [(100, 500), (700, 300), (None, 4500)])
def test_the_first_error_in_input_order_wins(executor, func_fails, input_fails):
    def func(x):
        if x == func_fails:
            raise ValueError(f"func failed at {x}")
        return x

    expected = RuntimeError if func_fails is None or input_fails < func_fails else ValueError
    with pytest.raises(Exception) as ref:
        list(map(func, failing_input(6000, input_fails)))
    assert isinstance(ref.value, expected)
    with pytest.raises(expected) as got:
        amortune.execute(func, failing_input(6000, input_fails), executor=executor, config=FAST)
    assert str(got.value) == str(ref.value)


def test_batches_keep_input_errors_in_order():
    def func(x):
        if x == 100:
            raise ValueError("func failed at 100")
        return x

    with pytest.raises(ValueError, match="func failed at 100"):
        amortune.process_in_batches(func, failing_input(6000, 500), batch_size=64)


def test_nested_execute_inside_a_worker_runs_serially():
    expected = [sum(x * x for x in range(i, i + 50)) for i in range(4)]
    got = amortune.execute(tasks.nested_execute, range(4), executor="processes", n_jobs=2)
    assert got == expected


def test_pool_inside_a_daemonic_process_raises_clearly():
    script = textwrap.dedent("""
        import multiprocessing as mp
        def child(q):
            import amortune
            try:
                amortune.Pool(2)
            except amortune.AmortuneError as exc:
                q.put("error: " + str(exc))
            else:
                q.put("no error")
        if __name__ == "__main__":
            ctx = mp.get_context("fork")
            q = ctx.Queue()
            p = ctx.Process(target=child, args=(q,), daemon=True)
            p.start()
            print(q.get(timeout=60))
            p.join()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert "error:" in out.stdout and "daemonic" in out.stdout, out.stdout + out.stderr


def test_a_failed_worker_start_is_retried_not_hung():
    script = textwrap.dedent("""
        import multiprocessing.context as ctxmod
        from amortune.backends import processes
        from amortune.backends._base import ChunkTask, FunctionRef
        calls = []
        orig = ctxmod.ForkServerProcess.start
        def flaky_start(self):
            calls.append(1)
            if len(calls) <= 2:
                raise OSError(24, "Too many open files (simulated)")
            return orig(self)
        if __name__ == "__main__":
            ctxmod.ForkServerProcess.start = flaky_start
            be = processes.ProcessBackend(1, start_method="forkserver")
            fut = be.submit(ChunkTask(FunctionRef(abs), [-1, -2], 0))
            print(fut.result(timeout=30).results, len(calls))
            be.shutdown(wait=True, kill=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split()[:2] == ["[1,", "2]"], out.stdout + out.stderr


def test_timeout_covers_the_first_items_too():
    with pytest.raises(TaskTimeoutError, match="item 0"):
        amortune.execute(tasks.stuck_first, range(20), timeout=1.0)
    plan_reasons = amortune.optimize(tasks.square, range(10), config=Config(timeout_seconds=1.0))
    assert any("timeout" in r for r in plan_reasons.reasons)


def test_retry_on_covers_the_sampled_items():
    tasks._seen_flaky.clear()
    got = amortune.execute(tasks.flaky_in_process, range(50), retries=2,
                           retry_on=(tasks.Flaky,))
    assert got == list(range(50))


@pytest.mark.parametrize("executor", ["threads", "serial"])
def test_timeout_with_threads_or_serial_warns(executor):
    with pytest.warns(amortune.AmortuneWarning, match="timeout is ignored"):
        got = amortune.execute(tasks.square, range(30), executor=executor, timeout=5.0)
    assert got == [x * x for x in range(30)]


def test_plan_data_keeps_sampled_items_of_a_shared_iterator():
    class Shared:
        def __init__(self, n):
            self._it = iter(range(n))

        def __iter__(self):
            return self._it

    assert list(amortune.optimize(abs, Shared(10)).data) == list(range(10))


def test_progress_callback_completes_on_empty_input():
    seen = []
    amortune.execute(abs, [], progress_callback=lambda p, f: seen.append((p, f)))
    assert seen[-1] == ("execute", 1.0)


def test_a_plan_made_inside_a_worker_stays_in_that_worker():
    """Nested detection reads the worker's daemon flag: the inner plan is serial, and says why."""
    with amortune.Pool(1) as pool:
        executor, reasons = pool.apply(tasks.nested_plan, (2000,))
    assert executor == "serial"
    assert any("inside a worker process" in r for r in reasons), reasons
    outer = amortune.optimize(tasks.spin, [0.002] * 200)
    assert not any("inside a worker process" in r for r in outer.reasons)


def test_more_functions_than_a_worker_caches_are_resent_when_needed():
    """A worker evicts its oldest function; the caller must send it again, not assume it."""
    from amortune._worker import FUNC_CACHE_SIZE

    def adder(k: int):
        return lambda x: x + k

    funcs = [adder(k) for k in range(FUNC_CACHE_SIZE + 3)]
    for _ in range(2):
        for k, f in enumerate(funcs):
            got = amortune.execute(f, range(40), executor="processes", n_jobs=2, chunksize=5,
                                   config=FAST)
            assert got == [x + k for x in range(40)]


def test_sample_in_caller_false_keeps_a_crashing_function_out_of_the_caller():
    script = textwrap.dedent("""
        import amortune
        from tests import tasks
        cfg = amortune.Config(sample_in_caller=False)
        try:
            amortune.execute(tasks.segfault, range(20), config=cfg)
        except amortune.WorkerCrashedError as exc:
            print("crashed in a worker:", exc.indices)
        print(amortune.execute(tasks.square, range(5), config=cfg))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert "crashed in a worker" in out.stdout, out.stdout + out.stderr
    assert "[0, 1, 4, 9, 16]" in out.stdout


def test_a_task_queued_behind_a_crashing_one_runs_again_elsewhere():
    """Small tasks wait in a worker's pipe behind the running one; a crash must not lose them."""
    from amortune._errors import WorkerCrashedError
    from amortune.backends._base import ChunkTask, FunctionRef
    from amortune.backends.processes import ProcessBackend

    backend = ProcessBackend(1, start_method="forkserver")
    try:
        assert backend.submit(ChunkTask(FunctionRef(tasks.square), [1], 0)).result(timeout=60).results == [1]
        crash = backend.submit(ChunkTask(FunctionRef(tasks.kill_self), [5], 5))
        queued = [backend.submit(ChunkTask(FunctionRef(tasks.square), [i], i)) for i in range(3)]
        with pytest.raises(WorkerCrashedError) as info:
            crash.result(timeout=60)
        assert info.value.indices == (5,)
        assert [f.result(timeout=60).results for f in queued] == [[0], [1], [4]]
    finally:
        backend.shutdown(wait=True, kill=True)


def test_a_worker_past_its_memory_limit_leaves_before_a_queued_task():
    from amortune.backends._base import ChunkTask, FunctionRef
    from amortune.backends.processes import ProcessBackend

    backend = ProcessBackend(1, start_method="forkserver", memory_growth_bytes=8 << 20)
    try:
        futs = [backend.submit(ChunkTask(FunctionRef(tasks.leak_mb), [(16, i)], i)) for i in range(4)]
        held = [f.result(timeout=60).results[0][1] for f in futs]
        assert held == [1, 1, 1, 1]  # every task ran in a fresh worker
    finally:
        backend.shutdown(wait=True, kill=True)


def test_multiprocessings_exit_handler_finds_the_pools_stopped_when_amortune_was_imported_first():
    """Its handler terminates and joins every child: run before amortune's pools were stopped,
    the manager thread could start a replacement it then joined forever."""
    script = textwrap.dedent("""
        import amortune
        from tests import tasks
        cfg = amortune.Config(sample_in_caller=False)
        try:
            amortune.execute(tasks.segfault, range(20), config=cfg)
        except amortune.WorkerCrashedError:
            pass
        amortune.execute(tasks.square, range(5), config=cfg)
        import multiprocessing, multiprocessing.util as util
        info, debug, run_finalizers, active, current = util._exit_function.__defaults__
        def finalizers_then_look(*args):
            run_finalizers(*args)
            if args == (0,):  # before it touches a child
                print("alive:", sorted(p.name for p in active()), flush=True)
        util._exit_function.__defaults__ = (info, debug, finalizers_then_look, active, current)
        print("workers:", len(multiprocessing.active_children()), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert "workers: 2" in out.stdout, out.stdout + out.stderr  # started by multiprocessing
    assert "alive: []" in out.stdout, out.stdout + out.stderr
