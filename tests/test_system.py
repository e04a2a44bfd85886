"""Tests for ``amortune._system``: parsers on fixture text, the pure rules, fake cgroup trees, and
invariants of a snapshot of the real machine. No test reads a real limit it then depends on."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from amortune import _system
from amortune._config import Config
from amortune._record import fields
from amortune._system import (
    SystemSnapshot,
    available_memory,
    memory_snapshot,
    parse_cfs_quota,
    parse_cpu_max,
    parse_meminfo,
    parse_memory_limit,
    parse_proc_self_cgroup,
    probe_system,
    probe_usable_cores,
    usable_cores,
)

DATA = Path(__file__).parent / "data" / "cgroup"
GIB = 1 << 30
DOCKER_ID = "3f9c2a7be1d04c55a8e0f6d2b1c4e7a9d8f0b2c3e4a5f6d7e8f9a0b1c2d3e4f5"


def fixture(name: str) -> str:
    return (DATA / name).read_text()


# --- parsers on fixture files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("v2_cpu.max", 1.5), ("v2_cpu.max.unlimited", None)],
)
def test_parse_cpu_max_fixtures(name: str, expected: float | None) -> None:
    assert parse_cpu_max(fixture(name)) == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [
        ("v1_cpu.cfs_quota_us", "v1_cpu.cfs_period_us", 2.5),
        ("v1_cpu.cfs_quota_us.unlimited", "v1_cpu.cfs_period_us", None),
    ],
)
def test_parse_cfs_quota_fixtures(quota: str, period: str, expected: float | None) -> None:
    assert parse_cfs_quota(fixture(quota), fixture(period)) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("v2_memory.max", 4 * GIB),
        ("v2_memory.max.unlimited", None),
        ("v2_memory.current", 1536 << 20),
        ("v1_memory.limit_in_bytes", 2 * GIB),
        ("v1_memory.limit_in_bytes.unlimited", None),
        ("v1_memory.usage_in_bytes", GIB),
    ],
)
def test_parse_memory_limit_fixtures(name: str, expected: int | None) -> None:
    assert parse_memory_limit(fixture(name)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max 100000", None),
        ("max", None),
        ("200000 100000", 2.0),
        ("50000 100000\n", 0.5),
        ("100000 1000000", 0.1),
        ("150000", 1.5),  # period omitted: the kernel default of 100 ms
        ("0 100000", None),
        ("", None),
        ("garbage", None),
        ("12 abc", None),
    ],
)
def test_parse_cpu_max_table(text: str, expected: float | None) -> None:
    assert parse_cpu_max(text) == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [
        ("-1", "100000", None),
        ("100000", "100000", 1.0),
        ("150000\n", "100000\n", 1.5),
        ("50000", "0", None),
        ("", "", None),
        ("x", "100000", None),
    ],
)
def test_parse_cfs_quota_table(quota: str, period: str, expected: float | None) -> None:
    assert parse_cfs_quota(quota, period) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max\n", None),
        ("9223372036854771712", None),  # v1 "unlimited" with 4 KiB pages
        ("9223372036854710272", None),  # v1 "unlimited" with 64 KiB pages
        ("-1", None),
        ("", None),
        ("lots", None),
        ("0", 0),
        ("536870912\n", 512 << 20),
        (str(1 << 40), 1 << 40),
    ],
)
def test_parse_memory_limit_table(text: str, expected: int | None) -> None:
    assert parse_memory_limit(text) == expected


def test_parse_meminfo_fixture() -> None:
    info = parse_meminfo(fixture("meminfo"))
    assert info["MemTotal"] == 32657068 * 1024
    assert info["MemAvailable"] == 21540424 * 1024
    assert info["Inactive(file)"] == 14524636 * 1024
    assert info["HugePages_Total"] == 0  # a count, not kB
    assert info["Hugepagesize"] == 2048 * 1024
    assert len(info) == 51


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("MemAvailable: 123 kB", {"MemAvailable": 123 * 1024}),
        ("HugePages_Free:  7\n", {"HugePages_Free": 7}),
        ("", {}),
        ("no colon here\nMemFree:\nBad: x kB\nSuper: \u00b2 kB\n", {}),
    ],
)
def test_parse_meminfo_table(text: str, expected: dict[str, int]) -> None:
    assert parse_meminfo(text) == expected


def test_parse_proc_self_cgroup_v1_fixture() -> None:
    groups = parse_proc_self_cgroup(fixture("proc_self_cgroup_v1"))
    assert groups["cpu"] == groups["cpuacct"] == groups["memory"] == f"/docker/{DOCKER_ID}"
    assert groups["net_cls"] == groups["net_prio"] == f"/docker/{DOCKER_ID}"
    assert groups["rdma"] == "/"
    assert groups["name=systemd"] == f"/docker/{DOCKER_ID}"
    assert groups[""] == "/system.slice/containerd.service"
    assert "cpu,cpuacct" not in groups


def test_parse_proc_self_cgroup_v2_fixture() -> None:
    groups = parse_proc_self_cgroup(fixture("proc_self_cgroup_v2"))
    assert groups == {"": "/user.slice/user-1000.slice/user@1000.service/app.slice/run-r2c1f.scope"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", {}), ("junk\n", {}), ("0::/a:b", {"": "/a:b"}), ("5:memory:/x\n", {"memory": "/x"})],
)
def test_parse_proc_self_cgroup_table(text: str, expected: dict[str, str]) -> None:
    assert parse_proc_self_cgroup(text) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [("cpuinfo_2socket_ht", 2), ("cpuinfo_arm", None)],  # same core id on two sockets; no ids
)
def test_parse_cpuinfo_cores(name: str, expected: int | None) -> None:
    assert _system._parse_cpuinfo_cores(fixture(name)) == expected


@given(st.text())
@example("Weird: \u00b2 kB\ninactive_file \u00b2\n")  # isdigit() but not int()-able
def test_parsers_never_raise(text: str) -> None:
    parse_cpu_max(text)
    parse_cfs_quota(text, text)
    parse_memory_limit(text)
    parse_meminfo(text)
    parse_proc_self_cgroup(text)
    _system._parse_cpuinfo_cores(text)
    _system._parse_keyed(text)


@given(st.integers(1, 10**9), st.integers(1, 10**7))
def test_parse_cpu_max_is_quota_over_period(quota: int, period: int) -> None:
    assert parse_cpu_max(f"{quota} {period}\n") == quota / period


# --- the pure rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logical", "affinity", "quota", "cap", "expected"),
    [
        (8, None, None, None, 8),
        (8, 8, 1.5, None, 2),  # a fractional quota rounds up
        (8, 8, 2.0, None, 2),
        (8, 8, 0.1, None, 1),
        (8, 8, 16.0, None, 8),  # a quota above the machine does not add cores
        (8, 1, None, None, 1),  # affinity (taskset, cpuset)
        (8, 3, 4.0, None, 3),
        (8, 8, None, 1, 1),  # AMORTUNE_MAX_WORKERS=1
        (8, 8, 6.5, 4, 4),
        (2, 2, None, 64, 2),  # a cap above the machine does not add cores
        (0, None, None, None, 1),  # os.cpu_count() unknown
    ],
)
def test_usable_cores_table(
    logical: int, affinity: int | None, quota: float | None, cap: int | None, expected: int
) -> None:
    assert usable_cores(logical, affinity, quota, cap) == expected


@pytest.mark.parametrize(
    ("host", "limit", "usage", "expected"),
    [
        (8 * GIB, None, None, 8 * GIB),
        (8 * GIB, None, 5 * GIB, 8 * GIB),  # usage without a limit is no constraint
        (8 * GIB, 4 * GIB, 3 * GIB, GIB),  # headroom (limit minus usage), not the limit itself
        (8 * GIB, 4 * GIB, None, 4 * GIB),
        (GIB, 4 * GIB, 0, GIB),  # the host is the tighter bound
        (8 * GIB, 4 * GIB, 5 * GIB, 0),  # over the limit: zero, never negative
        (-5, None, None, 0),
    ],
)
def test_available_memory_table(
    host: int, limit: int | None, usage: int | None, expected: int
) -> None:
    assert available_memory(host, limit, usage) == expected


optional_count = st.none() | st.integers(1, 1024)


@given(
    st.integers(1, 1024),
    optional_count,
    st.none() | st.floats(0.001, 2048, allow_nan=False),
    optional_count,
)
def test_usable_cores_properties(
    logical: int, affinity: int | None, quota: float | None, cap: int | None
) -> None:
    cores = usable_cores(logical, affinity, quota, cap)
    assert 1 <= cores <= logical
    for bound in (affinity, cap, None if quota is None else math.ceil(quota)):
        if bound is not None:
            assert cores <= bound
    # It is a minimum: one of the limits is reached exactly.
    assert cores in {logical, affinity, cap, None if quota is None else math.ceil(quota)}


optional_bytes = st.none() | st.integers(0, 1 << 50)


@given(st.integers(-(1 << 40), 1 << 50), optional_bytes, optional_bytes)
def test_available_memory_properties(host: int, limit: int | None, usage: int | None) -> None:
    available = available_memory(host, limit, usage)
    assert 0 <= available <= max(0, host)
    if limit is not None:
        assert available <= max(0, limit - (usage or 0))
        assert available <= limit


# --- cgroup trees on disk (fake /sys/fs/cgroup) -------------------------------------------------


def put(directory: Path, **files: str) -> None:
    """Write cgroup interface files into ``directory`` (``cpu_max`` names ``cpu.max``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)


def copy(directory: Path, *names: str) -> None:
    """Copy fixtures into ``directory``, dropping their ``v1_``/``v2_`` prefix."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(DATA / name, directory / name[3:])


def test_v2_tree_reads_own_group(tmp_path: Path) -> None:
    groups = parse_proc_self_cgroup(fixture("proc_self_cgroup_v2"))
    leaf = tmp_path.joinpath(*groups[""].strip("/").split("/"))
    copy(leaf, "v2_cpu.max", "v2_memory.max", "v2_memory.current", "v2_memory.stat")
    assert _system._cgroup_cpu_quota(str(tmp_path), groups) == 1.5
    # usage leaves out inactive_file (reclaimable page cache): 1.5 GiB - 0.5 GiB
    assert _system._cgroup_memory(str(tmp_path), groups) == (4 * GIB, GIB)


def test_v2_tree_binding_limit_on_an_ancestor(tmp_path: Path) -> None:
    groups = {"": "/parent.slice/job.scope"}
    put(
        tmp_path / "parent.slice",
        cpu_max="300000 100000\n",
        memory_max=str(2 * GIB),
        memory_current=str(GIB + GIB // 2),
    )
    put(
        tmp_path / "parent.slice" / "job.scope",
        cpu_max="max 100000\n",
        memory_max="max\n",
        memory_current=str(GIB // 4),
    )
    assert _system._cgroup_cpu_quota(str(tmp_path), groups) == 3.0
    # The parent has 0.5 GiB headroom left though this group itself uses only 0.25 GiB.
    assert _system._cgroup_memory(str(tmp_path), groups) == (2 * GIB, GIB + GIB // 2)


def test_v2_tree_tightest_headroom_wins(tmp_path: Path) -> None:
    groups = {"": "/a/b"}
    put(tmp_path / "a", memory_max=str(8 * GIB), memory_current=str(7 * GIB))
    put(tmp_path / "a" / "b", memory_max=str(4 * GIB), memory_current=str(GIB))
    assert _system._cgroup_memory(str(tmp_path), groups) == (8 * GIB, 7 * GIB)


def test_v1_tree_container_sees_its_group_at_the_mount_root(tmp_path: Path) -> None:
    # Docker without a cgroup namespace: the host path in /proc/self/cgroup does not exist
    # under the container's mounts, whose roots are the container's own groups.
    groups = parse_proc_self_cgroup(fixture("proc_self_cgroup_v1"))
    copy(tmp_path / "cpu,cpuacct", "v1_cpu.cfs_quota_us", "v1_cpu.cfs_period_us")
    copy(
        tmp_path / "memory",
        "v1_memory.limit_in_bytes",
        "v1_memory.usage_in_bytes",
        "v1_memory.stat",
    )
    assert _system._cgroup_cpu_quota(str(tmp_path), groups) == 2.5
    # usage 1 GiB minus total_inactive_file 256 MiB
    assert _system._cgroup_memory(str(tmp_path), groups) == (2 * GIB, 768 << 20)


def test_v1_tree_unlimited_and_cpu_only_mount(tmp_path: Path) -> None:
    # Mounts named "cpu" (not "cpu,cpuacct"), as on this project's reference sandbox.
    groups = {"cpu": "/", "memory": "/process_api/abc"}
    put(tmp_path / "cpu", cpu_cfs_quota_us="-1\n", cpu_cfs_period_us="100000\n")
    put(
        tmp_path / "memory" / "process_api" / "abc",
        memory_limit_in_bytes="9223372036854771712\n",
        memory_usage_in_bytes="166047744\n",
    )
    assert _system._cgroup_cpu_quota(str(tmp_path), groups) is None
    assert _system._cgroup_memory(str(tmp_path), groups) == (None, None)
    put(tmp_path / "cpu", cpu_cfs_quota_us="50000\n")
    assert _system._cgroup_cpu_quota(str(tmp_path), groups) == 0.5


def test_missing_or_unreadable_tree_means_no_limit(tmp_path: Path) -> None:
    groups = parse_proc_self_cgroup(fixture("proc_self_cgroup_v1"))
    assert _system._cgroup_cpu_quota(str(tmp_path / "absent"), groups) is None
    assert _system._cgroup_memory(str(tmp_path / "absent"), groups) == (None, None)
    (tmp_path / "cpu.max").mkdir()  # a directory where a file should be: unreadable
    (tmp_path / "memory.max").write_bytes(b"\xff\xfe\x00")
    assert _system._cgroup_cpu_quota(str(tmp_path), {}) is None
    assert _system._cgroup_memory(str(tmp_path), {}) == (None, None)


def test_probe_applies_cgroup_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Limits at the root of a fake v2 tree bind whatever this process's own cgroup path is.
    put(tmp_path, cpu_max="150000 100000\n", memory_max=str(GIB), memory_current=str(GIB // 4))
    monkeypatch.setattr(_system, "_CGROUP_ROOT", str(tmp_path))
    snap = probe_system(Config())
    assert snap.cpu_quota_cores == 1.5
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    assert snap.usable_cores == usable_cores(snap.logical_cores, affinity, 1.5, None)
    assert snap.usable_cores <= 2
    assert snap.cgroup_memory_limit_bytes == GIB
    assert snap.total_memory_bytes <= GIB
    assert snap.available_memory_bytes <= GIB - GIB // 4
    assert memory_snapshot() <= GIB - GIB // 4
    assert "cgroup quota 1.5" in snap.describe() and "(cgroup limit)" in snap.describe()


# --- the real machine --------------------------------------------------------------------------


def test_snapshot_invariants_on_this_machine() -> None:
    config = Config()
    snap = probe_system(config)
    assert 1 <= snap.usable_cores <= snap.logical_cores == (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert snap.usable_cores <= len(os.sched_getaffinity(0))
    if snap.physical_cores is not None:
        assert 1 <= snap.physical_cores <= snap.logical_cores
    if snap.cpu_quota_cores is not None:
        assert snap.usable_cores <= math.ceil(snap.cpu_quota_cores)
    assert 0 <= snap.available_memory_bytes <= snap.total_memory_bytes
    assert snap.total_memory_bytes > 0
    if snap.cgroup_memory_limit_bytes is not None:
        assert snap.total_memory_bytes <= snap.cgroup_memory_limit_bytes
    assert snap.start_method == (config.start_method or "auto")
    assert snap.platform == sys.platform
    assert 0 <= memory_snapshot() <= snap.total_memory_bytes


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_snapshot_start_method_is_configs(method: str) -> None:
    assert probe_system(Config(start_method=method)).start_method == method


def test_env_cap_of_one_worker() -> None:
    snap = probe_system(Config.from_env({"AMORTUNE_MAX_WORKERS": "1"}))
    assert snap.usable_cores == 1


@pytest.mark.parametrize("cap", [None, 1, 2, 64])
def test_the_cores_alone_are_what_the_full_probe_says(cap: int | None) -> None:
    config = Config(max_workers=cap)
    assert probe_usable_cores(config) == probe_system(config).usable_cores


def test_snapshot_is_frozen_and_plain() -> None:
    snap = probe_system(Config())
    with pytest.raises(AttributeError):
        snap.usable_cores = 99  # type: ignore[misc]
    data = snap.to_dict()
    assert list(data) == [f.name for f in fields(SystemSnapshot)]
    assert SystemSnapshot(**data) == snap  # type: ignore[arg-type]
    assert snap.describe().startswith(
        f"{snap.usable_cores} usable cores ({snap.logical_cores} logical"
    )


def test_describe_text() -> None:
    snap = SystemSnapshot(
        usable_cores=2,
        logical_cores=4,
        physical_cores=None,
        cpu_quota_cores=None,
        total_memory_bytes=4 * GIB,
        available_memory_bytes=3 * GIB,
        cgroup_memory_limit_bytes=None,
        start_method="spawn",
        platform="linux",
    )
    assert snap.describe() == (
        "2 usable cores (4 logical), 3.0 GiB available of 4.0 GiB, start method spawn"
    )


def test_import_loads_no_psutil_or_numpy() -> None:
    code = "import sys, amortune._system; bad = {'psutil', 'numpy'} & set(sys.modules); assert not bad, bad"
    subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).parent.parent
    )


def test_oom_kill_count_reads_the_processs_own_memory_cgroup(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    (v2 / "job" / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 7\n")
    (v2 / "job" / "step" / "memory.events").write_text("low 0\noom 1\noom_kill 3\n")
    assert _system.oom_kill_count(str(v2), {"": "/job/step"}) == 3  # its own group, not the parent's
    v1 = tmp_path / "v1"
    (v1 / "memory" / "a").mkdir(parents=True)
    (v1 / "memory" / "a" / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    assert _system.oom_kill_count(str(v1), {"memory": "/a"}) == 5
    assert _system.oom_kill_count(str(tmp_path / "none"), {}) is None


def test_a_sigkill_hints_at_memory_only_on_evidence(monkeypatch: pytest.MonkeyPatch) -> None:
    from amortune.backends._pending import memory_hint

    monkeypatch.setattr(_system, "oom_kill_count", lambda *a, **k: 4)
    monkeypatch.setattr(_system, "memory_snapshot", lambda: 8 << 30)
    assert memory_hint(0, 3) == (True, 4)  # the OOM killer struck since the pool started
    assert memory_hint(100 << 20, 4) == (False, 4)  # small worker, no new OOM kill
    assert memory_hint(6 << 30, 4) == (True, 4)  # it held most of what is free
    assert memory_hint(0, 4) == (None, 4)  # no evidence either way
