"""Devices: which GPUs there are (caller side, never initialising CUDA) and, in a worker, every
``torch.cuda`` call amortune makes.

Caller side, :func:`discover_devices` lists device ids as ``CUDA_VISIBLE_DEVICES`` values
(``"0"``, ``"GPU-…"``, ``"MIG-…"``) without importing torch: from ``AMORTUNE_FAKE_GPUS``, the
caller's ``CUDA_VISIBLE_DEVICES``, ``nvidia-smi -L``, ``/proc/driver/nvidia/gpus``, and only as a
last resort a throwaway interpreter that asks torch. A process that initialised CUDA can no longer
fork safely and keeps memory on every device, so the caller must never do so itself.

Worker side, :func:`worker_device` returns the :class:`Device` a worker computes on. Every call
into ``torch.cuda`` (memory counters, the cache, out-of-memory detection) is a method of it, so
:class:`FakeDevice` can stand in for a GPU: with ``AMORTUNE_FAKE_GPUS=N`` the caller sees ``N``
devices whose workers compute on the CPU, and ``AMORTUNE_FAKE_GPU_MEMORY=bytes`` makes such a
worker raise a real ``torch.cuda.OutOfMemoryError`` as soon as the tensors a batch creates exceed
that budget (the model's weights are not counted). Imports the standard library only; torch is
imported inside the functions that need it, and only in workers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

__all__ = [
    "FAKE_GPUS_ENV",
    "FAKE_MEMORY_ENV",
    "Device",
    "DeviceList",
    "FakeDevice",
    "discover_devices",
    "is_out_of_memory",
    "parse_nvidia_smi",
    "parse_visible_devices",
    "worker_device",
]

FAKE_GPUS_ENV = "AMORTUNE_FAKE_GPUS"
FAKE_MEMORY_ENV = "AMORTUNE_FAKE_GPU_MEMORY"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
_PROC_GPUS = "/proc/driver/nvidia/gpus"
#: Seconds the last-resort probe interpreter may take (importing torch with CUDA takes ~2-5 s).
PROBE_TIMEOUT_SECONDS = 60.0
#: Texts of the errors allocators raise when memory runs out (CUDA, the CPU allocator, cuBLAS).
_OOM_TEXTS = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")
# Probe results by environment: a device count does not change while this process runs.
_PROBED: dict[tuple[str | None, str | None], int] = {}


class DeviceList(NamedTuple):
    """Device ids (``CUDA_VISIBLE_DEVICES`` values), whether they are fakes, and how found."""

    ids: tuple[str, ...]
    fake: bool
    source: str


def parse_visible_devices(text: str) -> list[str]:
    """The device ids of a ``CUDA_VISIBLE_DEVICES`` value, as CUDA reads it.

    CUDA stops at the first entry that is not a device (``-1`` hides every device).

    >>> parse_visible_devices("0, 2,GPU-8f2e")
    ['0', '2', 'GPU-8f2e']
    >>> parse_visible_devices("1,-1,2")
    ['1']
    >>> parse_visible_devices("0,nonsense,1")
    ['0']
    >>> parse_visible_devices("")
    []
    """
    out: list[str] = []
    for raw in text.split(","):
        token = raw.strip()
        if not (token.isdigit() or re.fullmatch(r"(GPU|MIG)-[\w\-/]+", token)):
            break
        out.append(token)
    return out


def parse_nvidia_smi(text: str) -> list[str]:
    """Device ids from ``nvidia-smi -L``: a GPU's index, or its MIG instances' UUIDs.

    >>> parse_nvidia_smi('''GPU 0: NVIDIA A100 (UUID: GPU-aaaa)
    ...   MIG 3g.20gb     Device  0: (UUID: MIG-bbbb)
    ...   MIG 3g.20gb     Device  1: (UUID: MIG-cccc)
    ... GPU 1: NVIDIA A100 (UUID: GPU-dddd)''')
    ['MIG-bbbb', 'MIG-cccc', '1']
    """
    gpus: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        gpu = re.match(r"\s*GPU (\d+):", line)
        if gpu:
            gpus.append((gpu.group(1), []))
            continue
        mig = re.match(r"\s*MIG .*\(UUID: (MIG-[^)\s]+)\)", line)
        if mig and gpus:
            gpus[-1][1].append(mig.group(1))
    out: list[str] = []
    for index, migs in gpus:
        out.extend(migs or [index])
    return out


def _count_proc_gpus(root: str = _PROC_GPUS) -> int | None:
    try:
        return len([e for e in os.scandir(root) if e.is_dir()])
    except OSError:
        return None


def _nvidia_smi() -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(proc.stdout) if proc.returncode == 0 else None


def _torch_build_has_gpu() -> bool | None:
    """Whether the installed torch was built with CUDA or ROCm, read from its version file."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (pathlib.Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return None
    found = re.findall(r"^(cuda|hip)\s*(?::[^=]*)?=\s*(.+)$", text, re.M)
    if not found:
        return None
    return any(value.strip() != "None" for _, value in found)


def _probe_torch(env: Mapping[str, str]) -> int:
    """``torch.cuda.device_count()`` asked in a throwaway interpreter (this one stays clean)."""
    key = (env.get(VISIBLE_ENV), env.get("HIP_VISIBLE_DEVICES"))
    if key in _PROBED:
        return _PROBED[key]
    code = "import torch; print(torch.cuda.device_count())"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_SECONDS, env=dict(env), check=False)
        count = int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else 0
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        count = 0
    _PROBED[key] = count
    return count


def discover_devices(env: Mapping[str, str] | None = None, *, probe: bool = True) -> DeviceList:
    """The GPUs workers can be given, found without initialising CUDA in this process.

    Parameters
    ----------
    env:
        The environment to read (default ``os.environ``).
    probe:
        Whether a throwaway interpreter may ask torch when nothing cheaper can tell.

    Returns
    -------
    DeviceList
        ``ids`` are ``CUDA_VISIBLE_DEVICES`` values, one per device; empty when there is none.
    """
    env = os.environ if env is None else env
    fake = env.get(FAKE_GPUS_ENV)
    if fake is not None and fake.strip():
        try:
            n = int(fake)
        except ValueError:
            raise ValueError(f"{FAKE_GPUS_ENV} must be a number of devices, got {fake!r}") from None
        return DeviceList(tuple(str(i) for i in range(max(0, n))), True, FAKE_GPUS_ENV)
    visible = env.get(VISIBLE_ENV)
    if visible is not None and not parse_visible_devices(visible):
        return DeviceList((), False, f"{VISIBLE_ENV}={visible!r}")
    found = _nvidia_smi()
    source = "nvidia-smi -L"
    if not found:
        count = _count_proc_gpus()
        found, source = ([str(i) for i in range(count)], _PROC_GPUS) if count else ([], "")
    if not found and probe and _torch_build_has_gpu() is not False:
        count = _probe_torch(env)
        found, source = [str(i) for i in range(count)], "torch.cuda.device_count()"
    if not found:
        return DeviceList((), False, "no GPU driver found")
    if visible is not None:  # the caller's own selection, as CUDA would apply it
        return DeviceList(tuple(parse_visible_devices(visible)), False, VISIBLE_ENV)
    return DeviceList(tuple(found), False, source)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed: CUDA, the CPU allocator, numpy, cuBLAS."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None:
        for oom_type in (getattr(torch, "OutOfMemoryError", None),
                         getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)):
            if isinstance(oom_type, type) and isinstance(exc, oom_type):
                return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OOM_TEXTS)


class Device:
    """Where a worker computes: the CUDA device its ``CUDA_VISIBLE_DEVICES`` leaves, or the CPU.

    ``device_id`` is the id the caller gave the worker (``"cpu"`` for a CPU worker).
    """

    fake = False

    def __init__(self, device_id: str) -> None:
        self.id = device_id
        self.is_cuda = device_id != "cpu"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r}>"

    @property
    def torch_device(self) -> Any:
        import torch

        return torch.device("cuda", 0) if self.is_cuda else torch.device("cpu")

    def check(self) -> None:
        """Fail clearly when the worker's device is not usable by torch here."""
        if self.is_cuda:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"worker for device {self.id!r} (CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get(VISIBLE_ENV)!r}) sees no CUDA device; pass devices='cpu' "
                    "to run on the CPU")

    def reset_peak(self) -> None:
        if self.is_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self._rss_base = _reset_rss_peak()

    def peak_bytes(self) -> int | None:
        """Peak memory since :meth:`reset_peak`: allocated on the GPU, or on the CPU the growth
        of this process's resident set (Linux; ``None`` where the peak cannot be reset)."""
        if not self.is_cuda:
            base = getattr(self, "_rss_base", None)
            high = _status_bytes("VmHWM") if base is not None else None
            return None if high is None or base is None else max(0, high - base)
        import torch

        return int(torch.cuda.max_memory_allocated())

    def total_bytes(self) -> int | None:
        if not self.is_cuda:
            return None
        import torch

        return int(torch.cuda.mem_get_info()[1])

    def synchronize(self) -> None:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize()

    def empty_cache(self) -> None:
        """Give cached blocks back after an out-of-memory error, so a smaller batch fits."""
        if self.is_cuda:
            import torch

            torch.cuda.empty_cache()

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return is_out_of_memory(exc)

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Around one batch: a real device counts its own memory; fakes count tensors here."""
        yield


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_rss_peak() -> int | None:
    """Reset this process's peak resident set to its current size (Linux ``clear_refs``);
    returns that size, or ``None`` where it cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


class FakeDevice(Device):
    """A GPU stand-in computing on the CPU, with an optional memory budget for batch tensors.

    Inside :meth:`measure`, every tensor an operation creates is counted until it is freed; when
    the live total would exceed ``memory_bytes`` a real ``torch.cuda.OutOfMemoryError`` is raised,
    so the code that handles a real one is exercised. Without a budget nothing is counted (and
    ``peak_bytes`` stays ``None``): the counting mode costs a second or two to load.
    """

    fake = True

    def __init__(self, device_id: str, memory_bytes: int | None = None) -> None:
        super().__init__(device_id)
        self.is_cuda = False
        self.memory_bytes = memory_bytes
        self._peak: int | None = None

    def check(self) -> None:
        pass

    def reset_peak(self) -> None:
        self._peak = None if self.memory_bytes is None else 0

    def peak_bytes(self) -> int | None:
        return self._peak

    def total_bytes(self) -> int | None:
        return self.memory_bytes

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.memory_bytes is None:  # nothing to enforce: skip the (slow to load) meter
            yield
            return
        meter = _meter_class()(self.id, self.memory_bytes)
        try:
            with meter:
                yield
        finally:
            self._peak = max(self._peak or 0, meter.peak)


@functools.cache
def _meter_class() -> Any:
    """A ``TorchDispatchMode`` counting live tensor storage bytes (defined once torch loads)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Meter(TorchDispatchMode):  # type: ignore[no-untyped-call]
        def __init__(self, device_id: str, budget: int | None) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.device_id, self.budget = device_id, budget
            self.live: dict[int, list[int]] = {}
            self.current = self.peak = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for t in outs:
                if isinstance(t, torch.Tensor):
                    self._count(t)
            return out

        def _count(self, t: Any) -> None:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            entry = self.live.get(key)
            if entry is None:
                size = int(storage.nbytes())
                if self.budget is not None and self.current + size > self.budget:
                    raise torch.cuda.OutOfMemoryError(
                        f"CUDA out of memory (fake device {self.device_id}). Tried to allocate "
                        f"{size} bytes with {self.current} of {self.budget} bytes in use "
                        f"({FAKE_MEMORY_ENV})")
                entry = self.live[key] = [size, 0]
                self.current += size
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._drop, key)

        def _drop(self, key: int) -> None:
            entry = self.live.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self.live[key]
                    self.current -= entry[0]

    return _Meter


def worker_device(device_id: str, env: Mapping[str, str] | None = None) -> Device:
    """The :class:`Device` for a worker given ``device_id`` (``"cpu"``, a GPU id, or a fake)."""
    env = os.environ if env is None else env
    if device_id == "cpu":
        return Device("cpu")
    if (env.get(FAKE_GPUS_ENV) or "").strip():
        budget = (env.get(FAKE_MEMORY_ENV) or "").strip()
        try:
            memory = int(float(budget)) if budget else None
        except ValueError:
            raise ValueError(f"{FAKE_MEMORY_ENV} must be a number of bytes, got {budget!r}") from None
        return FakeDevice(device_id, memory)
    return Device(device_id)
