"""On a Dask worker: the caller's environment, the thread cap and the initializer, each once."""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
from collections.abc import Sequence
from typing import Any

import distributed
from distributed import WorkerPlugin

from ..._errors import capture
from ..._worker import THREAD_ENV_VARS, limit_native_threads

#: An exception as :func:`amortune._errors.capture` packs it.
Captured = tuple[bytes | None, str, str, int | None]

#: Variables that describe the worker's own machine: a caller's environment never replaces them.
_MACHINE_ENV = frozenset({
    "PATH", "HOME", "PWD", "OLDPWD", "USER", "LOGNAME", "SHELL", "HOSTNAME", "TERM", "DISPLAY",
    "TMPDIR", "TMP", "TEMP", "LD_LIBRARY_PATH", "LD_PRELOAD", "DYLD_LIBRARY_PATH", "PYTHONPATH",
    "PYTHONHOME", "PYTHONEXECUTABLE", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "MALLOC_TRIM_THRESHOLD_",
    *THREAD_ENV_VARS,
})
_MACHINE_ENV_PREFIXES = ("DASK_", "SLURM_", "PBS_", "LSB_", "SGE_", "KUBERNETES_", "SSH_", "XDG_",
                         "CONDA_", "JUPYTER", "MPLCONFIG")

#: Guards the worker-side state of this package (the function cache of :mod:`._task` too).
_W_LOCK = threading.RLock()
#: Initializer token -> ``None`` once it ran, or its captured failure.
_W_INIT: dict[str, Captured | None] = {}
_W_STATE: dict[str, Any] = {"env": None, "base_env": None, "cap": None}


def _machine_local(name: str) -> bool:
    return name in _MACHINE_ENV or name.startswith(_MACHINE_ENV_PREFIXES)


def _apply_env(pairs: Sequence[tuple[str, str]]) -> None:
    """Make this worker's environment the caller's, except for what describes this machine.

    Names the caller lacks fall back to the worker's own environment as it was before amortune
    first changed it; machine-local names (paths, devices, scheduler and batch-system variables,
    thread caps) always keep the worker's values.
    """
    base = _W_STATE["base_env"]
    if base is None:
        base = _W_STATE["base_env"] = dict(os.environ)
    wanted = dict(base)
    wanted.update((k, v) for k, v in pairs if not _machine_local(k))
    for name in list(os.environ):
        if name not in wanted and not _machine_local(name):
            del os.environ[name]
    for name, value in wanted.items():
        if not _machine_local(name) and os.environ.get(name) != value:
            os.environ[name] = value


def _prepare(init_token: str | None, init_payload: bytes | None, env_token: str | None,
             env_pairs: Sequence[tuple[str, str]] | None,
             thread_cap: int | None) -> tuple[Captured, str] | None:
    """Environment, thread cap and initializer, each applied only when it changed.

    Returns ``(captured failure, note)`` when the initializer failed in this process (now or
    before), else ``None``.
    """
    with _W_LOCK:
        if env_token is not None and env_pairs is not None and _W_STATE["env"] != env_token:
            _apply_env(env_pairs)
            _W_STATE["env"] = env_token
        if thread_cap and _W_STATE["cap"] != thread_cap:
            limit_native_threads(thread_cap)
            _W_STATE["cap"] = thread_cap
        if init_token is None:
            return None
        if init_token not in _W_INIT:
            if init_payload is None:  # cannot happen: the caller sends both or neither
                return None
            try:
                init, initargs = pickle.loads(init_payload)
                init(*initargs)
                _W_INIT[init_token] = None
            except BaseException as exc:  # noqa: B036 - reported with every chunk of this worker
                _W_INIT[init_token] = capture(exc, None)
        failed = _W_INIT[init_token]
    if failed is None:
        return None
    return failed, f"amortune: raised by the initializer in Dask worker {_worker_label()}"


def _worker_label() -> str:
    try:
        worker = distributed.get_worker()
    except ValueError:
        return f"pid {os.getpid()}"
    return f"{worker.name!r} ({worker.address})"


class _SetupPlugin(WorkerPlugin):
    """Runs a call's initializer once in each worker process, as soon as the worker has it."""

    def __init__(self, init_token: str, init_payload: bytes, env_token: str | None,
                 env_pairs: Sequence[tuple[str, str]] | None, thread_cap: int | None) -> None:
        self.args = (init_token, init_payload, env_token, env_pairs, thread_cap)

    async def setup(self, worker: Any) -> None:
        # In a thread: a slow initializer (a model load) must not stall the worker's event loop.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _prepare, *self.args)
