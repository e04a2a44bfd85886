"""The command line in a fresh interpreter: ``amortune`` and ``python -m amortune``.

Every test starts a new process, as a user's shell does. Bad input must give one
``amortune: ...`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import amortune

ROOT = Path(amortune.__file__).resolve().parent.parent

MYWORK = '''\
def double(x):
    return 2 * x


def spin(x):
    import time

    end = time.perf_counter() + 0.002
    while time.perf_counter() < end:
        pass
    return x + 1


def vector(x):
    import numpy as np

    return np.full(3, x, dtype=np.float32)


def row_sum(row):
    return float(row.sum())


def same(x):
    return x


def opaque(x):
    return object()


def ragged(x):
    return [0] * x


LIMIT = 3
'''


def _env() -> dict[str, str]:
    # amortune importable from a temporary folder too, installed or not
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def cli(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m amortune ARGS`` (from the repository root, so ``tests.tasks`` imports)."""
    return subprocess.run([sys.executable, "-m", "amortune", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env=_env())


def console(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``amortune`` console script."""
    exe = shutil.which("amortune")
    if exe is None:
        pytest.skip("the amortune console script is not installed")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False, env=_env())


def assert_one_line_error(proc: subprocess.CompletedProcess[str], status: int = 2) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("amortune: "), proc.stderr
    assert proc.stdout == ""
    return lines[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's folder: ``mywork.py`` beside the data files."""
    (tmp_path / "mywork.py").write_text(MYWORK, encoding="utf-8")
    return tmp_path


# -- the basics ------------------------------------------------------------------------------
def test_version() -> None:
    proc = cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"amortune {amortune.__version__}"


def test_help_is_written_for_users() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("optimize", "run", "demo", "bench"):
        assert re.search(rf"^\s+{command}\s+\S", proc.stdout, re.M), proc.stdout
    assert "profile" not in proc.stdout  # the old name still works, but is not advertised
    assert "The only module that prints" not in proc.stdout
    assert "examples:" in proc.stdout
    for command in ("optimize", "run", "demo", "bench"):
        sub = cli(command, "--help")
        assert sub.returncode == 0 and f"usage: amortune {command}" in sub.stdout


def test_usage_errors_are_one_line_with_status_2() -> None:
    for args in ((), ("optimize",), ("optimize", "math:factorial"),
                 ("optimize", "tests.tasks:square", "--range", "ten"), ("frobnicate",),
                 ("run", "math:factorial", "--range", "3")):  # --out missing
        assert_one_line_error(cli(*args))
    assert "unknown command 'frobnicate'" in cli("frobnicate").stderr


# -- optimize --------------------------------------------------------------------------------
def test_optimize_math_factorial() -> None:
    proc = cli("optimize", "math:factorial", "--range", "200")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert re.match(r"amortune plan: serial, n_jobs=1, batch_size=\d+$", first), first
    assert "chunksize" not in first  # a serial plan has no chunks
    assert "pickled sizes not measured (serial plan)" in proc.stdout
    assert "pickled in 0 B" not in proc.stdout
    assert re.search(r"measured on \d+ item\(s\) of 200:", proc.stdout)
    assert re.search(r"^  - ", proc.stdout, re.M), "the plan lists its reasons"


def test_optimize_json_is_parseable() -> None:
    proc = cli("optimize", "tests.tasks:square", "--range", "100", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert (plan["executor"], plan["n_items"], plan["n_jobs"]) == ("serial", 100, 1)
    assert plan["reasons"] and plan["profile"]["n_sampled"] >= 1


def test_optimize_pins_what_is_asked() -> None:
    proc = cli("optimize", "tests.tasks:square", "--range", "100", "--json",
               "--executor", "threads", "--n-jobs", "3")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert (plan["executor"], plan["n_jobs"]) == ("threads", 3)


def test_profile_is_still_accepted() -> None:
    proc = cli("profile", "tests.tasks:square", "--range", "100")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("amortune plan: ")


def test_profile_json_lines_spelling_still_works(tmp_path: Path) -> None:
    data = tmp_path / "values.jsonl"
    data.write_text("\n".join(str(i) for i in range(50)) + "\n\n", encoding="utf-8")
    proc = cli("profile", "tests.tasks:square", "--json-lines", str(data), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_items"] == 50


def test_a_module_in_the_current_folder_loads_with_the_console_script(project: Path) -> None:
    proc = console("optimize", "mywork:double", "--range", "50", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("amortune plan: ")
    assert "of 50" in proc.stdout


def test_a_module_in_the_current_folder_loads_with_python_m(project: Path) -> None:
    proc = cli("optimize", "mywork:double", "--range", "50", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("amortune plan: ")


def test_a_file_path_names_the_module(project: Path, tmp_path_factory: pytest.TempPathFactory
                                      ) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    proc = cli("optimize", f"{project / 'mywork.py'}:double", "--range", "50", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr


def test_function_error_shows_the_users_traceback_and_the_item() -> None:
    proc = cli("optimize", "tests.tasks:fail_on_7", "--range", "100")
    assert proc.returncode == 1
    assert "ValueError: bad item 7" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "amortune: tests.tasks:fail_on_7 raised ValueError on item 7: bad item 7")
    assert 'tests/tasks.py"' in proc.stderr.replace(os.sep, "/")  # the user's frame is shown
    assert "amortune/_profile.py" not in proc.stderr.replace(os.sep, "/")  # ours are not


# -- bad input: one line, status 2 -----------------------------------------------------------
@pytest.mark.parametrize("spec, mentions", [
    ("nosuchmodule:f", "no module named 'nosuchmodule'"),
    ("math", "expected MODULE:FUNC"),
    ("math:", "expected MODULE:FUNC"),
    (":factorial", "expected MODULE:FUNC"),
    ("math:pi", "math:pi is a float, not a function"),
    ("math:factorail", "did you mean 'factorial'"),
    ("tests.tasks:no_such_function", "no_such_function"),
    ("missing_file.py:f", "no such file: missing_file.py"),
])
def test_bad_function_specs(spec: str, mentions: str) -> None:
    line = assert_one_line_error(cli("optimize", spec, "--range", "3"))
    assert mentions in line


def test_a_module_that_fails_to_import_names_its_own_problem(project: Path) -> None:
    (project / "broken.py").write_text("import no_such_dependency_xyz\n", encoding="utf-8")
    (project / "typo.py").write_text("def f(x)\n    return x\n", encoding="utf-8")
    line = assert_one_line_error(cli("optimize", "broken:f", "--range", "3", cwd=project))
    assert "cannot import broken: No module named 'no_such_dependency_xyz'" in line
    line = assert_one_line_error(cli("optimize", "typo:f", "--range", "3", cwd=project))
    assert "cannot import typo:" in line and "line 1" in line


def _bad_files(folder: Path) -> dict[str, tuple[str, str]]:
    (folder / "bad.jsonl").write_text('1\n{"a": \n3\n', encoding="utf-8")
    (folder / "empty.jsonl").write_text("", encoding="utf-8")
    (folder / "blank.txt").write_text("\n  \n\n", encoding="utf-8")
    (folder / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (folder / "notnpy.npy").write_bytes(b"not an array")
    (folder / "items.csv").write_text("1,2\n", encoding="utf-8")
    (folder / "object.json").write_text('{\n"a": 1\n}\n', encoding="utf-8")
    (folder / "subfolder.jsonl").mkdir()
    return {
        "missing": ("missing.jsonl", "data file not found: missing.jsonl"),
        "folder": (".", "is a folder, not a data file"),
        "folder-with-suffix": ("subfolder.jsonl", "is a folder, not a data file"),
        "malformed": ("bad.jsonl", "bad.jsonl, line 2: not valid JSON"),
        "empty": ("empty.jsonl", "holds no items"),
        "blank": ("blank.txt", "holds no items"),
        "not-utf8": ("latin1.txt", "is not UTF-8 text"),
        "not-npy": ("notnpy.npy", "is not a readable .npy array"),
        "unknown-format": ("items.csv", "cannot tell the format of items.csv"),
        "json-object": ("object.json", "holds one JSON dict"),
    }


@pytest.mark.parametrize("case", ["missing", "folder", "folder-with-suffix", "malformed", "empty",
                                  "blank", "not-utf8", "not-npy", "unknown-format",
                                  "json-object"])
@pytest.mark.parametrize("command", ["optimize", "run"])
def test_bad_data_files(project: Path, case: str, command: str) -> None:
    name, mentions = _bad_files(project)[case]
    extra = ("--out", "out.jsonl") if command == "run" else ()
    line = assert_one_line_error(cli(command, "mywork:double", "--data", name, *extra,
                                     cwd=project))
    assert mentions in line
    assert not (project / "out.jsonl").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads every file")
def test_unreadable_data_file(project: Path) -> None:
    data = project / "secret.jsonl"
    data.write_text("1\n", encoding="utf-8")
    data.chmod(0)
    line = assert_one_line_error(cli("optimize", "mywork:double", "--data", str(data),
                                     cwd=project))
    assert "permission denied" in line


@pytest.mark.parametrize("n, mentions", [("-5", "--range must be a number of items"),
                                         ("0", "--range 0 gives no items")])
def test_bad_ranges(n: str, mentions: str) -> None:
    assert mentions in assert_one_line_error(cli("optimize", "math:factorial", "--range", n))


@pytest.mark.parametrize("args, mentions", [
    (("--out", "nowhere/out.jsonl"), "does not exist"),
    (("--out", "out.csv"), "--out must end in .jsonl, .json, .npy"),
    (("--out", "."), "is a folder"),
    (("--out", "out.jsonl", "--report", "report.pdf"), "--report must end in"),
    (("--out", "out.jsonl", "--n-jobs", "0"), "must be at least 1"),
])
def test_bad_run_options(project: Path, args: tuple[str, ...], mentions: str) -> None:
    line = assert_one_line_error(cli("run", "mywork:double", "--range", "5", *args,
                                     cwd=project))
    assert mentions in line


# -- run -------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[object]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_run_json_lines_round_trip(project: Path) -> None:
    items = [1, 2.5, "ab", [1, 2], {"k": 3}]
    (project / "in.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n\n",
                                      encoding="utf-8")
    proc = cli("run", "mywork:same", "--data", "in.jsonl", "--out", "out.jsonl", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(project / "out.jsonl") == items
    assert proc.stdout.startswith("wrote 5 results to out.jsonl")


def test_run_writes_the_functions_results_in_order(project: Path) -> None:
    (project / "in.jsonl").write_text("".join(f"{i}\n" for i in range(300)), encoding="utf-8")
    proc = cli("run", "mywork:double", "--data", "in.jsonl", "--out", "out.jsonl", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(project / "out.jsonl") == [2 * i for i in range(300)]
    assert [p.name for p in project.iterdir() if p.name.endswith(".tmp")] == []


def test_run_reads_text_and_json_arrays(project: Path) -> None:
    (project / "words.txt").write_text("alpha\nbeta\n\ngamma\n", encoding="utf-8")
    proc = cli("run", "mywork:double", "--data", "words.txt", "--out", "out.json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(project / "out.json") == ["alphaalpha", "betabeta", "gammagamma"]
    (project / "array.json").write_text("[\n  1,\n  2\n]\n", encoding="utf-8")
    proc = cli("run", "mywork:double", "--data", "array.json", "--out", "out.jsonl", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(project / "out.jsonl") == [2, 4]


def test_run_npy_in_and_out(project: Path) -> None:
    np = pytest.importorskip("numpy")
    np.save(project / "rows.npy", np.arange(12, dtype=np.int64).reshape(4, 3))
    proc = cli("run", "mywork:row_sum", "--data", "rows.npy", "--out", "sums.npy", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert np.load(project / "sums.npy").tolist() == [3.0, 12.0, 21.0, 30.0]
    proc = cli("run", "mywork:vector", "--range", "5", "--out", "vectors.npy", cwd=project)
    assert proc.returncode == 0, proc.stderr
    out = np.load(project / "vectors.npy")
    assert out.shape == (5, 3) and out.dtype == np.float32
    assert out[4].tolist() == [4.0, 4.0, 4.0]


def test_run_results_that_do_not_fit_the_output_format(project: Path) -> None:
    line = assert_one_line_error(cli("run", "mywork:opaque", "--range", "3", "--out",
                                     "out.jsonl", cwd=project), status=1)
    assert "result 0 cannot be written as JSON" in line
    line = assert_one_line_error(cli("run", "mywork:ragged", "--range", "3", "--out",
                                     "out.npy", cwd=project), status=1)
    assert "result 1 has shape (1,), result 0 has (0,)" in line
    assert sorted(p.name for p in project.iterdir()) == ["mywork.py"]


def test_run_function_error_writes_nothing(project: Path) -> None:
    (project / "in.jsonl").write_text("".join(f"{i}\n" for i in range(20)), encoding="utf-8")
    proc = cli("run", "tests.tasks:fail_on_7", "--data", str(project / "in.jsonl"), "--out",
               str(project / "out.jsonl"))
    assert proc.returncode == 1
    assert "bad item 7" in proc.stderr and "on item 7" in proc.stderr
    assert list(project.glob("out.jsonl*")) == [] and list(project.glob(".out.jsonl*")) == []


def test_run_spill_checkpoint_and_resume(project: Path) -> None:
    args = ("run", "mywork:double", "--range", "2000", "--out", "out.jsonl", "--spill",
            "--checkpoint", "run.ckpt", "--progress")
    proc = cli(*args, cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(project / "out.jsonl") == [2 * i for i in range(2000)]
    assert (project / "run.ckpt").is_dir()
    assert "2000/2000" in proc.stderr  # the progress bar
    (project / "out.jsonl").unlink()
    again = cli(*args, cwd=project)  # every batch is done: read back from the checkpoint
    assert again.returncode == 0, again.stderr
    assert read_jsonl(project / "out.jsonl") == [2 * i for i in range(2000)]
    other = cli("run", "mywork:spin", "--range", "2000", "--out", "out.jsonl", "--checkpoint",
                "run.ckpt", cwd=project)
    assert "checkpoint" in assert_one_line_error(other)


def test_run_spill_to_npy(project: Path) -> None:
    np = pytest.importorskip("numpy")
    proc = cli("run", "mywork:vector", "--range", "3000", "--out", "v.npy", "--spill",
               cwd=project)
    assert proc.returncode == 0, proc.stderr
    out = np.load(project / "v.npy")
    assert out.shape == (3000, 3) and out[2999, 0] == 2999


def test_run_report_html(project: Path) -> None:
    proc = cli("run", "mywork:double", "--range", "500", "--out", "out.jsonl", "--report",
               "out.html", cwd=project)
    assert proc.returncode == 0, proc.stderr
    page = (project / "out.html").read_text(encoding="utf-8")
    assert "<svg" in page and "</html>" in page
    assert "amortune run: 500 items" in page
    assert read_jsonl(project / "out.jsonl") == [2 * i for i in range(500)]
    assert "report: out.html" in proc.stdout


def test_run_report_of_a_parallel_run(project: Path) -> None:
    proc = cli("run", "mywork:spin", "--range", "300", "--out", "out.jsonl", "--report",
               "run.txt", "--executor", "processes", "--n-jobs", "2", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(project / "out.jsonl") == [i + 1 for i in range(300)]
    text = (project / "run.txt").read_text(encoding="utf-8")
    assert text.startswith("amortune run: 300 items in ")
    assert re.search(r"^\s+worker \d", text, re.M), text  # a lane per worker


def test_run_report_with_a_checkpoint(project: Path) -> None:
    proc = cli("run", "mywork:double", "--range", "100", "--out", "out.jsonl", "--checkpoint",
               "ck", "--report", "run.html", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "<svg" in (project / "run.html").read_text(encoding="utf-8")


def test_run_report_png_needs_matplotlib_or_says_so(project: Path) -> None:
    proc = cli("run", "mywork:double", "--range", "50", "--out", "out.jsonl", "--report",
               "run.png", cwd=project)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install 'amortune[plot]'" in assert_one_line_error(proc)
    else:
        assert proc.returncode == 0, proc.stderr
        assert (project / "run.png").read_bytes()[:4] == b"\x89PNG"


# -- demo and bench --------------------------------------------------------------------------
def test_bench_quick_builtin_comparison() -> None:
    proc = cli("bench", "--quick", "--builtin", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if re.search(r"x\s+(yes|NO)$", line)]
    assert len(rows) == 4 and all(row.endswith("yes") for row in rows), proc.stdout


@pytest.mark.slow
def test_bench_quick_runs_the_benchmark_suite_in_a_checkout() -> None:
    if not (ROOT / "benchmarks" / "run.py").is_file():
        pytest.skip("not a source checkout")
    proc = cli("bench", "--quick", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "benchmarks/run.py --quick" in proc.stderr.replace(os.sep, "/")


@pytest.mark.slow
def test_demo_runs_and_is_correct() -> None:
    proc = cli("demo", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if re.search(r"x\s*(yes|NO)$", line)]
    assert len(rows) == 4, proc.stdout
    assert all(line.endswith("yes") for line in rows)
    assert proc.stdout.count("amortune plan:") == 4


# -- how --report is recorded (in this process) ----------------------------------------------
def test_chunks_are_rebuilt_from_item_times() -> None:
    import threading

    from amortune._stats import RunStats
    from amortune.cli import _events_from_items

    me, main_thread = os.getpid(), threading.main_thread().ident
    other = me + 1
    t = 100.0
    records = [(0, t, t + 0.001, 0.001, me, main_thread)]       # sampled in the caller
    records += [(i, t + 0.01 + i * 0.001, t + 0.01 + i * 0.001 + 0.0009, 0.0009, other, 7)
                for i in range(1, 5)]                           # one worker, back to back
    records += [(5, t + 0.5, t + 0.501, 0.001, other, 7)]       # the same worker, much later
    stats = RunStats()
    _events_from_items(stats, records)
    assert [(e.start_index, e.n_items, e.backend) for e in stats.events] == [
        (0, 1, "serial"), (1, 4, "processes"), (5, 1, "processes")]
    assert stats.items == 6 and stats.chunks == 3
    assert stats.caller_item_seconds == pytest.approx(0.001)
    assert [n for _, n in stats.chunk_sizes] == [1, 4, 1]


def test_an_engine_report_is_used_as_it_comes() -> None:
    from amortune._report import RunReport
    from amortune._stats import RunStats
    from amortune.cli import _as_report

    stats = RunStats(items=3)
    report = RunReport(stats)
    assert _as_report(report) is report
    assert _as_report(stats).stats is stats

    class Holder:
        plan = None

        def __init__(self) -> None:
            self.stats = stats

    assert _as_report(Holder()).stats is stats
