"""The error tree, and exceptions crossing the process boundary as plain data."""

from __future__ import annotations

import pickle
import signal
import sys
import threading
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest

import amortune
from amortune._errors import (
    AmortuneError,
    AmortuneWarning,
    MemoryBudgetError,
    NotPicklableError,
    RemoteTraceback,
    TaskTimeoutError,
    WorkerCrashedError,
    add_note,
    capture,
    describe_indices,
    exit_reason,
    rebuild,
)
from tests import tasks


def raised(exc: BaseException) -> BaseException:
    """``exc`` after being raised and caught, so it carries a traceback (as in a worker)."""
    def user_function_that_fails() -> None:
        raise exc

    try:
        user_function_that_fails()
    except BaseException as caught:
        return caught
    raise AssertionError("unreachable")


def notes_of(exc: BaseException) -> list[str]:
    """``exc.__notes__`` (Python 3.11+), or an empty list."""
    return list(getattr(exc, "__notes__", []))


def round_trip(exc: BaseException, index: int | None = 5) -> BaseException:
    """capture in the 'worker', send the plain data through pickle, rebuild in the 'caller'."""
    captured = capture(raised(exc), index)
    return rebuild(pickle.loads(pickle.dumps(captured)))


class NeedsTwoArgs(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(a)  # pickles args=(a,), so unpickling calls __init__(a) and fails
        self.b = b


class HoldsALock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


# -- capture / rebuild ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc",
    [ValueError("bad value 7"), KeyError("k"), ZeroDivisionError("division by zero"),
     tasks.Flaky("transient"), OSError(2, "No such file")],
    ids=lambda e: type(e).__name__,
)
def test_round_trip_keeps_type_and_message(exc: BaseException) -> None:
    back = round_trip(exc)
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.args == exc.args


def test_round_trip_sets_remote_traceback_as_cause() -> None:
    back = round_trip(ValueError("bad value 7"))
    cause = back.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "Traceback (most recent call last)" in cause.tb
    assert "user_function_that_fails" in cause.tb
    assert "ValueError: bad value 7" in cause.tb
    assert str(cause) == cause.tb


def test_round_trip_adds_the_index_note() -> None:
    back = round_trip(ValueError("x"), index=42)
    assert notes_of(back) == ["amortune: raised while processing item 42"]
    assert back.amortune_index == 42  # type: ignore[attr-defined]


def test_no_index_no_note() -> None:
    back = round_trip(ValueError("x"), index=None)
    assert not getattr(back, "__notes__", None)
    assert isinstance(back.__cause__, RemoteTraceback)


def test_captured_is_plain_data() -> None:
    payload, summary, tb_text, index = capture(raised(ValueError("boom")), 3)
    assert isinstance(payload, bytes)
    assert summary == "builtins.ValueError: boom"
    assert isinstance(tb_text, str) and "boom" in tb_text
    assert index == 3


def test_capture_drops_the_traceback_frames() -> None:
    # Frames hold locals (possibly huge or unpicklable); only their text should travel.
    exc = raised(ValueError("x"))
    capture(exc, 0)
    assert exc.__traceback__ is None


@pytest.mark.parametrize("exc", [HoldsALock("has a lock"), NeedsTwoArgs("first", "second")],
                         ids=["unpicklable", "fails-to-unpickle"])
def test_unpicklable_exception_becomes_amortune_error_with_summary(exc: BaseException) -> None:
    if isinstance(exc, NeedsTwoArgs) and "tblib.pickling_support" in sys.modules:
        pytest.skip("tblib (installed by distributed when it loads) pickles any exception")
    payload, summary, _, _ = capture(raised(exc), 9)
    assert payload is None
    back = rebuild((payload, summary, "tb text", 9))
    assert type(back) is AmortuneError
    assert type(exc).__qualname__ in str(back)
    assert str(exc.args[0]) in str(back)
    assert "cannot be pickled" in str(back)
    assert isinstance(back.__cause__, RemoteTraceback)
    assert "item 9" in notes_of(back)[0]


def test_payload_that_fails_to_load_becomes_amortune_error() -> None:
    back = rebuild((b"not a pickle", "pkg.Err: message", "tb", None))
    assert type(back) is AmortuneError
    assert "pkg.Err: message" in str(back)


def test_exception_class_defined_in_a_function_travels_by_value() -> None:
    class LocalError(Exception):
        pass

    back = round_trip(LocalError("local"))
    assert type(back).__name__ == "LocalError"
    assert str(back) == "local"


def test_add_note_appends() -> None:
    exc = ValueError("x")
    add_note(exc, "one")
    add_note(exc, "two")
    assert notes_of(exc) == ["one", "two"]


# -- exit codes -----------------------------------------------------------------------------------
def test_exit_reason_sigkill_hints_at_memory() -> None:
    text = exit_reason(-signal.SIGKILL)
    assert "SIGKILL" in text
    assert "memory" in text


@pytest.mark.parametrize(
    "exitcode, expected",
    [(-signal.SIGSEGV, "signal SIGSEGV"), (-signal.SIGTERM, "signal SIGTERM"),
     (3, "exit code 3"), (0, "exit code 0"), (None, "unknown exit status")],
)
def test_exit_reason(exitcode: int | None, expected: str) -> None:
    text = exit_reason(exitcode)
    assert text == expected
    assert "memory" not in text


def test_exit_reason_unknown_signal_number() -> None:
    text = exit_reason(-200)
    assert "200" in text
    assert "signal signal" not in text


@pytest.mark.parametrize(
    "indices, expected",
    [((), "no items"), ((4,), "item 4"), ((10, 11, 12), "items 10-12"),
     ([3, 1, 2], "items 1-3"), ((1, 5, 9), "3 items between 1 and 9")],
)
def test_describe_indices(indices: Any, expected: str) -> None:
    assert describe_indices(indices) == expected


# -- the tree -------------------------------------------------------------------------------------
def test_error_tree() -> None:
    assert issubclass(WorkerCrashedError, BrokenProcessPool)
    assert issubclass(WorkerCrashedError, AmortuneError)
    assert issubclass(NotPicklableError, TypeError)
    assert issubclass(NotPicklableError, AmortuneError)
    assert issubclass(MemoryBudgetError, MemoryError)
    assert issubclass(MemoryBudgetError, AmortuneError)
    assert issubclass(TaskTimeoutError, TimeoutError)
    assert issubclass(AmortuneWarning, UserWarning)
    assert issubclass(AmortuneError, Exception)


def test_public_names_are_the_same_classes() -> None:
    assert amortune.AmortuneError is AmortuneError
    assert amortune.WorkerCrashedError is WorkerCrashedError
    assert amortune.NotPicklableError is NotPicklableError
    assert amortune.MemoryBudgetError is MemoryBudgetError
    assert amortune.AmortuneWarning is AmortuneWarning


def test_worker_crashed_error_carries_details() -> None:
    err = WorkerCrashedError("worker died", exitcode=-9, indices=(3, 4), rss_bytes=123)
    assert (err.exitcode, err.indices, err.rss_bytes) == (-9, (3, 4), 123)
    assert str(err) == "worker died"
    with pytest.raises(BrokenProcessPool):
        raise err


def test_catching_the_stdlib_types_works() -> None:
    with pytest.raises(TypeError):
        raise NotPicklableError("func cannot be pickled")
    with pytest.raises(MemoryError):
        raise MemoryBudgetError("one result is larger than the budget")
    with pytest.raises(TimeoutError):
        raise TaskTimeoutError("item 3 ran longer than 1 s", indices=(3,))
