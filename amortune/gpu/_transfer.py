"""Items and outputs on their way through the pipe and into a checkpoint: tensors of one dtype
travel as one numpy buffer, views as copies of themselves."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple


def _compact(item: Any) -> Any:
    """A tensor view pickles its whole storage: send a copy of just the view instead."""
    torch = sys.modules.get("torch")
    if torch is None:
        return item
    if isinstance(item, torch.Tensor):
        if item.untyped_storage().nbytes() > item.numel() * item.element_size():
            return item.clone()
        return item
    if isinstance(item, tuple) and not hasattr(item, "_fields"):
        return tuple(_compact(v) for v in item)
    if isinstance(item, list):
        return [_compact(v) for v in item]
    if isinstance(item, dict):
        return {k: _compact(v) for k, v in item.items()}
    return item


class _Packed(NamedTuple):
    """Tensors of one dtype as one flat numpy buffer, for the pipe: a tensor pickles in ~0.2 ms
    (its storage object), one buffer of thousands of them in about that time.

    ``shape`` set: ``n`` items of that shape (the rows of one block); else ``shapes`` lists each
    item's shape.
    """

    flat: Any
    n: int
    shape: tuple[int, ...] | None
    shapes: tuple[tuple[int, ...], ...] = ()


class _Rows(Sequence[Any]):
    """Items that are the rows of one tensor: :func:`default_collate` uses the block as it is,
    so a batch of equal-shape items costs no per-item operation."""

    def __init__(self, block: Any) -> None:
        self.block = block

    def __len__(self) -> int:
        return int(self.block.shape[0])

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return _Rows(self.block[index])
        return self.block[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.block.unbind(0))


def _packable(values: Sequence[Any]) -> bool:
    """Tensors of one dtype (device, layout and gradients are checked by stacking them)."""
    torch = sys.modules.get("torch")
    if torch is None or not values:
        return False
    tensor, dtype = torch.Tensor, getattr(values[0], "dtype", None)
    return all(isinstance(v, tensor) and v.dtype == dtype for v in values)


def _numpy(t: Any) -> Any:
    """``t`` flat as a numpy array, or ``None`` (bfloat16 has no numpy dtype; a CUDA tensor, a
    sparse one or one needing gradients is not sent this way)."""
    if t.device.type != "cpu" or t.layout is not sys.modules["torch"].strided or t.requires_grad:
        return None
    try:
        return t.reshape(-1).numpy()
    except (TypeError, RuntimeError):
        return None


def _pack(values: Sequence[Any]) -> Any:
    """``values`` as a :class:`_Packed` when they are CPU tensors of one dtype, else as a list
    (tensor views copied, so none pickles its whole batch's storage)."""
    import torch

    if isinstance(values, _Rows):
        flat = _numpy(values.block.contiguous())
        if flat is not None:
            return _Packed(flat, len(values), tuple(values.block.shape[1:]))
        values = list(values)
    if _packable(values):
        try:
            stacked = torch.stack(list(values))  # equal shapes: one block
        except RuntimeError:
            stacked = None
        if stacked is not None:
            flat = _numpy(stacked)
            if flat is not None:
                return _Packed(flat, len(values), tuple(stacked.shape[1:]))
        else:
            shapes = [tuple(v.shape) for v in values]
            try:
                if all(len(s) >= 1 and s[1:] == shapes[0][1:] for s in shapes):
                    joined = torch.cat(list(values))  # ragged along the first dimension
                else:
                    joined = torch.cat([v.reshape(-1) for v in values])
            except RuntimeError:  # tensors on different devices, sparse ones
                joined = None
            flat = None if joined is None else _numpy(joined)
            if flat is not None:
                return _Packed(flat, len(values), None, tuple(shapes))
    return [_compact(v) for v in values]


def _unpack(values: Any) -> Sequence[Any]:
    """The items :func:`_pack` was given: rows of one block (views of one buffer)."""
    if not isinstance(values, _Packed):
        return list(values)
    import torch

    flat = torch.from_numpy(values.flat)
    if values.shape is not None:
        return _Rows(flat.view(values.n, *values.shape))
    parts = torch.split(flat, [math.prod(s) for s in values.shapes])
    return [p if len(s) == 1 else p.view(s) for p, s in zip(parts, values.shapes, strict=True)]


def _as_list(values: Sequence[Any]) -> list[Any]:
    return list(values.block.unbind(0)) if isinstance(values, _Rows) else list(values)


class _AsNumpy:
    """A CPU tensor that pickles through numpy (~6x faster both ways) and unpickles as a tensor,
    so a checkpoint of many small outputs is cheap to write and to resume."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor

    def __reduce__(self) -> tuple[Any, ...]:
        import torch

        return (torch.from_numpy, (self.tensor.numpy(),))


class _ArrayAsTensor:
    """A numpy row that unpickles as a CPU tensor (see :class:`_AsNumpy`)."""

    __slots__ = ("array",)

    def __init__(self, array: Any) -> None:
        self.array = array

    def __reduce__(self) -> tuple[Any, ...]:
        import torch

        return (torch.from_numpy, (self.array,))


def _stored_rows(outputs: Any) -> list[Any]:
    """One task's outputs as a checkpoint stores them: one entry per item, each unpickling as
    the tensor (or object) the caller gets back."""
    if isinstance(outputs, _Packed) and outputs.shape is not None:
        rows = outputs.flat.reshape(outputs.n, *outputs.shape)
        return [_ArrayAsTensor(r) for r in rows]  # no tensor object per item made here
    return [_stored(v) for v in _as_list(_unpack(outputs))]


def _stored(value: Any) -> Any:
    torch = sys.modules.get("torch")
    if (torch is not None and isinstance(value, torch.Tensor) and value.device.type == "cpu"
            and value.layout == torch.strided and not value.requires_grad):
        try:
            value.numpy()
        except (TypeError, RuntimeError):
            return value
        return _AsNumpy(value)
    return value
