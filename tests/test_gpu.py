"""The Torch worker mode, tested without a GPU through the code paths a GPU takes.

``AMORTUNE_FAKE_GPUS=N`` makes amortune see N devices: real spawned workers, each with its own
``CUDA_VISIBLE_DEVICES``, computing on the CPU. ``AMORTUNE_FAKE_GPU_MEMORY`` gives each a memory
budget enforced with a real ``torch.cuda.OutOfMemoryError``, so the batch-size search and the
out-of-memory splitting run as they would on a GPU. The model factories below write one line per
load (pid, device, slot, threads) so a test can count loads per worker. Tests marked ``gpu`` need
real CUDA. Sizes and decisions are asserted, never durations; a SIGALRM guard fails a hung test.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from amortune import _device, gpu  # noqa: E402
from amortune._batcher import Batcher  # noqa: E402
from amortune._checkpoint import CheckpointMismatchError  # noqa: E402

IN, HIDDEN, OUT = 8, 32, 3
#: tests/conftest.py turns a test running longer than this into a failure.
HARD_TIMEOUT_SECONDS = 240
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch):
    """Two fake GPUs, no memory budget (tests set one where they need it)."""
    monkeypatch.setenv(_device.FAKE_GPUS_ENV, "2")
    monkeypatch.delenv(_device.FAKE_MEMORY_ENV, raising=False)
    return monkeypatch


# -- models, built here, loaded in workers --------------------------------------------------------


def _log_load(log_path: str | None) -> None:
    if log_path:
        with open(log_path, "a") as f:
            f.write(json.dumps({
                "pid": os.getpid(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "slot": os.environ.get("AMORTUNE_WORKER_SLOT"),
                "threads": torch.get_num_threads()}) + "\n")


def make_mlp(log_path: str | None = None) -> torch.nn.Module:
    _log_load(log_path)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, OUT))


class MaskedConv(torch.nn.Module):
    """A 1-D conv net over zero-padded sequences; padding never changes an item's output."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(1, channels)
        self.conv = torch.nn.Conv1d(channels, channels, 3, padding=1)
        self.head = torch.nn.Linear(channels, OUT)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(values.shape[1], device=values.device)
        mask = (positions[None, :] < lengths[:, None]).unsqueeze(-1).to(values.dtype)
        h = self.embed(values.unsqueeze(-1)) * mask
        h = torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2) * mask
        return self.head(h.sum(1) / lengths[:, None].clamp(min=1).to(values.dtype))


def make_conv(log_path: str | None = None) -> torch.nn.Module:
    _log_load(log_path)
    torch.manual_seed(0)
    return MaskedConv()


STALL, CRASH, FAIL = -1.0, -2.0, -3.0  # marker values in an item's first feature


def _marked(batch: torch.Tensor, marker: float) -> bool:
    return bool((batch[:, 0] == marker).any())


def stalling_predict(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    if _marked(batch, STALL):
        time.sleep(3600)
    return model(batch)


def crashing_predict(once_flag: str | None, model: torch.nn.Module,
                     batch: torch.Tensor) -> torch.Tensor:
    """Kill the worker on a CRASH item: every time, or only once while ``once_flag`` exists."""
    if _marked(batch, CRASH):
        if once_flag is None:
            os._exit(3)
        try:
            os.remove(once_flag)
        except FileNotFoundError:
            pass
        else:
            os._exit(3)
    return model(batch)


def failing_predict(flag: str, calls: str, model: torch.nn.Module,
                    batch: torch.Tensor) -> torch.Tensor:
    """Record the ids of the items of each batch; raise on a FAIL item while ``flag`` exists."""
    with open(calls, "a") as f:
        f.write(" ".join(str(int(v)) for v in batch[:, 1]) + "\n")
    if os.path.exists(flag) and _marked(batch, FAIL):
        raise ValueError("a FAIL item")
    return model(batch)


def items(n: int, seed: int = 1) -> list[torch.Tensor]:
    """Feature vectors whose second feature is the item's id (so predict can log it)."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.rand(IN, generator=g) for _ in range(n)]
    for i, x in enumerate(out):
        x[1] = float(i)
    return out


def reference(model_factory, data: list[torch.Tensor]) -> torch.Tensor:
    model = model_factory()
    with torch.inference_mode():
        return torch.stack([model(x[None])[0] for x in data])


def ragged(n: int, seed: int = 2, longest: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n,), generator=g)
    return [torch.rand(int(k), generator=g) for k in lengths]


def conv_reference(data: list[torch.Tensor]) -> torch.Tensor:
    model = make_conv()
    with torch.inference_mode():
        return torch.stack([model(x[None], torch.tensor([len(x)]))[0] for x in data])


def loads(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def fits(factory, budget: int, size: int, make_items) -> bool:
    """Whether a batch of ``size`` runs within ``budget`` bytes on a fake device, in-process."""
    st_ = gpu._WorkerState(factory().eval(), _device.FakeDevice("0", budget), _config())
    try:
        gpu._predict_batch(st_, make_items(size))
    except torch.cuda.OutOfMemoryError:
        return False
    return True


def _config(**kw) -> gpu._WorkerConfig:
    base = dict(predict=None, collate=None, split=None, n_threads=None, search="items",
                item_cap=4096, token_cap=None, token_limit=None, sample=(), sample_lengths=None,
                margin=gpu.MARGIN, probe_seconds=60.0, trace_dir=None)
    base.update(kw)
    return gpu._WorkerConfig(**base)


# -- pure parts: packing, the search, collate and split -------------------------------------------


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 50), max_size=60), max_items=st.integers(1, 20),
       max_tokens=st.one_of(st.none(), st.integers(1, 300)), sort=st.booleans())
def test_packing_covers_the_input_in_order_within_both_budgets(
        lengths: list[int], max_items: int, max_tokens: int | None, sort: bool) -> None:
    if sort:
        lengths = sorted(lengths, reverse=True)
    bounds = gpu.pack_batches(lengths, len(lengths), max_items, max_tokens)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(len(lengths)))
    for a, b in bounds:
        assert 0 < b - a <= max_items
        padded = (b - a) * max(lengths[a:b])
        if max_tokens is not None and b - a > 1:
            assert padded <= max_tokens
    for (a, b), (c, _) in zip(bounds, bounds[1:], strict=False):  # greedy: the next item broke it
        grown = (b - a + 1) * max(lengths[a:c + 1])
        assert b - a == max_items or (max_tokens is not None and grown > max_tokens)


def test_packing_sorted_lengths_counts_padding() -> None:
    assert gpu.pack_batches([10, 9, 3, 3, 3, 1], 6, None, max_tokens=20) == [(0, 2), (2, 6)]
    assert gpu.pack_batches(None, 0, 4) == []


class _Oom(Exception):
    pass


@settings(max_examples=300, deadline=None)
@given(threshold=st.integers(0, 5000), limit=st.integers(1, 8000), start=st.integers(1, 64))
def test_search_finds_the_largest_size_that_runs_then_keeps_the_margin(
        threshold: int, limit: int, start: int) -> None:
    tried: list[int] = []

    def run(size: int) -> float:
        tried.append(size)
        if size > threshold:
            raise _Oom
        return 1.0

    found = gpu.search_batch_size(run, limit=limit, start=start,
                                  is_oom=lambda e: isinstance(e, _Oom), after_oom=lambda: None)
    assert max(tried) <= limit
    best = min(threshold, limit)
    if best == 0:
        assert found.size == found.largest_ok == 0
        return
    assert best * (1 - gpu.BISECT_TOLERANCE) - 1 <= found.largest_ok <= best
    if threshold >= limit:
        assert found.limited_by == "limit" and found.size == limit
    else:
        assert found.limited_by == "memory" and found.smallest_failed is not None
        assert found.size == max(1, math.floor(found.largest_ok * (1 - gpu.MARGIN)))


def test_search_on_cpu_grows_while_throughput_holds_up_and_stops_when_it_falls() -> None:
    def seconds(b: int) -> float:  # 1 ms per batch + 10 us per item; caches spill past 2048
        return 1e-3 + 1e-5 * b * (1 if b <= 2048 else 3)

    found = gpu.search_batch_size(seconds, limit=1 << 20, start=8, by_throughput=True)
    assert found.limited_by == "throughput"
    assert [b for b, _, _ in found.trials] == [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
                                               8192]
    assert found.size == 2048  # the largest within KNEE_GAIN of the best rate

    rising = gpu.search_batch_size(lambda b: 1e-3 + 1e-5 * b, limit=4096, by_throughput=True)
    assert rising.limited_by == "limit" and rising.size == 4096

    # the limit is reached, but the last sizes ran slower: a smaller one is kept, and said why
    slower = gpu.search_batch_size(lambda b: 1e-3 + 1e-5 * b * (1 if b <= 1024 else 2),
                                   limit=4096, start=8, by_throughput=True)
    assert [b for b, _, _ in slower.trials][-1] == 4096
    assert slower.size == 1024 and slower.limited_by == "throughput"


@settings(max_examples=100, deadline=None)
@given(overhead=st.floats(1e-5, 1.0), per_item=st.floats(1e-7, 1e-2),
       slower_past=st.integers(1, 5000))
def test_cpu_search_keeps_a_size_near_the_best_rate(overhead: float, per_item: float,
                                                    slower_past: int) -> None:
    def seconds(b: int) -> float:  # past ``slower_past`` items, caches spill: twice the cost
        return overhead + per_item * b * (1 if b <= slower_past else 2)

    found = gpu.search_batch_size(seconds, limit=1 << 16, start=8, by_throughput=True)
    rates = {b: b / seconds(b) for b, ok, _ in found.trials}
    assert found.size in rates
    assert rates[found.size] >= max(rates.values()) * (1 - gpu.KNEE_GAIN)
    assert all(rates[b] < max(rates.values()) * (1 - gpu.KNEE_GAIN)
               for b in rates if b > found.size)


def test_search_lets_other_errors_through() -> None:
    def run(size: int) -> float:
        raise KeyError("not memory")

    with pytest.raises(KeyError):
        gpu.search_batch_size(run, limit=10)


def test_search_gives_up_growing_after_max_seconds() -> None:
    now = [0.0]

    def run(size: int) -> float:
        now[0] += 1.0
        return 1.0

    found = gpu.search_batch_size(run, limit=1 << 20, max_seconds=3.5, clock=lambda: now[0])
    assert found.limited_by == "time" and found.size == found.largest_ok == 8


def test_repeated_timings_run_3_to_10_times_and_keep_the_mean_of_all_but_the_first() -> None:
    from amortune.gpu._search import timed_repeats, typical_seconds

    runs: list[float] = []

    def once(seconds: float) -> float:
        runs.append(seconds)
        return seconds

    assert timed_repeats(lambda: once(0.5), min_seconds=0.1) == 0.5 and len(runs) == 3
    runs.clear()
    assert timed_repeats(lambda: once(1e-4), min_seconds=0.1) == pytest.approx(1e-4)
    assert len(runs) == 10
    runs.clear()
    assert timed_repeats(lambda: once(0.5), repeat=False) == 0.5 and len(runs) == 1
    # the first run pays the size's first allocations: it never counts once there are three
    assert typical_seconds([5.0, 1.0, 2.0]) == 1.5
    assert typical_seconds([5.0, 1.0, 2.0, 6.0]) == 3.0
    assert typical_seconds([5.0, 1.0]) == 3.0


@pytest.mark.parametrize("seed", range(8))
def test_the_cpu_search_on_a_busy_machine_is_not_drawn_to_batches_that_dodge_interruptions(
        seed: int) -> None:
    """A machine that runs this process 2 ms of every 4 (a shared core): a batch shorter than
    2 ms sometimes runs untouched, a longer one never. Over a whole run every size gets half the
    machine, so the largest batches are fastest; best-of timings would pick a short one."""
    import random

    from amortune.gpu._search import timed_repeats

    rng = random.Random(seed)
    now = [0]  # nanoseconds: whole numbers, so a slice's end is met exactly

    def once(size: int) -> float:
        began = now[0] = now[0] + rng.randrange(100_000, 900_000)  # the caller's own step
        left = 200_000 + 2_000 * size  # 0.2 ms a batch, 2 us an item
        while left > 0:
            phase = now[0] % 4_000_000
            if phase >= 2_000_000:  # descheduled until the next slice
                now[0] += 4_000_000 - phase
                continue
            step = min(left, 2_000_000 - phase)
            now[0] += step
            left -= step
        return (now[0] - began) / 1e9

    def typical(size: int) -> float:
        return timed_repeats(lambda: once(size), min_seconds=0.02)

    def best_of(size: int) -> float:
        return min(once(size) for _ in range(10))

    picked = gpu.search_batch_size(typical, limit=8192, start=8, by_throughput=True).size
    lured = gpu.search_batch_size(best_of, limit=8192, start=8, by_throughput=True).size
    assert lured <= 512 < 2048 <= picked

def test_collate_stacks_equal_shapes_of_every_kind() -> None:
    import numpy as np

    out = gpu.default_collate([torch.ones(3), torch.zeros(3)])
    assert out.shape == (2, 3)
    assert gpu.default_collate([np.ones((2, 2)), np.zeros((2, 2))]).shape == (2, 2, 2)
    assert gpu.default_collate([1.0, 2.0]).tolist() == [1.0, 2.0]
    assert gpu.default_collate([[1, 2], [3, 4]]).tolist() == [[1, 2], [3, 4]]
    pair = gpu.default_collate([(torch.ones(2), 1), (torch.zeros(2), 0)])
    assert isinstance(pair, tuple) and pair[0].shape == (2, 2) and pair[1].tolist() == [1, 0]
    d = gpu.default_collate([{"x": torch.ones(2)}, {"x": torch.zeros(2)}])
    assert d["x"].shape == (2, 2)
    assert gpu.default_collate(["a", "b"]) == ["a", "b"]
    padded = gpu.default_collate([torch.ones(2), torch.ones(2)], pad=True)
    assert isinstance(padded, gpu.Padded) and padded.lengths.tolist() == [2, 2]


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=12),
       width=st.sampled_from([(), (2,)]))
def test_ragged_sequences_are_padded_with_lengths_and_mask(lengths: list[int],
                                                           width: tuple[int, ...]) -> None:
    seqs = [torch.rand((n, *width)) + 1 for n in lengths]
    batch = gpu.default_collate(seqs)
    if len(set(lengths)) == 1:
        assert isinstance(batch, torch.Tensor)
        return
    assert isinstance(batch, gpu.Padded)
    assert batch.values.shape == (len(seqs), max(lengths), *width)
    assert batch.lengths.tolist() == lengths
    assert batch.mask.sum(1).tolist() == lengths
    for i, s in enumerate(seqs):
        assert torch.equal(batch.values[i, : len(s)], s)
        assert not batch.values[i, len(s):].any()
    out = gpu.trim_padding(batch.values * 2, batch)
    assert [len(o) for o in out] == lengths


def test_split_gives_one_compact_output_per_item() -> None:
    out = torch.arange(12.0).reshape(4, 3)
    rows = gpu.default_split(out, torch.zeros(4, 1))
    assert [r.tolist() for r in rows] == out.tolist()
    assert all(r.untyped_storage().nbytes() == 3 * 4 for r in rows)  # copies, not views
    pairs = gpu.default_split((out, out[:, 0]), torch.zeros(4))
    assert pairs[1][0].tolist() == [3.0, 4.0, 5.0] and pairs[1][1].item() == 3.0
    dicts = gpu.default_split({"a": out, "b": None}, torch.zeros(4))
    assert dicts[2]["a"].tolist() == [6.0, 7.0, 8.0] and dicts[2]["b"] is None
    with pytest.raises(ValueError, match="pass split="):
        gpu.default_split(torch.zeros(3), torch.zeros(4))


# -- the device module ------------------------------------------------------------------------


def test_device_discovery_reads_fakes_and_visible_devices() -> None:
    assert _device.discover_devices({"AMORTUNE_FAKE_GPUS": "3"}).ids == ("0", "1", "2")
    assert _device.discover_devices({"AMORTUNE_FAKE_GPUS": "3"}).fake
    assert _device.discover_devices({"CUDA_VISIBLE_DEVICES": ""}).ids == ()
    assert _device.discover_devices({"CUDA_VISIBLE_DEVICES": "-1"}).ids == ()
    with pytest.raises(ValueError, match="AMORTUNE_FAKE_GPUS"):
        _device.discover_devices({"AMORTUNE_FAKE_GPUS": "two"})
    assert _device.parse_visible_devices("GPU-1a,MIG-2b") == ["GPU-1a", "MIG-2b"]


def test_worker_device_is_fake_with_its_budget() -> None:
    dev = _device.worker_device("1", {"AMORTUNE_FAKE_GPUS": "2", "AMORTUNE_FAKE_GPU_MEMORY": "5e4"})
    assert isinstance(dev, _device.FakeDevice) and dev.memory_bytes == 50_000
    assert _device.worker_device("cpu", {"AMORTUNE_FAKE_GPUS": "2"}).is_cuda is False
    assert type(_device.worker_device("0", {})) is _device.Device


def test_out_of_memory_is_recognised_in_every_form() -> None:
    assert _device.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert _device.is_out_of_memory(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't allocate memory"))
    assert _device.is_out_of_memory(MemoryError())
    assert not _device.is_out_of_memory(RuntimeError("shape mismatch"))


def test_fake_budget_raises_a_real_cuda_out_of_memory_error() -> None:
    dev = _device.FakeDevice("0", 10_000)
    dev.reset_peak()
    with pytest.raises(torch.cuda.OutOfMemoryError, match="fake device 0"), dev.measure():
        torch.zeros(10_000) + 1
    with dev.measure():
        torch.zeros(100) + 1
    assert 0 < (dev.peak_bytes() or 0) <= 10_000


# -- the worker side, in this process ---------------------------------------------------------


def test_the_search_finds_the_limit_a_fake_budget_implies_and_less_for_less() -> None:
    def batch(b: int) -> list[torch.Tensor]:
        return [torch.rand(IN) for _ in range(b)]

    sizes = {}
    for budget in (30_000, 120_000):
        st_ = gpu._WorkerState(make_mlp().eval(), _device.FakeDevice("0", budget),
                               _config(sample=tuple(batch(4))))
        report = gpu._probe(st_, [], None)
        assert report.limited_by == "memory" and report.peak_memory_bytes <= budget
        found = max(s for s, ok, _ in report.trials if ok)
        failed = min(s for s, ok, _ in report.trials if not ok)
        assert failed - found <= max(1, int(found * gpu.BISECT_TOLERANCE))
        assert fits(make_mlp, budget, found, batch) and not fits(make_mlp, budget, failed, batch)
        assert report.batch_size == math.floor(found * (1 - gpu.MARGIN)) == st_.item_cap
        sizes[budget] = report.batch_size
    assert sizes[30_000] < sizes[120_000]


def test_out_of_memory_mid_run_halves_the_batch_and_lowers_the_cap() -> None:
    data = items(40)
    gpu._worker._STATE = gpu._WorkerState(make_mlp().eval(), _device.FakeDevice("0", 5_000),
                                  _config(search=None, item_cap=40))
    result = gpu._run_task(gpu._Task(0, tuple(range(40)), data, None, {}))
    assert result.oom_splits >= 1 and result.item_cap <= math.floor(20 * (1 - gpu.MARGIN))
    assert torch.allclose(torch.stack(gpu._as_list(gpu._unpack(result.outputs))),
                          reference(make_mlp, data), atol=1e-6)
    for _ in range(3):  # each further out-of-memory error lowers the cap by the margin again
        result = gpu._run_task(gpu._Task(0, tuple(range(40)), data, None, {}))
    assert fits(make_mlp, 5_000, result.item_cap, lambda b: data[:b])
    settled = result.oom_splits
    result = gpu._run_task(gpu._Task(0, tuple(range(40)), data, None, {}))
    assert result.oom_splits == settled  # no further splits once the cap fits


def test_an_item_too_large_alone_is_a_typed_error() -> None:
    gpu._worker._STATE = gpu._WorkerState(make_mlp().eval(), _device.FakeDevice("3", 100),
                                  _config(search=None, item_cap=4))
    with pytest.raises(gpu.ItemTooLargeError) as info:
        gpu._run_task(gpu._Task(0, (7, 8), items(2), None, {}))
    assert info.value.device == "3" and info.value.failed_indices == (7,)
    assert isinstance(info.value, MemoryError) and len(info.value.failed_sequences) == 1


@pytest.fixture(autouse=True)
def _reset_worker_state():
    yield
    gpu._worker._STATE = None


# -- one CPU worker, in this process ------------------------------------------------------------


class BatchLog:
    """A predict that records each batch's size (and padded width) and can refuse big ones with
    the CPU allocator's out-of-memory error."""

    def __init__(self, refuse_above: int | None = None) -> None:
        self.sizes: list[int] = []
        self.widths: list[int] = []
        self.refuse_above = refuse_above
        self.refused = 0

    def __call__(self, model: torch.nn.Module, batch):
        n = len(batch)
        if self.refuse_above is not None and n > self.refuse_above:
            self.refused += 1
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 1 bytes")
        self.sizes.append(n)
        if isinstance(batch, gpu.Padded):
            self.widths.append(int(batch.values.shape[1]))
            return model(batch.values, batch.lengths)
        return model(batch)


def test_one_cpu_worker_runs_here_and_its_search_batches_are_part_of_the_result(
        tmp_path: Path) -> None:
    log = tmp_path / "loads.jsonl"
    data = items(3000)
    threads = torch.get_num_threads()
    record = BatchLog()
    out = gpu.map_model(functools.partial(make_mlp, str(log)), data, devices=["cpu"],
                        predict=record)
    assert torch.allclose(torch.stack(out), reference(make_mlp, data), atol=1e-6)
    assert [s["pid"] for s in loads(log)] == [os.getpid()]  # one load, in this process
    assert sum(record.sizes) == len(data)  # no item ran twice: the search timed real batches
    assert record.sizes[0] == gpu.CPU_START_BATCH_SIZE
    assert torch.get_num_threads() == threads
    assert gpu._local.runs_here(["cpu"], None)
    assert not gpu._local.runs_here(["cpu"], 60.0) and not gpu._local.runs_here(["cpu"] * 2, None)
    assert not gpu._local.runs_here(["0"], None)


def test_a_cpu_worker_with_a_timeout_keeps_its_own_process(tmp_path: Path) -> None:
    log = tmp_path / "loads.jsonl"
    data = items(50)
    out = gpu.map_model(functools.partial(make_mlp, str(log)), data, devices=["cpu"],
                        timeout=120)
    assert torch.allclose(torch.stack(out), reference(make_mlp, data), atol=1e-6)
    (seen,) = loads(log)
    assert seen["pid"] != os.getpid() and seen["visible"] == ""


def test_the_search_on_the_input_reruns_what_ran_out_of_memory_and_keeps_a_margin() -> None:
    data = items(20000)
    record = BatchLog(refuse_above=50)
    st_ = gpu._WorkerState(make_mlp().eval(), _device.Device("cpu"),
                           _config(predict=record, item_cap=4096))
    done: list[tuple[int, int]] = []
    outputs: list[torch.Tensor] = []

    def task(a: int, b: int) -> gpu._Task:
        return gpu._Task(0, tuple(range(a, b)), data[a:b], None, {})

    def emit(a: int, b: int, parts) -> None:
        done.append((a, b))
        outputs.extend(v for p in parts for v in gpu._as_list(p))

    report, cursor = gpu._local.search_on_input(st_, None, 0, len(data), task, emit)
    assert report is not None and report.limited_by == "memory"
    assert report.batch_size == st_.item_cap <= math.floor(50 * (1 - gpu.MARGIN))
    assert [a for a, _ in done] == [0] + [b for _, b in done[:-1]] and done[-1][1] == cursor
    assert max(b - a for a, b in done) <= 50
    assert torch.allclose(torch.stack(outputs), reference(make_mlp, data[:cursor]), atol=1e-6)


def test_the_search_on_the_input_stops_when_the_input_runs_out() -> None:
    data = items(30)
    st_ = gpu._WorkerState(make_mlp().eval(), _device.Device("cpu"), _config(item_cap=30))
    done: list[tuple[int, int]] = []
    report, cursor = gpu._local.search_on_input(
        st_, None, 0, len(data), lambda a, b: gpu._Task(0, tuple(range(a, b)), data[a:b], None, {}),
        lambda a, b, parts: done.append((a, b)))
    assert report is None and cursor == 30 and sum(b - a for a, b in done) == 30


def test_out_of_memory_in_this_process_lowers_the_size_for_the_batches_after_it() -> None:
    data = items(400)
    record = BatchLog(refuse_above=10)
    out = gpu.map_model(make_mlp, data, devices=["cpu"], predict=record, batch_size=40)
    assert torch.allclose(torch.stack(out), reference(make_mlp, data), atol=1e-6)
    assert sum(record.sizes) == len(data) and max(record.sizes) <= 10
    assert record.refused <= 10  # ten batches of 40 would each fail three times or more


def test_ragged_sequences_in_this_process_run_longest_first_within_the_token_budget() -> None:
    data = ragged(600, longest=40)
    record = BatchLog()
    out = gpu.map_model(make_conv, data, devices=["cpu"], length=len, predict=record)
    assert torch.allclose(torch.stack(out), conv_reference(data), atol=1e-5)
    assert sum(record.sizes) == len(data)
    assert record.widths == sorted(record.widths, reverse=True)  # longest first
    assert record.widths[0] == max(len(x) for x in data)


def test_a_checkpoint_resumes_in_this_process_too(tmp_path: Path) -> None:
    flag, calls, ckpt = tmp_path / "fail", tmp_path / "calls", tmp_path / "run.ckpt"
    flag.touch()
    data = items(64)
    data[42][0] = FAIL
    predict = functools.partial(failing_predict, str(flag), str(calls))
    with pytest.raises(ValueError, match="a FAIL item") as info:
        gpu.map_model(make_mlp, data, predict=predict, batch_size=8, checkpoint=ckpt,
                      devices=["cpu"])
    assert any("items 40-47" in n and "device cpu" in n for n in info.value.__notes__)
    flag.unlink()
    calls.unlink()
    out = gpu.map_model(make_mlp, data, predict=predict, batch_size=8, checkpoint=ckpt,
                        devices=["cpu"])
    rerun = sorted(int(i) for line in calls.read_text().split("\n") for i in line.split())
    assert rerun == list(range(40, 64))
    assert torch.allclose(torch.stack(out), reference(make_mlp, data), atol=1e-6)


# -- real spawned workers on fake GPUs --------------------------------------------------------


def test_one_model_load_per_worker_each_on_its_own_device_results_in_order(
        fake_gpus, tmp_path: Path) -> None:
    log = tmp_path / "loads.jsonl"
    data = items(300)
    calls: list[tuple[str, float]] = []
    out = gpu.map_model(functools.partial(make_mlp, str(log)), data,
                        progress_callback=lambda phase, frac: calls.append((phase, frac)))
    assert torch.allclose(torch.stack(out), reference(make_mlp, data), atol=1e-6)
    seen = loads(log)
    assert len(seen) == 2 and len({s["pid"] for s in seen}) == 2
    assert sorted(s["visible"] for s in seen) == ["0", "1"]
    assert {(s["slot"], s["visible"]) for s in seen} == {("0", "0"), ("1", "1")}
    assert calls[-1] == ("execute", 1.0)
    assert not torch.cuda.is_initialized()


def test_find_batch_size_in_workers_matches_the_budget_and_shrinks_with_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_device.FAKE_GPUS_ENV, "1")
    sample = items(8)
    found = {}
    for budget in (30_000, 120_000):
        monkeypatch.setenv(_device.FAKE_MEMORY_ENV, str(budget))
        (report,) = gpu.find_batch_size(make_mlp, sample)
        assert report.device == "0" and report.limited_by == "memory"
        assert report.peak_memory_bytes <= budget and report.items_per_second > 0
        in_process = gpu._probe(gpu._WorkerState(
            make_mlp().eval(), _device.FakeDevice("0", budget),
            _config(sample=tuple(sample))), [], None)
        assert report.batch_size == in_process.batch_size
        found[budget] = report.batch_size
    assert found[30_000] < found[120_000]


def test_ragged_sequences_run_longest_first_under_a_found_token_budget(
        fake_gpus, tmp_path: Path) -> None:
    fake_gpus.setenv(_device.FAKE_GPUS_ENV, "1")
    fake_gpus.setenv(_device.FAKE_MEMORY_ENV, "60000")
    data = ragged(120)
    (report,) = gpu.find_batch_size(make_conv, data, length=len)
    assert report.limited_by == "memory" and report.max_tokens >= 40
    out = gpu.map_model(make_conv, data, length=len)
    assert torch.allclose(torch.stack(out), conv_reference(data), atol=1e-5)


def test_out_of_memory_in_a_worker_splits_batches_and_results_stay_right(fake_gpus) -> None:
    fake_gpus.setenv(_device.FAKE_GPUS_ENV, "1")
    fake_gpus.setenv(_device.FAKE_MEMORY_ENV, "20000")
    data = items(200)
    out = gpu.map_model(make_mlp, data, batch_size=100)  # 100 items do not fit in 20 kB
    assert torch.allclose(torch.stack(out), reference(make_mlp, data), atol=1e-6)


def test_a_stuck_batch_restarts_its_worker_on_the_same_device_then_fails_typed(
        fake_gpus, tmp_path: Path) -> None:
    fake_gpus.setenv(_device.FAKE_GPUS_ENV, "1")  # the second try must wait for the replacement
    log = tmp_path / "loads.jsonl"
    data = items(24)
    data[13][0] = STALL
    with pytest.raises(gpu.BatchTimeoutError) as info:
        gpu.map_model(functools.partial(make_mlp, str(log)), data, predict=stalling_predict,
                      batch_size=4, timeout=1.5, retries=1)
    err = info.value
    assert isinstance(err, gpu.ModelBatchError) and isinstance(err, TimeoutError)
    assert isinstance(err.__cause__, TimeoutError)  # the engine's own timeout, kept as cause
    assert err.failed_indices == (12, 13, 14, 15) and len(err.failed_sequences) == 4
    assert err.device == "0" and "device 0" in str(err)
    seen = loads(log)
    assert len(seen) >= 2 and len({s["pid"] for s in seen}) == len(seen)
    assert all(s["visible"] == "0" and s["slot"] == "0" for s in seen)  # same slot, same device


def test_a_dead_worker_batch_runs_again_on_a_replacement(fake_gpus, tmp_path: Path) -> None:
    log, flag = tmp_path / "loads.jsonl", tmp_path / "crash-once"
    flag.touch()
    data = items(40)
    data[21][0] = CRASH
    out = gpu.map_model(functools.partial(make_mlp, str(log)), data, batch_size=8, retries=1,
                        predict=functools.partial(crashing_predict, str(flag)))
    assert torch.allclose(torch.stack(out), reference(make_mlp, data), atol=1e-6)
    assert not flag.exists()
    assert all(s["visible"] == s["slot"] for s in loads(log))


def test_a_worker_that_always_dies_names_the_items_and_device(fake_gpus) -> None:
    data = items(16)
    data[5][0] = CRASH
    with pytest.raises(gpu.ModelWorkerCrashedError) as info:
        gpu.map_model(make_mlp, data, batch_size=4, retries=1,
                      predict=functools.partial(crashing_predict, None))
    assert info.value.failed_indices == (4, 5, 6, 7)
    assert info.value.device in ("0", "1") and info.value.exitcode == 3


def test_a_model_error_keeps_its_type_and_names_the_batch(fake_gpus, tmp_path: Path) -> None:
    flag, calls = tmp_path / "fail", tmp_path / "calls"
    flag.touch()
    data = items(16)
    data[9][0] = FAIL
    with pytest.raises(ValueError, match="a FAIL item") as info:
        gpu.map_model(make_mlp, data, batch_size=4,
                      predict=functools.partial(failing_predict, str(flag), str(calls)))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "items 8-11" in notes and "device" in notes


def test_a_checkpoint_resumes_the_finished_batches_only(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(_device.FAKE_GPUS_ENV, "1")
    monkeypatch.delenv(_device.FAKE_MEMORY_ENV, raising=False)
    flag, calls, ckpt = tmp_path / "fail", tmp_path / "calls", tmp_path / "run.ckpt"
    flag.touch()
    data = items(64)
    data[42][0] = FAIL
    predict = functools.partial(failing_predict, str(flag), str(calls))
    with pytest.raises(ValueError):
        gpu.map_model(make_mlp, data, predict=predict, batch_size=8, checkpoint=ckpt)
    flag.unlink()
    calls.unlink()
    out = gpu.map_model(make_mlp, data, predict=predict, batch_size=8, checkpoint=ckpt)
    rerun = sorted(int(i) for line in calls.read_text().split("\n") for i in line.split())
    assert rerun == list(range(40, 64))  # batches 0-4 came from the checkpoint
    assert torch.allclose(torch.stack(out), reference(make_mlp, data), atol=1e-6)
    changed = list(data)
    changed[3] = torch.zeros(IN)
    with pytest.raises(CheckpointMismatchError, match="input changed"):
        gpu.map_model(make_mlp, changed, predict=predict, batch_size=8, checkpoint=ckpt)


def test_cpu_workers_share_the_cores_and_hide_the_gpus(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(_device.FAKE_GPUS_ENV, raising=False)
    log = tmp_path / "loads.jsonl"
    data = items(100)
    out = gpu.map_model(functools.partial(make_mlp, str(log)), data, devices=["cpu", "cpu"])
    assert torch.allclose(torch.stack(out), reference(make_mlp, data), atol=1e-6)
    seen = loads(log)
    assert len(seen) == 2 and all(s["visible"] == "" for s in seen)
    assert all(s["threads"] == gpu.worker_threads(2) for s in seen)


def test_batcher_runs_batches_on_model_workers(fake_gpus, tmp_path: Path) -> None:
    log = tmp_path / "loads.jsonl"
    data = items(60)
    with gpu.ModelWorkers(functools.partial(make_mlp, str(log)), sample_items=data[:4],
                          max_batch_size=16) as workers, \
            Batcher(workers, max_batch_size=16, max_wait=0.005) as b:
        futures = [b.submit(x) for x in data]
        out = [f.result(120) for f in futures]
    assert torch.allclose(torch.stack(out), reference(make_mlp, data), atol=1e-6)
    assert sorted(s["visible"] for s in loads(log)) == ["0", "1"]


def broken_loader() -> torch.nn.Module:
    raise FileNotFoundError("weights.pt")


def test_a_failing_load_model_keeps_its_type_and_names_the_device(fake_gpus) -> None:
    fake_gpus.setenv(_device.FAKE_GPUS_ENV, "1")
    with pytest.raises(FileNotFoundError, match="weights.pt") as info:
        gpu.map_model(broken_loader, items(4))
    assert any("load_model" in n and "device 0" in n for n in info.value.__notes__)
    assert "broken_loader" in str(info.value.__cause__)  # the worker's traceback


def test_empty_input_and_bad_arguments(fake_gpus) -> None:
    assert gpu.map_model(make_mlp, []) == []
    with pytest.raises(ValueError, match="batch_size"):
        gpu.map_model(make_mlp, items(2), batch_size=0)
    with pytest.raises(ValueError, match="needs length"):
        gpu.map_model(make_mlp, items(2), max_tokens=100)
    with pytest.raises(ValueError, match="devices"):
        gpu.map_model(make_mlp, items(2), devices="tpu")
    with pytest.raises(TypeError, match="load_model"):
        gpu.map_model(None, items(2))


def visible_device(_: object) -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_backend_gpu_gives_each_slot_its_own_device(fake_gpus) -> None:
    from amortune.backends import ChunkTask, FunctionRef, resolve_backend

    backend = resolve_backend("gpu", n_jobs=None, config=None)
    try:
        assert [s.devices for s in backend.info().slots] == [("0",), ("1",)]
        futures = [backend.submit(ChunkTask(FunctionRef(visible_device), [i], i, "item", 60.0))
                   for i in range(2)]
        seen = {f.result(120).results[0] for f in futures}
        assert seen <= {"0", "1"} and seen
    finally:
        backend.shutdown()


def test_importing_the_gpu_mode_loads_no_torch() -> None:
    code = ("import sys, amortune.gpu, amortune._batcher, amortune._device; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 25), min_size=1, max_size=30),
       max_tokens=st.integers(25, 200))
def test_token_packed_ragged_batches_equal_one_item_at_a_time(lengths: list[int],
                                                               max_tokens: int) -> None:
    assume(len(set(lengths)) > 1)
    data = [torch.rand(n) for n in lengths]
    gpu._worker._STATE = gpu._WorkerState(make_conv().eval(), _device.FakeDevice("0"),
                                  _config(search=None, item_cap=1 << 10, token_cap=max_tokens,
                                          sequences=True))
    order = sorted(range(len(data)), key=lambda i: -lengths[i])
    task = gpu._Task(0, tuple(order), [data[i] for i in order], [lengths[i] for i in order], {})
    result = gpu._run_task(task)
    outputs = gpu._as_list(gpu._unpack(result.outputs))
    got = torch.stack([outputs[order.index(i)] for i in range(len(data))])
    assert torch.allclose(got, conv_reference(data), atol=1e-5)


# -- real CUDA --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_gpus_run_map_model_and_report_their_memory(tmp_path: Path) -> None:
    log = tmp_path / "loads.jsonl"
    data = items(2000)
    reports = gpu.find_batch_size(make_mlp, data[:16], max_batch_size=1 << 14)
    assert reports and all(r.batch_size >= 1 and r.peak_memory_bytes for r in reports)
    out = gpu.map_model(functools.partial(make_mlp, str(log)), data)
    assert torch.allclose(torch.stack(out), reference(make_mlp, data), atol=1e-4)
    assert len(loads(log)) == len(reports)
