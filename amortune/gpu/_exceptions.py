"""Errors raised when a batch cannot be run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._errors import AmortuneError


class ModelBatchError(AmortuneError):
    """A batch could not be run: its items (``failed_sequences``), their indices and the device.

    ``failed_indices`` are input positions, ``failed_sequences`` the input items themselves,
    ``device`` the device id (``CUDA_VISIBLE_DEVICES`` value, ``"cpu"`` for a CPU worker) and
    ``error_details`` a one-line reason.
    """

    def __init__(self, message: str, *, indices: Sequence[int] = (),
                 items: Sequence[Any] | None = None, device: str | None = None,
                 details: str = "") -> None:
        super().__init__(message)
        self.failed_indices = tuple(indices)
        self.failed_sequences = list(items) if items is not None else []
        self.device = device
        self.error_details = details or message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), str(self), self.failed_indices,
                                 self.failed_sequences, self.device, self.error_details))


def _rebuild_error(cls: type[ModelBatchError], message: str, indices: tuple[int, ...],
                   items: list[Any], device: str | None, details: str) -> ModelBatchError:
    return cls(message, indices=indices, items=items, device=device, details=details)


class BatchTimeoutError(ModelBatchError, TimeoutError):
    """A batch ran past ``timeout`` on every try; its worker was replaced each time."""


class ModelWorkerCrashedError(ModelBatchError):
    """The worker holding a batch died on every try (``exitcode`` says how)."""

    exitcode: int | None = None


class ItemTooLargeError(ModelBatchError, MemoryError):
    """One item alone does not fit in the device's memory, so no batch size can hold it."""
