"""The ``optimize`` and ``run`` commands."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from ._errors import _user_errors
from ._inputs import _input, _load
from ._outputs import _OutFile
from ._reporting import _check_report_path, _run_with_report, _write_report


def _optimize(args: argparse.Namespace) -> int:
    func, spec = _load(args.function)
    data = _input(args)
    import amortune

    with _user_errors(spec):
        plan = amortune.optimize(func, data, n_jobs=args.n_jobs, executor=args.executor)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.explain(), flush=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    func, spec = _load(args.function)
    out = _OutFile(args.out)
    report_path = _check_report_path(args.report) if args.report else None
    data = _input(args)
    import amortune

    batched = args.spill or args.checkpoint is not None
    kwargs: dict[str, Any] = {"n_jobs": args.n_jobs, "executor": args.executor,
                              "progress": bool(args.progress)}
    if batched:
        call: Callable[..., Any] = amortune.process_in_batches
        kwargs.update(spill="disk" if args.spill else None, checkpoint=args.checkpoint)
    else:
        call = amortune.execute
    results: Any = None
    try:
        t0 = time.perf_counter()
        with _user_errors(spec):
            if report_path is None:
                results, report = call(func, data, **kwargs), None
            else:
                results, report = _run_with_report(call, func, data, kwargs,
                                                   checkpoint=args.checkpoint is not None)
        seconds = time.perf_counter() - t0
        out.write(results)
    except BaseException:
        out.discard()
        raise
    finally:
        close = getattr(results, "close", None)
        if callable(close):
            close()  # spilled results: remove their folder now
    print(f"wrote {len(out)} results to {args.out} in {seconds:.2f} s", flush=True)
    if report is not None and report_path is not None:
        _write_report(report, report_path)
        print(f"report: {report_path}", flush=True)
    return 0
