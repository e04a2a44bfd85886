"""The spawned model workers of one call, one per device, and what they report back."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from .._errors import describe_indices
from .._record import replace
from ._constants import PROBE_MAX_SECONDS, START_TIMEOUT_SECONDS
from ._exceptions import BatchTimeoutError, ModelBatchError, ModelWorkerCrashedError
from ._plan import _slot_env
from ._worker import _init_worker, _probe_task, _run_task, _Task, _TaskResult, _WorkerConfig


class _Workers:
    """One spawned worker per device on the process backend, each with the model loaded.

    The slots' environments pin the devices (a replacement worker gets the same one), the
    initializer loads the model, and each worker notes which task it runs in a private folder,
    so a batch lost with its worker is reported with that worker's device.
    """

    def __init__(self, devices: Sequence[str], load_model: Callable[[], Any],
                 config: _WorkerConfig) -> None:
        from ..backends import Slot, WorkerSetup
        from ..backends.processes import ProcessBackend

        self.devices = list(devices)
        self.trace_dir = tempfile.mkdtemp(prefix="amortune-gpu-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.trace_dir, True)
        config = replace(config, trace_dir=self.trace_dir)
        self.config = config
        slots = [Slot(i, devices=() if d == "cpu" else (d,), env=_slot_env(d, i))
                 for i, d in enumerate(self.devices)]
        self.setup = WorkerSetup(initializer=_init_worker, initargs=(load_model, config),
                                 thread_cap=config.n_threads)
        try:
            self.backend = ProcessBackend(len(slots), start_method="spawn", slots=slots,
                                          setup=self.setup)
        except BaseException:
            self._cleanup()
            raise

    def submit(self, task: _Task, fn: Any, timeout: float | None) -> Future[Any]:
        from ..backends import ChunkTask

        return self.backend.submit(ChunkTask(fn, [task], 0, "item", timeout, self.setup))

    def _traces(self) -> dict[int, tuple[float, int]]:
        """Task seq -> (when, slot) of the last worker that started it, from the trace files."""
        out: dict[int, tuple[float, int]] = {}
        try:
            entries = os.listdir(self.trace_dir)
        except OSError:
            return out
        for name in entries:
            path = os.path.join(self.trace_dir, name)
            try:
                with open(path) as f:
                    seq = int(f.read().strip())
                when, slot = os.stat(path).st_mtime, int(name)
            except (OSError, ValueError):
                continue
            if 0 <= slot < len(self.devices) and when >= out.get(seq, (-1.0, 0))[0]:
                out[seq] = (when, slot)
        return out

    def running(self, seqs: Sequence[int]) -> int | None:
        """Which of ``seqs`` (the tasks of a lost chunk) a worker was running last."""
        traces = self._traces()
        found = [(traces[s][0], s) for s in seqs if s in traces]
        return max(found)[1] if found else None

    def device_of(self, seq: int) -> str | None:
        """The device whose worker last started task ``seq``."""
        hit = self._traces().get(seq)
        if hit is not None:
            return self.devices[hit[1]]
        return self.devices[0] if len(set(self.devices)) == 1 else None

    def lost_error(self, exc: BaseException, task: _Task, retries: int) -> BaseException:
        """A :class:`ModelBatchError` for a batch lost to a timeout or a dead worker."""
        from .._errors import TaskTimeoutError, WorkerCrashedError

        device = self.device_of(task.seq)
        where = f"device {device}" if device is not None else "its device"
        what = describe_indices(task.indices) if task.indices else "the probe batch"
        tries = f"{retries + 1} time{'s' if retries else ''} (retries={retries})"
        err: ModelBatchError
        if isinstance(exc, TaskTimeoutError):
            err = BatchTimeoutError(
                f"the batch of {what} ran past the timeout on {where} {tries}; its worker was "
                "replaced each time", indices=task.indices, items=task.items, device=device,
                details=str(exc))
        elif isinstance(exc, WorkerCrashedError):
            err = ModelWorkerCrashedError(
                f"the worker for {where} died while running the batch of {what}, {tries}: "
                f"{exc}", indices=task.indices, items=task.items, device=device, details=str(exc))
            err.exitcode = exc.exitcode
        else:
            return exc  # not a lost batch: raised as it is, its own cause kept
        err.__cause__ = exc
        return err

    def wait_ready(self) -> None:
        """Until every worker has started and loaded its model (or the backend gave up)."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while (self.backend.warm_workers < len(self.devices) and self.backend.alive
               and time.monotonic() < deadline):
            time.sleep(0.01)

    def probe_all(self, timeout: float | None) -> list[_TaskResult]:
        """Ask every worker for its batch size (each finds it now if it must).

        Sent once every worker is ready, each probe task goes to an idle worker: one per device.
        They carry a timeout, so none waits behind a running one; should a worker still answer
        twice, another finds its size on its first batch instead (tasks carry the sizes known).
        """
        self.wait_ready()
        futures = [self.submit(_Task(-1 - i, (), [], None, {}), _PROBE_REF,
                               _probe_timeout(timeout)) for i in range(len(self.devices))]
        out: list[_TaskResult] = []
        for i, fut in enumerate(futures):
            try:
                outcome = fut.result()
            except BaseException as exc:
                raise self.lost_error(exc, _Task(-1 - i, (), [], None, {}), 0)  # noqa: B904
            if outcome.error is not None:
                raise outcome.error
            out.append(outcome.results[0])
        return out

    def shutdown(self, *, kill: bool = False) -> None:
        try:
            self.backend.shutdown(wait=True, kill=kill)
        finally:
            self._cleanup()

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(kill=exc[0] is not None)


def _function_ref(func: Callable[..., Any]) -> Any:
    from ..backends import FunctionRef

    return FunctionRef(func)


_RUN_REF = _function_ref(_run_task)
_PROBE_REF = _function_ref(_probe_task)


def _probe_timeout(timeout: float | None) -> float:
    # Generous, but always set: a task with a timeout never waits behind another (probe_all).
    return (3600.0 if timeout is None else 4 * timeout) + PROBE_MAX_SECONDS
