"""Files amortune reads back are its own: private folders, no-follow opens, swaps detected.

The tests that hand a folder or file to another user use ``os.chown`` and run only as root; what
they plant would run code if it were ever unpickled (it creates a marker file), so each also
checks that nothing of it was loaded.
"""

from __future__ import annotations

import ast
import errno
import os
import pathlib
import pickle
import stat
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amortune
from amortune import _files
from amortune._checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointPermissionError,
    input_digest,
)
from amortune._errors import AmortuneError
from amortune._files import PrivateDir, SpillError, SpillPermissionError
from amortune._spill import SpillStore
from tests import tasks

PACKAGE = pathlib.Path(amortune.__file__).resolve().parent
OTHER_UID = 12345
as_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                             reason="handing files to another user needs root")


@pytest.fixture
def tmp_dir() -> Iterator[pathlib.Path]:
    """A scratch folder removed after the test (pytest's tmp_path outlives the run)."""
    with tempfile.TemporaryDirectory(prefix="amortune-test-") as d:
        yield pathlib.Path(d)


class Planted:
    """Unpickling this creates ``marker``: proof that a planted file was loaded."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


def plant(path: pathlib.Path, marker: pathlib.Path, *, uid: int = OTHER_UID) -> None:
    """Write a pickle at ``path`` that creates ``marker`` when loaded, owned by ``uid``."""
    path.write_bytes(pickle.dumps([Planted(marker)]))
    os.chmod(path, 0o600)
    os.chown(path, uid, uid)


def foreign_folder(path: pathlib.Path, files: dict[str, bytes], uid: int = OTHER_UID) -> None:
    """A private folder of user ``uid`` holding ``files``."""
    path.mkdir(mode=0o700)
    for name, data in files.items():
        (path / name).write_bytes(data)
        os.chmod(path / name, 0o600)
        os.chown(path / name, uid, uid)
    os.chown(path, uid, uid)


def mode_of(path: pathlib.Path) -> int:
    return stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)


# -- 1. the shared helpers -----------------------------------------------------------------------


def test_private_dir_is_created_owner_only_whatever_the_umask(tmp_dir: pathlib.Path) -> None:
    old = os.umask(0o277)  # would make mkdir's folder 0500 and a new file 0400
    try:
        folder = PrivateDir.open(tmp_dir / "a" / "b")
        nbytes = folder.write_atomic("f.bin", lambda sink: sink.write(b"abc"))
    finally:
        os.umask(old)
    assert folder.created and mode_of(tmp_dir / "a" / "b") == 0o700
    assert nbytes == 3 and (tmp_dir / "a" / "b" / "f.bin").read_bytes() == b"abc"
    assert mode_of(tmp_dir / "a" / "b" / "f.bin") & 0o077 == 0
    assert folder.read("f.bin", lambda f: f.read(), size=3) == b"abc"
    folder.close()
    folder.close()
    with pytest.raises(ValueError, match="closed"):
        folder.read("f.bin", lambda f: f.read())
    again = PrivateDir.open(tmp_dir / "a" / "b")
    assert not again.created and sorted(os.listdir(again.path)) == ["f.bin"]  # no probe left
    again.close()


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_dir: pathlib.Path) -> None:
    folder = PrivateDir.open(tmp_dir / "d")
    folder.write_atomic("f", lambda sink: sink.write(b"old"))

    def half_then_fail(sink: _files.Sink) -> None:
        sink.write(b"new" * 1000)
        sink.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(SpillError, match="No space left") as info:
        folder.write_atomic("f", half_then_fail)
    assert info.value.errno == errno.ENOSPC and str(folder.path) in str(info.value)
    assert sorted(os.listdir(folder.path)) == ["f"]
    assert (folder.path / "f").read_bytes() == b"old"
    with pytest.raises(ValueError, match="plain file name"):
        folder.write_atomic("../escape", lambda sink: sink.write(b"x"))
    folder.close()


@pytest.mark.parametrize("kind", ["symlink", "fifo", "group-writable", "directory"])
def test_open_file_takes_only_private_regular_files(tmp_dir: pathlib.Path, kind: str) -> None:
    folder = PrivateDir.open(tmp_dir / "d")
    target = tmp_dir / "elsewhere.pkl"
    target.write_bytes(b"data")
    os.chmod(target, 0o600)
    entry = folder.path / "x"
    if kind == "symlink":
        entry.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(entry, 0o600)  # opening it for reading must not block
    elif kind == "group-writable":
        entry.write_bytes(b"data")
        os.chmod(entry, 0o620)
    else:
        entry.mkdir(mode=0o700)
    expected = {"symlink": "symbolic link", "fifo": "not a regular file",
                "group-writable": "writable by group", "directory": "not a regular file"}
    with pytest.raises(SpillPermissionError, match=expected[kind]) as info:
        folder.read("x", lambda f: f.read())
    assert str(entry) in str(info.value)
    assert isinstance(info.value, PermissionError) and isinstance(info.value, AmortuneError)
    folder.close()


def test_a_folder_moved_away_and_replaced_is_detected(tmp_dir: pathlib.Path) -> None:
    folder = PrivateDir.open(tmp_dir / "d")
    folder.write_atomic("f", lambda sink: sink.write(b"mine"))
    os.rename(tmp_dir / "d", tmp_dir / "moved")
    (tmp_dir / "d").mkdir(mode=0o700)  # even a folder of the same user is not the one opened
    (tmp_dir / "d" / "f").write_bytes(b"other")
    for attempt in (lambda: folder.read("f", lambda f: f.read()),
                    lambda: folder.write_atomic("g", lambda sink: sink.write(b"x")),
                    folder.entries, folder.dup):
        with pytest.raises(SpillPermissionError, match="moved, removed or replaced"):
            attempt()
    assert sorted(os.listdir(tmp_dir / "d")) == ["f"]
    assert sorted(os.listdir(tmp_dir / "moved")) == ["f"]
    folder.close()


def test_a_folder_made_public_after_opening_is_refused(tmp_dir: pathlib.Path) -> None:
    folder = PrivateDir.open(tmp_dir / "d")
    folder.write_atomic("f", lambda sink: sink.write(b"mine"))
    os.chmod(folder.path, 0o777)
    with pytest.raises(SpillPermissionError, match="writable by group or others"):
        folder.read("f", lambda f: f.read())
    folder.close()


def _imports(module: str) -> list[tuple[str, str]]:
    """``(module, name)`` for every ``from X import name`` in ``amortune/<module>.py``."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            target = ("amortune." if node.level else "") + node.module.lstrip(".")
            found += [(target, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def test_checkpoints_use_the_spill_classes_not_its_private_helpers() -> None:
    from_spill = {name for mod, name in _imports("_checkpoint") if mod == "amortune._spill"}
    assert from_spill <= {"Segment", "SpillStore", "SpilledResults", "write_segment"}
    from amortune import _spill

    assert from_spill <= set(_spill.__all__)
    internal = {mod for mod, _ in _imports("_files") if mod.startswith("amortune")}
    assert internal <= {"amortune._errors", "amortune._safedir", "amortune._serde"}


def test_pickles_are_written_in_one_place() -> None:
    """Only ``_files`` (streaming) and ``_serde`` pickle; spill and checkpoint only load."""
    for module in ("_spill", "_checkpoint"):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
        used = {f"{n.value.id}.{n.attr}" for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
        assert not {"pickle.dump", "pickle.dumps", "pickle.Pickler"} & used, module
        assert not any(name.startswith("cloudpickle.") for name in used), module


# -- 2. spill=path -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(mode=st.integers(0, 0o777))
def test_an_existing_spill_folder_must_not_be_writable_by_others(mode: int) -> None:
    with tempfile.TemporaryDirectory(prefix="amortune-test-") as tmp:
        path = pathlib.Path(tmp) / "out"
        path.mkdir()
        os.chmod(path, mode | 0o700)  # usable by its owner: only what others may do varies
        if mode & 0o022:
            with pytest.raises(SpillPermissionError, match="writable by group or others") as info:
                SpillStore(path)
            assert str(path) in str(info.value) and "chmod go-w" in str(info.value)
            assert os.listdir(path) == []
        else:
            with SpillStore(path) as store:
                store.write_segment(0, [1, 2])
                assert list(store.results()) == [1, 2]


def test_a_symlink_at_the_spill_path_is_refused(tmp_dir: pathlib.Path) -> None:
    real = tmp_dir / "real"
    real.mkdir(mode=0o700)
    (tmp_dir / "link").symlink_to(real)
    with pytest.raises(SpillPermissionError, match="symbolic link"):
        SpillStore(tmp_dir / "link")
    assert os.listdir(real) == []
    (tmp_dir / "file").write_text("")
    with pytest.raises(SpillError, match="not a folder"):
        SpillStore(tmp_dir / "file")


def test_spill_through_process_in_batches_refuses_a_public_folder(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "out"
    path.mkdir()
    os.chmod(path, 0o777)
    with pytest.raises(SpillPermissionError, match="writable by group or others"):
        amortune.process_in_batches(tasks.square, range(10), batch_size=5, spill=path)
    assert os.listdir(path) == []


@as_root
def test_a_spill_folder_of_another_user_is_refused(tmp_dir: pathlib.Path) -> None:
    marker = tmp_dir / "loaded"
    foreign_folder(tmp_dir / "out", {})
    with pytest.raises(SpillPermissionError, match=f"belongs to user id {OTHER_UID}"):
        SpillStore(tmp_dir / "out")
    plant(tmp_dir / "out" / "seg-00000000.pkl", marker)
    with pytest.raises(SpillPermissionError):
        SpillStore(tmp_dir / "out")
    assert not marker.exists()


@as_root
def test_a_segment_replaced_by_another_user_is_never_loaded(tmp_dir: pathlib.Path) -> None:
    marker = tmp_dir / "loaded"
    with SpillStore(tmp_dir / "out") as store:
        store.write_segment(0, ["a", "b"])
        store.write_segment(1, ["c"])
        results = store.results()
        plant(store.directory / "seg-00000001.pkl", marker)
        assert results[0] == "a"
        with pytest.raises(SpillPermissionError, match=f"belongs to user id {OTHER_UID}") as info:
            results[2]
        assert "seg-00000001.pkl" in str(info.value)
        with pytest.raises(SpillPermissionError):
            list(results)
    assert not marker.exists()


@as_root
@pytest.mark.parametrize("kept", [True, False], ids=["path", "disk"])
def test_a_spill_folder_swapped_mid_run_is_detected(tmp_dir: pathlib.Path, kept: bool) -> None:
    marker = tmp_dir / "loaded"
    parent = tmp_dir / "parent"
    parent.mkdir()
    os.chmod(parent, 0o777)  # world-writable, not sticky: anyone may rename entries
    store = SpillStore(parent / "out") if kept else SpillStore(parent=str(parent))
    path = store.directory
    store.write_segment(0, ["a", "b"])
    results = store.results()
    assert results[1] == "b"
    results._cache.clear()
    os.rename(path, parent / "moved")
    forged = pickle.dumps([Planted(marker), "x"])
    foreign_folder(path, {"seg-00000000.pkl": forged, "seg-00000001.pkl": forged})
    with pytest.raises(SpillPermissionError, match="moved, removed or replaced") as info:
        results[0]
    assert str(path) in str(info.value)
    with pytest.raises(SpillPermissionError):
        store.write_segment(1, ["c"])
    results.close()
    assert not marker.exists()
    # The folder at the path is not ours: it is left alone, and ours is emptied where it went.
    assert sorted(os.listdir(path)) == ["seg-00000000.pkl", "seg-00000001.pkl"]
    if not kept:
        assert os.listdir(parent / "moved") == []


# -- 3. checkpoints ------------------------------------------------------------------------------


@as_root
def test_a_checkpoint_folder_swapped_mid_run_is_detected(tmp_dir: pathlib.Path) -> None:
    marker = tmp_dir / "loaded"
    parent = tmp_dir / "parent"
    parent.mkdir()
    os.chmod(parent, 0o777)  # world-writable, not sticky
    path = parent / "run.ckpt"
    ckpt = Checkpoint.open(path, fingerprint="fp", mode="list")
    ckpt.record_batch(0, 0, 2, input_digest([1, 2]), results=[1, 4])
    early = ckpt.results()
    os.rename(path, parent / "moved")
    forged = pickle.dumps([Planted(marker), 0])
    manifest = (parent / "moved" / "manifest.json").read_bytes()
    foreign_folder(path, {"manifest.json": manifest, "seg-00000000.pkl": forged})
    with pytest.raises(CheckpointPermissionError, match="moved, removed or replaced") as info:
        ckpt.results()
    assert str(path) in str(info.value) and isinstance(info.value, CheckpointError)
    with pytest.raises(CheckpointPermissionError):
        early[0]
    with pytest.raises(CheckpointPermissionError):
        ckpt.record_batch(1, 2, 3, input_digest([3]), results=[9])
    early.close()
    with pytest.raises(CheckpointPermissionError):
        ckpt.remove()  # never deletes the folder that took its place
    assert path.exists() and not marker.exists()
    with pytest.raises(CheckpointPermissionError, match=f"belongs to user id {OTHER_UID}"):
        Checkpoint.open(path, fingerprint="fp", mode="list")
    assert not marker.exists()


@as_root
def test_a_checkpoint_segment_of_another_user_is_never_loaded(tmp_dir: pathlib.Path) -> None:
    marker = tmp_dir / "loaded"
    path = tmp_dir / "run.ckpt"
    with Checkpoint.open(path, fingerprint="fp", mode="list") as ckpt:
        ckpt.record_batch(0, 0, 1, input_digest([1]), results=[1])
        results = ckpt.results()
        size = (path / "seg-00000000.pkl").stat().st_size
        plant(path / "seg-00000000.pkl", marker)
        os.truncate(path / "seg-00000000.pkl", size)  # the size the manifest recorded
        with pytest.raises(CheckpointPermissionError, match=f"belongs to user id {OTHER_UID}"):
            results[0]
        results.close()
    with pytest.raises(CheckpointPermissionError):
        Checkpoint.open(path, fingerprint="fp", mode="list")
    assert not marker.exists()


@as_root
@pytest.mark.parametrize("lock", ["foreign-0666", "foreign-0600", "own-0666", "symlink"])
def test_a_lock_file_others_could_alter_is_refused(tmp_dir: pathlib.Path, lock: str) -> None:
    path = tmp_dir / "run.ckpt"
    Checkpoint.open(path, fingerprint="fp", mode="list").close()
    target, elsewhere = path / ".lock", tmp_dir / "elsewhere"
    if lock == "symlink":
        os.unlink(target)
        elsewhere.write_text("not a lock")
        target.symlink_to(elsewhere)
    else:
        os.chmod(target, 0o666 if lock.endswith("0666") else 0o600)
        if lock.startswith("foreign"):
            os.chown(target, OTHER_UID, OTHER_UID)
    with pytest.raises(CheckpointPermissionError) as info:
        Checkpoint.open(path, fingerprint="fp", mode="list")
    assert str(target) in str(info.value)
    assert lock != "symlink" or elsewhere.read_text() == "not a lock"


def test_checkpoint_errors_name_the_path_and_the_fix(tmp_dir: pathlib.Path) -> None:
    path = tmp_dir / "run.ckpt"
    Checkpoint.open(path, fingerprint="fp", mode="list").close()
    os.chmod(path, 0o757)
    with pytest.raises(CheckpointPermissionError) as info:
        Checkpoint.open(path, fingerprint="fp", mode="list")
    message = str(info.value)
    assert f"chmod go-w {path}" in message and "pickle" in message and "another path" in message
