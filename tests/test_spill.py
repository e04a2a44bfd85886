"""Tests for amortune._spill: segment format, lazy reading, permissions, cleanup, disk full."""

from __future__ import annotations

import copy
import errno
import gc
import os
import pathlib
import pickle
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amortune import _spill
from amortune._errors import NotPicklableError
from amortune._files import PrivateDir
from amortune._spill import Segment, SpilledResults, SpillError, SpillStore, resolve_spill_target

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def tmp_dir() -> Iterator[pathlib.Path]:
    """A scratch folder removed after the test (pytest's tmp_path outlives the run)."""
    with tempfile.TemporaryDirectory(prefix="amortune-test-") as d:
        yield pathlib.Path(d)


def mode_of(path: pathlib.Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120
    )


def is_memory_mapped(item: np.ndarray) -> bool:
    base: Any = item
    while base is not None:
        if isinstance(base, np.memmap) or type(base).__name__ == "mmap":
            return True
        base = getattr(base, "base", None)
    return False


def spill_folders(parent: pathlib.Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("amortune-spill-"))


# -- format -------------------------------------------------------------------------------------


def test_temp_folder_is_private_and_removed_on_close(tmp_dir: pathlib.Path) -> None:
    store = SpillStore(parent=str(tmp_dir))
    assert store.directory.parent == tmp_dir
    assert store.directory.name.startswith("amortune-spill-")
    assert mode_of(store.directory) == 0o700
    seg_a = store.write_segment(0, [np.zeros(4), np.ones(4)])
    seg_b = store.write_segment(1, ["x", {"y": 1}])
    for seg in (seg_a, seg_b):
        path = store.directory / seg.name
        assert mode_of(path) == 0o600
        assert seg.nbytes == path.stat().st_size
    assert [s.seq for s in store.segments()] == [0, 1]
    store.close()
    store.close()
    assert not store.directory.exists()
    assert spill_folders(tmp_dir) == []


@pytest.mark.parametrize(
    "batch",
    [
        [np.arange(12.0).reshape(4, 3) * k for k in range(5)],
        [np.arange(6, dtype=np.int32) + k for k in range(3)],
        [np.array([1 + 2j, 3 - 4j]) for _ in range(2)],
        [np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[D]") for _ in range(3)],
        [np.array(["ab", "cde"]), np.array(["fgh", "i"])],
        [np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]) for _ in range(2)],
        [np.array(k) for k in range(4)],  # 0-d items stay 0-d
        [np.asfortranarray(np.arange(6.0).reshape(2, 3)) for _ in range(2)],
    ],
    ids=["float2d", "int32", "complex", "datetime", "str", "record", "0d", "fortran"],
)
def test_uniform_arrays_come_back_as_read_only_memory_mapped_views(
    tmp_dir: pathlib.Path, batch: list[np.ndarray]
) -> None:
    with SpillStore(parent=str(tmp_dir)) as store:
        segment = store.write_segment(0, batch)
        assert segment.is_array and segment.name.endswith(".npy")
        assert segment.count == len(batch)
        results = store.results()
        assert len(results) == len(batch)
        for got, want in zip(results, batch, strict=True):
            assert type(got) is np.ndarray
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got, want)
            assert not got.flags.writeable
            assert is_memory_mapped(got)
        with pytest.raises(ValueError):
            results[0][...] = 0


@pytest.mark.parametrize(
    "batch",
    [
        [np.zeros(3), np.zeros(4)],  # shapes differ
        [np.zeros(3), np.zeros(3, dtype=np.float32)],  # dtypes differ
        [np.array([None, 1], dtype=object), np.array([2, 3], dtype=object)],
        [np.ma.masked_array([1.0, 2.0], mask=[0, 1]), np.ma.masked_array([3.0, 4.0])],
        [np.zeros((2, 0)), np.zeros((2, 0))],  # no data bytes to map
        [np.zeros(3), 5],
        [np.float64(1.5), np.float64(2.5)],
    ],
    ids=["shapes", "dtypes", "object", "masked", "empty", "mixed", "scalars"],
)
def test_other_batches_are_pickled_and_equal(tmp_dir: pathlib.Path, batch: list[Any]) -> None:
    with SpillStore(parent=str(tmp_dir)) as store:
        assert not store.write_segment(0, batch).is_array
        got = list(store.results())
    assert len(got) == len(batch)
    for g, w in zip(got, batch, strict=True):
        assert type(g) is type(w)
        assert np.array_equal(np.asarray(g), np.asarray(w))


def test_cloudpickle_fallback_and_unpicklable_results(tmp_dir: pathlib.Path) -> None:
    with SpillStore(parent=str(tmp_dir)) as store:
        store.write_segment(0, [lambda x: x + 1, 2])
        assert store.results()[0](41) == 42
        with pytest.raises(NotPicklableError, match="cannot be pickled"):
            store.write_segment(1, [threading.Lock()])
        assert [s.seq for s in store.segments()] == [0]
        assert sorted(os.listdir(store.directory)) == [".lock", "seg-00000000.pkl"]


def test_import_loads_neither_numpy_nor_cloudpickle() -> None:
    code = (
        "import sys, amortune\n"
        "before = set(sys.modules)\n"
        "import amortune._spill, amortune._checkpoint\n"
        "print(sorted({'numpy', 'cloudpickle'} & (set(sys.modules) - before)))\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- the lazy sequence --------------------------------------------------------------------------


def test_sequence_protocol_in_seq_order(tmp_dir: pathlib.Path) -> None:
    with SpillStore(parent=str(tmp_dir)) as store:
        store.write_segment(3, [7, 8])
        store.write_segment(0, [0, 1, 2])
        store.write_segment(1, [])
        store.write_segment(2, [3, 4, 5, 6])
        results = store.results()
        expected = list(range(9))
        assert isinstance(results, SpilledResults)
        assert len(results) == 9
        assert list(results) == expected
        assert [results[i] for i in range(-9, 9)] == expected[-9:] + expected
        assert results[np.int64(4)] == 4
        for sl in (slice(None), slice(2, 7), slice(None, None, -1), slice(1, 9, 3), slice(8, 20)):
            assert results[sl] == expected[sl]
        assert list(reversed(results)) == expected[::-1]
        assert 5 in results and 9 not in results
        assert results.index(7) == 7
        for bad in (9, -10):
            with pytest.raises(IndexError):
                results[bad]
        assert "9 items in 4 segments" in repr(results)


@settings(max_examples=40, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=6),
        max_size=6,
    ),
    probes=st.lists(st.integers(-40, 40), max_size=10),
    window=st.tuples(
        st.none() | st.integers(-40, 40),
        st.none() | st.integers(-40, 40),
        st.sampled_from([1, 2, -1, -3]),
    ),
)
def test_matches_a_list_of_the_same_batches(
    batches: list[list[Any]], probes: list[int], window: tuple[int | None, int | None, int]
) -> None:
    expected = [x for batch in batches for x in batch]
    with tempfile.TemporaryDirectory() as parent, SpillStore(parent=parent) as store:
        for seq, batch in enumerate(batches):
            store.write_segment(seq, batch)
        results = store.results()
        assert len(results) == len(expected)
        assert list(results) == expected
        assert results[slice(*window)] == expected[slice(*window)]
        for i in probes:
            if -len(expected) <= i < len(expected):
                assert results[i] == expected[i]
            else:
                with pytest.raises(IndexError):
                    results[i]


def test_reads_only_the_segment_it_needs(
    tmp_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    real = _spill._read_segment

    def counting(folder: Any, segment: Segment) -> Any:
        loads.append(segment.name)
        return real(folder, segment)

    monkeypatch.setattr(_spill, "_read_segment", counting)
    with SpillStore(parent=str(tmp_dir)) as store:
        for seq in range(5):
            store.write_segment(seq, list(range(seq * 10, seq * 10 + 10)))
        results = store.results()
        assert len(results) == 50 and loads == []
        assert results[-1] == 49
        assert loads == ["seg-00000004.pkl"]
        assert results[45] == 45 and len(loads) == 1  # cached
        assert list(results) == list(range(50))
        assert len(loads) == 6  # one read per segment while iterating
        assert len(results._cache) <= 2


def test_results_refuse_to_pickle(tmp_dir: pathlib.Path) -> None:
    with SpillStore(parent=str(tmp_dir)) as store:
        store.write_segment(0, [1])
        results = store.results()
        with pytest.raises(TypeError, match=r"list\(results\)"):
            pickle.dumps(results)
        with pytest.raises(TypeError):
            copy.copy(results)


# -- cleanup ------------------------------------------------------------------------------------


def test_results_keep_the_store_alive_and_closing_them_removes_the_folder(
    tmp_dir: pathlib.Path,
) -> None:
    store = SpillStore(parent=str(tmp_dir))
    store.write_segment(0, ["a", "b"])
    results = store.results()
    folder = store.directory
    del store
    gc.collect()
    assert folder.exists()
    assert results[1] == "b"
    with results:
        pass
    assert not folder.exists()
    with pytest.raises(ValueError, match="closed"):
        results[0]


def test_del_and_gc_remove_the_folder(tmp_dir: pathlib.Path) -> None:
    store = SpillStore(parent=str(tmp_dir))
    store.write_segment(0, [np.zeros(2), np.ones(2)])
    folder = store.directory
    cycle: list[Any] = [store]
    cycle.append(cycle)
    del store, cycle
    gc.collect()
    assert not folder.exists()


def test_close_after_an_exception_removes_the_folder(tmp_dir: pathlib.Path) -> None:
    with pytest.raises(KeyboardInterrupt), SpillStore(parent=str(tmp_dir)) as store:
        store.write_segment(0, [1, 2])
        raise KeyboardInterrupt
    assert not store.directory.exists()
    with pytest.raises(ValueError, match="closed"):
        store.write_segment(1, [3])


def test_ctrl_c_in_another_process_removes_its_folder(tmp_dir: pathlib.Path) -> None:
    code = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # even if the run ignores it
        "from amortune._spill import SpillStore\n"
        "store = SpillStore(parent=sys.argv[1])\n"
        "print(store.directory, flush=True)\n"
        "for seq in range(1000):\n"
        "    store.write_segment(seq, list(range(100)))\n"
        "    if seq == 3:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
    )
    proc = run_python(code, str(tmp_dir))
    assert "KeyboardInterrupt" in proc.stderr
    assert proc.stdout.strip().startswith(str(tmp_dir))
    assert spill_folders(tmp_dir) == []


def test_folder_of_a_killed_process_is_swept_by_the_next_store(tmp_dir: pathlib.Path) -> None:
    code = (
        "import os, signal, sys\n"
        "from amortune._spill import SpillStore\n"
        "store = SpillStore(parent=sys.argv[1])\n"
        "store.write_segment(0, [1, 2, 3])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = run_python(code, str(tmp_dir))
    assert proc.returncode == -signal.SIGKILL
    assert len(spill_folders(tmp_dir)) == 1  # SIGKILL runs no cleanup
    with SpillStore(parent=str(tmp_dir)) as live, SpillStore(parent=str(tmp_dir)) as other:
        assert spill_folders(tmp_dir) == sorted([live.directory.name, other.directory.name])
    assert spill_folders(tmp_dir) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_removes_its_parents_folder(tmp_dir: pathlib.Path) -> None:
    with SpillStore(parent=str(tmp_dir)) as store:
        store.write_segment(0, [1])
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                store.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert store.directory.exists()
        assert store.results()[0] == 1
    assert not store.directory.exists()


def test_user_folder_is_kept_unless_keep_false(tmp_dir: pathlib.Path) -> None:
    kept = tmp_dir / "a" / "spill"
    with SpillStore(kept) as store:
        store.write_segment(0, [1])
    assert mode_of(kept) == 0o700
    assert sorted(os.listdir(kept)) == ["seg-00000000.pkl"]

    created = tmp_dir / "made-here"
    with SpillStore(created, keep=False) as store:
        store.write_segment(0, [1])
    assert not created.exists()

    existing = tmp_dir / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with SpillStore(existing, keep=False) as store:
        store.write_segment(0, [1])
    assert sorted(os.listdir(existing)) == ["notes.txt"]

    with SpillStore(parent=str(tmp_dir), keep=True) as store:
        store.write_segment(0, [1])
    assert (store.directory / "seg-00000000.pkl").exists()


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [list(range(2000)), [np.arange(1000.0)] * 3], ids=["pkl", "npy"])
def test_disk_full_raises_spill_error_and_leaves_no_partial_file(
    tmp_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, batch: list[Any]
) -> None:
    store = SpillStore(parent=str(tmp_dir))
    real_write = os.write
    budget = [100]
    seen_partial: list[str] = []

    def write(fd: int, data: Any) -> int:
        if budget[0] <= 0:
            seen_partial.extend(n for n in os.listdir(store.directory) if n.endswith(".tmp"))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = real_write(fd, memoryview(data)[: budget[0]])
        budget[0] -= written
        return written

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(SpillError) as info:
        store.write_segment(0, batch)
    monkeypatch.undo()
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(store.directory) in str(err) and "No space left on device" in str(err)
    assert len(seen_partial) == 1  # a partial temp file existed when the disk filled up ...
    assert sorted(os.listdir(store.directory)) == [".lock"]  # ... and was removed
    assert store.segments() == []
    store.write_segment(0, batch)  # the same batch can be written once there is room
    assert len(store.results()) == len(batch)
    store.close()


def test_misuse_is_refused(tmp_dir: pathlib.Path) -> None:
    with SpillStore(parent=str(tmp_dir)) as store:
        store.write_segment(0, [1])
        with pytest.raises(ValueError, match="already written"):
            store.write_segment(0, [2])
        with pytest.raises(ValueError):
            store.write_segment(-1, [2])
        with pytest.raises(ValueError, match="not a segment file name"):
            store.adopt(Segment(1, "../etc/passwd", 1, 1))
        with pytest.raises(FileNotFoundError):
            store.adopt(Segment(5, "seg-00000005.pkl", 1, 1))
    with pytest.raises(SpillError, match="could not create"):
        SpillStore(parent=str(tmp_dir / "missing"))
    (tmp_dir / "file").write_text("")
    with pytest.raises(SpillError):
        SpillStore(tmp_dir / "file")


# -- every read is a copy of the stored result ---------------------------------------------------


def test_changing_a_result_never_changes_what_is_stored(tmp_dir: pathlib.Path) -> None:
    with SpillStore(parent=str(tmp_dir)) as store:
        for seq in range(3):
            store.write_segment(seq, [{"x": seq * 10 + j} for j in range(10)])
        results = store.results()
        results[5]["x"] = -1
        assert results[5]["x"] == 5  # not the changed value while it is cached ...
        assert results[15]["x"] == 15 and results[25]["x"] == 25  # ... evicting segment 0 ...
        assert results[5]["x"] == 5  # ... and not the old one only after that
        kept = results[5]
        kept["x"] = -2
        assert results[5] == {"x": 5} and results[5] is not results[5]
        for item in results:
            item["x"] = 0
        assert [item["x"] for item in results] == list(range(30))
        assert all(item["x"] == 10 * k for k, item in enumerate(results[::10]))
        with pytest.raises(TypeError):
            results[5] = {"x": 1}  # type: ignore[index]


@settings(max_examples=30, deadline=None)
@given(
    batches=st.lists(st.lists(st.integers(), min_size=1, max_size=4), min_size=1, max_size=5),
    ops=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100), st.integers()), max_size=15),
)
def test_reads_after_any_changes_and_evictions_return_the_stored_results(
    batches: list[list[int]], ops: list[tuple[int, int, int]]
) -> None:
    expected = [[x] for batch in batches for x in batch]
    with tempfile.TemporaryDirectory() as parent, SpillStore(parent=parent) as store:
        for seq, batch in enumerate(batches):
            store.write_segment(seq, [[x] for x in batch])
        results = store.results()
        for changed, read, value in ops:
            results[changed % len(expected)].append(value)
            assert results[read % len(expected)] == expected[read % len(expected)]
        assert list(results) == expected


def test_arrays_in_pickled_segments_come_back_as_fresh_copies(tmp_dir: pathlib.Path) -> None:
    with SpillStore(parent=str(tmp_dir)) as store:
        store.write_segment(0, [np.zeros(3), np.zeros(4)])  # shapes differ: pickled
        results = store.results()
        first = results[0]
        first[0] = 7.0
        assert first.flags.writeable and results[0][0] == 0.0


def test_segments_of_the_first_format_are_still_read(tmp_dir: pathlib.Path) -> None:
    folder = PrivateDir.open(tmp_dir / "old")
    payload = pickle.dumps([{"a": 1}, [2], "three"])  # the whole batch in one pickle
    nbytes = folder.write_atomic("seg-00000000.pkl", lambda sink: sink.write(payload))
    store = SpillStore.over(folder)
    store.adopt(Segment(0, "seg-00000000.pkl", 3, nbytes))
    results = store.results()
    results[0]["a"] = 5
    assert list(results) == [{"a": 1}, [2], "three"]
    results.close()
    assert (tmp_dir / "old" / "seg-00000000.pkl").exists()  # a store over a folder keeps it


def test_a_damaged_segment_raises_spill_error_naming_the_file(tmp_dir: pathlib.Path) -> None:
    with SpillStore(parent=str(tmp_dir)) as store:
        segment = store.write_segment(0, ["a", "b"])
        path = store.directory / segment.name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(SpillError, match="cannot be read back") as info:
            store.results()[0]
        assert str(path) in str(info.value)
        path.write_bytes(b"\x00" * len(data))  # the size that was written, but not a pickle
        with pytest.raises(SpillError, match="cannot be read back"):
            store.results()[1]


# -- what spill= may be ---------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["ram", "Disk", "memory", "", "tmp", "disk "])
def test_a_spill_word_that_is_not_a_path_is_refused(
    word: str, tmp_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_dir)
    with pytest.raises(ValueError) as info:
        resolve_spill_target(word)
    message = str(info.value)
    assert repr(word) in message and "'disk'" in message and "None" in message
    assert "folder path" in message
    assert os.listdir(tmp_dir) == []  # no folder named after the word


def test_spill_targets_that_are_paths(tmp_dir: pathlib.Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_dir)
    assert resolve_spill_target(None) is None
    assert resolve_spill_target("disk") == "disk"
    assert resolve_spill_target("out/") == pathlib.Path("out")
    assert resolve_spill_target("./ram") == pathlib.Path("ram")
    assert resolve_spill_target(".hidden") == pathlib.Path(".hidden")
    assert resolve_spill_target(str(tmp_dir / "x")) == tmp_dir / "x"
    assert resolve_spill_target("~/spill") == pathlib.Path.home() / "spill"
    assert resolve_spill_target(pathlib.Path("ram")) == pathlib.Path("ram")  # a Path is a path
    (tmp_dir / "ram").mkdir()
    assert resolve_spill_target("ram") == pathlib.Path("ram")  # an existing folder
    for bad in (3, b"disk", ["disk"]):
        with pytest.raises(TypeError, match="spill must be"):
            resolve_spill_target(bad)


@settings(max_examples=200, deadline=None)
@given(word=st.text(max_size=12))
def test_spill_strings_are_disk_or_clearly_paths(word: str) -> None:
    with tempfile.TemporaryDirectory() as empty:
        cwd = os.getcwd()
        os.chdir(empty)
        try:
            path_like = ("/" in word or word.startswith((".", "~")) or os.path.isabs(word)
                         or os.path.isdir(word))
            if word == "disk":
                assert resolve_spill_target(word) == "disk"
            elif path_like:
                assert isinstance(resolve_spill_target(word), pathlib.Path)
            else:
                with pytest.raises(ValueError, match="neither 'disk' nor a folder path"):
                    resolve_spill_target(word)
            assert os.listdir(empty) == []
        finally:
            os.chdir(cwd)
