"""Workers forked before the engine loads, each with its first chunk inherited (``_prefork``).

This happens only in a fresh process (one that has not imported the process engine), so every
case runs a script in a new interpreter: the results are ``map``'s, errors keep their type, index
and the worker's traceback, a crash or Ctrl-C neither hangs the call nor leaves work running, and
the adopted workers serve the rest of the run and later calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amortune
from tests._fresh import fresh_json

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import functools, json, os, sys, time
    import amortune
    from amortune import _execute, _optimize, _prefork
    from tests import tasks

    seen = {"forked": None}
    fork = _execute._fork_with_chunks

    def watched(*args, **kwargs):
        out = fork(*args, **kwargs)
        if out is not None:
            seen["forked"] = [[start, len(items)] for start, items, _, _ in out[1]]
            seen["pids"] = out[0].pids()
            seen["kinds"] = sorted({type(w.process).__name__ for w in out[0]._mgr.workers})
        return out

    _execute._fork_with_chunks = watched
    fork_with_chunks = _prefork.fork_with_chunks

    def counted(*args, **kwargs):
        out = fork_with_chunks(*args, **kwargs)
        seen["n_forked"] = 0 if out is None else len(out.workers)
        seen["cloudpickle_at_fork"] = "cloudpickle" in sys.modules
        return out

    _prefork.fork_with_chunks = counted

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def run_interrupted(marks):  # chunks of ~1 s, interrupted: marks then, 0.3 s later, children
        import multiprocessing
        _execute.PRELAUNCH_SECONDS = 2.0
        func = functools.partial(tasks.spin_square_failing, marks=marks)
        try:
            amortune.execute(func, range(3000))
        except KeyboardInterrupt:
            stopped = len(os.listdir(marks))
            time.sleep(0.3)
            return ["KeyboardInterrupt", stopped, len(os.listdir(marks)),
                    len(multiprocessing.active_children())]
        raise AssertionError("the call was not interrupted")

    def in_main(x):  # a __main__ function: later workers get it by value
        tasks.spin(0.002)
        return -x

    LOG = None

    def read_log(marks):  # which items ran, and in which processes
        with open(os.path.join(marks, "log")) as f:
            lines = [line.split() for line in f]
        seen["items"] = sorted(int(x) for x, _ in lines)
        seen["pids"] = sorted({int(pid) for _, pid in lines})

    def logs_to_global(x):  # a script function holding an open file: it cannot be pickled
        tasks.spin(0.002)
        print(x, os.getpid(), file=LOG, flush=True)
        return x * x

    def run(case, marks):
        if case == "mp-imported":  # multiprocessing.Process forks the workers
            import multiprocessing
            return amortune.execute(tasks.spin_square_failing, list(range(300)))
        if case == "as-child":
            caller = os.getpid()
            out = amortune.execute(functools.partial(tasks.spin_as_seen_by_multiprocessing,
                                                     caller=caller), range(300))
            seen["caller_loaded_multiprocessing"] = "multiprocessing" in sys.modules
            return [caller, [v for v in out if v is not None]]
        if case == "list":
            return amortune.execute(tasks.spin_square_failing, list(range(300)))
        if case == "generator":
            return amortune.execute(tasks.spin_square_failing, (i for i in range(300)))
        if case == "numpy":
            import numpy as np
            return [int(v) for v in amortune.execute(tasks.spin_square_failing, np.arange(300))]
        if case == "main":
            return amortune.execute(in_main, range(300))
        if case == "error":
            func = functools.partial(tasks.spin_square_failing, in_worker_at=3)
            try:
                amortune.execute(func, range(300))
            except KeyError as exc:
                return ["KeyError", exc.amortune_index, type(exc.__cause__).__name__]
        if case == "crash":
            try:
                amortune.execute(tasks.spin_kill_at_5, range(300))
            except amortune.WorkerCrashedError as exc:
                return ["WorkerCrashedError", 5 in exc.indices]
        if case == "interrupt":  # Ctrl-C while planning, after the pool adopted the workers
            _optimize.sample = interrupted
            return run_interrupted(marks)
        if case == "interrupt-adopt":  # Ctrl-C after the fork, before the pool adopts them
            from amortune.backends import _warm

            _execute._engine_loaded = lambda: False
            _warm.get_warm_pool = interrupted
            return run_interrupted(marks)
        if case == "unpicklable":  # it holds an open file: it never runs in a worker
            log = open(os.path.join(marks, "log"), "a")

            def logs(x):
                tasks.spin(0.002)
                print(x, os.getpid(), file=log, flush=True)
                return x * x

            out = amortune.execute(logs, range(300))
            log.close()
            read_log(marks)
            return out
        if case in ("unpicklable-script", "scan-missed"):
            import warnings
            global LOG
            if case == "scan-missed":  # as if the scan had not seen the file it holds
                _prefork.script_function = lambda func: True
            LOG = open(os.path.join(marks, "log"), "a")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = amortune.execute(logs_to_global, range(300))
            LOG.close()
            read_log(marks)
            seen["warnings"] = [str(w.message) for w in caught]
            return out
        if case == "forkserver":  # the user's start method: no fork, before or after the engine
            import multiprocessing
            multiprocessing.set_start_method("forkserver")
            out = amortune.execute(tasks.spin_square_failing, range(300))
            from amortune.backends._warm import all_warm_pools
            seen["methods"] = sorted({p.start_method for p in all_warm_pools()})
            return out
        if case.startswith("at="):
            at = tuple(json.loads(case[3:]))
            try:
                amortune.execute(functools.partial(tasks.spin_square_failing, at=at), range(300))
            except LookupError as exc:
                return [exc.args[0], exc.amortune_index]
        if case == "again":
            first = amortune.execute(tasks.spin_square_failing, range(300))
            second = amortune.execute(tasks.spin_pid, range(300))
            return [first == [x * x for x in range(300)], sorted(set(second) - {os.getpid()})]
        raise AssertionError(case)

    if __name__ == "__main__":
        out = run(sys.argv[1], sys.argv[2])
        seen["multiprocessing"] = "multiprocessing" in sys.modules
        print(json.dumps({"out": out, **seen}))
""")


def _run(tmp_path: Path, case: str) -> dict[str, Any]:
    script = tmp_path / "prefork.py"
    script.write_text(SCRIPT)
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    for old in marks.iterdir():
        old.unlink()
    proc = subprocess.run([sys.executable, str(script), case, str(marks)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    got: dict[str, Any] = json.loads(proc.stdout)
    return got


@pytest.fixture(autouse=True)
def _two_cores() -> None:
    if amortune.probe_system().usable_cores < 2:
        pytest.skip("workers start early only with two usable cores")


def _check_chunks(forked: list[list[int]], n: int) -> None:
    assert forked, "no worker was forked with a chunk"
    assert forked[0][0] == 2  # the first look ran items 0 and 1
    ends = [start + size for start, size in forked]
    assert [start for start, _ in forked[1:]] == ends[:-1]  # contiguous, in input order
    assert sum(size for _, size in forked) <= n // 4


@pytest.mark.parametrize(("case", "expected"), [
    ("list", [x * x for x in range(300)]),
    ("generator", [x * x for x in range(300)]),
    ("numpy", [x * x for x in range(300)]),
    ("main", [-x for x in range(300)]),
])
def test_workers_forked_with_their_first_chunk_return_what_map_returns(
        tmp_path: Path, case: str, expected: list[int]) -> None:
    got = _run(tmp_path, case)
    assert got["out"] == expected
    _check_chunks(got["forked"], 300)
    # A script's function is found by name in a forked child: cloudpickle, whose import takes
    # 12-19 ms, waits until the workers run.
    assert got["cloudpickle_at_fork"] is False
    # Forked by os.fork and adopted, with no multiprocessing import to delay them.
    assert got["kinds"] == ["ForkedChild"] and not got["multiprocessing"]


def test_where_the_script_imported_multiprocessing_it_forks_the_workers(tmp_path: Path) -> None:
    got = _run(tmp_path, "mp-imported")
    assert got["out"] == [x * x for x in range(300)]
    _check_chunks(got["forked"], 300)
    assert got["kinds"] == ["ForkProcess"]


def test_a_worker_forked_before_multiprocessing_loaded_is_what_its_workers_are(
        tmp_path: Path) -> None:
    # Once it imports multiprocessing, it is daemonic (no children of its own, which nothing
    # would stop when it is killed) and names the caller as its parent.
    got = _run(tmp_path, "as-child")
    caller, seen = got["out"]
    assert seen and got["kinds"] == ["ForkedChild"]
    assert {(daemonic, parent) for _, daemonic, parent in seen} == {(True, caller)}
    assert not got["caller_loaded_multiprocessing"]


def test_a_function_that_cannot_be_pickled_never_runs_in_a_worker(tmp_path: Path) -> None:
    # It holds an open file: forking it would share that file with children, and killing them
    # once the pickling failed would run their items again in the caller.
    got = _run(tmp_path, "unpicklable")
    assert got["out"] == [x * x for x in range(300)]
    assert got["forked"] is None and got["n_forked"] == 0
    assert got["items"] == list(range(300))  # each item ran once
    assert len(got["pids"]) == 1  # in the caller only


def test_a_script_function_holding_an_open_file_never_runs_in_a_worker(tmp_path: Path) -> None:
    # The scan of what it reaches finds the file without pickling: as for a closure, no fork.
    got = _run(tmp_path, "unpicklable-script")
    assert got["out"] == [x * x for x in range(300)]
    assert got["forked"] is None and got["n_forked"] == 0
    assert got["items"] == list(range(300)) and len(got["pids"]) == 1


def test_a_script_function_that_fails_to_pickle_after_the_fork_runs_each_item_once(
        tmp_path: Path) -> None:
    # Had the scan missed what makes it unpicklable: the early workers run their first chunks,
    # pickling it for later workers fails after the fork, and the rest runs in the caller.
    got = _run(tmp_path, "scan-missed")
    assert got["out"] == [x * x for x in range(300)]
    assert got["forked"] and got["n_forked"] == 2
    assert got["items"] == list(range(300))  # each item ran once
    assert len(got["pids"]) == 3  # the caller and the two early workers
    assert any("cannot run in worker processes" in w for w in got["warnings"]), got["warnings"]


SCAN = textwrap.dedent("""
    import json, os, threading, math
    from collections import OrderedDict
    from tests import tasks

    LIMIT, NAMES, TABLE = 3, ("a", "b"), {"k": [1, 2.5, None, b"x"]}
    DEEP = []
    for _ in range(3000):
        DEEP = [DEEP]
    LOCK, ORDERED = threading.Lock(), OrderedDict(a=1)

    def helper(x):
        return math.sqrt(x) + LIMIT

    def plain(x, scale=2):
        return helper(x) * scale + len(NAMES) + len(TABLE) + tasks.spin(0) + os.getpid()

    def locked(x):
        with LOCK:
            return x

    def via_helper(x):
        return locked(x)

    def default_lock(x, lock=LOCK):
        return x

    def ordered(x):
        return ORDERED

    def deep(x):  # nested past the interpreter's stack: the scan gives up, it does not fail
        return DEEP

    class Local:
        pass

    def uses_class(x):
        return Local()

    def make():
        y = 1
        def inner(x):
            return x + y
        return inner

    from amortune._serde import script_function
    print(json.dumps({f.__name__: script_function(f) for f in
                      (plain, helper, locked, via_helper, default_lock, ordered, deep,
                       uses_class, make(), tasks.spin, print)}))
""")


def test_which_script_functions_fork_without_being_pickled_first() -> None:
    got = fresh_json(SCAN)
    assert got == {"plain": True, "helper": True, "locked": False, "via_helper": False,
                   "default_lock": False, "ordered": False, "deep": False, "uses_class": False,
                   "inner": False, "spin": False, "print": False}


def test_a_start_method_the_user_set_is_honoured_without_an_early_fork(tmp_path: Path) -> None:
    got = _run(tmp_path, "forkserver")
    assert got["out"] == [x * x for x in range(300)]
    assert got["forked"] is None and got["methods"] == ["forkserver"]


def test_an_error_in_an_inherited_chunk_keeps_its_type_index_and_traceback(
        tmp_path: Path) -> None:
    got = _run(tmp_path, "error")
    assert got["out"] == ["KeyError", 3, "RemoteTraceback"]
    assert got["forked"] and got["forked"][0][0] <= 3 < got["forked"][0][0] + got["forked"][0][1]


def test_a_worker_killed_in_its_inherited_chunk_fails_the_call_with_that_chunk(
        tmp_path: Path) -> None:
    got = _run(tmp_path, "crash")
    assert got["out"] == ["WorkerCrashedError", True]
    assert got["forked"]


def test_ctrl_c_while_planning_stops_the_inherited_chunks(tmp_path: Path) -> None:
    got = _run(tmp_path, "interrupt")
    name, stopped, later, _ = got["out"]
    assert name == "KeyboardInterrupt"
    assert later == stopped  # nothing of the call ran on after it
    assert stopped < sum(size for _, size in got["forked"])


def test_ctrl_c_before_the_pool_adopts_the_workers_kills_them(tmp_path: Path) -> None:
    got = _run(tmp_path, "interrupt-adopt")
    assert got["out"][0] == "KeyboardInterrupt"
    _, stopped, later, children = got["out"]
    assert got["n_forked"] >= 1  # workers were forked with chunks of ~2 s each
    assert later == stopped and children == 0  # killed: nothing of the call runs on


def test_the_adopted_workers_are_the_warm_pool_of_later_calls(tmp_path: Path) -> None:
    got = _run(tmp_path, "again")
    same, pids = got["out"]
    assert same and pids
    assert set(pids) <= set(got["pids"])  # the next call ran on the same processes


@settings(max_examples=6, deadline=None)
@given(at=st.lists(st.integers(2, 150), min_size=1, max_size=3, unique=True))
def test_in_a_fresh_process_the_first_failing_item_in_input_order_raises(
        tmp_path_factory: pytest.TempPathFactory, at: list[int]) -> None:
    # Failures in the inherited chunks, the sample or later chunks: the earliest wins, as in map.
    got = _run(tmp_path_factory.mktemp("at"), "at=" + json.dumps(at))
    assert got["out"] == [min(at), min(at)]
    assert got["forked"]


RAW = textwrap.dedent("""
    import json, pickle, sys
    from amortune import _prefork
    from amortune._protocol import Done, Ready, Run
    from amortune._serde import dumps

    def reply(w):
        msg = pickle.loads(w.conn.recv_bytes())
        while isinstance(msg, Ready):
            msg = pickle.loads(w.conn.recv_bytes())
        return pickle.loads(msg.results) if isinstance(msg, Done) else type(msg).__name__

    forked = _prefork.fork_with_chunks(bytes, [(0, [3]), (1, [200_000])], thread_cap=1,
                                       growth_limit=None)
    a, b = forked.workers
    out = {"kinds": [type(w.process).__name__ for w in forked.workers],
           "first": [reply(a) == [bytes(3)], reply(b) == [bytes(200_000)]]}
    # A message far above one write's size, both ways, on the same pipes.
    big = Run(99, forked.token, 7, "item", dumps([300_000]), False, None)
    a.conn.send_bytes(pickle.dumps(big))
    out["big"] = reply(a) == [bytes(300_000)]
    a.conn.send_bytes(pickle.dumps(None))  # told to stop: exits 0
    a.process.join(10)
    b.process.kill()
    b.process.join(10)
    out["exitcodes"] = [a.process.exitcode, b.process.exitcode]
    out["alive"] = [a.process.is_alive(), b.process.is_alive()]
    try:
        b.conn.recv_bytes()
    except EOFError:
        out["eof"] = True
    exits = _prefork.fork_with_chunks(sys.exit, [(0, [3])], thread_cap=1, growth_limit=None)
    exits.workers[0].process.join(10)
    out["sys.exit(3)"] = exits.workers[0].process.exitcode
    print(json.dumps(out))
""")


def test_raw_forked_workers_talk_in_framed_messages_and_report_how_they_exited(
        tmp_path: Path) -> None:
    script = tmp_path / "raw.py"
    script.write_text(RAW)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["kinds"] == ["ForkedChild", "ForkedChild"]
    assert got["first"] == [True, True] and got["big"]
    assert got["exitcodes"] == [0, -9] and got["alive"] == [False, False]
    assert got.get("eof")
    assert got["sys.exit(3)"] == 3  # func's SystemExit ends its worker with that code


ORPHAN = textwrap.dedent("""
    import json, os, sys, time
    from amortune import _prefork

    # The caller: forks a raw worker into an hour-long item, reports its pid, then is killed.
    forked = _prefork.fork_with_chunks(time.sleep, [(0, [3600])], thread_cap=1,
                                       growth_limit=None)
    print(json.dumps({"worker": forked.workers[0].process.pid,
                      "ctypes": "ctypes" in sys.modules}), flush=True)
    time.sleep(3600)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_raw_forked_worker_dies_with_its_killed_caller(tmp_path: Path) -> None:
    # The worker asks the kernel for SIGKILL when its parent dies (prctl through _ctypes, so
    # the caller imports no ctypes before it forks): a busy worker cannot notice it otherwise.
    import psutil

    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    worker = None
    try:
        assert proc.stdout is not None
        got = json.loads(proc.stdout.readline())
        worker = got["worker"]
        assert got["ctypes"] is False
        assert psutil.pid_exists(worker)
        proc.kill()
        proc.wait(timeout=30)
        try:
            gone, _ = psutil.wait_procs([psutil.Process(worker)], timeout=10)
        except psutil.NoSuchProcess:
            gone = [worker]
        assert gone, "the worker outlived its killed caller"
    finally:
        if worker is not None and psutil.pid_exists(worker):
            psutil.Process(worker).kill()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
