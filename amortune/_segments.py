"""Segment files: one batch's results on disk, written atomically and read back lazily.

A batch of plain ``numpy.ndarray`` results of one dtype and shape is one ``.npy`` file of the
stacked array, streamed item by item and read back memory-mapped: its items are *read-only*
views. Any other batch is one ``.pkl`` file, the pickle of a list holding each result's own pickle
(cloudpickle when pickle refuses), so one result decodes without the others. Files go through
:class:`amortune._files.PrivateDir`. Imports the standard library and :mod:`amortune._files`;
numpy only inside functions.
"""

from __future__ import annotations

import io
import pickle
import re
import sys
from collections.abc import Sequence
from typing import Any

from amortune._files import PrivateDir, Sink, dumps_item

from ._record import record

__all__ = ["Segment", "read_segment", "write_segment"]

_SEGMENT_NAME_RE = re.compile(r"seg-(\d{8,})\.(npy|pkl)\Z")
# numpy kinds that ``.npy`` stores without pickling: bool, ints, floats, complex, datetimes,
# bytes, str and plain structured records (object fields are excluded via ``hasobject``).
_NPY_KINDS = frozenset("biufcmMSUV")
# A ``.pkl`` segment is the pickle of ``(_ITEMS_TAG, [pickle of item 0, pickle of item 1, ...])``,
# written opcode by opcode so that only one item's pickle is in memory at a time.
_ITEMS_TAG = "amortune-items"
_ITEMS_HEAD = b"\x80\x05(\x8c" + bytes([len(_ITEMS_TAG)]) + _ITEMS_TAG.encode() + b"]("


@record(frozen=True)
class Segment:
    """One batch's results on disk: file ``name`` in the folder, ``count`` items, ``nbytes``."""

    seq: int
    name: str
    count: int
    nbytes: int

    @property
    def is_array(self) -> bool:
        """True for a stacked ``.npy`` segment (items read back as read-only memmap views)."""
        return self.name.endswith(".npy")

    @staticmethod
    def file_name(seq: int, is_array: bool) -> str:
        """The file name of segment ``seq``."""
        return f"seg-{seq:08d}.{'npy' if is_array else 'pkl'}"

    @classmethod
    def checked(cls, seq: int, name: str, count: int, nbytes: int) -> Segment:
        """A segment record read from elsewhere (a manifest); ``ValueError`` if it is malformed."""
        match = _SEGMENT_NAME_RE.match(name)
        if match is None or int(match.group(1)) != seq or count < 0 or nbytes < 0:
            raise ValueError(f"not a segment file name for seq {seq}: {name!r}")
        return cls(seq, name, count, nbytes)


def write_segment(folder: PrivateDir, seq: int, results: Sequence[Any], *,
                  durable: bool = True) -> Segment:
    """Write one batch's results as segment ``seq`` in ``folder`` (see the module docstring)."""
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    layout = _array_layout(results)
    name = Segment.file_name(seq, layout is not None)
    if layout is not None:
        nbytes = folder.write_atomic(name, lambda sink: _write_npy(sink, results, *layout),
                                     durable=durable)
    else:
        nbytes = folder.write_atomic(name, lambda sink: _write_items(sink, results, name),
                                     durable=durable)
    return Segment(seq, name, len(results), nbytes)


def _array_layout(results: Sequence[Any]) -> tuple[Any, tuple[int, ...]] | None:
    """``(dtype, shape)`` if every result is a plain ndarray of that dtype and shape, else None."""
    np = sys.modules.get("numpy")  # no numpy loaded means no arrays to stack: never import it here
    if np is None or not results or type(results[0]) is not np.ndarray:
        return None
    dtype, shape = results[0].dtype, results[0].shape
    if dtype.hasobject or dtype.kind not in _NPY_KINDS or dtype.itemsize == 0 or 0 in shape:
        return None
    for item in results:
        if type(item) is not np.ndarray or item.dtype != dtype or item.shape != shape:
            return None
    return dtype, shape


def _write_npy(sink: Sink, results: Sequence[Any], dtype: Any, shape: tuple[int, ...]) -> None:
    """Stream ``np.save(np.stack(results))`` without building the stacked array."""
    import numpy as np

    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": (len(results), *shape)}
    # Format 2.0 (numpy >= 1.9) has no 64 KiB header limit, which large record dtypes can hit.
    np.lib.format.write_array_header_2_0(sink, header)
    for item in results:
        # Viewed as bytes: datetime64 arrays do not export the buffer protocol themselves.
        sink.write(np.ascontiguousarray(item).reshape(-1).view(np.uint8).data)


def _write_items(sink: Sink, results: Sequence[Any], name: str) -> None:
    sink.write(_ITEMS_HEAD)
    for j, item in enumerate(results):
        blob = dumps_item(item, f"result {j} of {name}")
        sink.write(b"\x8e" + len(blob).to_bytes(8, "little"))  # BYTES8
        sink.write(blob)
    sink.write(b"et.")  # APPENDS, TUPLE, STOP


def _load_items(f: io.BufferedReader) -> list[bytes]:
    data = pickle.load(f)
    if type(data) is tuple and len(data) == 2 and data[0] == _ITEMS_TAG:
        return list(data[1])
    # A segment of the first format pickled the whole list: its items are re-pickled so that
    # every read still returns a copy of its own.
    return [dumps_item(item, "a stored result") for item in data]


def _load_npy(f: io.BufferedReader) -> Any:
    import numpy as np

    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format {version} is not one amortune writes")
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    try:  # our own header, already checked to be a private file: no header size limit
        shape, fortran, dtype = read_header(f, max_header_size=1 << 30)
    except TypeError:  # pragma: no cover - numpy < 1.24
        shape, fortran, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError("it holds Python objects")
    stacked = np.memmap(f, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C",
                        offset=f.tell())
    return stacked.view(np.ndarray)


def read_segment(folder: PrivateDir, segment: Segment) -> tuple[str, Any]:
    """``("npy", stacked read-only memmap)`` or ``("pkl", [each item's pickle])``."""
    kind, load = ("npy", _load_npy) if segment.is_array else ("pkl", _load_items)
    payload = folder.read(segment.name, load, size=segment.nbytes)
    if len(payload) != segment.count:
        raise folder.damaged(segment.name, f"it holds {len(payload)} results, not {segment.count}")
    return kind, payload
