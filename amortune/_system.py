"""The machine as it really is: usable cores, memory headroom and start method, in one snapshot.

Owns :class:`SystemSnapshot`, pure parsers of ``/proc`` and cgroup v1/v2 file *text* (tests feed
fixtures), the pure rules combining them, and :func:`probe_system` / :func:`memory_snapshot`, the
only functions that read the OS; an unreadable file means "no limit", never an error. Imports the
stdlib and ``amortune._config`` only: no higher layer, no numpy, and ``psutil`` only lazily inside
a function as a fallback. Only physical cores are cached (hardware does not change under a
process); affinity, quotas and memory do change, so every snapshot reads them fresh.
"""

from __future__ import annotations

import functools
import math
import os
import sys

from amortune._config import Config

from ._record import asdict, record

__all__ = [
    "SystemSnapshot",
    "available_memory",
    "memory_snapshot",
    "parse_cfs_quota",
    "parse_cpu_max",
    "parse_meminfo",
    "parse_memory_limit",
    "parse_proc_self_cgroup",
    "probe_system",
    "probe_usable_cores",
    "usable_cores",
]

_CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages: 9223372036854771712 with 4 KiB pages,
# other values with 16 or 64 KiB pages. Anything from 1 EiB up is no real machine's memory.
_UNLIMITED_BYTES = 1 << 60
_GIB = 1 << 30


@record(frozen=True)
class SystemSnapshot:
    """What this process may use now; built by :func:`probe_system` and passed down explicitly.

    Cores: see :func:`usable_cores`. Memory: the host's ``MemAvailable`` capped by the cgroup's
    headroom, as a container can be near its limit on a host with plenty free.
    """

    usable_cores: int
    logical_cores: int
    physical_cores: int | None
    cpu_quota_cores: float | None
    total_memory_bytes: int
    available_memory_bytes: int
    cgroup_memory_limit_bytes: int | None
    start_method: str
    platform: str

    def to_dict(self) -> dict[str, object]:
        """Field-to-value mapping of plain (JSON-serialisable) values."""
        return asdict(self)

    def describe(self) -> str:
        """One line for humans, as used by ``OptimizationResult.explain()``."""
        detail = f"{self.logical_cores} logical"
        if self.physical_cores is not None:
            detail += f", {self.physical_cores} physical"
        if self.cpu_quota_cores is not None:
            detail += f", cgroup quota {self.cpu_quota_cores:g}"
        limit = " (cgroup limit)" if self.cgroup_memory_limit_bytes is not None else ""
        return (
            f"{self.usable_cores} usable cores ({detail}), "
            f"{self.available_memory_bytes / _GIB:.1f} GiB available of "
            f"{self.total_memory_bytes / _GIB:.1f} GiB{limit}, start method {self.start_method}"
        )


# --- pure parsers: file text in, numbers out; malformed text counts as "no limit" -------------


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` (``"<quota> <period>"``) in cores; ``None`` when unlimited.

    >>> parse_cpu_max("150000 100000\\n"), parse_cpu_max("max 100000")
    (1.5, None)
    """
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    return parse_cfs_quota(fields[0], fields[1] if len(fields) > 1 else "100000")


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` in cores; ``None`` when unlimited.

    >>> parse_cfs_quota("-1", "100000"), parse_cfs_quota("50000\\n", "100000\\n")
    (None, 0.5)
    """
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_memory_limit(text: str) -> int | None:
    """v2 ``memory.max`` or v1 ``memory.limit_in_bytes`` in bytes; ``None`` when unlimited.

    >>> parse_memory_limit("max"), parse_memory_limit("9223372036854771712"), parse_memory_limit("4096")
    (None, None, 4096)
    """
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 <= value < _UNLIMITED_BYTES else None


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as ``{field: bytes}``; unitless counts (``HugePages_Total``) kept as is.

    >>> parse_meminfo("MemAvailable:  123 kB\\nHugePages_Total:  0\\n")
    {'MemAvailable': 125952, 'HugePages_Total': 0}
    """
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and fields and fields[0].isdecimal():
            out[key.strip()] = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    return out


def parse_proc_self_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as ``{controller: path}``; the v2 unified line has the key ``""``.

    >>> parse_proc_self_cgroup("4:cpu,cpuacct:/a\\n0::/b\\n")
    {'cpu': '/a', 'cpuacct': '/a', '': '/b'}
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.update(dict.fromkeys(parts[1].split(","), parts[2]))
    return out


def _parse_keyed(text: str) -> dict[str, int]:
    """A flat-keyed cgroup file such as ``memory.stat`` (``"<key> <int>"`` lines)."""
    pairs = (line.split() for line in text.splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdecimal()}


def _parse_cpuinfo_cores(text: str) -> int | None:
    """Distinct ``(physical id, core id)`` pairs in ``/proc/cpuinfo``; ``None`` if none listed."""
    cores: set[tuple[str, str]] = set()
    physical = ""
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return len(cores) or None


# --- pure rules --------------------------------------------------------------------------------


def usable_cores(logical: int, affinity: int | None, quota: float | None, cap: int | None) -> int:
    """The least of the limits given, the quota rounded up, and at least 1.

    A quota of 1.5 cores still lets two processes make progress, so it counts as 2.

    >>> usable_cores(8, 4, 1.5, None), usable_cores(8, None, None, 1), usable_cores(0, None, None, None)
    (2, 1, 1)
    """
    limits = [logical, *(n for n in (affinity, cap) if n is not None)]
    if quota is not None:
        limits.append(math.ceil(quota))
    return max(1, min(limits))


def available_memory(
    host_available: int, cgroup_limit: int | None, cgroup_usage: int | None
) -> int:
    """Host ``MemAvailable`` capped by the cgroup's headroom (limit minus usage), never negative.

    >>> available_memory(8 << 30, 4 << 30, 3 << 30) == 1 << 30, available_memory(5, 4, 9)
    (True, 0)
    """
    available = max(0, host_available)
    if cgroup_limit is not None:
        available = min(available, max(0, cgroup_limit - (cgroup_usage or 0)))
    return available


# --- reading the OS ----------------------------------------------------------------------------


def _read(*path: str) -> str:
    """The file's text, or ``""`` (which every parser reads as "no limit") if it cannot be read."""
    try:
        with open(os.path.join(*path), encoding="ascii", errors="replace") as f:
            return f.read()
    except (OSError, ValueError):
        return ""


def _levels(mount: str, path: str) -> list[str]:
    """Existing cgroup directories from this process's own group up to ``mount``: limits nest.

    In a container the host's path is often absent and the mount root is the container's group.
    """
    if not mount:
        return []
    parts = [p for p in path.split("/") if p not in ("", ".", "..")]
    dirs = [os.path.join(mount, *parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if os.path.isdir(d)]


def _v1_mount(root: str, *names: str) -> str:
    return next((m for m in (os.path.join(root, n) for n in names) if os.path.isdir(m)), "")


def _cgroup_cpu_quota(root: str, groups: dict[str, str]) -> float | None:
    """The tightest CPU quota, in cores, over all v2 ``cpu.max`` and v1 CFS levels."""
    quotas = [parse_cpu_max(_read(d, "cpu.max")) for d in _levels(root, groups.get("", "/"))]
    for d in _levels(_v1_mount(root, "cpu,cpuacct", "cpu"), groups.get("cpu", "/")):
        quotas.append(parse_cfs_quota(_read(d, "cpu.cfs_quota_us"), _read(d, "cpu.cfs_period_us")))
    return min((q for q in quotas if q is not None), default=None)


def _cgroup_memory(root: str, groups: dict[str, str]) -> tuple[int | None, int | None]:
    """``(limit, usage)`` in bytes of the level with the least headroom, or ``(None, None)``.

    Usage leaves out ``inactive_file``, page cache the kernel reclaims before any OOM kill (the
    kubelet's working-set rule); otherwise a job that has read large files looks out of memory.
    """
    v1 = (_v1_mount(root, "memory"), groups.get("memory", "/"))
    layouts = [
        (root, groups.get("", "/"), "memory.max", "memory.current", "inactive_file"),
        (*v1, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ]
    best: tuple[int, int] | None = None
    for mount, path, limit_file, usage_file, cache_key in layouts:
        for d in _levels(mount, path):
            limit = parse_memory_limit(_read(d, limit_file))
            if limit is None:
                continue
            usage = parse_memory_limit(_read(d, usage_file)) or 0
            usage = max(0, usage - _parse_keyed(_read(d, "memory.stat")).get(cache_key, 0))
            if best is None or limit - usage < best[0] - best[1]:
                best = (limit, usage)
    return best if best is not None else (None, None)


def _host_memory() -> tuple[int, int]:
    """``(total, available)`` bytes for the whole host: ``/proc/meminfo``, else psutil."""
    info = parse_meminfo(_read("/proc/meminfo"))
    if "MemTotal" in info:  # MemAvailable exists since Linux 3.14 (and RHEL 7's 3.10)
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    import psutil  # lazy: see the module docstring; a declared dependency, so no fallback

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def _memory(groups: dict[str, str]) -> tuple[int, int, int | None]:
    """``(total, available, cgroup limit)`` in bytes, host figures capped by the cgroup."""
    host_total, host_available = _host_memory()
    limit, usage = _cgroup_memory(_CGROUP_ROOT, groups)
    total = host_total if limit is None else min(host_total, limit)
    return total, min(total, available_memory(host_available, limit, usage)), limit


@functools.cache
def _physical_cores() -> int | None:
    """Physical cores from ``/proc/cpuinfo``, else psutil; ``None`` if neither can tell."""
    cores = _parse_cpuinfo_cores(_read("/proc/cpuinfo"))
    if cores is not None:
        return cores
    try:
        import psutil  # lazy: see the module docstring

        count = psutil.cpu_count(logical=False)
        return int(count) if count else None
    except Exception:
        return None


def oom_kill_count(root: str = _CGROUP_ROOT, groups: dict[str, str] | None = None) -> int | None:
    """Processes the kernel's OOM killer has killed in this process's memory cgroup so far.

    cgroup v2 ``memory.events`` or v1 ``memory.oom_control`` (``oom_kill``, Linux 4.13+) of the
    process's own group; ``None`` where neither can be read (macOS, old kernels).
    """
    if groups is None:
        groups = parse_proc_self_cgroup(_read("/proc/self/cgroup"))
    places = ((root, groups.get("", "/"), "memory.events"),
              (_v1_mount(root, "memory"), groups.get("memory", "/"), "memory.oom_control"))
    for mount, path, name in places:
        for d in _levels(mount, path):
            counts = _parse_keyed(_read(d, name))
            if "oom_kill" in counts:
                return counts["oom_kill"]
    return None


def memory_snapshot() -> int:
    """Available memory in bytes now, by :func:`probe_system`'s host-and-cgroup rule.

    Cheap (a few small file reads), so the batch loop can re-check between batches.
    """
    return _memory(parse_proc_self_cgroup(_read("/proc/self/cgroup")))[1]


def probe_usable_cores(config: Config | None = None) -> int:
    """:attr:`SystemSnapshot.usable_cores` alone, without reading memory or the CPU list: what a
    fresh call needs before it forks its first workers (0.1 ms instead of 0.8)."""
    config = Config.from_env() if config is None else config
    groups = parse_proc_self_cgroup(_read("/proc/self/cgroup"))
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return usable_cores(os.cpu_count() or 1, affinity, _cgroup_cpu_quota(_CGROUP_ROOT, groups),
                        config.max_workers)


def probe_system(config: Config | None = None) -> SystemSnapshot:
    """Read the OS into a :class:`SystemSnapshot`; ``config`` defaults to ``Config.from_env()``."""
    config = Config.from_env() if config is None else config
    groups = parse_proc_self_cgroup(_read("/proc/self/cgroup"))
    logical = os.cpu_count() or 1
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        affinity = None
    quota = _cgroup_cpu_quota(_CGROUP_ROOT, groups)
    total, available, limit = _memory(groups)
    return SystemSnapshot(
        usable_cores=usable_cores(logical, affinity, quota, config.max_workers),
        logical_cores=logical,
        physical_cores=_physical_cores(),
        cpu_quota_cores=quota,
        total_memory_bytes=total,
        available_memory_bytes=available,
        cgroup_memory_limit_bytes=limit,
        start_method=config.start_method or "auto",
        platform=sys.platform,
    )
