"""Test fixtures: start-method matrix, and a leak check around every test."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import psutil
import pytest

from amortune.backends._warm import all_warm_pools

START_METHODS = [m for m in ("fork", "forkserver", "spawn") if m in mp.get_all_start_methods()]


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _stray_processes() -> list[psutil.Process]:
    warm = {pid for pool in all_warm_pools() for pid in pool.pids()}
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if "forkserver" in cmd or "resource_tracker" in cmd or child.pid in warm:
            continue
        out.append(child)
    return out


@pytest.fixture(autouse=True)
def hard_timeout(request: pytest.FixtureRequest):
    """A test module's ``HARD_TIMEOUT_SECONDS`` turns a hang into a failure (SIGALRM)."""
    seconds = getattr(request.module, "HARD_TIMEOUT_SECONDS", None)
    if seconds is None:
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"test ran past its hard timeout of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def no_leaks(tmp_path_factory: pytest.TempPathFactory):
    """No child process, thread or spill folder may outlive the test (warm pools excepted)."""
    threads_before = {t.ident for t in threading.enumerate()}
    tmp = os.environ.get("TMPDIR", "/tmp")
    spill_before = {n for n in os.listdir(tmp) if n.startswith("amortune-")}
    yield
    deadline = time.monotonic() + 5
    while True:
        stray = _stray_processes()
        manager_idents = {p._mgr.thread.ident for p in all_warm_pools()}
        threads = [t for t in threading.enumerate()
                   if t.ident not in threads_before and t.ident not in manager_idents and t.is_alive()
                   and not t.name.startswith(("QueueFeederThread", "pydevd", "tqdm_monitor"))]
        spill = {n for n in os.listdir(tmp) if n.startswith("amortune-")} - spill_before
        if not (stray or threads or spill) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in stray:
        p.kill()
    assert not stray, f"child processes left behind: {stray}"
    assert not threads, f"threads left behind: {threads}"
    assert not spill, f"spill folders left behind: {spill}"
