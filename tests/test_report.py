"""Run reports drawn from synthetic ``RunStats``: the time split, the text, the HTML and the PNG.

The runs are built by hand (times on a made-up clock), so every number the report prints can be
checked against the arithmetic here.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from amortune._model import WorkloadProfile
from amortune._plan import OptimizationResult
from amortune._report import RunReport, SlotTime, build_report
from amortune._stats import ChunkEvent, PlanChange, RunStats

T0 = 1000.0  # a perf_counter reading: reports show times relative to the run's start


def chunk(start: int, n: int, slot: int, sent: float, began: float, ended: float, *,
          received: float | None = None, status: str = "ok", serde: float = 0.0,
          backend: str = "processes", attempt: int = 1, rss: int = 0) -> ChunkEvent:
    return ChunkEvent(
        start_index=start, n_items=n, slot=slot, backend=backend,
        submitted=T0 + sent, received=T0 + (received if received is not None else ended + serde),
        started=T0 + began, finished=T0 + ended, wall_seconds=ended - began,
        cpu_seconds=ended - began, serde_seconds=serde, rss_bytes=rss, attempt=attempt,
        status=status)


def two_worker_run() -> RunStats:
    """A typical process run: sampling in the caller, two workers booting, growing chunks.

    Worker 0 boots in [0.00, 0.08] and worker 1 in [0.00, 0.10]. The caller samples items 0-9
    in [0.00, 0.02]. Worker 1 waits 0.05 s for the caller before its third chunk, loses one chunk
    to a crash (retried on worker 0) and is idle for the last 0.10 s.
    """
    events = [chunk(0, 10, 0, 0.0, 0.0, 0.02, backend="serial")]
    # worker 0: starts at 0.08, back-to-back chunks
    events += [
        chunk(10, 4, 0, 0.02, 0.08, 0.12, serde=0.002),
        chunk(18, 8, 0, 0.03, 0.122, 0.20, serde=0.002),
        chunk(34, 16, 0, 0.10, 0.202, 0.36, serde=0.004),
        chunk(50, 16, 0, 0.30, 0.364, 0.44, serde=0.002, attempt=2),  # the lost chunk, again
        chunk(66, 8, 0, 0.36, 0.442, 0.50),
    ]
    # worker 1: starts at 0.10
    events += [
        chunk(14, 4, 1, 0.02, 0.10, 0.14, serde=0.002),
        chunk(26, 8, 1, 0.05, 0.142, 0.22, serde=0.002),
        # free at 0.222, the caller sends the next chunk only at 0.272: 0.05 s waiting
        chunk(50, 16, 1, 0.272, 0.274, 0.30, received=0.30, status="lost"),
        chunk(74, 10, 1, 0.30, 0.302, 0.40, serde=0.002),
    ]
    return RunStats(
        chunks=9, retries=1, items=84, started_at=T0, finished_at=T0 + 0.50, events=events,
        changes=[PlanChange(T0 + 0.02, "moved to 2 worker processes"),
                 PlanChange(T0 + 0.30, "a worker died; its chunk runs again elsewhere")],
        memory=[(T0 + 0.05 * i, (40 + 3 * i) << 20) for i in range(11)],
        chunk_sizes=[(T0 + 0.02, 4), (T0 + 0.03, 8), (T0 + 0.10, 16), (T0 + 0.30, 8),
                     (T0 + 0.36, 6), (T0 + 0.40, 4)],
        worker_starts={0: (T0 + 0.0, T0 + 0.08), 1: (T0 + 0.0, T0 + 0.10)},
        first_calls={1: 0.012},
        caller_item_seconds=0.02,
    )


def a_plan(executor: str = "processes", n_jobs: int = 2, speedup: float = 1.8,
           item_seconds: float = 0.01) -> OptimizationResult:
    profile = WorkloadProfile(n_sampled=10, sampled_wall_seconds=0.02,
                              item_wall_seconds=item_seconds, item_cpu_seconds=item_seconds)
    return OptimizationResult(
        n_jobs=n_jobs, chunksize=4, batch_size=84, executor=executor, estimated_speedup=speedup,
        predicted_serial_seconds=0.84, predicted_seconds=0.84 / speedup, reasons=("because",),
        warnings=[], data=range(84), profile=profile, n_items=84)


def by_lane(report: RunReport) -> dict[str, SlotTime]:
    return {s.lane: s for s in report.slots()}


# -- the time split --------------------------------------------------------------------------
def test_time_split_per_slot_adds_up_to_the_run() -> None:
    lanes = by_lane(build_report(two_worker_run()))
    assert list(lanes) == ["caller", "worker 0", "worker 1"]
    w0, w1 = lanes["worker 0"], lanes["worker 1"]
    assert w0.startup == pytest.approx(0.08)
    assert w1.startup == pytest.approx(0.10)
    assert w0.compute == pytest.approx(0.04 + 0.078 + 0.158 + 0.076 + 0.058)
    assert w0.serialization == pytest.approx(0.010)
    assert w1.waiting == pytest.approx(0.05)
    assert w0.waiting == pytest.approx(0.0)
    for s in (w0, w1):
        assert s.span == pytest.approx(0.50)
        total = s.startup + s.compute + s.serialization + s.waiting + s.idle
        assert total == pytest.approx(s.span)
    assert w1.idle > 0.09  # the last 0.10 s with nothing left to do
    assert (w1.lost, w0.lost) == (1, 0)
    assert (w0.chunks, w1.chunks) == (5, 4)
    assert w0.items + w1.items + lanes["caller"].items == 84


def test_caller_lane_has_no_waiting_and_counts_its_items_once() -> None:
    report = build_report(two_worker_run())
    caller = by_lane(report)["caller"]
    assert caller.compute == pytest.approx(0.02)
    assert caller.waiting == 0.0
    # caller_item_seconds is the same 0.02 s the caller lane shows: not added twice
    busy = sum(s.compute for s in report.slots())
    assert report.item_seconds() == pytest.approx(busy)
    assert report.measured_speedup() == pytest.approx(busy / 0.5)


def test_caller_items_without_caller_events_count_toward_item_time() -> None:
    stats = two_worker_run()
    stats.events = [e for e in stats.events if e.backend != "serial"]
    report = build_report(stats)
    assert "caller" not in by_lane(report)
    workers = sum(s.compute for s in report.slots())
    assert report.item_seconds() == pytest.approx(workers + 0.02)
    assert "the caller also ran items for 20.00 ms" in report.explain()


def test_events_without_worker_times_use_the_callers_view() -> None:
    stats = RunStats(items=2, started_at=T0, finished_at=T0 + 1.0, events=[
        ChunkEvent(0, 1, 0, "dask", T0 + 0.1, T0 + 0.6, 0.0, 0.0, 0.4, 0.4),
        ChunkEvent(1, 1, 1, "dask", T0 + 0.1, T0 + 0.9, 0.0, 0.0, 0.7, 0.7)])
    report = build_report(stats)
    lanes = by_lane(report)
    assert lanes["worker 0"].compute == pytest.approx(0.4)  # wall_seconds, not the round trip
    assert lanes["worker 1"].compute == pytest.approx(0.7)
    assert "as seen by the caller" in report.to_svg()


def test_window_comes_from_the_events_when_the_run_has_no_clock() -> None:
    stats = RunStats(events=[chunk(0, 5, 0, 0.1, 0.2, 0.7)])
    report = build_report(stats)
    assert report.t0 == pytest.approx(T0 + 0.1)
    assert report.wall_seconds == pytest.approx(0.6)


# -- text ------------------------------------------------------------------------------------
def test_explain_covers_every_part_of_the_run() -> None:
    text = build_report(two_worker_run(), a_plan()).explain()
    first = text.splitlines()[0]
    assert first == ("amortune run: 84 items in 9 chunks on 2 worker(s), 500.00 ms wall "
                     "(plan: processes, n_jobs=2, 1 retry)")
    for words in ("start-up", "compute", "serialization", "idle", "waiting on caller"):
        assert words in text
    assert re.search(r"^\s+worker 1\s+100\.00 ms 20%", text, re.M), text
    assert "worker 1 paid 12.00 ms on its first call" in text
    assert "speedup: predicted 1.80x, measured " in text
    assert "wall predicted 466.67 ms, took 500.00 ms (+7%)" in text
    assert re.search(r"chunk sizes: [▁▂▃▄▅▆▇█]+  first 4, largest 16 at 100\.00 ms, last 4", text)
    assert re.search(r"caller memory: [▁▂▃▄▅▆▇█]+  40\.0 MiB at the start, peak 70\.0 MiB at "
                     r"500\.00 ms, 70\.0 MiB at the end", text)
    assert "at 20.00 ms: moved to 2 worker processes" in text
    assert "at 300.00 ms: a worker died" in text
    assert "1 chunk(s) were lost to a dead or stopped worker; 1 retried" in text
    assert str(build_report(two_worker_run())) == build_report(two_worker_run()).explain()


def test_findings_name_a_caller_bound_run() -> None:
    # Each worker runs 10 ms and then waits 40 ms for the caller: the caller is the bottleneck.
    events = []
    for i in range(10):
        for slot in (0, 1):
            t = 0.05 * i
            events.append(chunk(2 * i + slot, 1, slot, t + 0.04 if i else 0.0,
                                t + 0.04 if i else 0.0, t + 0.05))
    stats = RunStats(items=20, chunks=20, started_at=T0, finished_at=T0 + 0.5, events=events)
    findings = build_report(stats).findings()
    assert any("waited" in f and "the caller is the bottleneck" in f for f in findings), findings


def test_a_serial_run_shows_the_caller_only() -> None:
    stats = RunStats(items=100, chunks=1, started_at=T0, finished_at=T0 + 0.2, events=[
        chunk(0, 100, 0, 0.0, 0.0, 0.2, backend="serial")], caller_item_seconds=0.2)
    text = build_report(stats, a_plan("serial", 1, 1.0)).explain()
    assert text.splitlines()[0].startswith("amortune run: 100 items in 1 chunks on the caller")
    assert "the run kept the plan as it was" in text
    assert "measured 1.00x" in text


def test_an_empty_run_reports_without_failing(tmp_path: Path) -> None:
    report = build_report(RunStats())
    text = report.explain()
    assert text.startswith("amortune run: 0 items, 0.0 µs wall")
    assert "not measured" in text
    page = report.to_html(tmp_path / "empty.html")
    assert "<svg" in page and "no chunk events were recorded" in page


def test_function_errors_are_reported_with_their_items() -> None:
    stats = RunStats(items=10, started_at=T0, finished_at=T0 + 0.1,
                     events=[chunk(0, 10, 0, 0.0, 0.01, 0.05),
                             chunk(10, 5, 1, 0.0, 0.01, 0.04, status="error")])
    assert any("raised in 1 chunk(s), first at items 10-14" in f
               for f in build_report(stats).findings())


# -- HTML ------------------------------------------------------------------------------------
class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.scripts = 0
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "script":
            self.scripts += 1
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.external.append(value)


def test_html_is_self_contained_with_one_lane_per_slot(tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    page = build_report(two_worker_run(), a_plan()).to_html(path)
    assert path.read_text(encoding="utf-8") == page
    parser = _Tags()
    parser.feed(page)
    assert parser.scripts == 0 and parser.external == []  # no script, nothing fetched
    assert parser.tags.count("svg") == 1
    svg = page[page.index("<svg"):page.index("</svg>")]
    for label in (">caller<", ">worker 0<", ">worker 1<", ">chunk size<", ">caller memory<"):
        assert label in svg
    # one bar per chunk: each carries a tooltip naming its items
    assert len(re.findall(r"<title>items \d+", svg)) == len(two_worker_run().events)
    assert svg.count('fill="url(#startup)"') >= 2  # two worker start-ups (plus the legend)
    assert "#f58518" in svg  # the lost chunk in its own colour
    assert "waiting on the caller: 50.00 ms" in svg
    assert "moved to 2 worker processes" in page
    assert "The plan it started from" in page
    assert "1.80x" in page


def test_html_escapes_what_it_shows(tmp_path: Path) -> None:
    stats = two_worker_run()
    stats.note(T0 + 0.1, "<script>alert(1)</script> & more")
    page = build_report(stats).to_html()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page


def test_many_tiny_chunks_keep_the_page_small() -> None:
    events = [chunk(i, 1, i % 2, i * 1e-5, i * 1e-5, i * 1e-5 + 9e-6) for i in range(100_000)]
    stats = RunStats(items=100_000, started_at=T0, finished_at=T0 + 1.0, events=events)
    svg = build_report(stats).to_svg()
    assert len(svg) < 2_000_000
    assert "small chunks" in svg


# -- PNG -------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib missing")
def test_png_is_written(tmp_path: Path) -> None:
    path = tmp_path / "run.png"
    build_report(two_worker_run(), a_plan()).to_png(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_png_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from amortune._report import build_report\n"
        "from amortune._stats import RunStats\n"
        "try:\n"
        f"    build_report(RunStats()).to_png({str(tmp_path / 'x.png')!r})\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'amortune[plot]'" in proc.stdout
    assert not (tmp_path / "x.png").exists()


def test_report_module_imports_only_the_standard_library() -> None:
    code = ("import sys, amortune._report\n"
            "print(sorted(m for m in ('numpy', 'matplotlib', 'psutil') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_findings_explain_a_run_slower_than_planned() -> None:
    # planned 0.47 s; took 0.5 s: no finding. Stretch the run 3x: items cost more than sampled.
    calm = build_report(two_worker_run(), a_plan()).findings()
    assert not any("predicted time" in f for f in calm)
    slow = a_plan(speedup=5.0)  # predicts 0.168 s for a 0.5 s run
    findings = build_report(two_worker_run(), slow).findings()
    assert any(f.startswith("the run took 3.0x its predicted time; the machine was busier")
               for f in findings), findings
    # sampled at 2 ms an item, the run's items took 8 ms: the finding names both
    findings = build_report(two_worker_run(), a_plan(speedup=5.0, item_seconds=0.002)).findings()
    assert any("items took 8.00 ms each in the run against 2.00 ms when sampled" in f
               for f in findings), findings


def test_findings_note_workers_that_started_late() -> None:
    stats = RunStats(items=20, started_at=T0, finished_at=T0 + 1.0, events=[
        chunk(0, 10, 0, 0.0, 0.6, 1.0), chunk(10, 10, 1, 0.0, 0.6, 1.0)])
    assert any("first item started 600.00 ms into the run (60% of it)" in f
               for f in build_report(stats).findings())


def test_notes_say_how_the_run_was_recorded() -> None:
    report = build_report(two_worker_run(), notes=("recorded from item times",))
    assert report.explain().endswith("  note: recorded from item times")
    assert "<p class=\"sub\">recorded from item times</p>" in report.to_html()


def test_a_report_on_a_warm_pool_starts_with_the_run_not_with_the_pool() -> None:
    # Workers the warm pool started for an earlier call are not this run's start-up: its window
    # (and every lane's "waiting" time) begins when the run does.
    import time

    import amortune
    from tests import tasks

    amortune.execute(tasks.spin, [0.002] * 40, executor="processes")  # the pool is warm now
    time.sleep(0.3)
    before = time.perf_counter()
    with amortune.report() as rec:
        amortune.execute(tasks.spin, [0.002] * 40, executor="processes")
    rep = rec.report()
    assert all(started >= before for started, _ in rep.stats.worker_starts.values())
    assert rep.wall_seconds <= time.perf_counter() - before
