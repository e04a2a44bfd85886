"""The cold benchmark: one call per fresh ``python`` process, for every contestant alike.

Usage::

    python benchmarks/cold.py                      # full run (3 repeats), prints Markdown tables
    python benchmarks/cold.py --quick              # smoke test: fewer items, one repeat, < 60 s
    python benchmarks/cold.py --only spin-2ms      # one workload (or: importtime, first-call)
    python benchmarks/cold.py --reps 5 --write /tmp/cold.md

Most programs map once per process (a script, a cron job), so here nobody has a warm pool. Each
measurement is a new interpreter running a small generated script, as a user would write it: its
imports (numpy first on the numpy rows), then the input is built, then ONE call is timed, pool
creation and shutdown included for everyone. The script prints JSON: the seconds, a checksum of
the results (compared with the loop's) and its ``getrusage`` peaks; this process adds the life
of the process from start to exit. On the 1 MiB rows every contestant runs once more in another
fresh process, untimed, for the peak PSS of its whole process tree (sampled every 25 ms, and by
the probe right after the call): sampling a process's memory slows it down, unevenly, so memory
and time never come from the same run. Contestants run interleaved:
within a repeat every contestant runs once per workload, back to back, the order rotated every
workload and repeat; ratios are medians of per-repeat ratios, so a neighbour's burst of work
hits every contestant alike.

amortune's predicted speedup comes from ``optimize`` in a separate fresh process (the same state
the timed call starts from). Also measured: ``python -X importtime -c "import amortune"`` (and
with ``amortune.execute`` touched; and everything a first parallel call imports, the standard
library's modules included), and the first call of
``amortune.execute(lambda x: x, range(1000))`` in a new process, from before ``import amortune``
to the result, against a plain loop. Before and after the run, ``parallel_capacity`` measures
how many cores' worth of pure-Python work the machine gives processes running at once (a
virtual machine sharing its cores gets less than its core count, and then nobody reaches the
loop ÷ cores ideal). Targets are reported, not enforced: the exit status is 0 whatever they
say.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]  # the amortune of this checkout, in this process and every probe

import cold_workloads as cw  # noqa: E402  (needs HERE on the path)
from _measure import machine_busy_seconds  # noqa: E402

MIB = 1 << 20

# -- the probe scripts ---------------------------------------------------------------------------

#: name -> (imports at the script's top, body of ``run(func, data)``), as a user writes each one.
CONTESTANTS: dict[str, tuple[str, str]] = {
    "loop": ("", "return list(map(func, data))"),
    "amortune": ("import amortune", "return amortune.execute(func, data)"),
    "Pool.map": ("import multiprocessing",
                 "with multiprocessing.Pool() as pool:\n        return pool.map(func, data)"),
    "PPE.map": ("from concurrent.futures import ProcessPoolExecutor",
                "with ProcessPoolExecutor() as ex:\n        return list(ex.map(func, data))"),
    "joblib": ("from joblib import Parallel, delayed",
               "return Parallel(n_jobs=-1)(delayed(func)(x) for x in data)"),
    # mpire would concatenate array results into one array; this keeps list(map(...))'s shape.
    "mpire": ("from mpire import WorkerPool",
              "with WorkerPool() as pool:\n"
              "        return pool.map(func, data, concatenate_numpy_output=False)"),
}
# Items that are sequences themselves (numpy arrays) would be unpacked into arguments by mpire;
# its documented remedy wraps each item in a 1-tuple.
MPIRE_SINGLE = ("from mpire import WorkerPool\nfrom mpire.utils import make_single_arguments",
                "with WorkerPool() as pool:\n"
                "        return pool.map(func, make_single_arguments(data, generator=False),\n"
                "                        concatenate_numpy_output=False)")
OPTIONAL = {"joblib": "joblib", "mpire": "mpire"}  # contestant -> module it needs

PROBE = '''\
"""Fresh-process probe written by benchmarks/cold.py: {title}."""
{top}import json
import resource
import sys
import time

import cold_workloads
{imports}


{script_function}
def run(func, data):
    {body}


def main():
    name, scale, steps, per_step = json.loads(sys.argv[1])
    func, data = cold_workloads.build(name, scale, steps, per_step){rebind}
    report = {{}}
    try:
{timed}
    except BaseException as exc:
        import traceback

        report["error"] = "".join(traceback.format_exception(exc))[-3000:]
    report["maxrss_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["maxrss_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
'''

TIMED_CALL = '''\
        t0 = time.perf_counter()
        out = run(func, data)
        report["seconds"] = time.perf_counter() - t0{snapshot}
        report["digest"] = cold_workloads.digest(out)'''
# On the memory rows: the process tree's PSS right after the call, input and results still held.
SNAPSHOT = '''
        report["tree_pss"] = cold_workloads.tree_pss()'''

TIMED_OPTIMIZE = '''\
        t0 = time.perf_counter()
        plan = amortune.optimize(func, data)
        report["seconds"] = time.perf_counter() - t0
        report.update(estimated_speedup=plan.estimated_speedup, executor=plan.executor,
                      n_jobs=plan.n_jobs, chunksize=plan.chunksize, explain=plan.explain())'''

PREDICT = "predict"  # amortune.optimize alone, in its own fresh process


def memory_row(spec: cw.Spec) -> bool:
    return spec.kind in ("results", "inputs")


def probe_source(spec: cw.Spec, contestant: str, *, memory: bool = False) -> str:
    if contestant == PREDICT:
        imports, body, timed = "import amortune", "pass", TIMED_OPTIMIZE
    else:
        imports, body = (MPIRE_SINGLE if contestant == "mpire" and spec.iterable_items
                         else CONTESTANTS[contestant])
        timed = TIMED_CALL.format(snapshot=SNAPSHOT if memory else "")
    script_function = rebind = ""
    if spec.in_script:  # the function as the user's script defines it, in __main__
        script_function = "\n" + inspect.getsource(cw.spin) + "\n"
        rebind = "\n    func = spin  # the script's own function, not the module's"
    return PROBE.format(title=f"{contestant} on {spec.name}",
                        top="import numpy as np  # noqa: F401\n\n" if spec.numpy_at_top else "",
                        imports=imports, body=body, timed=timed,
                        script_function=script_function, rebind=rebind)


# -- running one fresh process -------------------------------------------------------------------


def _env() -> dict[str, str]:
    """The probes' environment: this checkout first on the path, and bytecode cached as after
    ``pip install`` (with ``PYTHONDONTWRITEBYTECODE`` every fresh process would compile the
    package again: a cost no installed package has)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([HERE, REPO, *([path] if path else [])])
    return env


def precompile() -> None:
    """Write the bytecode of the package and the workload module now, not in the first probe."""
    import compileall

    compileall.compile_dir(os.path.join(REPO, "amortune"), quiet=1)
    compileall.compile_file(os.path.join(HERE, "cold_workloads.py"), quiet=1)


def _group_alive(pgid: int) -> bool:
    """Any process of group ``pgid`` still running (zombies do not count)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


class TreeSampler:
    """Peak PSS of a process and all its descendants, sampled every ``interval`` in a thread."""

    def __init__(self, pid: int, interval: float = 0.025) -> None:
        self.pid, self.interval, self.peak, self.samples = pid, interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while True:
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak, self.samples = max(self.peak, total), self.samples + 1
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_fresh(argv: Sequence[str], *, timeout: float, sample_memory: bool = False
              ) -> dict[str, Any]:
    """Run ``argv`` as a new process group; its last JSON line, plus what this side measured.

    Adds ``lifetime`` (start to exit), ``cpu`` (its own CPU seconds, with the children it waited
    for), ``others`` (cores other processes kept busy meanwhile), ``leftover`` (seconds its group
    outlived it), ``peak_pss`` (with ``sample_memory``) and ``stderr``.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        busy0, mine0, t0 = machine_busy_seconds(), sum(os.times()[:2]), time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=_env(), cwd=REPO,
                                start_new_session=True, stdin=subprocess.DEVNULL)
        sampler = TreeSampler(proc.pid) if sample_memory else None
        killer = threading.Timer(timeout, _kill_group, (proc.pid,))
        killer.start()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped yet
        lifetime = time.perf_counter() - t0
        if sampler is not None:
            sampler.stop()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        killer.cancel()
        busy1, mine1 = machine_busy_seconds(), sum(os.times()[:2])
        t_exit = time.perf_counter()
        while _group_alive(proc.pid) and time.perf_counter() - t_exit < 10:
            time.sleep(0.01)
        leftover = time.perf_counter() - t_exit
        if leftover >= 10:
            _kill_group(proc.pid)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("{")]
        stderr = err.read()
    result: dict[str, Any] = {}
    if lines:
        try:
            result = json.loads(lines[-1])
        except ValueError:
            result = {}
    if "seconds" not in result and "error" not in result:
        why = "timed out" if proc.returncode == -signal.SIGKILL else f"exit {proc.returncode}"
        result["error"] = f"{why}: {stderr[-2000:]}"
    cpu = usage.ru_utime + usage.ru_stime
    result.update(lifetime=lifetime, cpu=cpu, leftover=leftover, stderr=stderr[-2000:],
                  returncode=proc.returncode)
    if busy0 is not None and busy1 is not None and lifetime > 0:
        result["others"] = max(0.0, (busy1 - busy0) - cpu - (mine1 - mine0)) / lifetime
    if sampler is not None:
        result["peak_pss"] = max(sampler.peak, result.get("tree_pss", 0))
    return result


# -- the benchmark -------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def bench(specs: list[cw.Spec], names: list[str], reps: int, scale: float, steps: int,
          per_step: float, folder: str, timeout: float) -> dict[str, dict[str, Any]]:
    """Every contestant on every spec, ``reps`` times, interleaved; raw per-repeat records."""
    scripts: dict[tuple[str, str, bool], str] = {}
    for spec in specs:
        for c in [*names, PREDICT]:
            for memory in (False, True) if memory_row(spec) and c != PREDICT else (False,):
                path = os.path.join(folder, f"probe_{len(scripts):02d}.py")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(probe_source(spec, c, memory=memory))
                scripts[spec.name, c, memory] = path
    raw: dict[str, dict[str, Any]] = {
        s.name: {"runs": {c: [] for c in names}, "memory": {c: [] for c in names},
                 "predict": []} for s in specs}
    for rep in range(reps):
        for k, spec in enumerate(specs):
            arg = json.dumps([spec.name, scale, steps, per_step])
            shift = (rep + k) % len(names)
            order = names[shift:] + names[:shift]
            got: dict[str, dict[str, Any]] = {}
            for c in order:
                got[c] = run_fresh([sys.executable, scripts[spec.name, c, False], arg],
                                   timeout=timeout)
                raw[spec.name]["runs"][c].append(got[c])
            raw[spec.name]["predict"].append(
                run_fresh([sys.executable, scripts[spec.name, PREDICT, False], arg],
                          timeout=timeout))
            if memory_row(spec):
                for c in order:
                    raw[spec.name]["memory"][c].append(
                        run_fresh([sys.executable, scripts[spec.name, c, True], arg],
                                  timeout=timeout, sample_memory=True))
            print(f"  rep {rep + 1}/{reps} {spec.name}: " + ", ".join(
                f"{c} {got[c]['seconds']:.3f}s" if "seconds" in got[c] else f"{c} FAILED"
                for c in names), file=sys.stderr)
    return raw


def summarize(spec: cw.Spec, rec: dict[str, Any], names: list[str], cores: int,
              scale: float) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = rec["runs"]
    reps = len(runs["loop"])
    ok = {c: [("seconds" in r) for r in runs[c]] for c in names}
    wrong, failed = [], {}
    for c in names:
        for i, r in enumerate(runs[c]):
            if "error" in r:
                failed.setdefault(c, r["error"].strip().splitlines()[-1][:200])
            elif "digest" in r and "digest" in runs["loop"][i] and not cw.same_results(
                    r["digest"], runs["loop"][i]["digest"]):
                wrong.append(c)

    def ratios(c: str, key: str = "seconds", base: str = "loop") -> list[float]:
        return [runs[c][i][key] / runs[base][i][key] for i in range(reps)
                if ok[c][i] and ok[base][i] and runs[base][i].get(key)]

    def best_of(i: int, among: Sequence[str]) -> tuple[str, float] | None:
        cand = [(runs[c][i]["seconds"], c) for c in among if c in runs and ok[c][i]]
        return (min(cand)[1], min(cand)[0]) if cand else None

    others_all = [c for c in names if c != "amortune"]
    others_goal = [c for c in ("loop", "Pool.map", "joblib", "mpire") if c in names]

    def vs_best(among: Sequence[str]) -> tuple[float, str]:
        vals, winners = [], []
        for i in range(reps):
            b = best_of(i, among)
            if b is not None and ok["amortune"][i]:
                vals.append(runs["amortune"][i]["seconds"] / b[1])
                winners.append(b[0])
        return median(vals), (max(set(winners), key=winners.count) if winners else "–")

    to_loop = {c: median(ratios(c)) for c in names}
    predicted = [p["estimated_speedup"] for p in rec["predict"] if "estimated_speedup" in p]
    plans = [f"{p['executor']} n_jobs={p['n_jobs']} chunksize {p['chunksize']}"
             for p in rec["predict"] if "executor" in p]
    measured = 1 / to_loop["amortune"] if to_loop["amortune"] > 0 else math.nan
    pred = median(predicted)
    row: dict[str, Any] = {
        "spec": spec, "n": cw.n_items(spec, scale),
        "seconds": {c: median([r["seconds"] for r in runs[c] if "seconds" in r]) for c in names},
        "to_loop": to_loop,
        "lifetime": {c: median(ratios(c, "lifetime")) for c in names},
        "lifetime_s": {c: median([r["lifetime"] for r in runs[c]]) for c in names},
        "vs_best": vs_best(others_all), "vs_goal": vs_best(others_goal),
        "to_ideal": to_loop["amortune"] * cores if spec.kind == "spin" else None,
        "predicted": pred, "measured": measured,
        "error": (pred - measured) / measured if measured == measured and measured else math.nan,
        "plan": max(set(plans), key=plans.count) if plans else "(optimize failed)",
        "explain": next((p["explain"] for p in rec["predict"] if "explain" in p),
                        next((p.get("error", "") for p in rec["predict"]), "")),
        "optimize_s": median([p["seconds"] for p in rec["predict"] if "seconds" in p]),
        "wrong": sorted(set(wrong)), "failed": failed,
        "others": median([r["others"] for r in runs["loop"] if "others" in r]),
        "leftover": {c: max(r["leftover"] for r in runs[c]) for c in names},
    }
    mem: dict[str, list[dict[str, Any]]] = rec["memory"]
    if memory_row(spec) and mem["loop"]:
        row["peak"] = {c: median([r["peak_pss"] for r in mem[c] if r.get("peak_pss")])
                       for c in names}
        row["peak_ratio"] = {c: median([m["peak_pss"] / b["peak_pss"]
                                        for m, b in zip(mem[c], mem["loop"], strict=True)
                                        if m.get("peak_pss") and b.get("peak_pss")])
                             for c in names}
        for c in names:
            for r in mem[c]:
                if "error" in r:
                    failed.setdefault(c, r["error"].strip().splitlines()[-1][:200])
    return row


# -- import time and the first call --------------------------------------------------------------

FIRST_CALL = {
    "amortune": "import time\nt0 = time.perf_counter()\nimport amortune\n"
                "r = amortune.execute(lambda x: x, range(1000))\n"
                "t = time.perf_counter() - t0\nassert r == list(range(1000))\n"
                "print('{\"seconds\": %r}' % t)\n",
    "loop": "import time\nt0 = time.perf_counter()\nr = list(map(lambda x: x, range(1000)))\n"
            "t = time.perf_counter() - t0\nassert r == list(range(1000))\n"
            "print('{\"seconds\": %r}' % t)\n",
}


def first_call(runs: int, timeout: float) -> dict[str, Any]:
    got: dict[str, list[dict[str, Any]]] = {c: [] for c in FIRST_CALL}
    for i in range(runs):
        for c in (list(FIRST_CALL) if i % 2 == 0 else list(FIRST_CALL)[::-1]):
            got[c].append(run_fresh([sys.executable, "-c", FIRST_CALL[c]], timeout=timeout))
    out: dict[str, Any] = {"runs": runs}
    for c, rs in got.items():
        good = [r for r in rs if "seconds" in r]
        out[c] = {"seconds": median([r["seconds"] for r in good]),
                  "lifetime": median([r["lifetime"] for r in good]),
                  "error": next((r["error"] for r in rs if "error" in r), None)}
    return out


IMPORTS = {"import": "import amortune",
           "engine": "import amortune; amortune.execute",
           # What a first parallel call imports, once the script's own imports are done.
           "parallel": "import amortune, cold_workloads; "
                       "amortune.execute(cold_workloads.spin, [20000] * 300)"}
#: For these probes the total is every import after this module's (the call's own).
IMPORTS_AFTER = {"parallel": "cold_workloads"}


def import_time(code: str, runs: int, timeout: float, after: str | None = None
                ) -> dict[str, Any]:
    """``python -X importtime -c CODE``: medians of the ``amortune`` line's self and cumulative
    µs, of the cumulative µs of every top-level import of ``amortune`` or ``amortune.*`` (the
    package loads its engine lazily), and the slowest modules below them (median self µs).
    With ``after``, the total is every top-level import after module ``after``'s, whoever made
    it: what the call itself imported, the standard library included."""
    selfs, cums, totals, under = [], [], [], {}
    error = None
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env=_env())
        rows = []
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:") or "|" not in line:
                continue
            parts = line[len("import time:"):].split("|")
            try:
                s, c = int(parts[0]), int(parts[1])
            except ValueError:
                continue  # the header line
            name = parts[2].rstrip()
            depth = (len(name) - len(name.lstrip()) - 1) // 2  # "| " then two spaces a level
            rows.append((s, c, depth, name.strip()))
        if after is None:
            tops = [i for i, r in enumerate(rows)
                    if r[2] == 0 and (r[3] == "amortune" or r[3].startswith("amortune."))]
        else:
            start = next((i for i, r in enumerate(rows) if r[2] == 0 and r[3] == after), None)
            tops = [] if start is None else [i for i in range(start + 1, len(rows))
                                             if rows[i][2] == 0]
            if tops and not any(r[3] == "amortune" for r in rows):
                tops = []
        if proc.returncode != 0 or not tops:
            error = proc.stderr[-1000:]
            continue
        total = 0
        for i in tops:
            j = i
            while j > 0 and rows[j - 1][2] > 0:
                j -= 1
            total += rows[i][1]
            for s, _c, _d, name in rows[j:i]:
                under.setdefault(name, []).append(s)
            if rows[i][3] == "amortune":
                selfs.append(rows[i][0])
                cums.append(rows[i][1])
        if after is not None:
            top = next(r for r in rows if r[3] == "amortune")
            selfs.append(top[0])
            cums.append(top[1])
        totals.append(total)
    slowest = sorted(((median(v), k) for k, v in under.items()), reverse=True)[:5]
    return {"code": code, "self_us": median(selfs), "cumulative_us": median(cums),
            "total_us": median(totals), "runs": len(totals),
            "slowest": [(k, v) for v, k in slowest], "error": error}


# -- report --------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _x(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}×"


def targets(rows: list[dict[str, Any]], cores: int) -> list[tuple[str, bool]]:
    checks: list[tuple[str, bool]] = []
    for r in rows:
        s, a = r["spec"], r["to_loop"]["amortune"]
        if s.kind in ("spin", "cpu"):
            v, who = r["vs_goal"]
            checks.append((f"{s.name}: amortune ≤ 1.05 × best of loop/Pool.map/joblib/mpire "
                           f"({v:.2f}× {who})", v <= 1.05))
        if s.kind == "spin":
            checks.append((f"{s.name}: amortune ≤ 1.05 × ideal (loop / {cores}) "
                           f"({r['to_ideal']:.2f}×)", r["to_ideal"] <= 1.05))
        if s.kind in ("tiny", "inputs"):
            checks.append((f"{s.name}: amortune ≤ 1.2 × loop ({a:.2f}×)", a <= 1.2))
        if s.kind == "results":
            checks.append((f"{s.name}: amortune ≤ 1.05 × loop ({a:.2f}×)", a <= 1.05))
            p = r["peak_ratio"]["amortune"]
            checks.append((f"{s.name}: amortune's peak memory ≤ 1.1 × the loop's ({p:.2f}×)",
                           p <= 1.1))
        if s.kind == "sleep":
            checks.append((f"{s.name}: amortune ≤ 0.05 × loop ({a:.3f}×)", a <= 0.05))
        e = r["error"]
        checks.append((f"{s.name}: predicted speedup within ±25% of measured "
                       f"({r['predicted']:.2f}× vs {r['measured']:.2f}×, {e:+.0%})",
                       abs(e) <= 0.25))
        if r["wrong"] or "amortune" in r["failed"]:
            checks.append((f"{s.name}: amortune's results equal the loop's", False))
    return checks


def report(rows: list[dict[str, Any]], names: list[str], cores: int,
           extra: dict[str, Any]) -> tuple[list[str], list[tuple[str, bool]]]:
    md: list[str] = []
    peers = [c for c in names if c != "loop"]
    if rows:
        md += ["## Cold: one call in a fresh process (time ÷ loop; lower is better)", ""]
        body = []
        for r in rows:
            v, who = r["vs_best"]
            res = ("all match" if not r["wrong"] and not r["failed"] else
                   "; ".join([f"WRONG: {', '.join(r['wrong'])}"] * bool(r["wrong"])
                             + [f"failed: {', '.join(r['failed'])}"] * bool(r["failed"])))
            body.append([r["spec"].name, str(r["n"]), f"{r['seconds']['loop']:.3f}",
                         *(_x(r["to_loop"][c]) for c in peers),
                         f"{_x(v)} ({who})", _x(r["to_ideal"]),
                         _x(r["predicted"]), _x(r["measured"]),
                         "–" if r["error"] != r["error"] else f"{r['error']:+.0%}", res])
        md += _table(["workload", "items", "loop s", *peers, "amortune ÷ best other",
                      f"amortune ÷ ideal (loop/{cores})", "predicted", "measured", "error",
                      "results"], body)
        md += ["", "Each cell is the median over repeats of (contestant ÷ loop) within one repeat; "
               "every measurement is a new `python` process running one call, pool creation and "
               "shutdown timed. *best other* is the fastest non-amortune contestant of each repeat "
               "(the one named won most repeats); *ideal* is shown for the pure-Python spin "
               "rows; *predicted* is `optimize(func, data).estimated_speedup` in its own fresh "
               "process, *measured* is loop ÷ amortune."]
        md += ["", "### Wall time of the timed call (median seconds)", ""]
        md += _table(["workload", *names, "others' load during the loop"],
                     [[r["spec"].name, *(f"{r['seconds'][c]:.3f}" for c in names),
                       "–" if r["others"] != r["others"] else f"{r['others']:.2f} cores"]
                      for r in rows])
        md += ["", "### Whole process, start to exit (÷ the loop's process; median seconds of "
               "the loop's)", ""]
        md += _table(["workload", "loop s", *peers],
                     [[r["spec"].name, f"{r['lifetime_s']['loop']:.3f}",
                       *(_x(r["lifetime"][c]) for c in peers)] for r in rows])
        slow_exit = [f"{r['spec'].name}/{c} {t:.1f} s" for r in rows
                     for c, t in r["leftover"].items() if t >= 0.5]
        if slow_exit:
            md += ["", "Processes that outlived their probe by 0.5 s or more (worker or server "
                   "processes still running after the script exited): " + ", ".join(slow_exit)]
        mem = [r for r in rows if "peak" in r]
        if mem:
            md += ["", "### Peak memory: PSS of the process tree, sampled every 25 ms and right "
                   "after the call, in separate untimed runs (median MiB; ÷ the loop's)", ""]
            md += _table(["workload", *names],
                         [[r["spec"].name, *(f"{r['peak'][c] / MIB:.0f} ({_x(r['peak_ratio'][c])})"
                                             for c in names)] for r in mem])
        md += ["", "### amortune's plan (`optimize` in a fresh process)", ""]
        md += _table(["workload", "what", "plan", "predicted", "optimize s"],
                     [[r["spec"].name, r["spec"].note, r["plan"], _x(r["predicted"]),
                       f"{r['optimize_s']:.3f}"] for r in rows])
        fails = [f"{r['spec'].name}/{c}: {e}" for r in rows for c, e in r["failed"].items()]
        if fails:
            md += ["", "Failed runs: " + "; ".join(fails)]
    if "importtime" in extra:
        for it in extra["importtime"]:
            md += ["", f"### `python -X importtime -c \"{it['code']}\"` (median of "
                   f"{it['runs']})", ""]
            if not it["runs"]:
                md += [f"failed: {it['error']}"]
                continue
            what = ("every import the call made (the standard library's included)"
                    if "execute(" in it["code"] else "every top-level `amortune*` import")
            md += [f"`amortune`: self {it['self_us'] / 1e3:.2f} ms, cumulative "
                   f"{it['cumulative_us'] / 1e3:.2f} ms; {what} "
                   f"together: {it['total_us'] / 1e3:.2f} ms. Slowest modules below them "
                   "(self): " + (", ".join(f"`{k}` {v / 1e3:.2f} ms" for k, v in it["slowest"])
                                 or "none") + "."]
    if "first_call" in extra:
        fc = extra["first_call"]
        a, lp = fc["amortune"], fc["loop"]
        md += ["", f"### First call in a fresh process (median of {fc['runs']} processes)", ""]
        if a["error"] or lp["error"]:
            md += [f"failed: {a['error'] or lp['error']}"]
        else:
            md += [f"`import amortune; amortune.execute(lambda x: x, range(1000))`, from before "
                   f"the import to the result: {a['seconds'] * 1e3:.1f} ms; "
                   f"`list(map(lambda x: x, range(1000)))`: {lp['seconds'] * 1e3:.2f} ms "
                   f"(overhead {(a['seconds'] - lp['seconds']) * 1e3:+.1f} ms). Whole process: "
                   f"{a['lifetime'] * 1e3:.0f} ms vs {lp['lifetime'] * 1e3:.0f} ms "
                   f"({(a['lifetime'] - lp['lifetime']) * 1e3:+.0f} ms)."]
    checks = targets(rows, cores)
    if checks:
        md += ["", "### Targets", ""]
        md += _table(["target", "result"], [[t, "PASS" if ok else "**MISS**"] for t, ok in checks])
    return md, checks


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _machine() -> tuple[int, str, str]:
    """Usable cores, the machine in words, and which amortune the probes import."""
    try:
        import amortune

        where = f"amortune {amortune.__version__} from {os.path.dirname(amortune.__file__)}"
    except Exception as exc:  # a broken checkout still gets its failures reported, row by row
        where = f"amortune (import failed: {exc!r})"
    try:
        system = amortune.probe_system()
        return system.usable_cores, system.describe(), where
    except Exception as exc:  # the report still needs a core count
        cores = len(os.sched_getaffinity(0))
        return cores, f"{cores} usable cores (amortune.probe_system failed: {exc!r})", where


CAPACITY_SCRIPT = """
import sys, time
sys.path.insert(0, {here!r})
from cold_workloads import spin
began = time.perf_counter()
for _ in range({items}):
    spin({steps})
print(time.perf_counter() - began)
"""


def parallel_capacity(cores: int, steps: int, items: int, rounds: int = 5
                      ) -> tuple[float, float]:
    """How many cores' worth of pure-Python work this machine runs at once right now.

    ``cores`` fresh processes spin the same ``items`` × ~2 ms at once, against one alone (timed
    inside each, start-up excluded), alternated ``rounds`` times: capacity = cores × alone ÷
    together, medians. A virtual machine whose cores share hardware with its neighbours gets
    less than ``cores``; then no contestant can reach the loop ÷ cores ideal. Also the median
    seconds of one alone."""
    code = CAPACITY_SCRIPT.format(here=HERE, items=items, steps=steps)

    def together(n: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  text=True) for _ in range(n)]
        return [float(p.communicate()[0]) for p in procs]

    alone, both = [], []
    for _ in range(rounds):
        alone.extend(together(1))
        both.append(statistics.fmean(together(cores)))
    one = statistics.median(alone)
    return cores * one / statistics.median(both), one


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer items, one repeat (< 60 s)")
    ap.add_argument("--reps", type=int, default=None, help="repeats (default 3, quick 1)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="a workload name, or importtime / first-call (repeatable)")
    ap.add_argument("--write", metavar="PATH", help="also write the report as Markdown to PATH")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds one probe may run (default 300, quick 60)")
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    scale = 0.05 if args.quick else 1.0
    timeout = args.timeout or (60 if args.quick else 300)
    known = [s.name for s in cw.SPECS] + ["importtime", "first-call"]
    for name in args.only:
        if name not in known:
            ap.error(f"--only {name!r}: choose from {', '.join(known)}")
    wanted = set(args.only) or set(known)
    names = [c for c in CONTESTANTS
             if c not in OPTIONAL or importlib.util.find_spec(OPTIONAL[c]) is not None]
    skipped = [c for c in CONTESTANTS if c not in names]
    cores, machine, where = _machine()
    steps, per_step = cw.calibrate()
    print(f"calibrated: {steps} steps of spin ≈ 2 ms ({per_step * 1e9:.1f} ns each); {machine}"
          + (f"; skipped (not importable): {', '.join(skipped)}" if skipped else ""),
          file=sys.stderr)
    started = time.perf_counter()
    precompile()
    load_before = os.getloadavg()
    capacity_items = 25 if args.quick else 250
    capacity_rounds = 1 if args.quick else 5
    capacity = ([parallel_capacity(cores, steps, capacity_items, capacity_rounds)]
                if cores > 1 else [])
    specs = [s for s in cw.SPECS if s.name in wanted]
    folder = tempfile.mkdtemp(prefix="amortune-cold-")
    try:
        raw = bench(specs, names, reps, scale, steps, per_step, folder, timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = [summarize(s, raw[s.name], names, cores, scale) for s in specs]
    extra: dict[str, Any] = {}
    runs = 3 if args.quick else 7
    if "importtime" in wanted:
        extra["importtime"] = [import_time(code, runs, timeout, IMPORTS_AFTER.get(name))
                               for name, code in IMPORTS.items()]
    if "first-call" in wanted:
        extra["first_call"] = first_call(runs, timeout)
    if cores > 1:
        capacity.append(parallel_capacity(cores, steps, capacity_items, capacity_rounds))
    load_after = os.getloadavg()
    md, checks = report(rows, names, cores, extra)
    command = shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    header = [
        "## Cold benchmark: one call per fresh process", "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: {machine} ({platform.processor() or platform.machine()})",
        f"- Python {platform.python_version()}, {where}, numpy "
        f"{_version('numpy')}, joblib {_version('joblib')}, mpire {_version('mpire')}"
        + (f" (skipped: {', '.join(skipped)})" if skipped else ""),
        f"- command: `{command}` ({reps} interleaved repeat{'s' * (reps != 1)}, medians; "
        f"{time.perf_counter() - started:.0f} s)",
        f"- load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"~2 ms = {steps} steps of `spin` ({per_step * 1e9:.1f} ns each)",
        *([f"- parallel capacity: {cores} processes spinning at once got "
           + " and ".join(f"{c:.2f}" for c, _ in capacity)
           + f" cores' worth (before and after the run; {capacity_items} × ~2 ms each, one "
           f"alone in {capacity[0][1]:.2f} s): the best any contestant can reach here is "
           f"about {cores / min(c for c, _ in capacity):.2f}× the loop ÷ {cores} ideal"]
          if capacity else []),
        "", "Bytecode of amortune and the workload module is compiled ahead, as after `pip "
        "install`" + ("; `PYTHONDONTWRITEBYTECODE` is set here, and the probes run without it"
                      if "PYTHONDONTWRITEBYTECODE" in os.environ else "") + ".",
        "", "Contestants, each timed from the call to its result (pool creation and shutdown "
        "included): `list(map(f, data))`; `amortune.execute(f, data)`; `with "
        "multiprocessing.Pool() as p: p.map(f, data)`; `with ProcessPoolExecutor() as ex: "
        "list(ex.map(f, data))`; `Parallel(n_jobs=-1)(delayed(f)(x) for x in data)`; `with "
        "mpire.WorkerPool() as p: p.map(f, data, concatenate_numpy_output=False)` (1MiB-inputs: "
        "items wrapped by `make_single_arguments`, or mpire would unpack each array).", ""]
    print("\n".join(header + md))
    missed = [t for t, ok in checks if not ok]
    print(f"\ntargets: {len(checks) - len(missed)} PASS, {len(missed)} MISS", file=sys.stderr)
    missed_rows = [r for r in rows if any(t.startswith(r["spec"].name + ":") for t in missed)]
    for r in missed_rows:
        print(f"\n{r['spec'].name}: amortune.optimize(...).explain() in a fresh process:\n"
              f"{r['explain']}", file=sys.stderr)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write("\n".join(header + md) + "\n")
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
