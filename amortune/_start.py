"""How worker processes are started, and what that costs: the choice and its reason.

A one-shot run cannot amortise a fresh interpreter (~0.1 s for forkserver or spawn); a fork of
the caller is ready in a few milliseconds. Fork is safe only from a process with one thread (a
lock held by another thread at the moment of the fork stays held forever in the child) and
without CUDA initialised, so amortune forks the first workers *from the caller's thread, before
its manager thread exists*, when both hold, and uses forkserver (Linux) or spawn for every
worker started later, when the manager thread makes the caller multi-threaded. A start method
set with ``multiprocessing.set_start_method()`` or ``Config(start_method=...)`` is honoured.
Imports the standard library only.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["StartPlan", "choose_start", "in_worker_process", "mark_worker", "record_start_cost",
           "start_cost"]


class StartPlan(NamedTuple):
    """``first``: method for the workers started now; ``later``: for replacements and growth."""

    first: str
    later: str
    reason: str


#: Measured here, per method: (seconds until the first worker is ready, seconds per further one).
_MEASURED: dict[str, tuple[float, float]] = {}
#: Before anything is measured: a fork is ready in ~3-10 ms, a cold forkserver or spawn needs a
#: fresh interpreter (~0.1 s; benchmarks/calibrate.py).
_DEFAULTS = {"fork": (0.01, 0.003), "forkserver": (0.1, 0.006), "spawn": (0.1, 0.05)}


_in_worker = False


def mark_worker() -> None:
    """Note that this process is one of amortune's workers (it must start none of its own)."""
    global _in_worker
    _in_worker = True


def in_worker_process() -> bool:
    """Whether this process is a worker, amortune's or ``multiprocessing``'s, so it starts no
    workers of its own (a worker forked before ``multiprocessing`` was imported says so through
    :func:`mark_worker`)."""
    if _in_worker:
        return True
    mp = sys.modules.get("multiprocessing")
    return bool(mp is not None and mp.current_process().daemon)


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        return True  # cannot tell: assume the worst


def _user_start_method() -> str | None:
    """The method the user set with ``multiprocessing.set_start_method()``, if any."""
    mp = sys.modules.get("multiprocessing")
    if mp is None:
        return None
    try:
        ctx = mp.context._default_context
        actual = ctx._actual_context
        default = ctx._default_context
    except AttributeError:
        return None
    # Any Pool() or get_context() resolves the platform default into _actual_context; only a
    # different method can be told apart as the user's choice.
    if actual is None or actual is default:
        return None
    return str(actual.get_start_method())


def _fallback() -> str:
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


def choose_start(configured: str | None) -> StartPlan:
    """Pick how to start workers now and later, with the reason ``explain()`` shows."""
    if configured is not None:
        return StartPlan(configured, configured, f"start method {configured} (configured)")
    user = _user_start_method()
    if user is not None:
        return StartPlan(user, user, f"start method {user} (multiprocessing.set_start_method)")
    later = _fallback()
    if not sys.platform.startswith("linux"):
        return StartPlan(later, later, f"start method {later} (fork is unsafe on this platform)")
    if _cuda_initialised():
        return StartPlan(later, later, f"start method {later}: CUDA is initialised in this "
                                       "process, and a forked child cannot use it")
    threads = sys.modules.get("amortune.backends.threads")
    if threads is not None:
        threads.join_ending_threads()  # a finished threads run's idle threads, ending anyway
    if threading.active_count() > 1 or threading.current_thread() is not threading.main_thread():
        return StartPlan(later, later, f"start method {later}: this process runs "
                                       f"{threading.active_count()} threads, so a fork could "
                                       "inherit a held lock")
    return StartPlan("fork", later, f"first workers forked from this single-threaded process "
                                    f"(a few ms); replacements start with {later}")


def start_cost(method: str) -> tuple[float, float]:
    """(first worker, each further worker) start-up seconds: measured here, else defaults."""
    return _MEASURED.get(method, _DEFAULTS.get(method, (0.05, 0.04)))


def record_start_cost(method: str, first_seconds: float) -> None:
    """Remember how long the first worker of ``method`` took to be ready in this process."""
    if method not in _MEASURED:
        _MEASURED[method] = (first_seconds, _DEFAULTS.get(method, (0.05, 0.04))[1])


_ENV_LOCK = threading.Lock()


def start_process(proc: Any, method: str, env: Mapping[str, str]) -> None:
    """``proc.start()``; a spawned child starts with ``env`` (its slot's device variables).

    A spawned child imports the caller's ``__main__`` before the worker code runs, so variables
    read at import (``CUDA_VISIBLE_DEVICES``) must be in the environment it starts with; they
    are set around the start, under a lock, and restored.
    """
    if method == "forkserver":
        _preload_forkserver()  # here, not sooner: a run whose workers all fork never needs it
    if method != "spawn" or not env:
        proc.start()
        return
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _preload_forkserver() -> None:
    """Have the fork server import the worker code once, so each worker starts without it.

    Preloaded, a worker forked from a running server is ready in ~4-7 ms instead of paying
    20-60 ms importing amortune. Modules already listed are kept; a running server is unaffected.
    """
    import multiprocessing
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    current = list(getattr(server, "_preload_modules", None) or ["__main__"])
    wanted = [m for m in ("amortune._serve",) if m not in current]
    if wanted:
        multiprocessing.set_forkserver_preload(current + wanted)
