"""The online Batcher: futures, priorities, batch limits, adaptation, stats, pause, stop, a bounded
queue, numpy stacking.

Everything runs on threads in this process. No test asserts a duration: batches are held back
with ``pause()`` or an event so their composition is decided by the queue alone, and every wait
has a timeout (a SIGALRM guard fails a test that hangs).
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amortune._batcher import Batcher, BatcherFullError, BatcherStoppedError

WAIT = 10.0  # seconds any single future may take before the test fails
#: tests/conftest.py turns a test running longer than this into a failure.
HARD_TIMEOUT_SECONDS = 60


class Recorder:
    """A batch function that records every batch it gets (and can be held on an event)."""

    def __init__(self, func=lambda x: x * 2, gate: threading.Event | None = None) -> None:
        self.func, self.gate = func, gate
        self.batches: list[list] = []
        self.lock = threading.Lock()

    def __call__(self, batch):
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        with self.lock:
            self.batches.append(list(batch) if not isinstance(batch, np.ndarray) else batch)
        return [self.func(x) for x in batch]

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


def test_results_come_back_in_their_futures() -> None:
    with Batcher(Recorder(), max_batch_size=8, max_wait=0.001) as b:
        futures = [b.submit(i) for i in range(100)]
        assert [f.result(WAIT) for f in futures] == [2 * i for i in range(100)]


def test_a_lone_item_runs_after_max_wait() -> None:
    rec = Recorder()
    with Batcher(rec, max_batch_size=64, max_wait=0.01, adaptive=False) as b:
        assert b.submit(21).result(WAIT) == 42
    assert rec.sizes == [1]


def test_batches_never_exceed_max_batch_size() -> None:
    rec = Recorder()
    with Batcher(rec, max_batch_size=4, max_wait=0.001, adaptive=False) as b:
        b.pause()
        futures = [b.submit(i) for i in range(10)]
        b.resume()
        assert [f.result(WAIT) for f in futures] == [2 * i for i in range(10)]
    assert rec.sizes == [4, 4, 2]


def test_higher_priority_runs_first_and_ties_keep_arrival_order() -> None:
    rec = Recorder(func=lambda x: x)
    with Batcher(rec, max_batch_size=2, max_wait=0.001, adaptive=False) as b:
        b.pause()
        futures = [b.submit(("low", i), priority=0) for i in range(3)]
        futures += [b.submit(("high", i), priority=5) for i in range(3)]
        b.resume()
        for f in futures:
            f.result(WAIT)
    order = [x for batch in rec.batches for x in batch]
    assert order == [("high", 0), ("high", 1), ("high", 2), ("low", 0), ("low", 1), ("low", 2)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(priorities=st.lists(st.integers(-3, 3), min_size=1, max_size=40),
       max_batch_size=st.integers(1, 9))
def test_processing_order_and_sizes_follow_the_queue(priorities: list[int],
                                                     max_batch_size: int) -> None:
    rec = Recorder(func=lambda x: x)
    with Batcher(rec, max_batch_size=max_batch_size, max_wait=0.0, adaptive=False) as b:
        b.pause()
        futures = [b.submit(i, priority=p) for i, p in enumerate(priorities)]
        b.resume()
        assert [f.result(WAIT) for f in futures] == list(range(len(priorities)))
    order = [x for batch in rec.batches for x in batch]
    assert order == sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
    assert all(1 <= n <= max_batch_size for n in rec.sizes)
    assert sum(rec.sizes) == len(priorities)


def test_numpy_items_are_stacked_into_one_array() -> None:
    seen: list[tuple[type, tuple[int, ...]]] = []

    def double(batch):
        seen.append((type(batch), getattr(batch, "shape", ())))
        return batch * 2

    with Batcher(double, max_batch_size=16, max_wait=0.001, adaptive=False) as b:
        b.pause()
        futures = [b.submit(np.array([i, i + 1], dtype=np.float32)) for i in range(10)]
        b.resume()
        results = [f.result(WAIT) for f in futures]
    assert seen == [(np.ndarray, (10, 2))]
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, [2 * i, 2 * i + 2])


def test_mixed_shapes_are_passed_as_a_list() -> None:
    seen: list[type] = []

    def sizes(batch):
        seen.append(type(batch))
        return [len(x) for x in batch]

    with Batcher(sizes, max_batch_size=8, max_wait=0.001, adaptive=False) as b:
        b.pause()
        futures = [b.submit(np.zeros(n)) for n in (1, 2, 3)]
        b.resume()
        assert [f.result(WAIT) for f in futures] == [1, 2, 3]
    assert seen == [list]


def test_a_backlog_runs_in_full_batches_while_the_size_doubles() -> None:
    rec = Recorder()
    with Batcher(rec, max_batch_size=16, max_wait=0.001, initial_batch_size=1) as b:
        b.pause()
        futures = [b.submit(i) for i in range(64)]
        b.resume()
        for f in futures:
            f.result(WAIT)
        settled = b.batch_size
    # A batch that starts takes every waiting item up to the maximum, so no item waits behind a
    # queue of partial batches; the size (what a batch waits for) doubled while items were left.
    assert rec.sizes == [16, 16, 16, 16]
    assert settled == 8


def test_batch_size_drops_to_what_arrives_within_max_wait() -> None:
    rec = Recorder()
    with Batcher(rec, max_batch_size=32, max_wait=0.001, initial_batch_size=32) as b:
        assert b.submit(1).result(WAIT) == 2
        assert b.batch_size == 1  # one item came within max_wait: stop waiting for 32


def test_batch_size_doubles_when_any_item_is_left_after_a_full_batch() -> None:
    entered, gate = threading.Event(), threading.Event()

    def hold(batch):
        entered.set()
        assert gate.wait(WAIT)
        return list(batch)

    sizes: list[int] = []

    def hold_and_count(batch):
        sizes.append(len(batch))
        return hold(batch)

    with Batcher(hold_and_count, max_batch_size=16, max_wait=0.001, initial_batch_size=3) as b:
        b.pause()
        futures = [b.submit(i) for i in range(17)]  # one more than the largest batch
        b.resume()
        assert entered.wait(WAIT)
        grown = b.batch_size
        gate.set()
        assert [f.result(WAIT) for f in futures] == list(range(17))
    assert grown == 6 and sizes == [16, 1]  # the first batch took all it could


def test_a_paused_stream_starts_its_batch_without_waiting_out_max_wait() -> None:
    rec = Recorder()
    with Batcher(rec, max_batch_size=64, max_wait=600.0, initial_batch_size=64) as b:
        futures = [b.submit(i) for i in range(20)]  # never a full batch
        assert [f.result(WAIT) for f in futures] == [2 * i for i in range(20)]
        starts = b.stats()["batch_starts"]
    assert starts["quiet"] >= 1 and starts["wait"] == starts["size"] == 0
    assert sum(rec.sizes) == 20


def test_a_fixed_size_batcher_waits_out_max_wait() -> None:
    rec = Recorder()
    with Batcher(rec, max_batch_size=64, max_wait=0.2, adaptive=False) as b:
        futures = [b.submit(i) for i in range(3)]
        assert [f.result(WAIT) for f in futures] == [0, 2, 4]
        starts = b.stats()["batch_starts"]
    assert starts == {"size": 0, "wait": 1, "quiet": 0, "drain": 0} and rec.sizes == [3]


def test_batch_size_halves_when_a_batch_runs_past_target_batch_seconds() -> None:
    gate = threading.Event()

    def slow(batch):
        gate.wait(0.05)  # always longer than the target below
        return list(batch)

    with Batcher(slow, max_batch_size=16, min_batch_size=2, max_wait=0.001,
                 initial_batch_size=16, target_batch_seconds=0.001) as b:
        b.pause()
        futures = [b.submit(i) for i in range(40)]
        b.resume()
        for f in futures:
            f.result(WAIT)
        assert b.batch_size == 2


def test_stats_report_throughput_latency_sizes_queue_and_errors() -> None:
    with Batcher(Recorder(), max_batch_size=8, max_wait=0.001) as b:
        for f in [b.submit(i) for i in range(50)]:
            f.result(WAIT)
        s = b.stats()
    assert s["submitted"] == s["completed"] == 50
    assert s["errors"] == 0 and s["queue_length"] == 0 and s["batches"] >= 1
    assert 0 <= s["latency_p50"] <= s["latency_p95"] <= s["latency_p99"]
    assert s["throughput"] > 0 and sum(n * c for n, c in s["batch_sizes"].items()) == 50
    assert 1 <= s["batch_size_mean"] <= 8 and s["batch_size_max"] <= 8


def test_an_exception_fails_every_item_of_its_batch() -> None:
    def boom(batch):
        if 3 in batch:
            raise KeyError("bad batch")
        return list(batch)

    with Batcher(boom, max_batch_size=4, max_wait=0.001, adaptive=False) as b:
        b.pause()
        futures = [b.submit(i) for i in range(8)]
        b.resume()
        for i, f in enumerate(futures):
            if i < 4:
                with pytest.raises(KeyError, match="bad batch"):
                    f.result(WAIT)
            else:
                assert f.result(WAIT) == i
        s = b.stats()
    assert s["errors"] == 4 and s["error_batches"] == 1 and s["completed"] == 4


def test_a_wrong_number_of_outputs_fails_the_batch() -> None:
    with Batcher(lambda batch: [0], max_batch_size=4, max_wait=0.001, adaptive=False) as b:
        b.pause()
        futures = [b.submit(i) for i in range(2)]
        b.resume()
        for f in futures:
            with pytest.raises(ValueError, match="1 outputs for a batch of 2"):
                f.result(WAIT)


def test_a_full_queue_raises_or_blocks_as_asked() -> None:
    rec = Recorder()
    with Batcher(rec, max_batch_size=4, max_wait=0.001, max_queue_size=2) as b:
        b.pause()
        first = [b.submit(0), b.submit(1)]
        with pytest.raises(BatcherFullError, match="full"):
            b.submit(2, block=False)
        with pytest.raises(BatcherFullError):
            b.submit(2, timeout=0.01)
        got: list = []
        t = threading.Thread(target=lambda: got.append(b.submit(3)))
        t.start()  # blocks: the queue is full while paused
        b.resume()
        t.join(WAIT)
        assert not t.is_alive()
        assert got[0].result(WAIT) == 6
        assert [f.result(WAIT) for f in first] == [0, 2]


def test_stop_drains_the_queue_even_when_paused() -> None:
    b = Batcher(Recorder(), max_batch_size=4, max_wait=10.0)
    b.pause()
    futures = [b.submit(i) for i in range(6)]
    b.stop(timeout=WAIT)
    assert [f.result(0) for f in futures] == [2 * i for i in range(6)]
    with pytest.raises(BatcherStoppedError, match="after stop"):
        b.submit(7)


def test_stop_with_cancel_pending_fails_what_is_queued() -> None:
    b = Batcher(Recorder(), max_batch_size=4, max_wait=0.001)
    b.pause()
    futures = [b.submit(i) for i in range(3)]
    b.stop(cancel_pending=True)
    for f in futures:
        with pytest.raises(BatcherStoppedError, match="cancel_pending"):
            f.result(0)
    assert b.stats()["errors"] == 3


def test_stop_timeout_fails_items_that_did_not_start() -> None:
    gate = threading.Event()
    rec = Recorder(gate=gate)
    b = Batcher(rec, max_batch_size=1, max_wait=0.0, adaptive=False)
    running = b.submit(0)
    while b.stats()["running_batches"] == 0:
        threading.Event().wait(0.001)
    waiting = b.submit(1)
    b.stop(timeout=0.05)  # the running batch holds the only thread past the timeout
    with pytest.raises(BatcherStoppedError, match="before this item ran"):
        waiting.result(0)
    gate.set()
    assert running.result(WAIT) == 0
    for t in b._threads:
        t.join(WAIT)


def test_fire_and_forget_items_are_processed_and_counted() -> None:
    rec = Recorder()
    with Batcher(rec, max_batch_size=8, max_wait=0.001) as b:
        for i in range(20):
            b.put(i)
    assert sorted(x for batch in rec.batches for x in batch) == list(range(20))
    assert b.stats()["completed"] == 20


def test_cancelled_futures_are_skipped() -> None:
    rec = Recorder()
    with Batcher(rec, max_batch_size=8, max_wait=0.001, adaptive=False) as b:
        b.pause()
        keep, drop = b.submit(1), b.submit(2)
        assert drop.cancel()
        b.resume()
        assert keep.result(WAIT) == 2
    with pytest.raises(CancelledError):
        drop.result(0)
    assert [x for batch in rec.batches for x in batch] == [1]


def test_concurrency_runs_batches_at_the_same_time() -> None:
    barrier = threading.Barrier(2, timeout=WAIT)

    def meet(batch):
        barrier.wait()  # only returns when two batches run at once
        return list(batch)

    with Batcher(meet, max_batch_size=1, max_wait=0.0, adaptive=False, concurrency=2) as b:
        futures = [b.submit(i) for i in range(4)]
        assert [f.result(WAIT) for f in futures] == [0, 1, 2, 3]


def test_submitting_threads_all_get_their_own_results() -> None:
    results: dict[int, list[int]] = {}
    with Batcher(Recorder(), max_batch_size=16, max_wait=0.001) as b:
        def client(k: int) -> None:
            results[k] = [b.submit(100 * k + i).result(WAIT) for i in range(25)]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    assert results == {k: [2 * (100 * k + i) for i in range(25)] for k in range(4)}


@pytest.mark.parametrize("kwargs, match", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"min_batch_size": 5, "max_batch_size": 2}, "exceeds"),
    ({"max_wait": -1}, "max_wait"),
    ({"target_batch_seconds": 0}, "target_batch_seconds"),
    ({"max_queue_size": 0}, "max_queue_size"),
    ({"concurrency": 0}, "concurrency"),
])
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Batcher(lambda b: b, **kwargs)


def test_model_workers_are_recognised_without_importing_them() -> None:
    class Workers:
        n_workers = 3

        def __init__(self) -> None:
            self.batches: list[list[int]] = []

        def predict(self, items):
            self.batches.append(list(items))
            return [x + 1 for x in items]

    workers = Workers()
    with Batcher(workers, max_batch_size=4, max_wait=0.001) as b:
        assert len(b._threads) == 3 and not b.stack
        assert b.submit(np.zeros(2)).result(WAIT).tolist() == [1.0, 1.0]
