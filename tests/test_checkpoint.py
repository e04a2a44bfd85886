"""Tests for amortune._checkpoint: fingerprints, resume, refusal, and consistency after SIGKILL."""

from __future__ import annotations

import errno
import functools
import gc
import json
import operator
import os
import pathlib
import pickle
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amortune._checkpoint import (
    BatchRecord,
    Checkpoint,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointPermissionError,
    describe_function,
    function_fingerprint,
    input_digest,
)
from amortune._files import PrivateDir, canonical_dumps
from amortune._spill import SpillError, write_segment
from tests import tasks

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def tmp_dir() -> Iterator[pathlib.Path]:
    """A scratch folder removed after the test (pytest's tmp_path outlives the run)."""
    with tempfile.TemporaryDirectory(prefix="amortune-test-") as d:
        yield pathlib.Path(d)


def run_python(code: str, *args: str, hash_seed: str = "0") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": hash_seed}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120
    )


def make_function(source: str, name: str = "f", module: str = "user_mod") -> Callable[..., Any]:
    namespace: dict[str, Any] = {"__name__": module}
    exec(compile(textwrap.dedent(source), f"<{module}>", "exec"), namespace)
    return namespace[name]  # type: ignore[no-any-return]


def mode_of(path: pathlib.Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- fingerprints -------------------------------------------------------------------------------

BASE = """
def f(x):
    def inner(y):
        return y * 2
    return inner(x) + 1
"""


def test_fingerprint_is_equal_for_the_same_function() -> None:
    a, b = make_function(BASE), make_function(BASE)
    assert a is not b
    assert function_fingerprint(a) == function_fingerprint(b)
    assert len(function_fingerprint(a)) == 64
    before = function_fingerprint(a)
    for i in range(2000):  # the adaptive interpreter rewrites hot code in place
        a(i)
    assert function_fingerprint(a) == before


@pytest.mark.parametrize(
    "other",
    [
        BASE.replace("+ 1", "+ 2"),  # constant in the body
        BASE.replace("y * 2", "y * 3"),  # constant in a nested function
        BASE.replace("y * 2", "y + y"),  # nested bytecode
        BASE.replace("inner(x)", "abs(x)"),  # names
        BASE.replace("def f(x)", "def g(x)").replace("    return inner", "    return inner"),
    ],
    ids=["const", "nested-const", "nested-code", "names", "name"],
)
def test_fingerprint_changes_with_the_code_or_name(other: str) -> None:
    name = "g" if "def g" in other else "f"
    assert function_fingerprint(make_function(BASE)) != function_fingerprint(
        make_function(other, name)
    )


def test_fingerprint_depends_on_module_and_ignores_line_numbers() -> None:
    assert function_fingerprint(make_function(BASE, module="a")) != function_fingerprint(
        make_function(BASE, module="b")
    )
    assert function_fingerprint(make_function(BASE)) == function_fingerprint(
        make_function("\n\n\n" + BASE)
    )


def test_fingerprint_of_callables_without_code() -> None:
    base = make_function(BASE)
    assert function_fingerprint(functools.partial(base, 1)) == function_fingerprint(
        functools.partial(base, 1)
    )
    assert function_fingerprint(functools.partial(base, 1)) != function_fingerprint(
        functools.partial(base, 2)
    )
    assert function_fingerprint(operator.itemgetter(1)) == function_fingerprint(
        operator.itemgetter(1)
    )
    assert function_fingerprint(operator.itemgetter(1)) != function_fingerprint(
        operator.itemgetter(2)
    )
    assert function_fingerprint(len) != function_fingerprint(abs)
    assert describe_function(functools.partial(base, 1)) == "user_mod.f"
    assert describe_function(operator.itemgetter(1)) == "operator.itemgetter"


def test_fingerprints_and_digests_are_stable_across_processes() -> None:
    # The frozenset constant and the set/dict inputs iterate in hash-seed order.
    source = "def f(x):\n    return x in {'alpha', 'beta', 'gamma', 'delta', 'eps'}\n"
    code = textwrap.dedent(
        f"""
        import functools, operator, textwrap
        from amortune._checkpoint import function_fingerprint, input_digest
        ns = {{"__name__": "user_mod"}}
        exec({source!r}, ns)
        print(function_fingerprint(ns["f"]))
        print(function_fingerprint(functools.partial(textwrap.indent, prefix="> ")))
        print(function_fingerprint(operator.itemgetter(1)))
        print(input_digest([{{"b": 1, "a": (2.5, "x")}}, "text", None, b"raw", 10**30]))
        """
    )
    outputs = set()
    for seed in ("1", "2", "3"):
        proc = run_python(code, hash_seed=seed)
        assert proc.returncode == 0, proc.stderr
        outputs.add(proc.stdout)
    assert len(outputs) == 1
    lines = outputs.pop().split()
    f = make_function(source)
    assert lines[0] == function_fingerprint(f)
    assert lines[1] == function_fingerprint(functools.partial(textwrap.indent, prefix="> "))
    assert lines[3] == input_digest([{"b": 1, "a": (2.5, "x")}, "text", None, b"raw", 10**30])


def test_input_digest() -> None:
    assert input_digest([1, 2, 3]) == input_digest((1, 2, 3)) == input_digest(range(1, 4))
    assert input_digest([1, 2, 3]) != input_digest([1, 2, 4])
    assert input_digest([1, 2, 3]) != input_digest([3, 2, 1])
    assert input_digest([[1, 2], [3]]) != input_digest([[1], [2, 3]])
    shared = [0] * 3
    assert input_digest([shared, shared]) == input_digest([[0] * 3, [0] * 3])
    arr = np.arange(5.0)
    assert input_digest([arr]) == input_digest([arr.copy()])
    assert input_digest([arr]) != input_digest([arr + 1])
    fn = lambda x: x  # noqa: E731 - needs cloudpickle
    assert input_digest([fn]) == input_digest([fn])


# -- open, record, resume -----------------------------------------------------------------------


def test_open_creates_a_private_folder(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "nested" / "run.ckpt"
    ckpt = Checkpoint.open(path, fingerprint="fp", mode="list", function_name="m.f")
    assert mode_of(path) == 0o700
    assert mode_of(path / "manifest.json") == 0o600
    assert ckpt.batches == [] and ckpt.next_start == 0
    assert list(ckpt.results()) == []
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["fingerprint"] == "fp" and manifest["function"] == "m.f"
    with pytest.raises(ValueError, match="mode"):
        Checkpoint.open(tmp_dir / "x", fingerprint="fp", mode="dict")


def test_list_mode_round_trip(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "run.ckpt"
    ckpt = Checkpoint.open(path, fingerprint="fp", mode="list")
    batches = [[1, 2, 3], [4, 5], [6]]
    start = 0
    for seq, items in enumerate(batches):
        results: list[Any] = [np.full(4, x, dtype=float) for x in items] if seq != 1 else items
        ckpt.record_batch(seq, start, start + len(items), input_digest(items), results=results)
        start += len(items)
    ckpt.close()
    again = Checkpoint.open(path, fingerprint="fp", mode="list")
    assert again.next_start == 6
    assert [(b.seq, b.start, b.stop) for b in again.batches] == [(0, 0, 3), (1, 3, 5), (2, 5, 6)]
    assert again.batches[1] == BatchRecord(1, 3, 5, input_digest([4, 5]), "seg-00000001.pkl")
    got = again.results()
    assert len(got) == 6
    assert got[3] == 4 and got[4] == 5
    assert np.array_equal(got[0], np.full(4, 1.0)) and np.array_equal(got[-1], np.full(4, 6.0))
    for seq, items in enumerate(batches):
        again.verify_batch(
            seq, again.batches[seq].start, again.batches[seq].stop, input_digest(items)
        )
    got.close()  # its own store: the checkpoint stays usable and on disk
    again.record_batch(3, 6, 8, input_digest([7, 8]), results=[7, 8])
    assert list(again.results())[-2:] == [7, 8]
    assert all(mode_of(p) == 0o600 for p in path.iterdir())


def test_reduce_mode_round_trip(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "sum.ckpt"
    ckpt = Checkpoint.open(path, fingerprint="fp", mode="reduce")
    with pytest.raises(LookupError):
        ckpt.aggregate()
    total = 0
    for seq in range(4):
        items = list(range(seq * 3, seq * 3 + 3))
        total += sum(items)
        ckpt.record_batch(seq, seq * 3, seq * 3 + 3, input_digest(items), aggregate={"sum": total})
    ckpt.close()
    again = Checkpoint.open(path, fingerprint="fp", mode="reduce")
    assert again.aggregate() == {"sum": sum(range(12))}
    assert again.next_start == 12 and all(b.segment is None for b in again.batches)
    assert sorted(os.listdir(path)) == [".lock", "aggregate-00000003.pkl", "manifest.json"]
    again.record_batch(4, 12, 13, input_digest([12]), aggregate=lambda: 99)  # needs cloudpickle
    again.close()
    assert Checkpoint.open(path, fingerprint="fp", mode="reduce").aggregate()() == 99
    with pytest.raises(ValueError, match="'reduce' mode"):
        again.results()


def test_mismatched_function_or_mode_is_refused(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "run.ckpt"
    old, new = make_function(BASE), make_function(BASE.replace("+ 1", "+ 2"))
    Checkpoint.open(
        path, fingerprint=function_fingerprint(old), mode="list", function_name="user_mod.f"
    )
    with pytest.raises(CheckpointMismatchError) as info:
        Checkpoint.open(
            path, fingerprint=function_fingerprint(new), mode="list", function_name="other.g"
        )
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "user_mod.f" in message and "other.g" in message and str(path) in message
    assert "delete it" in message
    with pytest.raises(CheckpointMismatchError, match="its code or the values it captures"):
        Checkpoint.open(
            path, fingerprint=function_fingerprint(new), mode="list", function_name="user_mod.f"
        )
    with pytest.raises(CheckpointMismatchError, match="'list' mode"):
        Checkpoint.open(path, fingerprint=function_fingerprint(old), mode="reduce")


def test_verify_batch_names_the_batch_whose_input_changed(tmp_dir: pathlib.Path) -> None:
    ckpt = Checkpoint.open(tmp_dir / "c", fingerprint="fp", mode="list")
    ckpt.record_batch(0, 0, 2, input_digest([1, 2]), results=[1, 2])
    ckpt.record_batch(1, 2, 4, input_digest([3, 4]), results=[3, 4])
    ckpt.verify_batch(1, 2, 4, input_digest([3, 4]))
    with pytest.raises(CheckpointMismatchError, match=r"input changed.*batch 1 \(items 2-3\)"):
        ckpt.verify_batch(1, 2, 4, input_digest([3, 5]))
    with pytest.raises(CheckpointMismatchError, match="batch boundaries"):
        ckpt.verify_batch(1, 2, 5, input_digest([3, 4]))
    with pytest.raises(ValueError, match="not recorded"):
        ckpt.verify_batch(2, 4, 6, input_digest([5, 6]))


def test_record_batch_refuses_misuse(tmp_dir: pathlib.Path) -> None:
    ckpt = Checkpoint.open(tmp_dir / "c", fingerprint="fp", mode="list")
    with pytest.raises(ValueError, match="expects batch 0"):
        ckpt.record_batch(1, 0, 2, "d", results=[1, 2])
    with pytest.raises(ValueError, match="starting at 0"):
        ckpt.record_batch(0, 1, 2, "d", results=[1])
    with pytest.raises(TypeError):
        ckpt.record_batch(0, 0, 2, "d")
    with pytest.raises(TypeError):
        ckpt.record_batch(0, 0, 2, "d", results=[1, 2], aggregate=3)
    reduce = Checkpoint.open(tmp_dir / "r", fingerprint="fp", mode="reduce")
    with pytest.raises(TypeError):
        reduce.record_batch(0, 0, 2, "d", results=[1, 2])
    with pytest.raises(ValueError, match="'list' mode"):
        ckpt.aggregate()
    ckpt.remove()
    assert not (tmp_dir / "c").exists()
    with pytest.raises(ValueError, match="closed"):
        ckpt.record_batch(0, 0, 2, "d", results=[1, 2])


# -- refusal and recovery -----------------------------------------------------------------------


def test_a_checkpoint_in_use_is_refused(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "c"
    first = Checkpoint.open(path, fingerprint="fp", mode="list")
    with pytest.raises(CheckpointError, match="in use by another run"):
        Checkpoint.open(path, fingerprint="fp", mode="list")
    first.close()
    second = Checkpoint.open(path, fingerprint="fp", mode="list")
    del second
    gc.collect()
    with Checkpoint.open(path, fingerprint="fp", mode="list") as third:
        third.record_batch(0, 0, 1, input_digest([1]), results=[1])
    with pytest.raises(ValueError, match="closed"):
        third.record_batch(1, 1, 2, input_digest([2]), results=[2])


@pytest.mark.parametrize("target", ["manifest", "folder", "segment"])
def test_files_others_could_write_are_refused(tmp_dir: pathlib.Path, target: str) -> None:
    path = tmp_dir / "c"
    ckpt = Checkpoint.open(path, fingerprint="fp", mode="list")
    ckpt.record_batch(0, 0, 1, input_digest([1]), results=[1])
    ckpt.close()
    victim = {
        "manifest": path / "manifest.json",
        "folder": path,
        "segment": path / "seg-00000000.pkl",
    }
    os.chmod(victim[target], 0o777 if target == "folder" else 0o666)
    with pytest.raises(CheckpointPermissionError, match="writable by group or others") as info:
        Checkpoint.open(path, fingerprint="fp", mode="list")
    assert isinstance(info.value, PermissionError)
    assert "pickle" in str(info.value)


def test_folders_of_other_users_are_refused(
    tmp_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Checkpoint.open(tmp_dir / "c", fingerprint="fp", mode="list")
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_dir).st_uid + 1)
    with pytest.raises(CheckpointPermissionError, match="belongs to user id"):
        Checkpoint.open(tmp_dir / "c", fingerprint="fp", mode="list")


def test_open_deletes_what_an_interrupted_write_left(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "c"
    ckpt = Checkpoint.open(path, fingerprint="fp", mode="list")
    ckpt.record_batch(0, 0, 2, input_digest([1, 2]), results=[1, 2])
    ckpt.close()
    folder = PrivateDir.open(path)
    write_segment(folder, 1, [3, 4])  # written, but the manifest never listed it
    folder.close()
    for leftover in ("seg-00000002.npy.0badc0de.tmp", "manifest.json.12ab34cd.tmp"):
        (path / leftover).write_bytes(b"half")
    (path / "notes.txt").write_text("the user's own file")
    again = Checkpoint.open(path, fingerprint="fp", mode="list")
    assert sorted(os.listdir(path)) == [".lock", "manifest.json", "notes.txt", "seg-00000000.pkl"]
    assert list(again.results()) == [1, 2]
    again.record_batch(1, 2, 4, input_digest([3, 4]), results=[30, 40])
    again.close()
    assert list(Checkpoint.open(path, fingerprint="fp", mode="list").results()) == [1, 2, 30, 40]


def test_damaged_checkpoints_raise_checkpoint_error(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "c"
    ckpt = Checkpoint.open(path, fingerprint="fp", mode="list")
    ckpt.record_batch(0, 0, 1, input_digest([1]), results=[1])
    ckpt.close()
    os.unlink(path / "seg-00000000.pkl")
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint.open(path, fingerprint="fp", mode="list")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["batches"][0]["segment"] = "../../etc/passwd"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="damaged"):
        Checkpoint.open(path, fingerprint="fp", mode="list")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        Checkpoint.open(path, fingerprint="fp", mode="list")


def test_disk_full_while_writing_the_manifest_keeps_the_last_state(
    tmp_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_dir / "c"
    ckpt = Checkpoint.open(path, fingerprint="fp", mode="reduce")
    ckpt.record_batch(0, 0, 1, input_digest([1]), aggregate=1)
    real_replace = os.replace

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        if str(dst).endswith("manifest.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SpillError, match="No space left"):
        ckpt.record_batch(1, 1, 2, input_digest([2]), aggregate=3)
    monkeypatch.undo()
    assert ckpt.next_start == 1 and ckpt.aggregate() == 1
    ckpt.close()
    with Checkpoint.open(path, fingerprint="fp", mode="reduce") as again:
        assert again.aggregate() == 1
        again.record_batch(1, 1, 2, input_digest([2]), aggregate=3)
    assert Checkpoint.open(path, fingerprint="fp", mode="reduce").aggregate() == 3


# -- SIGKILL at any moment ----------------------------------------------------------------------

KILLED_RUN = """
import json, os, signal, sys
import numpy as np
from amortune._checkpoint import Checkpoint, input_digest

cfg = json.loads(sys.argv[1])
ckpt = Checkpoint.open(cfg["folder"], fingerprint="fp", mode=cfg["mode"])
armed = False
real_open, real_replace, real_write = os.open, os.replace, os.write
opened = {}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def open_(path, flags, mode=0o777, **kw):
    fd = real_open(path, flags, mode, **kw)
    opened[fd] = os.path.basename(path)
    return fd

def replace(src, dst, **kw):  # "before_manifest": the batch's file is complete, the manifest not
    if armed and cfg["phase"] == "before_manifest" and str(dst).endswith("manifest.json"):
        die()
    return real_replace(src, dst, **kw)

def write(fd, data):  # "mid_data" / "mid_manifest": half of that file reached the disk
    target = "manifest" if opened.get(fd, "").startswith("manifest.json") else "data"
    if armed and cfg["phase"] == f"mid_{target}":
        view = memoryview(data)
        real_write(fd, view[: max(1, len(view) // 2)])
        os.fsync(fd)
        die()
    return real_write(fd, data)

os.open, os.replace, os.write = open_, replace, write
start, total = 0, 0
for seq, size in enumerate(cfg["sizes"]):
    if seq == cfg["k"]:
        if cfg["phase"] == "after":
            die()
        armed = True
    items = list(range(start, start + size))
    digest = input_digest(items)
    if cfg["mode"] == "list":
        if cfg["kind"] == "array":
            results = [np.full(3, x, dtype=float) for x in items]
        else:
            results = [{"x": x, "sq": x * x} for x in items]
        ckpt.record_batch(seq, start, start + size, digest, results=results)
    else:
        total += sum(items)
        ckpt.record_batch(seq, start, start + size, digest, aggregate={"total": total})
    start += size
die()
"""


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    k_fraction=st.floats(0, 1),
    phase=st.sampled_from(["after", "mid_data", "before_manifest", "mid_manifest"]),
    kind=st.sampled_from(["array", "object"]),
    mode=st.sampled_from(["list", "reduce"]),
)
def test_a_run_killed_at_any_moment_resumes_from_complete_batches(
    sizes: list[int], k_fraction: float, phase: str, kind: str, mode: str
) -> None:
    k = round(k_fraction * len(sizes))
    with tempfile.TemporaryDirectory(prefix="amortune-test-") as tmp:
        folder = os.path.join(tmp, "run.ckpt")
        cfg = {"folder": folder, "sizes": sizes, "k": k, "phase": phase, "kind": kind, "mode": mode}
        proc = run_python(KILLED_RUN, json.dumps(cfg))
        assert proc.returncode == -signal.SIGKILL, proc.stderr

        ckpt = Checkpoint.open(folder, fingerprint="fp", mode=mode)
        bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        assert [(b.start, b.stop) for b in ckpt.batches] == bounds[:k]
        for seq, (start, stop) in enumerate(bounds[:k]):
            ckpt.verify_batch(seq, start, stop, input_digest(list(range(start, stop))))
        n_done = bounds[k - 1][1] if k else 0
        assert ckpt.next_start == n_done
        listed = {".lock", "manifest.json", *(b.segment for b in ckpt.batches if b.segment)}
        if mode == "list":
            results = ckpt.results()
            assert len(results) == n_done
            for x, got in enumerate(results):
                if kind == "array":
                    assert np.array_equal(got, np.full(3, x, dtype=float))
                else:
                    assert got == {"x": x, "sq": x * x}
        elif k:
            assert ckpt.aggregate() == {"total": sum(range(n_done))}
            listed.add(f"aggregate-{k - 1:08d}.pkl")
        else:
            with pytest.raises(LookupError):
                ckpt.aggregate()
        assert set(os.listdir(folder)) == listed  # leftovers of the killed write are gone

        if k < len(sizes):  # and the run can go on from there
            start, stop = bounds[k]
            items = list(range(start, stop))
            if mode == "list":
                ckpt.record_batch(k, start, stop, input_digest(items), results=items)
            else:
                ckpt.record_batch(k, start, stop, input_digest(items), aggregate=0)
            ckpt.close()
            assert Checkpoint.open(folder, fingerprint="fp", mode=mode).next_start == stop


# -- fingerprints cover what the function captures ------------------------------------------------

FACTORY = """
def make(scale):
    def f(x):
        return x * scale
    return f
"""


def test_fingerprint_covers_closure_cells() -> None:
    make = make_function(FACTORY, "make")
    assert function_fingerprint(make(1)) == function_fingerprint(make(1))
    assert function_fingerprint(make(1)) != function_fingerprint(make(2))
    assert function_fingerprint(make({"a", "b"})) == function_fingerprint(make({"b", "a"}))


@pytest.mark.parametrize(
    ("source", "change"),
    [
        ("def f(x, scale=1):\n    return x * scale\n", ("scale=1", "scale=2")),
        ("def f(x, *, scale=1):\n    return x * scale\n", ("scale=1", "scale=2")),
        ("SCALE = 1\ndef f(x):\n    return x * SCALE\n", ("SCALE = 1", "SCALE = 2")),
        ("CFG = {'k': [1]}\ndef f(x):\n    return CFG['k'][0] * x\n", ("[1]", "[2]")),
        ("def helper(x):\n    return x + 1\ndef f(x):\n    return helper(x)\n",
         ("x + 1", "x + 2")),
        ("def f(x):\n    def g(y):\n        return y * LIMIT\n    return g(x)\nLIMIT = 3\n",
         ("LIMIT = 3", "LIMIT = 4")),
    ],
    ids=["default", "kwdefault", "global", "global-dict", "helper", "global-in-nested"],
)
def test_fingerprint_covers_defaults_globals_and_helpers(
    source: str, change: tuple[str, str]
) -> None:
    same, other = make_function(source), make_function(source.replace(*change))
    assert function_fingerprint(make_function(source)) == function_fingerprint(same)
    assert function_fingerprint(same) != function_fingerprint(other)


def test_fingerprint_covers_bound_methods_and_recursion() -> None:
    model = make_function(
        "class Model:\n    def __init__(self, k):\n        self.k = k\n"
        "    def predict(self, x):\n        return x * self.k\n",
        name="Model",
    )
    assert function_fingerprint(model(2).predict) == function_fingerprint(model(2).predict)
    assert function_fingerprint(model(2).predict) != function_fingerprint(model(3).predict)
    fact = make_function("def fact(n):\n    return 1 if n < 2 else n * fact(n - 1)\n", "fact")
    assert len(function_fingerprint(fact)) == 64  # a function naming itself terminates


@settings(max_examples=60, deadline=None)
@given(
    a=st.recursive(st.none() | st.integers() | st.text(max_size=4) | st.booleans(),
                   lambda inner: st.lists(inner, max_size=3) | st.frozensets(st.text(max_size=3))
                   | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=6),
    b=st.integers() | st.text(max_size=4) | st.frozensets(st.text(max_size=3), max_size=4),
)
def test_closures_fingerprint_alike_exactly_when_their_values_pickle_alike(a: Any, b: Any) -> None:
    make = make_function(FACTORY, "make")
    same_bytes = canonical_dumps(a) == canonical_dumps(b)
    assert (function_fingerprint(make(a)) == function_fingerprint(make(b))) == same_bytes


def test_a_changed_closure_is_refused_at_resume(tmp_dir: pathlib.Path) -> None:
    make = make_function(FACTORY, "make")
    path = tmp_dir / "run.ckpt"
    with Checkpoint.open(path, fingerprint=function_fingerprint(make(1)), mode="list",
                         function_name=describe_function(make(1))) as ckpt:
        ckpt.record_batch(0, 0, 1, input_digest([1]), results=[1])
    with Checkpoint.open(path, fingerprint=function_fingerprint(make(1)), mode="list",
                         function_name=describe_function(make(1))) as again:
        assert again.next_start == 1
    with pytest.raises(CheckpointMismatchError, match="the values it captures") as info:
        Checkpoint.open(path, fingerprint=function_fingerprint(make(2)), mode="list",
                        function_name=describe_function(make(2)))
    assert "user_mod.make.<locals>.f" in str(info.value)


def test_fingerprints_of_captures_are_stable_across_processes() -> None:
    source = (
        "import os\nWORDS = {'alpha', 'beta', 'gamma', 'delta'}\n"
        "TABLE = {'k': frozenset({'x', 'y', 'z'}), 'n': [1, 2.5]}\n"
        "def helper(x):\n    return x in WORDS and os.sep\n"
        "def make(tags):\n"
        "    def f(x, extra={'p', 'q', 'r'}, *, more=frozenset({'s', 't'})):\n"
        "        return helper(x) or x in tags or x in TABLE or x in extra or x in more\n"
        "    return f\n"
    )
    code = (
        "import sys\nfrom amortune._checkpoint import function_fingerprint\n"
        f"ns = {{'__name__': 'user_mod'}}\nexec({source!r}, ns)\n"
        "print(function_fingerprint(ns['make']({'u', 'v', 'w', 'uu', 'vv'})))\n"
    )
    outputs = set()
    for seed in ("1", "2", "3"):
        proc = run_python(code, hash_seed=seed)
        assert proc.returncode == 0, proc.stderr
        outputs.add(proc.stdout.strip())
    assert len(outputs) == 1
    make = make_function(source, "make")
    assert outputs.pop() == function_fingerprint(make({"u", "v", "w", "uu", "vv"}))


# -- input digests do not depend on the hash seed -------------------------------------------------

SET_ITEMS = (
    "[{'alpha', 'beta', 'gamma', 'delta', 'eps'}, frozenset({'x', 'y', 'zz'}), "
    "{'k': {'a', 'b', 'c'}, 'n': [{('p', 1), ('q', 2)}]}, ({frozenset({'m', 'n'}), 'o'},)]"
)


def test_input_digest_of_sets_is_the_same_in_every_process() -> None:
    code = f"from amortune._checkpoint import input_digest\nprint(input_digest({SET_ITEMS}))\n"
    outputs = set()
    for seed in ("1", "2", "3", "4"):
        proc = run_python(code, hash_seed=seed)
        assert proc.returncode == 0, proc.stderr
        outputs.add(proc.stdout.strip())
    assert outputs == {input_digest(eval(SET_ITEMS))}


def _rebuilt(value: Any, salt: list[str]) -> Any:
    """An equal value whose sets were built with another history (so may iterate otherwise)."""
    if isinstance(value, (set, frozenset)):
        elements = [_rebuilt(v, salt) for v in reversed(sorted(value, key=repr))]
        built = set(salt) | set(elements)
        built -= set(salt) - set(elements)
        return type(value)(built)
    if isinstance(value, list):
        return [_rebuilt(v, salt) for v in value]
    if isinstance(value, dict):
        return {k: _rebuilt(v, salt) for k, v in value.items()}
    return value


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sets(st.text(max_size=6), max_size=12),
        st.frozensets(st.text(max_size=6) | st.integers(), max_size=12),
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=3), inner, max_size=3),
    )


@settings(max_examples=60, deadline=None)
@given(
    items=st.lists(st.recursive(st.text(max_size=6) | st.integers(), _nested, max_leaves=10),
                   max_size=4),
    salt=st.lists(st.text(min_size=1, max_size=6), max_size=40),
)
def test_input_digest_ignores_how_sets_were_built(items: list[Any], salt: list[str]) -> None:
    assert input_digest(items) == input_digest(_rebuilt(items, salt))


RESUME_WITH_SETS = """
import json, sys
import amortune
from tests import tasks
data = [{"tag-%d" % i, "x", "y", "zeta", "omega"} for i in range(12)]
out = amortune.process_in_batches(tasks.identity, data, batch_size=4, checkpoint=sys.argv[1],
                                  executor="serial")
print(json.dumps(sorted(sorted(s) for s in out) == sorted(sorted(s) for s in data)))
"""


def test_a_checkpoint_of_sets_of_strings_resumes_in_another_process(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "run.ckpt"
    for seed in ("1", "2"):
        proc = run_python(RESUME_WITH_SETS, str(path), hash_seed=seed)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "true"
    with Checkpoint.open(path, fingerprint=function_fingerprint(tasks.identity),
                         mode="list") as ckpt:
        assert ckpt.next_start == 12


def test_an_input_mismatch_does_not_claim_the_input_changed(tmp_dir: pathlib.Path) -> None:
    with Checkpoint.open(tmp_dir / "c", fingerprint="fp", mode="list") as ckpt:
        ckpt.record_batch(0, 0, 1, input_digest([1]), results=[1])
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.verify_batch(0, 0, 1, input_digest([2]))
    assert "or its items do not pickle to the same bytes in every run" in str(info.value)


def test_a_checkpoint_of_the_first_format_still_resumes(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "c"
    fp = function_fingerprint(tasks.square)  # captures nothing: the same in both formats
    with Checkpoint.open(path, fingerprint=fp, mode="list", function_name="tests.tasks.square") as c:
        c.record_batch(0, 0, 2, input_digest([1, 2]), results=[{"a": 1}, {"b": 2}])
    old_segment = pickle.dumps([{"a": 1}, {"b": 2}], protocol=5)  # format 1: the whole list
    (path / "seg-00000000.pkl").write_bytes(old_segment)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = 1
    manifest["batches"][0]["nbytes"] = len(old_segment)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with Checkpoint.open(path, fingerprint=fp, mode="list", function_name="tests.tasks.square") as c:
        c.verify_batch(0, 0, 2, input_digest([1, 2]))
        results = c.results()
        results[0]["a"] = 9
        assert list(results) == [{"a": 1}, {"b": 2}]
        results.close()
        c.record_batch(1, 2, 3, input_digest([3]), results=[{"c": 3}])
        assert list(c.results()) == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert json.loads((path / "manifest.json").read_text())["version"] == 2
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointMismatchError, match="format 1 checkpoints did not"):
        Checkpoint.open(path, fingerprint=function_fingerprint(make_function(FACTORY, "make")(1)),
                        mode="list", function_name="tests.tasks.square")


# -- damaged and unusable checkpoints ------------------------------------------------------------


def test_a_truncated_segment_is_a_checkpoint_error_naming_the_file(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "c"
    with Checkpoint.open(path, fingerprint="fp", mode="list") as ckpt:
        ckpt.record_batch(0, 0, 2, input_digest([1, 2]), results=[{"a": 1}, {"b": 2}])
        ckpt.record_batch(1, 2, 3, input_digest([3]), results=[np.arange(3.0)])
        results = ckpt.results()
        for name in ("seg-00000000.pkl", "seg-00000001.npy"):
            intact = (path / name).read_bytes()
            os.truncate(path / name, len(intact) - 3)
            with pytest.raises(CheckpointError, match="cannot be read back") as info:
                list(results)
            assert str(path / name) in str(info.value)
            os.truncate(path / name, len(intact))  # the recorded size again, but a zero tail
            if name.endswith(".pkl"):
                with pytest.raises(CheckpointError, match=str(path / name)):
                    list(results)
            (path / name).write_bytes(intact)
            results._cache.clear()
        assert len(list(results)) == 3
        results.close()
    os.truncate(path / "seg-00000000.pkl", 10)
    with pytest.raises(CheckpointError, match="truncated") as info:
        Checkpoint.open(path, fingerprint="fp", mode="list")
    assert str(path / "seg-00000000.pkl") in str(info.value)


def test_a_damaged_aggregate_is_a_checkpoint_error_naming_the_file(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "r"
    with Checkpoint.open(path, fingerprint="fp", mode="reduce") as ckpt:
        ckpt.record_batch(0, 0, 1, input_digest([1]), aggregate={"sum": 1})
        os.truncate(path / "aggregate-00000000.pkl", 5)
        with pytest.raises(CheckpointError, match="aggregate-00000000.pkl"):
            ckpt.aggregate()


UNUSABLE_FOLDERS = """
import json, os, sys
import amortune._checkpoint as c
import amortune._spill as s
os.setgid(65534)
os.setuid(65534)  # everything is imported: drop root, whose writes ignore the mode bits
base, out = sys.argv[1], {}

def attempt(key, target, call):
    try:
        call()
        out[key] = "opened"
    except Exception as exc:
        out[key] = [type(exc).__name__, isinstance(exc, PermissionError), str(exc), target]

for mode in (0o500, 0o000, 0o300):
    path, spill = os.path.join(base, "c%o" % mode), os.path.join(base, "s%o" % mode)
    ckpt = c.Checkpoint.open(path, fingerprint="fp", mode="list")
    ckpt.record_batch(0, 0, 1, c.input_digest([1]), results=[1])
    ckpt.close()
    os.mkdir(spill, 0o700)
    for target in (path, spill):
        os.chmod(target, mode)
    attempt("ckpt %o" % mode, path,
            lambda: c.Checkpoint.open(path, fingerprint="fp", mode="list").close())
    attempt("spill %o" % mode, spill, lambda: s.SpillStore(spill).close())
    for target in (path, spill):
        os.chmod(target, 0o700)
lock = os.path.join(base, "c500", ".lock")
os.chmod(lock, 0)
attempt("lock 0", lock, lambda: c.Checkpoint.open(os.path.dirname(lock), fingerprint="fp",
                                                  mode="list").close())
store = s.SpillStore(os.path.join(base, "s500"))
store.write_segment(0, [1])
segment = os.path.join(base, "s500", "seg-00000000.pkl")
os.chmod(segment, 0)
attempt("segment 0", segment, lambda: store.results()[0])
store.close()
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="drops root to an unprivileged user")
def test_a_folder_or_file_the_user_cannot_use_fails_at_open(tmp_dir: pathlib.Path) -> None:
    os.chown(tmp_dir, 65534, 65534)
    proc = run_python(UNUSABLE_FOLDERS, str(tmp_dir))
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    assert len(outcome) == 8
    expected = {"ckpt": "CheckpointPermissionError", "lock": "CheckpointPermissionError",
                "spill": "SpillPermissionError", "segment": "SpillPermissionError"}
    for key, got in outcome.items():
        assert got != "opened", key
        name, is_permission, message, target = got
        assert name == expected[key.split()[0]] and is_permission, (key, message)
        assert target in message and "by the current user" in message, (key, message)
        assert "chmod u+rw" in message, (key, message)
