"""Long-lived model workers for online use."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._record import replace
from ._constants import DEFAULT_MAX_BATCH_SIZE
from ._plan import _check_retries, _check_size, _plan
from ._pool import _RUN_REF, _Workers
from ._transfer import _as_list, _compact, _pack, _unpack
from ._worker import _Task, _TaskResult


class ModelWorkers:
    """Long-lived model workers, one per device, for online use (:class:`amortune.Batcher`).

    The constructor returns once every worker has loaded its model. ``predict(items)`` runs one
    batch on an idle worker and returns one output per item; it is thread-safe, so
    ``n_workers`` callers keep every device busy. A batch is split to each
    device's found size (found from ``sample_items``, or from the first batch a worker gets).
    A batch lost with its worker runs again up to ``retries`` times.
    """

    def __init__(self, load_model: Callable[[], Any], *, predict: Any = None, collate: Any = None,
                 split: Any = None, devices: Any = "auto", batch_size: int | str = "auto",
                 max_batch_size: int | None = None, sample_items: Iterable[Any] = (),
                 timeout: float | None = None, retries: int = 1) -> None:
        _check_retries(retries)
        sample = [_compact(x) for x in sample_items]
        plan = _plan(load_model, sample, predict=predict, collate=collate, split=split,
                     length=None, devices=devices, batch_size=batch_size,
                     max_batch_size=max_batch_size, max_tokens=None, timeout=timeout)
        limit = _check_size("max_batch_size", max_batch_size, auto=False) or DEFAULT_MAX_BATCH_SIZE
        config = plan.config
        if config.search is not None:
            config = replace(config, item_cap=limit)
        self.devices = plan.devices
        self.timeout, self.retries = timeout, retries
        self._workers = _Workers(plan.devices, load_model, config)
        self._caps: dict[str, tuple[int, int | None]] = {}
        self._seq = itertools.count()
        try:
            self._workers.wait_ready()  # served requests never wait for a cold start
        except BaseException:
            self._workers.shutdown(kill=True)
            raise

    @property
    def n_workers(self) -> int:
        return len(self.devices)

    def predict(self, items: Sequence[Any]) -> list[Any]:
        """Run ``items`` as one batch on an idle worker; one output per item, in order."""
        batch = list(items)
        task = _Task(next(self._seq), tuple(range(len(batch))), batch, None, dict(self._caps))
        sent = replace(task, items=_pack(batch))
        for attempt in range(self.retries + 1):
            fut = self._workers.submit(sent, _RUN_REF, self.timeout)
            try:
                outcome = fut.result()
            except BaseException as exc:
                if self._workers.backend.is_lost(exc) and attempt < self.retries:
                    continue
                raise self._workers.lost_error(exc, task, attempt)  # noqa: B904
            if outcome.error is not None:
                raise outcome.error
            result: _TaskResult = outcome.results[0]
            self._caps[result.device] = (result.item_cap, result.token_cap)
            return _as_list(_unpack(result.outputs))
        raise AssertionError("unreachable")

    def close(self, *, kill: bool = False) -> None:
        self._workers.shutdown(kill=kill)

    def __enter__(self) -> ModelWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(kill=exc[0] is not None)
