"""``optimize()`` on real functions: the plan's decisions, ``explain()``, ``to_dict()`` and ``data``.

Decisions only, never timings: the workloads are chosen far from any threshold so a loaded
2-core machine still gets the same answer.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import amortune
from amortune import Config, OptimizationResult
from amortune._model import WorkloadProfile
from amortune._record import FrozenInstanceError
from tests import tasks


def sleep_5ms(x: Any) -> Any:
    """An I/O-like item: 5 ms of waiting, almost no CPU."""
    time.sleep(0.005)
    return x


def spin_2ms(x: int) -> int:
    """A CPU-bound item of about 2 ms."""
    tasks.spin(0.002)
    return x


def numbered(n: int) -> Iterator[int]:
    yield from range(n)


# -- decisions ------------------------------------------------------------------------------------
def test_tiny_function_is_serial() -> None:
    plan = amortune.optimize(lambda x: x * x, range(200_000))
    assert plan.executor == "serial"
    assert plan.n_jobs == 1
    assert not plan.parallel
    assert any(r.startswith("serial:") for r in plan.reasons)


def test_sleep_like_items_use_threads() -> None:
    plan = amortune.optimize(sleep_5ms, [0.0] * 400)
    assert plan.executor == "threads", plan.explain()
    assert plan.n_jobs > 2
    assert plan.estimated_speedup > 1


def test_one_worker_allowed_never_gives_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMORTUNE_MAX_WORKERS", "1")
    plan = amortune.optimize(spin_2ms, range(300))
    assert plan.executor != "processes", plan.explain()
    assert "1 usable core" in plan.system


def test_pinned_choices_pass_through() -> None:
    plan = amortune.optimize(tasks.square, range(10_000), n_jobs=2, executor="processes")
    assert (plan.executor, plan.n_jobs) == ("processes", 2)
    assert any("as requested" in r for r in plan.reasons)


def test_sample_size_limits_the_sample() -> None:
    plan = amortune.optimize(tasks.square, range(1000), sample_size=5)
    assert plan.profile.n_sampled == 5


def _locked_spin() -> Any:
    """A ~2 ms CPU-bound function closing over a lock: it cannot be pickled."""
    lock = threading.Lock()

    def locked_spin(x: int) -> int:
        with lock:
            tasks.spin(0.002)
        return x

    return locked_spin


def test_unpicklable_function_is_never_sent_to_processes() -> None:
    locked_spin = _locked_spin()

    plan = amortune.optimize(locked_spin, range(300))
    assert plan.executor != "processes"
    assert not plan.profile.picklable
    assert "lock" in plan.profile.not_picklable_reason
    assert any("cannot run in worker processes" in w for w in plan.warnings)
    assert any("cannot be pickled" in r for r in plan.reasons)


def test_a_lazily_probed_function_is_pickled_once_the_plan_needs_processes() -> None:
    from amortune._optimize import plan_run

    locked_spin = _locked_spin()

    # CPU-bound items: the model would choose processes, so the function is pickled after all,
    # found unpicklable, and the plan decided again without processes.
    run = plan_run(locked_spin, range(300), Config(), lazy_function_probe=True)
    assert run.sampled.function_probed and not run.plan.profile.picklable
    assert run.plan.executor != "processes", run.plan.explain()
    assert any("cannot run in worker processes" in w for w in run.plan.warnings)
    # A picklable one is probed the same way and goes to processes as before.
    run = plan_run(tasks.spin, [0.002] * 300, Config(), lazy_function_probe=True)
    assert run.sampled.function_probed and run.sampled.func_bytes
    assert run.plan.executor == "processes", run.plan.explain()
    # Items that wait go to threads without the function ever being pickled.
    run = plan_run(tasks.sleep_then_return, [0.005] * 300, Config(), lazy_function_probe=True)
    assert run.plan.executor == "threads" and not run.sampled.function_probed


def test_unpicklable_function_with_processes_pinned_falls_back_with_a_warning() -> None:
    locked_spin = _locked_spin()

    plan = amortune.optimize(locked_spin, range(300), executor="processes")
    assert plan.executor == "serial"
    assert any("cannot use processes" in w for w in plan.warnings)


def test_large_results_warn_about_memory() -> None:
    # 1 MiB results x 1000 against 1% of available memory: the memory warning and its advice.
    plan = amortune.optimize(tasks.return_mb, range(1000), max_memory_percent=0.01)
    assert any("Result memory exceeds safety threshold" in w for w in plan.warnings)
    assert any("memory" in w.lower() for w in plan.warnings)  # the check users write before choosing batches
    assert 1 <= plan.batch_size < 1000


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(TypeError, match="callable"):
        amortune.optimize(3, range(10))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_jobs"):
        amortune.optimize(tasks.square, range(10), n_jobs=0)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        amortune.optimize(tasks.square, range(10), executor="nope")
    with pytest.raises(ValueError, match="sample_items"):
        amortune.optimize(tasks.square, range(10), sample_size=0)
    with pytest.raises(ValueError, match="max_memory_percent"):
        amortune.optimize(tasks.square, range(10), max_memory_percent=1.5)


def test_exception_in_sampling_propagates_with_index() -> None:
    with pytest.raises(ValueError, match="bad item 7") as info:
        amortune.optimize(tasks.fail_on_7, range(100), config=Config(sample_items=20))
    assert any("item 7" in n for n in getattr(info.value, "__notes__", []))


# -- plan.data ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 3, 100, 10_000])
def test_generator_data_yields_every_item_once_in_order(n: int) -> None:
    plan = amortune.optimize(tasks.square, numbered(n), config=Config(sample_items=8))
    assert list(plan.data) == list(range(n))


@pytest.mark.parametrize("data", [list(range(500)), range(500), tuple(range(500)),
                                  np.arange(500)], ids=["list", "range", "tuple", "array"])
def test_reiterable_data_is_handed_back_as_is(data: Any) -> None:
    plan = amortune.optimize(tasks.square, data)
    assert plan.data is data


def test_plan_feeds_pool_map_on_a_generator() -> None:
    opt_result = amortune.optimize(tasks.square, (i for i in range(2000)))
    with mp.get_context("forkserver").Pool(2) as pool:
        results = pool.map(tasks.square, opt_result.data, chunksize=opt_result.chunksize)
    assert results == [i * i for i in range(2000)]


# -- explain() and to_dict() ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def plans() -> list[OptimizationResult]:
    return [
        amortune.optimize(tasks.square, range(5000)),
        amortune.optimize(sleep_5ms, [0.0] * 200),
        amortune.optimize(tasks.square, range(5000), n_jobs=2, executor="processes"),
        amortune.optimize(tasks.return_mb, range(500), max_memory_percent=0.01),
        amortune.optimize(tasks.square, numbered(100)),
    ]


def test_explain_shows_decision_numbers_and_reasons(plans: list[OptimizationResult]) -> None:
    for plan in plans:
        text = plan.explain()
        assert f"n_jobs={plan.n_jobs}" in text
        if plan.parallel:
            assert f"chunksize={plan.chunksize}" in text
        else:  # a serial plan cuts no chunks for workers: no chunksize to show
            assert "chunksize" not in text.splitlines()[0]
        assert f"batch_size={plan.batch_size}" in text
        assert plan.executor in text
        assert f"{plan.estimated_speedup:.2f}x" in text
        assert plan.reasons
        for reason in plan.reasons:
            assert reason in text
        for warning in plan.warnings:
            assert warning in text
        assert str(plan) == text


def test_explain_says_unknown_for_length_less_input(plans: list[OptimizationResult]) -> None:
    generator_plan = plans[-1]
    assert generator_plan.n_items == 100  # short: the read-ahead found the end
    long_plan = amortune.optimize(tasks.square, numbered(100_000))
    assert long_plan.n_items is None
    assert "of unknown" in long_plan.explain()


def test_to_dict_is_json_and_round_trips(plans: list[OptimizationResult]) -> None:
    for plan in plans:
        d = plan.to_dict()
        back = json.loads(json.dumps(d))
        assert back == d
        for name in ("n_jobs", "chunksize", "batch_size", "executor", "estimated_speedup",
                     "predicted_serial_seconds", "predicted_seconds", "n_items", "start_method",
                     "thread_cap"):
            assert back[name] == getattr(plan, name), name
        assert back["reasons"] == list(plan.reasons)
        assert back["warnings"] == list(plan.warnings)
        assert WorkloadProfile(**back["profile"]) == plan.profile
        assert "data" not in back


def test_plan_is_frozen(plans: list[OptimizationResult]) -> None:
    with pytest.raises(FrozenInstanceError):
        plans[0].n_jobs = 8  # type: ignore[misc]


def test_speedup_matches_predictions(plans: list[OptimizationResult]) -> None:
    for plan in plans:
        assert plan.estimated_speedup == pytest.approx(
            plan.predicted_serial_seconds / plan.predicted_seconds
        )
        if plan.executor == "serial":
            assert plan.estimated_speedup == pytest.approx(1.0)
