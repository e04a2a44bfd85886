"""The behaviours code written for ``multiprocessing.Pool`` relies on, and hostile inputs.

Each test pins one behaviour the drop-in must share with the stdlib (or refuse clearly).
"""

from __future__ import annotations

import multiprocessing.pool
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import amortune
from tests import tasks

ROOT = Path(__file__).resolve().parents[1]


def test_map_runs_every_item_then_raises_the_first_error(tmp_path: Path) -> None:
    folder = tmp_path / "ran"
    folder.mkdir()
    import functools

    func = functools.partial(tasks.record_start_fail_at_40, str(folder))
    with amortune.Pool(2) as pool, pytest.raises(ValueError, match="item 40"):
        pool.map(func, range(120), chunksize=3)
    ran = sorted(int(p.name) for p in folder.iterdir())
    assert ran == list(range(120))  # every item ran, as in the stdlib: no fail-fast


def test_a_worker_error_has_a_remote_traceback_with_the_real_source_line() -> None:
    with amortune.Pool(2) as pool, pytest.raises(ValueError) as info:
        pool.map(tasks.fail_on_7, range(20))
    cause = info.value.__cause__
    assert isinstance(cause, multiprocessing.pool.RemoteTraceback)
    assert "tests/tasks.py" in str(cause) and "raise ValueError" in str(cause)


def test_imap_with_a_chunksize_puts_an_input_error_in_place_of_the_whole_chunk() -> None:
    def gen():
        yield from range(10)
        raise OSError("the input broke at item 10")

    with amortune.Pool(2) as pool:
        got = []
        with pytest.raises(OSError, match="broke"):
            for r in pool.imap(tasks.square, gen(), chunksize=4):
                got.append(r)
    assert got == [x * x for x in range(8)]  # items 8-9 were read into the failed chunk


def test_input_errors_are_noted_as_the_inputs_own() -> None:
    def gen():
        yield from range(70)
        raise OSError("disk went away")

    with pytest.raises(OSError) as info:
        amortune.execute(tasks.square, gen(), backend="threads", n_jobs=2)
    assert "amortune: raised by the input while reading item 70" in info.value.__notes__


def test_blocking_calls_from_a_callback_raise_instead_of_deadlocking() -> None:
    seen: list[BaseException] = []

    with amortune.Pool(1) as pool:
        def callback(_: object) -> None:
            try:
                pool.apply(tasks.square, (2,))
            except RuntimeError as exc:
                seen.append(exc)

        pool.apply_async(tasks.square, (3,), callback=callback).wait(30)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen and "callback" in str(seen[0])


INIT_POOL_SCRIPT = textwrap.dedent("""
    import amortune

    STATE = {}

    def init(k):
        STATE["k"] = k

    def work(x):
        return x + STATE["k"]

    if __name__ == "__main__":
        with amortune.Pool(2, initializer=init, initargs=(10,)) as pool:
            print(pool.map(work, range(5)))
""")


def test_pool_initializer_from_main_works(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(INIT_POOL_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[10, 11, 12, 13, 14]"


SET_START_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp
    import amortune

    if __name__ == "__main__":
        mp.set_start_method("spawn")
        with amortune.Pool(1) as pool:
            print(pool._backend.start_method, pool.map(abs, [-1, -2]))
""")


def test_set_start_method_is_honoured_by_a_pool_given_no_context() -> None:
    out = subprocess.run([sys.executable, "-c", SET_START_SCRIPT], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "spawn"


def test_spill_refuses_a_value_that_is_neither_disk_nor_a_path(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="disk"):
        amortune.process_in_batches(tasks.square, range(3), spill="ram")
    assert not os.path.exists(tmp_path / "ram")
