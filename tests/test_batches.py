"""process_in_batches and estimate_safe_batch_size keep the batch-processing guide's promises, and more.

Every example of the batch-processing guide runs unchanged (numpy arrays and dicts stand in for images and
database records); the input is streamed; one plan and one pool serve the loop; memory is a budget
(MemoryBudgetError, spill advice, a lazy disk-backed result); ``reduce=`` aggregates like a
batched codon count; a checkpointed run SIGKILLed at any item resumes without losing an item
or redoing a finished batch.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import gc
import json
import operator
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import types
import warnings
from typing import Any

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amortune import (
    AmortuneWarning,
    Config,
    MemoryBudgetError,
    _batches,
    _profile,
    _spill,
    _system,
    estimate_safe_batch_size,
    optimize,
    process_in_batches,
)
from amortune._checkpoint import (
    Checkpoint,
    CheckpointMismatchError,
    CheckpointPermissionError,
    function_fingerprint,
)
from amortune.backends._warm import all_warm_pools
from tests import tasks

FAST = Config(sample_items=3, sample_seconds=0.001, target_chunk_seconds=0.001)
EXECUTORS = ["serial", "threads", "processes"]
ROOT = pathlib.Path(__file__).resolve().parent.parent
expensive_func = tasks.square  # the batch-processing guide's stand-in workload


def same(a: Any, b: Any) -> bool:
    """Deep equality that compares numpy arrays by value."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def batch_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("Batch ")]


@pytest.fixture
def spill_parent(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Make ``spill="disk"`` folders appear in a private parent, so a test can watch them."""
    parent = tmp_path / "spill-parent"
    parent.mkdir()
    shim = types.SimpleNamespace(gettempdir=lambda: str(parent), mkdtemp=tempfile.mkdtemp)
    monkeypatch.setattr(_spill, "tempfile", shim)
    return parent


# -- 1. the batch-processing guide's examples, unchanged ---------------------------------------------------


def test_quick_start_basic_usage(capsys: pytest.CaptureFixture[str]) -> None:
    data = range(10000)
    results = process_in_batches(expensive_func, data, batch_size=1000, verbose=True)
    out = capsys.readouterr().out
    assert isinstance(results, list) and results == [x**2 for x in data]
    assert "Processing 10000 items in batches of 1000 (10 batches)" in out
    assert len(batch_lines(out)) == 10 and "items 9000-9999" in batch_lines(out)[-1]
    # Auto-calculated batch size
    results = process_in_batches(expensive_func, data, max_memory_percent=0.5, verbose=True)
    assert results == [x**2 for x in data] and batch_lines(capsys.readouterr().out)


def test_example_1_image_processing(capsys: pytest.CaptureFixture[str]) -> None:
    process_image = tasks.process_image
    image_files = [np.full((6, 8), i % 256, dtype=np.uint8) for i in range(300)]
    results = process_in_batches(process_image, image_files, batch_size=100, verbose=True)
    print(f"Processed {len(results)} images")
    out = capsys.readouterr().out
    assert "Processed 300 images" in out and len(batch_lines(out)) == 3
    assert same(results, [process_image(img) for img in image_files])


def test_example_2_database_records_with_large_results(capsys: pytest.CaptureFixture[str]) -> None:
    process_record = tasks.process_record
    records = [{"id": i, "name": f"r{i}", "values": list(range(i % 7 + 1))} for i in range(500)]
    results = process_in_batches(process_record, records, max_memory_percent=0.3, verbose=True)
    assert same(results, [process_record(r) for r in records])
    assert batch_lines(capsys.readouterr().out)


def test_example_3_manual_batch_size_estimation(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    result_size = 50 * 1024 * 1024
    available = _system.memory_snapshot()
    batch_size = estimate_safe_batch_size(result_size, max_memory_percent=0.5)
    assert isinstance(batch_size, int) and batch_size >= 1
    # The formula, with the memory read a moment apart (it may move by a few MiB meanwhile).
    assert abs(batch_size - int(0.5 * available // result_size)) <= 1
    my_func, my_data = tasks.square, list(range(700))
    results = process_in_batches(my_func, my_data, batch_size=batch_size, verbose=True)
    assert results == [x * x for x in my_data]
    assert batch_lines(capsys.readouterr().out)
    # The document's worked example: 16 GiB available, 50 %, 10 MB results -> about 800 items.
    monkeypatch.setattr(_system, "memory_snapshot", lambda: 16 << 30)
    assert estimate_safe_batch_size(10 * 2**20, max_memory_percent=0.5) == 819
    assert estimate_safe_batch_size(result_size, max_memory_percent=0.5) == 163
    assert estimate_safe_batch_size(64 << 30) == 1  # never 0, even when one result won't fit


@pytest.mark.parametrize("as_generator", [False, True])
def test_example_4_handling_memory_warnings(as_generator: bool,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data: Any = (x for x in range(2000)) if as_generator else range(2000)
    opt_result = optimize(expensive_func, data, sample_size=5)
    has_memory_warning = any("memory" in w.lower() for w in opt_result.warnings)
    if has_memory_warning:
        print("⚠️  Memory warning detected - using batch processing")
        results = process_in_batches(expensive_func, data, batch_size=100, verbose=True)
    else:
        print("✓ Safe to use normal Pool.map()")
        from multiprocessing import Pool

        with Pool(opt_result.n_jobs) as pool:
            results = pool.map(expensive_func, opt_result.data, chunksize=opt_result.chunksize)
    assert results == [x * x for x in range(2000)]
    assert "Safe to use normal Pool.map()" in capsys.readouterr().out


def test_example_5_progress_tracking(capsys: pytest.CaptureFixture[str]) -> None:
    def my_progress_callback(phase: str, progress: float) -> None:
        print(f"{phase}: {progress*100:.0f}%")

    data = range(2000)
    results = process_in_batches(expensive_func, data, batch_size=500,
                                 progress_callback=my_progress_callback, verbose=True)
    assert results == [x * x for x in data]
    reports = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"\w+: \d+%$", ln)]
    assert reports[0] == "optimize: 100%" and reports[-1] == "execute: 100%"


def test_example_6_with_profiling(capsys: pytest.CaptureFixture[str]) -> None:
    data = range(3000)
    results = process_in_batches(expensive_func, data, batch_size=1000, profile=True, verbose=True)
    assert results == [x * x for x in data]
    out = capsys.readouterr().out
    assert out.count("amortune plan") == 1  # profiled once: one optimization for the whole loop
    assert len(batch_lines(out)) == 3


# -- 2. streaming: one plan, one pool, bounded input ---------------------------------------------


class Tracker:
    """A tqdm stand-in that counts finished items (``progress=`` accepts any such object)."""

    total, done = None, 0

    def update(self, n: int) -> None:
        self.done += n


@pytest.mark.parametrize("executor", EXECUTORS)
def test_generator_is_streamed_not_materialized(executor: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    read_ahead, sample_size, batch_size, n = 16, 5, 50, 1500
    monkeypatch.setattr(_profile, "READ_AHEAD_ITEMS", read_ahead)
    tracker = Tracker()
    lags: list[tuple[int, int]] = []

    def gen():
        for i in range(n):
            lags.append((i, i + 1 - tracker.done))  # items pulled but not yet finished
            yield i

    out = process_in_batches(tasks.square, gen(), batch_size=batch_size, sample_size=sample_size,
                             executor=executor, progress=tracker, config=FAST)
    assert out == [i * i for i in range(n)] and tracker.done == n
    assert max(lag for _, lag in lags) <= batch_size + read_ahead + sample_size
    assert max(lag for i, lag in lags if i >= read_ahead + sample_size) <= batch_size


def test_only_the_current_batch_inputs_are_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    import weakref

    read_ahead, sample_size, batch_size = 16, 5, 40
    monkeypatch.setattr(_profile, "READ_AHEAD_ITEMS", read_ahead)

    class Item:
        pass

    alive: weakref.WeakSet[Item] = weakref.WeakSet()
    peak = [0]

    def func(item: Item) -> int:
        peak[0] = max(peak[0], len(alive))
        return 1

    def gen():
        for _ in range(1000):
            item = Item()
            alive.add(item)
            yield item

    out = process_in_batches(func, gen(), batch_size=batch_size, sample_size=sample_size,
                             executor="serial")
    assert out == [1] * 1000
    # The sampled items and the read-ahead buffer are kept by the plan; plus one batch.
    assert peak[0] <= batch_size + read_ahead + sample_size + 2


def test_one_plan_and_one_pool_serve_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = _batches.plan_run

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_batches, "plan_run", counting)
    out = process_in_batches(tasks.worker_pid, range(300), batch_size=30, executor="processes",
                             n_jobs=2, sample_size=1, config=FAST)
    assert len(calls) == 1
    assert out[0] == os.getpid()  # the sampled item ran in the caller
    workers = set(out[1:])
    pool_pids = {pid for pool in all_warm_pools() for pid in pool.pids()}
    assert workers <= pool_pids and 1 <= len(workers) <= 2  # 10 batches, the same two workers


# -- 3. memory: a budget, not a hope ---------------------------------------------------------------


def test_a_result_larger_than_the_budget_raises_before_running_everything() -> None:
    calls: list[int] = []
    func = lambda x: calls.append(x) or np.zeros(1 << 17)  # noqa: E731 - 1 MiB results
    with pytest.raises(MemoryBudgetError, match="max_memory_percent") as info:
        process_in_batches(func, range(1000), max_memory_bytes=256 << 10)
    assert isinstance(info.value, MemoryError)
    assert len(calls) <= 5  # only the sampled items ran


def _fit_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record
            if issubclass(w.category, AmortuneWarning) and "will not fit" in str(w.message)]


@pytest.mark.parametrize("n, size", [(60, 1 << 20), (5000, 8000)], ids=["short", "long-list"])
def test_a_list_that_will_not_fit_warns_and_names_the_fix(n: int, size: int) -> None:
    # "long-list" has more items than the read-ahead: the warning needs the input's len().
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = process_in_batches(lambda x: bytes(size), list(range(n)), max_memory_bytes=20 << 20,
                                 executor="serial")
    assert len(out) == n
    [message] = _fit_warnings(record)
    assert "spill='disk'" in message and "reduce=" in message


@pytest.mark.parametrize("how", [{"spill": "disk"}, {"reduce": operator.add}])
def test_no_fit_warning_when_results_are_not_kept_in_a_list(how: dict[str, Any]) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = process_in_batches(tasks.return_mb, range(40), max_memory_bytes=20 << 20,
                                 executor="serial", **how)
    assert not _fit_warnings(record)
    if "spill" in how:
        assert len(out) == 40
        out.close()


@pytest.mark.parametrize("executor", EXECUTORS)
def test_spilled_results_are_a_lazy_sequence_equal_to_map(executor: str,
                                                          spill_parent: pathlib.Path) -> None:
    data = list(range(37))
    expected = list(map(tasks.return_mb, data))
    result = process_in_batches(tasks.return_mb, data, batch_size=5, spill="disk",
                                executor=executor, config=FAST)
    assert not isinstance(result, list)
    [folder] = list(spill_parent.iterdir())
    with pytest.raises(TypeError):
        result[0] = 1  # type: ignore[index]
    assert len(result) == 37
    assert np.array_equal(result[0], expected[0]) and np.array_equal(result[-1], expected[-1])
    assert np.array_equal(result[-37], expected[0])
    assert same(result[-3:], expected[-3:]) and same(result[5:30:7], expected[5:30:7])
    assert same(list(result), expected) and same(list(reversed(result)), expected[::-1])
    with pytest.raises(IndexError):
        result[37]
    result.close()
    assert not folder.exists()


def test_spilled_records_round_trip_and_the_folder_goes_with_the_result(
        spill_parent: pathlib.Path) -> None:
    records = [{"id": i, "name": f"r{i}", "values": list(range(i % 5 + 1))} for i in range(90)]
    result = process_in_batches(tasks.process_record, records, batch_size=20, spill="disk")
    [folder] = list(spill_parent.iterdir())
    assert same(list(result), [tasks.process_record(r) for r in records])
    del result
    gc.collect()
    assert not folder.exists()
    with pytest.raises(ValueError, match="bad item 7"):  # a failed run leaves no folder either
        process_in_batches(tasks.fail_on_7, range(20), batch_size=3, spill="disk")
    assert not list(spill_parent.iterdir())


def test_spill_to_a_path_keeps_the_folder(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "kept"
    result = process_in_batches(tasks.square, range(25), batch_size=10, spill=folder)
    assert list(result) == [x * x for x in range(25)]
    result.close()
    assert len([p for p in folder.iterdir() if p.name.startswith("seg-")]) == 3
    assert folder.stat().st_mode & 0o077 == 0  # owner-only


def test_spilled_run_keeps_resident_memory_bounded() -> None:
    """200 results of 1 MiB with a 20 MiB budget: RSS, sampled in func, grows far less than 200 MiB."""
    budget = 20 << 20
    me = psutil.Process()

    def peak_growth(**kwargs: Any) -> int:
        peak = [0]

        def func(x: int) -> Any:
            peak[0] = max(peak[0], me.memory_info().rss)
            return tasks.return_mb(x)

        gc.collect()
        if sys.platform.startswith("linux"):  # return freed heap first: growth is then real growth
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = me.memory_info().rss
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AmortuneWarning)
            out = process_in_batches(func, range(200), max_memory_bytes=budget,
                                     executor="serial", **kwargs)
        assert len(out) == 200 and out[150][0] == 150
        if hasattr(out, "close"):
            out.close()
        del out
        return peak[0] - base

    assert peak_growth(spill="disk") < 3 * budget
    assert peak_growth() > 5 * budget  # the same probe sees a list that keeps everything


# -- 4. reduce= : a batched codon count ---------------------------------------------------


def dna(n: int, seed: int = 2) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices("ACGT", k=rng.randrange(90, 300))) for _ in range(n)]


@pytest.mark.parametrize("executor", ["serial", "processes"])
@pytest.mark.parametrize("merge", [operator.add, tasks.merge_counts], ids=["add", "merge"])
def test_codon_counts_reduce_to_the_direct_count(executor: str, merge: Any) -> None:
    seqs = dna(3000)
    direct = sum(map(tasks.count_codons, seqs), collections.Counter())
    got = process_in_batches(tasks.count_codons, seqs, batch_size=700, reduce=merge,
                             executor=executor, config=FAST)
    assert got == direct and len(got) == 64 and sum(got.values()) == sum(len(s) // 3 for s in seqs)


def test_reduce_ignores_spill_and_returns_the_aggregate(spill_parent: pathlib.Path) -> None:
    seqs = dna(500)
    direct = sum(map(tasks.count_codons, seqs), collections.Counter())
    got = process_in_batches(tasks.count_codons, seqs, batch_size=100, reduce=operator.add,
                             spill="disk")
    assert got == direct
    assert not list(spill_parent.iterdir())


def test_reduce_with_checkpoint_resumes_without_recomputing(tmp_path: pathlib.Path) -> None:
    seqs = dna(400)
    direct = sum(map(tasks.count_codons, seqs), collections.Counter())
    assert process_in_batches(tasks.count_codons, seqs, batch_size=50, reduce=operator.add,
                              checkpoint=tmp_path / "codons.ckpt") == direct
    data = [(str(tmp_path), i) for i in range(30)]  # log_then_maybe_kill logs each computation
    for _ in range(2):
        got = process_in_batches(tasks.log_then_maybe_kill, data, batch_size=7,
                                 reduce=operator.add, checkpoint=tmp_path / "log.ckpt")
        assert got == sum(i * i for i in range(30))
    assert sorted(map(int, (tmp_path / "log").read_text().split())) == list(range(30))


# -- 5. checkpoints survive SIGKILL ----------------------------------------------------------------

_RUN = textwrap.dedent("""
    import json, operator, os, sys
    import amortune
    from tests import tasks
    folder, ckpt, n, b, executor, reduce = sys.argv[1:]
    with open(os.path.join(folder, "caller.pid"), "w") as f:
        f.write(str(os.getpid()))
    out = amortune.process_in_batches(
        tasks.log_then_maybe_kill, [(folder, i) for i in range(int(n))], batch_size=int(b),
        sample_size=2, executor=executor, n_jobs=2 if executor == "processes" else None,
        checkpoint=ckpt, reduce=operator.add if reduce == "add" else None,
        config=amortune.Config(sample_seconds=0.001, target_chunk_seconds=0.001))
    print(json.dumps(out if reduce == "add" else list(out)))
""")


def _command(folder: pathlib.Path, n: int, b: int, executor: str, reduce: str) -> list[str]:
    args = [str(folder), str(folder / "ckpt"), str(n), str(b), executor, reduce]
    return [sys.executable, "-c", _RUN, *args]


def _run(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(*args), cwd=ROOT, capture_output=True, text=True, timeout=60)


def _next_start(folder: pathlib.Path, reduce: str) -> int:
    if not (folder / "ckpt" / "manifest.json").exists():
        return 0
    with Checkpoint.open(folder / "ckpt", fingerprint=function_fingerprint(tasks.log_then_maybe_kill),
                         mode="reduce" if reduce == "add" else "list") as ckpt:
        return ckpt.next_start


def _resume_and_check(folder: pathlib.Path, n: int, b: int, executor: str, reduce: str) -> int:
    """Rerun the killed call; check its result and that only the batch in flight ran twice."""
    resume_at = _next_start(folder, reduce)
    batch = max(b, 2)  # the first batch also holds the 2 sampled items
    second = _run(folder, n, b, executor, reduce)
    assert second.returncode == 0, second.stderr
    squares = [i * i for i in range(n)]
    assert json.loads(second.stdout) == (sum(squares) if reduce == "add" else squares)
    counts = collections.Counter(int(x) for x in (folder / "log").read_text().split())
    assert set(counts) == set(range(n))  # no item lost
    twice = {i for i, c in counts.items() if c > 1}
    assert max(counts.values()) <= 2 and twice <= set(range(resume_at, resume_at + batch))
    return resume_at


def _kill_and_resume(n: int, b: int, k: int, executor: str, reduce: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        (folder / "kill_at").write_text(str(k))
        first = _run(folder, n, b, executor, reduce)
        assert first.returncode == -signal.SIGKILL, first.stderr
        resume_at = _resume_and_check(folder, n, b, executor, reduce)
        assert resume_at <= k < resume_at + max(b, 2)  # every batch before k's was recorded


KILL_POINTS = {"data": st.data(), "n": st.integers(1, 30), "b": st.integers(1, 10),
               "reduce": st.sampled_from(["", "add"])}


@pytest.mark.parametrize("executor", ["serial", "processes"])
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**KILL_POINTS)
def test_a_run_killed_at_any_item_resumes_exactly(executor: str, data: st.DataObject, n: int,
                                                  b: int, reduce: str) -> None:
    """``func`` SIGKILLs the caller at item k (from the caller itself, or from a worker)."""
    _kill_and_resume(n, b, data.draw(st.integers(0, n - 1), label="k"), executor, reduce)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["serial", "processes"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**KILL_POINTS)
def test_many_kill_points(executor: str, data: st.DataObject, n: int, b: int, reduce: str) -> None:
    _kill_and_resume(n, b, data.draw(st.integers(0, n - 1), label="k"), executor, reduce)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(delay=st.floats(0.1, 0.4), b=st.integers(3, 10), reduce=st.sampled_from(["", "add"]))
def test_a_run_killed_at_a_random_moment_resumes_exactly(delay: float, b: int,
                                                         reduce: str) -> None:
    """Killed from outside, possibly while it writes a checkpoint file."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        proc = subprocess.Popen(_command(folder, 100, b, "serial", reduce), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if (folder / "log").exists():
            _resume_and_check(folder, 100, b, "serial", reduce)


def test_a_finished_checkpoint_is_reused_and_spill_reads_it(tmp_path: pathlib.Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    data = [(str(tmp_path / "once"), i) for i in range(23)]
    (tmp_path / "once").mkdir()
    first = process_in_batches(tasks.once_per_item, data, batch_size=5, checkpoint=ckpt)
    assert first == list(range(23))
    again = process_in_batches(tasks.once_per_item, data, batch_size=5, checkpoint=ckpt,
                               spill="disk")  # once_per_item raises if an item runs twice
    assert list(again) == first
    again.close()
    assert (ckpt / "manifest.json").exists()  # closing the result keeps the checkpoint


def test_another_function_or_a_changed_input_is_refused(tmp_path: pathlib.Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    assert process_in_batches(tasks.square, range(20), batch_size=5, checkpoint=ckpt) == [
        x * x for x in range(20)]
    assert issubclass(CheckpointMismatchError, ValueError)
    with pytest.raises(CheckpointMismatchError, match="square"):
        process_in_batches(tasks.identity, range(20), batch_size=5, checkpoint=ckpt)
    changed = [*range(7), 99, *range(8, 20)]
    with pytest.raises(CheckpointMismatchError, match="input changed"):
        process_in_batches(tasks.square, changed, batch_size=5, checkpoint=ckpt)
    with pytest.raises(CheckpointMismatchError):
        process_in_batches(tasks.square, range(12), batch_size=5, checkpoint=ckpt)
    with pytest.raises(CheckpointMismatchError, match="mode"):
        process_in_batches(tasks.square, range(20), batch_size=5, checkpoint=ckpt,
                           reduce=operator.add)
    # Nothing above touched it: the same call still gets its results.
    assert process_in_batches(tasks.square, range(20), batch_size=5, checkpoint=ckpt) == [
        x * x for x in range(20)]


def test_a_checkpoint_others_could_alter_is_refused(tmp_path: pathlib.Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "run.ckpt"
    process_in_batches(tasks.square, range(10), batch_size=5, checkpoint=ckpt)
    ckpt.chmod(0o770)
    with pytest.raises(CheckpointPermissionError, match="writable by group"):
        process_in_batches(tasks.square, range(10), batch_size=5, checkpoint=ckpt)
    ckpt.chmod(0o700)
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)
    with pytest.raises(PermissionError, match="not to the current user"):
        process_in_batches(tasks.square, range(10), batch_size=5, checkpoint=ckpt)


# -- 6. reporting ----------------------------------------------------------------------------------


def test_verbose_prints_one_line_per_batch(capsys: pytest.CaptureFixture[str]) -> None:
    process_in_batches(tasks.square, list(range(23)), batch_size=5, verbose=True)
    lines = batch_lines(capsys.readouterr().out)
    spans = [re.match(r"Batch (\d+)\S*: items (\d+)-(\d+) \((\d+) items", ln) for ln in lines]
    assert all(spans) and len(spans) == 5
    assert [tuple(map(int, m.groups())) for m in spans if m] == [
        (1, 0, 4, 5), (2, 5, 9, 5), (3, 10, 14, 5), (4, 15, 19, 5), (5, 20, 22, 3)]


def test_progress_true_shows_a_tqdm_bar(capsys: pytest.CaptureFixture[str]) -> None:
    process_in_batches(tasks.square, list(range(40)), batch_size=10, progress=True)
    err = capsys.readouterr().err
    assert "40/40" in err and "100%" in err


@pytest.mark.parametrize("shape", ["list", "long-list", "generator"])
def test_progress_callback_rises_to_one(shape: str) -> None:
    calls: list[tuple[str, float]] = []
    n = 6000 if shape == "long-list" else 300
    data: Any = (x for x in range(n)) if shape == "generator" else list(range(n))
    process_in_batches(tasks.square, data, batch_size=n // 6, executor="processes", config=FAST,
                       progress_callback=lambda phase, fraction: calls.append((phase, fraction)))
    assert calls[0] == ("optimize", 1.0) and calls[-1] == ("execute", 1.0)
    fractions = [f for phase, f in calls if phase == "execute"]
    assert fractions == sorted(fractions) and all(0.0 <= f <= 1.0 for f in fractions)
    if shape != "generator":  # the length is known, so the fraction grows batch by batch
        assert any(0.0 < f < 1.0 for f in fractions)


# -- 7. the property: it is map (or functools.reduce), in batches -------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.integers(-10**6, 10**6), max_size=120), as_generator=st.booleans(),
       batch_size=st.integers(1, 40), executor=st.sampled_from(EXECUTORS),
       mode=st.sampled_from(["list", "spill", "reduce"]))
def test_process_in_batches_is_map(values: list[int], as_generator: bool, batch_size: int,
                                   executor: str, mode: str) -> None:
    data: Any = (v for v in values) if as_generator else values
    expected = list(map(tasks.square, values))
    kwargs: dict[str, Any] = {"batch_size": batch_size, "executor": executor, "config": FAST}
    if mode == "reduce":
        if not values:
            with pytest.raises(ValueError, match="empty"):
                process_in_batches(tasks.square, data, reduce=operator.add, **kwargs)
            return
        got = process_in_batches(tasks.square, data, reduce=operator.add, **kwargs)
        assert got == functools.reduce(operator.add, expected)
    elif mode == "spill":
        result = process_in_batches(tasks.square, data, spill="disk", **kwargs)
        try:
            assert len(result) == len(expected) and list(result) == expected
        finally:
            result.close()
    else:
        assert process_in_batches(tasks.square, data, **kwargs) == expected


# -- 8. bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"batch_size": -3}, ValueError, "batch_size"),
    ({"batch_size": 2.5}, ValueError, "batch_size"),
    ({"max_memory_percent": 0}, ValueError, "max_memory_percent"),
    ({"max_memory_percent": 1.5}, ValueError, "max_memory_percent"),
    ({"max_memory_percent": float("nan")}, ValueError, "max_memory_percent"),
    ({"sample_size": 0}, ValueError, "sample_size"),
    ({"max_memory_bytes": 0}, ValueError, "max_memory_bytes"),
    ({"spill": 3}, TypeError, "spill"),
    ({"reduce": 3}, TypeError, "reduce"),
    ({"bogus_option": 1}, TypeError, "bogus_option"),
], ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_bad_arguments_name_the_parameter(kwargs: dict[str, Any], exc: type[Exception],
                                          name: str) -> None:
    pulled: list[int] = []

    def gen():
        for i in range(10):
            pulled.append(i)
            yield i

    with pytest.raises(exc, match=name):
        process_in_batches(tasks.square, gen(), **kwargs)
    assert not pulled  # refused before reading the input


@pytest.mark.parametrize("args, name", [((-1,), "result_size_bytes"),
                                        ((100, 0), "max_memory_percent"),
                                        ((100, 1.5), "max_memory_percent")])
def test_estimate_safe_batch_size_rejects_bad_input(args: tuple[Any, ...], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        estimate_safe_batch_size(*args)
