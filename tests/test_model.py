"""The cost model on synthetic measurements: table-driven decisions and property tests.

No processes, no clock: every profile and machine here is made up, so each decision is a pure
function of the numbers written in the test.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amortune import _model
from amortune._model import (
    MIN_CHUNKS_PER_WORKER,
    MIN_SPEEDUP,
    Costs,
    Decision,
    WorkloadProfile,
    decide,
    estimate_safe_batch_size_for,
    predict_process_seconds,
    predict_thread_seconds,
    project_rising_costs,
)
from amortune._record import FrozenInstanceError, replace

GiB = 1 << 30
MiB = 1 << 20
TWO_CORES = Costs(usable_cores=2, available_memory_bytes=8 * GiB)


def profile(
    item_wall_seconds: float,
    *,
    cpu_share: float = 1.0,
    n_sampled: int = 10,
    **extra: float | bool | str,
) -> WorkloadProfile:
    """A profile of ``n_sampled`` identical items of ``item_wall_seconds`` each."""
    fields: dict[str, object] = {
        "in_bytes": 30.0,
        "out_bytes": 30.0,
        "pickle_in_seconds": 1e-6,
        "pickle_out_seconds": 1e-6,
        "result_memory_bytes": 32.0,
    }
    fields.update(extra)
    return WorkloadProfile(
        n_sampled=n_sampled,
        sampled_wall_seconds=n_sampled * item_wall_seconds,
        item_wall_seconds=item_wall_seconds,
        item_cpu_seconds=cpu_share * item_wall_seconds,
        **fields,  # type: ignore[arg-type]
    )


CPU_2MS = profile(0.002)
SLEEP_5MS = profile(0.005, cpu_share=0.01, n_sampled=4)


# -- table-driven decisions ---------------------------------------------------------------------
DECISIONS = [
    # (id, profile, items left, costs, expected executor)
    ("1us-200k-items", profile(1e-6, n_sampled=64), 200_000 - 64, TWO_CORES, "serial"),
    ("2ms-cpu-1000-items-2-cores", CPU_2MS, 990, TWO_CORES, "processes"),
    ("5ms-sleep-400-items", SLEEP_5MS, 396, TWO_CORES, "threads"),
    (
        "1MiB-results-cheap-compute",
        profile(1e-4, out_bytes=MiB, pickle_out_seconds=2e-4, result_memory_bytes=MiB),
        980,
        TWO_CORES,
        "serial",
    ),
    (
        "1MiB-results-unmeasured-pickling",  # transfer alone (pipe bandwidth) must rule it out
        profile(1e-4, out_bytes=MiB, pickle_out_seconds=0.0, result_memory_bytes=MiB),
        980,
        TWO_CORES,
        "serial",
    ),
    ("1MiB-inputs-cheap-compute", profile(1e-4, in_bytes=MiB, pickle_in_seconds=2e-4), 980,
     TWO_CORES, "serial"),
    ("1MiB-inputs-unmeasured-pickling", profile(1e-4, in_bytes=MiB, pickle_in_seconds=0.0), 980,
     TWO_CORES, "serial"),
    ("1-core-cpu-bound", CPU_2MS, 990, replace(TWO_CORES, usable_cores=1), "serial"),
    ("1-core-heavy-cpu", profile(0.5), 10_000, replace(TWO_CORES, usable_cores=1),
     "serial"),
    ("unpicklable-cpu-bound", profile(0.002, picklable=False, not_picklable_reason="lock"), 990,
     TWO_CORES, "serial"),
    ("nothing-left", CPU_2MS, 0, TWO_CORES, "serial"),
    ("one-item-left", CPU_2MS, 1, TWO_CORES, "serial"),
]


@pytest.mark.parametrize(
    "p, n_items, costs, expected", [d[1:] for d in DECISIONS], ids=[d[0] for d in DECISIONS]
)
def test_decision_table(p: WorkloadProfile, n_items: int, costs: Costs, expected: str) -> None:
    d = decide(p, n_items, costs)
    assert d.executor == expected, d.reasons
    assert d.reasons, "every decision says why"
    if expected == "serial":
        assert d.n_jobs == 1
        assert d.estimated_speedup == pytest.approx(1.0)


def test_cpu_bound_on_two_cores_uses_both_with_target_sized_chunks() -> None:
    remaining = 990
    d = decide(CPU_2MS, remaining, TWO_CORES)
    assert (d.executor, d.n_jobs) == ("processes", 2)
    per_item = CPU_2MS.item_wall_seconds + CPU_2MS.pickle_in_seconds + CPU_2MS.pickle_out_seconds
    chunk_seconds = d.chunksize * per_item
    target = TWO_CORES.target_chunk_seconds
    # As close to the target as whole items allow, never over it.
    assert chunk_seconds <= target < chunk_seconds + per_item
    assert math.ceil(remaining / d.chunksize) >= MIN_CHUNKS_PER_WORKER * d.n_jobs
    assert 1.2 < d.estimated_speedup <= 2.0
    assert d.thread_cap == 1
    assert any("processes" in r and "chunks of" in r for r in d.reasons)


def test_chunksize_follows_target_chunk_seconds() -> None:
    small = decide(CPU_2MS, 100_000, replace(TWO_CORES, target_chunk_seconds=0.01))
    large = decide(CPU_2MS, 100_000, replace(TWO_CORES, target_chunk_seconds=0.2))
    assert small.executor == large.executor == "processes"
    assert small.chunksize == 4
    assert large.chunksize == 99


def test_few_items_get_at_least_min_chunks_per_worker() -> None:
    # 2 ms items would fill a 1 s chunk with 499; with 200 items that would leave a worker idle.
    d = decide(CPU_2MS, 200, replace(TWO_CORES, target_chunk_seconds=1.0))
    assert d.executor == "processes"
    assert d.chunksize == math.ceil(200 / (MIN_CHUNKS_PER_WORKER * d.n_jobs))


def test_sleep_like_items_use_many_threads() -> None:
    d = decide(SLEEP_5MS, 396, TWO_CORES)
    assert d.executor == "threads"
    assert d.n_jobs > TWO_CORES.usable_cores
    assert d.n_jobs >= 16
    assert d.n_jobs <= TWO_CORES.max_threads
    assert d.thread_cap is None
    assert any("threads" in r and "1%" in r for r in d.reasons)


def test_threads_respect_max_threads() -> None:
    d = decide(SLEEP_5MS, 396, replace(TWO_CORES, max_threads=8))
    assert d.executor == "threads"
    assert d.n_jobs <= 8


def test_one_thread_allowed_means_no_threads() -> None:
    d = decide(SLEEP_5MS, 396, replace(TWO_CORES, usable_cores=1, max_threads=1))
    assert d.executor == "serial"


def test_unpicklable_never_uses_processes_and_says_why() -> None:
    p = profile(0.002, picklable=False, not_picklable_reason="TypeError: cannot pickle lock")
    d = decide(p, 100_000, replace(TWO_CORES, usable_cores=16))
    assert d.executor != "processes"
    assert any("cannot be pickled" in r and "cannot pickle lock" in r for r in d.reasons)


def test_unpicklable_io_bound_may_still_use_threads() -> None:
    p = replace(SLEEP_5MS, picklable=False, not_picklable_reason="lock")
    assert decide(p, 396, TWO_CORES).executor == "threads"


def test_warm_pool_lowers_predicted_time() -> None:
    cold = decide(CPU_2MS, 990, TWO_CORES)
    warm = decide(CPU_2MS, 990, replace(TWO_CORES, warm_workers=2))
    assert cold.executor == warm.executor == "processes"
    assert warm.predicted_seconds < cold.predicted_seconds
    assert warm.estimated_speedup > cold.estimated_speedup


def test_warm_pool_can_tip_a_marginal_workload_to_processes() -> None:
    # Expensive cold start (spawn-like): not worth it cold, worth it with workers already up.
    costs = replace(TWO_CORES, process_start_seconds=0.2, per_worker_start_seconds=0.1)
    p = profile(0.002)
    assert decide(p, 300, costs).executor == "serial"
    assert decide(p, 300, replace(costs, warm_workers=2)).executor == "processes"



def test_imports_a_fresh_process_has_not_paid_can_keep_a_small_job_serial() -> None:
    # 24 items of 3.35 ms (a generator's rest): 80 ms serially, ~60 ms on two fork workers once
    # the engine is loaded; the 30 ms the first parallel run imports tip it back to serial.
    p = profile(0.00335, n_sampled=6)
    fork = replace(TWO_CORES, process_start_seconds=0.01, per_worker_start_seconds=0.003)
    loaded = decide(p, 24, fork)
    assert loaded.executor == "processes"
    assert not any("of imports" in r for r in loaded.reasons)
    fresh = decide(p, 24, replace(fork, process_import_seconds=0.03, thread_import_seconds=0.005))
    assert fresh.executor == "serial"
    big = decide(p, 2400, replace(fork, process_import_seconds=0.03))
    assert big.executor == "processes"
    assert any("30 ms of imports" in r for r in big.reasons)
    assert big.predicted_seconds == pytest.approx(decide(p, 2400, fork).predicted_seconds + 0.03)

# -- memory -------------------------------------------------------------------------------------
def test_total_result_memory_over_budget_warns_with_advice() -> None:
    p = profile(0.002, result_memory_bytes=10 * MiB)
    d = decide(p, 990, TWO_CORES)  # 1000 x 10 MiB = 9.8 GiB > 50% of 8 GiB
    (warning,) = d.warnings
    assert "Result memory exceeds safety threshold" in warning
    assert f"batch_size={d.batch_size}" in warning
    assert d.batch_size == estimate_safe_batch_size_for(10 * MiB, 0.5, 8 * GiB) == 409


def test_result_memory_within_budget_does_not_warn() -> None:
    p = profile(0.002, result_memory_bytes=1 * MiB)
    d = decide(p, 990, TWO_CORES)  # ~1 GiB of 4 GiB budget
    assert d.warnings == ()
    assert d.batch_size == 1000  # capped at the number of items


def test_unknown_length_never_claims_the_total_exceeds() -> None:
    p = profile(0.002, result_memory_bytes=10 * MiB)
    d = decide(p, 4096, TWO_CORES, n_items_known=False)
    assert not any("exceeds" in w for w in d.warnings)
    assert d.batch_size == 409


def test_single_result_over_budget_warns_and_caps_workers() -> None:
    p = profile(0.002, result_memory_bytes=5 * GiB)
    d = decide(p, 990, TWO_CORES)
    assert any("Result memory exceeds safety threshold" in w for w in d.warnings)
    assert any("single result" in w and "larger than the memory budget" in w for w in d.warnings)
    assert d.batch_size == 1
    assert d.executor == "serial"
    assert any("memory allows 1 worker" in r for r in d.reasons)


def test_worker_footprint_caps_n_jobs_with_a_reason() -> None:
    costs = Costs(usable_cores=8, available_memory_bytes=200 * MiB)  # budget 100 MiB, 48 MiB each
    d = decide(CPU_2MS, 990, costs)
    assert d.executor == "processes"
    assert d.n_jobs == 2
    assert any("memory allows 2 worker(s)" in r for r in d.reasons)
    roomy = decide(CPU_2MS, 990, replace(costs, available_memory_bytes=64 * GiB))
    assert roomy.n_jobs > 2
    assert not any("memory allows" in r for r in roomy.reasons)


# -- estimate_safe_batch_size_for (the documented formula) --------------------------------------------
@pytest.mark.parametrize(
    "result_size, fraction, available, expected",
    [
        (10e6, 0.5, 16e9, 800),  # the documented example: 8000 MB / 10 MB = 800 items
        (10 * MiB, 0.5, 16 * GiB, 819),  # the same in binary units (the doctest)
        (10 * MiB, 1.0, 16 * GiB, 1638),
        (3, 0.5, 10, 1),
        (100, 0.5, 10, 1),  # never below 1
        (1, 1.0, 1000, 1000),
    ],
)
def test_estimate_safe_batch_size_formula(
    result_size: float, fraction: float, available: float, expected: int
) -> None:
    assert estimate_safe_batch_size_for(result_size, fraction, int(available)) == expected


def test_estimate_safe_batch_size_zero_result_is_unbounded_but_positive() -> None:
    assert estimate_safe_batch_size_for(0, 0.5, 8 * GiB) >= 1
    assert estimate_safe_batch_size_for(0, 0.5, 0) == 1


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, 50, float("nan")])
def test_estimate_safe_batch_size_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="max_memory_percent"):
        estimate_safe_batch_size_for(1024, fraction, GiB)


def test_estimate_safe_batch_size_rejects_negative_size() -> None:
    with pytest.raises(ValueError, match="result_size_bytes"):
        estimate_safe_batch_size_for(-1, 0.5, GiB)


# -- pinned choices -----------------------------------------------------------------------------
def test_pinned_n_jobs_is_honoured() -> None:
    d = decide(CPU_2MS, 990, replace(TWO_CORES, usable_cores=8), n_jobs=3)
    assert d.n_jobs == 3
    assert any("as requested" in r for r in d.reasons)


def test_pinned_n_jobs_one_means_serial() -> None:
    d = decide(CPU_2MS, 990, TWO_CORES, n_jobs=1)
    assert (d.executor, d.n_jobs) == ("serial", 1)


@pytest.mark.parametrize("executor", ["serial", "processes", "threads"])
def test_pinned_executor_is_honoured(executor: str) -> None:
    d = decide(profile(1e-6, n_sampled=64), 100_000, TWO_CORES, executor=executor)
    assert d.executor == executor
    assert d.chunksize >= 1


def test_pinned_executor_and_n_jobs_beyond_the_candidates() -> None:
    d = decide(CPU_2MS, 990, TWO_CORES, executor="processes", n_jobs=5)
    assert (d.executor, d.n_jobs) == ("processes", 5)
    d = decide(SLEEP_5MS, 396, TWO_CORES, executor="threads", n_jobs=3)
    assert (d.executor, d.n_jobs) == ("threads", 3)


def test_pinned_chunksize_is_honoured_and_repredicted() -> None:
    free = decide(CPU_2MS, 990, TWO_CORES)
    pinned = decide(CPU_2MS, 990, TWO_CORES, chunksize=7)
    assert pinned.executor == free.executor == "processes"
    assert pinned.chunksize == 7
    assert pinned.predicted_seconds != free.predicted_seconds
    expected = CPU_2MS.sampled_wall_seconds + predict_process_seconds(
        CPU_2MS, 990, pinned.n_jobs, 7, TWO_CORES
    )
    assert pinned.predicted_seconds == pytest.approx(expected)


def test_pinned_executor_with_default_chunksize_is_not_one_item_per_chunk() -> None:
    # Pinning only the worker count should not fall back to one item per chunk (150 us dispatch
    # each); the chunk rule that applies when nothing is pinned should still size the chunks.
    d = decide(profile(1e-5), 100_000, TWO_CORES, executor="processes", n_jobs=3)
    assert d.chunksize > 1


def test_estimated_speedup_is_serial_over_predicted() -> None:
    for p, n in ((CPU_2MS, 990), (SLEEP_5MS, 396), (profile(1e-6), 10_000)):
        d = decide(p, n, TWO_CORES)
        assert d.estimated_speedup == pytest.approx(d.predicted_serial_seconds / d.predicted_seconds)
        assert d.predicted_serial_seconds == pytest.approx(
            p.sampled_wall_seconds + n * p.item_wall_seconds
        )


def test_decision_depends_only_on_the_numbers() -> None:
    """No hidden input (such as "numpy is imported"): same numbers, same decision."""
    params = list(inspect.signature(decide).parameters)
    assert params == ["p", "n_items", "costs", "n_items_known", "n_jobs", "chunksize", "executor"]
    first = decide(CPU_2MS, 990, TWO_CORES)
    import numpy  # noqa: F401  # importing numpy must not change anything

    assert decide(CPU_2MS, 990, TWO_CORES) == first
    # Equal numbers built separately give an equal decision.
    assert decide(replace(CPU_2MS), 990, replace(TWO_CORES)) == first


def test_model_module_is_pure() -> None:
    """The model imports only ``math`` and the record helper: no clock, no OS, no I/O."""
    import ast

    tree = ast.parse(inspect.getsource(_model))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "math", "_record"}, imported


def test_decision_is_frozen() -> None:
    d = decide(CPU_2MS, 990, TWO_CORES)
    assert isinstance(d, Decision)
    with pytest.raises(FrozenInstanceError):
        d.n_jobs = 4  # type: ignore[misc]


# -- properties ---------------------------------------------------------------------------------
@st.composite
def profiles(draw: st.DrawFn) -> WorkloadProfile:
    n = draw(st.integers(1, 200))
    wall = draw(st.floats(1e-8, 2.0))
    return WorkloadProfile(
        n_sampled=n,
        sampled_wall_seconds=n * wall,
        item_wall_seconds=wall,
        item_cpu_seconds=wall * draw(st.floats(0.0, 1.0)),
        item_wall_cv=draw(st.floats(0.0, 5.0)),
        max_item_wall_seconds=wall,
        in_bytes=draw(st.floats(0.0, 1e8)),
        out_bytes=draw(st.floats(0.0, 1e8)),
        pickle_in_seconds=draw(st.floats(0.0, 0.05)),
        pickle_out_seconds=draw(st.floats(0.0, 0.05)),
        result_memory_bytes=draw(st.one_of(st.just(0.0), st.floats(1.0, 1e10))),
        picklable=draw(st.booleans()),
        not_picklable_reason="x",
    )


@st.composite
def machines(draw: st.DrawFn) -> Costs:
    return Costs(
        usable_cores=draw(st.integers(1, 256)),
        available_memory_bytes=draw(st.integers(1 << 20, 1 << 42)),
        memory_fraction=draw(st.floats(0.01, 1.0)),
        process_start_seconds=draw(st.floats(0.0, 1.0)),
        per_worker_start_seconds=draw(st.floats(0.0, 0.1)),
        warm_workers=draw(st.integers(0, 256)),
        max_threads=draw(st.integers(1, 256)),
        target_chunk_seconds=draw(st.floats(1e-4, 2.0)),
    )


items = st.integers(0, 10**8)


@settings(max_examples=300, deadline=None)
@given(p=profiles(), n=items, costs=machines(), known=st.booleans())
def test_decision_invariants(p: WorkloadProfile, n: int, costs: Costs, known: bool) -> None:
    d = decide(p, n, costs, n_items_known=known)
    assert d.executor in ("serial", "processes", "threads")
    assert d.chunksize >= 1
    assert d.batch_size >= 1
    assert d.n_jobs >= 1
    assert d.predicted_seconds >= 0
    assert d.predicted_serial_seconds >= 0
    assert d.reasons
    if d.executor == "serial":
        assert d.n_jobs == 1
        assert d.predicted_seconds == pytest.approx(d.predicted_serial_seconds)
    else:
        # Parallel must beat serial by MIN_SPEEDUP on the part still to run.
        rest = d.predicted_seconds - p.sampled_wall_seconds
        serial_rest = d.predicted_serial_seconds - p.sampled_wall_seconds
        assert rest * MIN_SPEEDUP <= serial_rest * (1 + 1e-9)
        assert d.estimated_speedup >= 1.0
        assert d.chunksize <= max(1, math.ceil(n / (MIN_CHUNKS_PER_WORKER * d.n_jobs)))
    if d.executor == "processes":
        assert p.picklable
        assert 2 <= d.n_jobs <= costs.usable_cores
        assert d.thread_cap is not None and d.thread_cap * d.n_jobs <= costs.usable_cores
    if d.executor == "threads":
        assert 2 <= d.n_jobs <= costs.max_threads
    if costs.usable_cores == 1:
        assert d.executor != "processes"
    if known:
        assert d.batch_size <= max(1, n + p.n_sampled)


@settings(max_examples=200, deadline=None)
@given(p=profiles(), n=items, costs=machines(), pin=st.data())
def test_pinned_invariants(p: WorkloadProfile, n: int, costs: Costs, pin: st.DataObject) -> None:
    n_jobs = pin.draw(st.one_of(st.none(), st.integers(1, 64)))
    chunksize = pin.draw(st.one_of(st.none(), st.integers(1, 10_000)))
    executor = pin.draw(st.sampled_from([None, "serial", "processes", "threads"]))
    d = decide(p, n, costs, n_jobs=n_jobs, chunksize=chunksize, executor=executor)
    assert d.chunksize >= 1 and d.batch_size >= 1 and d.predicted_seconds >= 0
    if executor is not None:
        assert d.executor == executor
    if n_jobs is not None and d.executor != "serial":
        assert d.n_jobs == n_jobs
    if chunksize is not None and d.executor != "serial":
        assert d.chunksize == chunksize


@settings(max_examples=200, deadline=None)
@given(p=profiles(), n=items, costs=machines(), factor=st.floats(1.0, 100.0))
def test_more_work_per_item_never_predicts_less_time(
    p: WorkloadProfile, n: int, costs: Costs, factor: float
) -> None:
    heavier = replace(
        p,
        item_wall_seconds=p.item_wall_seconds * factor,
        item_cpu_seconds=p.item_cpu_seconds * factor,
        sampled_wall_seconds=p.sampled_wall_seconds * factor,
    )
    light, heavy = decide(p, n, costs), decide(heavier, n, costs)
    assert heavy.predicted_serial_seconds >= light.predicted_serial_seconds
    jobs = max(1, min(costs.usable_cores, 64))
    for c in (1, 7, 1000):
        assert predict_process_seconds(heavier, n, jobs, c, costs) >= predict_process_seconds(
            p, n, jobs, c, costs
        )
        assert predict_thread_seconds(heavier, n, 8, c) >= predict_thread_seconds(p, n, 8, c)


@settings(max_examples=200, deadline=None)
@given(p=profiles(), n=items, costs=machines(), n_jobs=st.integers(1, 256),
       chunksize=st.integers(1, 10**6), more=st.integers(0, 256))
def test_warmer_pool_never_predicts_more_time(
    p: WorkloadProfile, n: int, costs: Costs, n_jobs: int, chunksize: int, more: int
) -> None:
    warmer = replace(costs, warm_workers=costs.warm_workers + more)
    t_cold = predict_process_seconds(p, n, n_jobs, chunksize, costs)
    t_warm = predict_process_seconds(p, n, n_jobs, chunksize, warmer)
    assert 0 <= t_warm <= t_cold
    assert decide(p, n, warmer).predicted_seconds <= decide(p, n, costs).predicted_seconds * (
        1 + 1e-9
    )


@settings(max_examples=200, deadline=None)
@given(p=profiles(), n=items, costs=machines(), n_jobs=st.integers(1, 256),
       chunksize=st.integers(1, 10**6))
def test_predictions_are_non_negative(
    p: WorkloadProfile, n: int, costs: Costs, n_jobs: int, chunksize: int
) -> None:
    assert predict_process_seconds(p, n, n_jobs, chunksize, costs) >= 0
    assert predict_thread_seconds(p, n, n_jobs, chunksize) >= 0
    assert predict_process_seconds(p, 0, n_jobs, chunksize, costs) == 0
    assert predict_thread_seconds(p, 0, n_jobs, chunksize) == 0


@settings(max_examples=100, deadline=None)
@given(size=st.floats(1.0, 1e12), fraction=st.floats(0.001, 1.0),
       available=st.integers(0, 1 << 44))
def test_estimate_safe_batch_size_fits_the_budget(
    size: float, fraction: float, available: int
) -> None:
    b = estimate_safe_batch_size_for(size, fraction, available)
    assert b >= 1
    if b > 1:
        assert b * size <= fraction * available * (1 + 1e-9)
        assert (b + 1) * size > fraction * available * (1 - 1e-9)


def test_the_first_look_uses_the_models_constants() -> None:
    from amortune import _model, _quick

    assert _quick.PIPE_BYTES_PER_SECOND == _model.PIPE_BYTES_PER_SECOND
    assert _quick.MIN_SPEEDUP == _model.MIN_SPEEDUP
    assert _quick.ENGINE_IMPORT_SECONDS == _model.ENGINE_IMPORT_SECONDS
    assert _quick.THREAD_IMPORT_SECONDS == _model.THREAD_IMPORT_SECONDS
    assert _quick.PARALLEL_FLOOR_SECONDS == _model.PARALLEL_FLOOR_SECONDS


def test_items_under_the_first_looks_floor_never_go_parallel() -> None:
    # The first look keeps items cheaper than MIN_PARALLEL_ITEM_SECONDS in the caller however
    # long the input; the model agrees, even for ten million items on a warm pool.
    from amortune._model import Costs, WorkloadProfile, decide
    from amortune._quick import MIN_PARALLEL_ITEM_SECONDS

    t = MIN_PARALLEL_ITEM_SECONDS * 0.99
    profile = WorkloadProfile(n_sampled=64, sampled_wall_seconds=64 * t, item_wall_seconds=t,
                              item_cpu_seconds=t, in_bytes=5, out_bytes=5,
                              pickle_in_seconds=0.5e-6, pickle_out_seconds=0.5e-6)
    costs = Costs(usable_cores=8, available_memory_bytes=16 << 30, process_start_seconds=0.0,
                  per_worker_start_seconds=0.0, warm_workers=8)
    assert decide(profile, 10_000_000, costs).executor == "serial"


def test_the_first_look_keeps_cheap_items_in_the_caller_even_with_a_warm_pool() -> None:
    from amortune._quick import quick_serial

    now = [0.0]

    def cheap(x: int) -> int:
        now[0] += 0.5e-6
        return x

    got = quick_serial(cheap, range(200_000), threshold_seconds=0.01, clock=lambda: now[0],
                       cpu_clock=lambda: now[0])
    assert got is not None and got.rest is None and len(got.results) == 200_000


@pytest.mark.parametrize(("cpu_share", "handed_over"), [(1.0, False), (0.02, True)])
def test_the_first_look_hands_waiting_items_to_threads_sooner(cpu_share: float,
                                                               handed_over: bool) -> None:
    """20 items of 5 ms: 100 ms in all, under the 120 ms a fresh process's workers must beat,
    but far over what threads cost to start when the items wait (sleep, I/O)."""
    from amortune._quick import quick_serial

    wall, cpu = [0.0], [0.0]

    def item(x: int) -> int:
        wall[0] += 0.005
        cpu[0] += 0.005 * cpu_share
        return x

    got = quick_serial(item, range(20), threshold_seconds=0.12, waiting_threshold_seconds=0.018,
                       clock=lambda: wall[0], cpu_clock=lambda: cpu[0])
    assert got is not None
    if handed_over:
        assert got.rest is not None and got.n_rest == 18 and got.cpu_share == pytest.approx(0.02)
        assert got.results == [0, 1] and list(got.rest) == list(range(2, 20))
    else:
        assert got.rest is None and got.results == list(range(20))


def test_plans_count_the_imports_a_parallel_run_has_not_paid_yet() -> None:
    import json
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import json, amortune
        from tests import tasks
        data = [0.004] * 300
        plans = [amortune.optimize(tasks.sleep_then_return, data) for _ in range(2)]
        amortune.execute(tasks.sleep_then_return, data[:50], executor="threads")
        plans.append(amortune.optimize(tasks.sleep_then_return, data))
        print(json.dumps([[r for r in p.reasons if "imports this process pays once" in r]
                          for p in plans] + [p.executor for p in plans]))
    """)
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120, check=True)
    first, second, after_a_run, *executors = json.loads(out.stdout)
    assert executors == ["threads"] * 3
    # Planning imports no backend: until a run has, every plan counts what it will cost.
    assert first and second and not after_a_run


# -- costs that rise along the input ------------------------------------------------------------
def rising(r: float = 0.97, slope: float = 5e-6) -> WorkloadProfile:
    """The cheap head of an input whose costs grow: 60 items averaging 0.1 ms, rising."""
    return profile(1e-4, n_sampled=60, item_wall_slope=slope, item_wall_trend_r=r)


def test_a_rising_head_is_projected_onto_the_rest_and_goes_parallel() -> None:
    d = decide(rising(), 300, TWO_CORES)
    flat = decide(profile(1e-4, n_sampled=60), 300, TWO_CORES)
    assert flat.executor == "serial" and d.executor == "processes"
    assert d.predicted_serial_seconds > 5 * flat.predicted_serial_seconds
    assert any("grow along the input" in r for r in d.reasons)


def test_no_projection_without_a_clear_trend_or_a_known_length() -> None:
    for p in (rising(r=0.7), rising(slope=-5e-6), replace(rising(), n_sampled=6)):
        assert project_rising_costs(p, 300) == (p, 1.0)
    flat = decide(profile(1e-4, n_sampled=60), 300, TWO_CORES)
    unknown = decide(rising(), 300, TWO_CORES, n_items_known=False)  # 300 is only a lower bound
    assert unknown.executor == flat.executor == "serial"


def test_a_trend_the_first_look_measured_is_projected_from_a_sample_too_short_to_fit_one() -> None:
    """Early workers cut the sample to ~3 items: the first look's rise (32 items) stands in."""
    short = profile(1.7e-3, n_sampled=3, item_wall_slope=1.3e-5)
    assert project_rising_costs(short, 470) == (short, 1.0)  # 3 items fit no trend
    measured = replace(short, trend_items=32)
    projected, factor = project_rising_costs(measured, 470)
    assert projected.item_wall_seconds == pytest.approx(1.7e-3 + 1.3e-5 * (3 + 470) / 2)
    assert factor > 2
    d = decide(measured, 470, TWO_CORES)
    assert any("(13.0 µs more each item over the first 32 items)" in r for r in d.reasons)
    assert d.predicted_serial_seconds == pytest.approx(
        measured.sampled_wall_seconds + 470 * projected.item_wall_seconds)
    assert project_rising_costs(replace(measured, trend_items=6), 470)[1] == 1.0  # too few


@given(slope=st.floats(1e-9, 1.0), n=st.integers(10, 500), m=st.integers(1, 100_000),
       wall=st.floats(1e-7, 1.0))
def test_a_projection_never_exceeds_a_line_through_zero_cost(slope: float, n: int, m: int,
                                                              wall: float) -> None:
    p = profile(wall, n_sampled=n, item_wall_slope=slope, item_wall_trend_r=0.99)
    projected, factor = project_rising_costs(p, m)
    assert 1.0 <= factor <= 2 + m / n + 1e-9
    assert projected.item_wall_seconds == pytest.approx(wall * factor)
    assert projected.max_item_wall_seconds >= projected.item_wall_seconds or factor == 1.0


def _rising_first_look(n: int, per_index: float, noise: tuple[float, ...] = (1.0,)) -> Any:
    """The first look over ``n`` items whose cost is ``per_index * i`` seconds (times a
    repeating ``noise`` factor), on a fake clock."""
    from amortune._quick import quick_serial

    now = [0.0]

    def item(i: int) -> int:
        now[0] += per_index * i * noise[i % len(noise)]
        return i

    return quick_serial(item, range(n), threshold_seconds=0.12, clock=lambda: now[0],
                        cpu_clock=lambda: now[0])


def test_the_first_look_projects_costs_that_rise_along_the_input() -> None:
    """Costs 0 -> 8 ms over 600 items: the cheap head hands over at a rate that says ~0.2 s are
    left, the projection says what is really left (~2.4 s) and sizes chunks by it."""
    per_index = 0.008 / 600
    got = _rising_first_look(600, per_index)
    assert got.rest is not None and got.n_rest is not None
    start = len(got.results)
    exact = sum(per_index * i for i in range(start, 600))
    assert got.growth == pytest.approx(per_index, rel=0.05)
    assert got.seconds_of(start, got.n_rest) == pytest.approx(exact, rel=0.05)
    assert got.item_seconds * got.n_rest < exact / 5  # the latest rate alone is far too low
    n = got.items_within(start, 0.05)
    assert sum(per_index * i for i in range(start, start + n)) == pytest.approx(0.05, rel=0.1)


@pytest.mark.parametrize("noise", [(1.0,), (1.0, 1.3, 0.8, 1.1), (1.4, 0.7)])
def test_flat_costs_with_noise_are_not_taken_for_a_trend(noise: tuple[float, ...]) -> None:
    from amortune._quick import quick_serial

    now, k = [0.0], [0]

    def item(i: int) -> int:
        now[0] += 0.002 * noise[k[0] % len(noise)]
        k[0] += 1
        return i

    got = quick_serial(item, range(1000), threshold_seconds=0.12, clock=lambda: now[0],
                       cpu_clock=lambda: now[0])
    assert got.rest is not None and got.growth == 0.0
    assert got.seconds_of(len(got.results), 10) == pytest.approx(10 * got.item_seconds)
    assert got.items_within(len(got.results), 0.05) == int(0.05 / got.item_seconds)


@given(c0=st.floats(1e-6, 1e-2), g=st.floats(0.0, 1e-4), seconds=st.floats(1e-3, 1.0))
def test_items_within_inverts_seconds_of(c0: float, g: float, seconds: float) -> None:
    from amortune._quick import QuickOutcome

    cost = QuickOutcome([], None, 0, c0, growth=g, rate_at=0.0)
    n = cost.items_within(0, seconds)
    assert n >= 1
    assert n == 1 or cost.seconds_of(0, n) <= seconds * (1 + 1e-9)
    assert cost.seconds_of(0, n + 1) > seconds * (1 - 1e-9)


def test_a_trend_steeper_than_a_cost_proportional_to_the_index_is_cut_to_it() -> None:
    from amortune._quick import _growth

    assert _growth((1e-4, 11.5), 1e-3, 23.5) == pytest.approx(1e-3 / 23.5)  # 10x in one doubling
    assert _growth((1e-4, 11.5), 2e-4, 23.5) == pytest.approx(1e-4 / 12)  # doubled: the fit
    assert _growth((1e-4, 11.5), 1.4e-4, 23.5) == 0.0  # under GROWTH_RATIO: not a trend
    assert _growth(None, 1e-3, 23.5) == 0.0
