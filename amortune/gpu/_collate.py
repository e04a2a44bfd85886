"""Collate, predict, split: items to a batch and a model's output back to one per item.

They run in workers; torch is imported inside them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .._record import record
from ._transfer import _compact, _Rows


@record()
class Padded:
    """Ragged sequences padded to one tensor: ``values`` (batch, longest, ...) zero-padded,
    ``lengths`` (batch,) and ``mask`` (batch, longest), true on real positions."""

    values: Any
    lengths: Any
    mask: Any

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


def _as_tensor(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if type(x).__module__ == "numpy" and hasattr(x, "shape"):
        import numpy as np

        arr = np.asarray(x)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr).copy()
        return torch.from_numpy(arr)
    if isinstance(x, (bool, int, float)) or (isinstance(x, list) and x and all(
            isinstance(v, (bool, int, float)) for v in x)):
        return torch.tensor(x)
    return None


def default_collate(items: Sequence[Any], *, pad: bool = False) -> Any:
    """Items to one batch: stack equal shapes, pad ragged sequences, recurse into tuples/dicts.

    Tensors, numpy arrays, numbers and lists of numbers of one shape are stacked into a tensor.
    Sequences that differ only in their first dimension (all sequences, with ``pad=True``, which
    :func:`map_model` uses when given ``length=``) are zero-padded to the longest into a
    :class:`Padded` (values, lengths, mask). Tuples and dicts are collated field by field; other
    items are passed on as the list itself.
    """
    import torch

    if not items:
        raise ValueError("cannot collate an empty batch")
    if isinstance(items, _Rows):  # equal-shape items sent as one block: the batch already
        block = items.block
        if not (pad and block.dim() >= 2):
            return block
        lengths = torch.full((len(items),), block.shape[1], dtype=torch.long)
        return Padded(block, lengths, torch.ones(block.shape[:2], dtype=torch.bool))
    first = items[0]
    if not pad and isinstance(first, torch.Tensor):
        try:  # equal shapes, the usual case: one call instead of a check per item
            return torch.stack(list(items))
        except (RuntimeError, TypeError):
            pass
    if isinstance(first, Mapping):
        return {k: default_collate([it[k] for it in items], pad=pad) for k in first}
    if isinstance(first, tuple):
        fields = [default_collate(list(f), pad=pad) for f in zip(*items, strict=True)]
        return type(first)(*fields) if hasattr(first, "_fields") else tuple(fields)
    tensors = [_as_tensor(x) for x in items]
    if any(t is None for t in tensors):
        return list(items)
    shape = tensors[0].shape
    if all(t.shape == shape for t in tensors) and not (pad and len(shape) >= 1):
        return torch.stack(tensors)
    if all(t.dim() >= 1 and t.shape[1:] == shape[1:] for t in tensors):
        lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
        values = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
        mask = torch.arange(values.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return Padded(values, lengths, mask)
    raise ValueError(f"cannot collate items of shapes {sorted({tuple(t.shape) for t in tensors})}: "
                     "pass collate=")


def default_predict(model: Any, batch: Any) -> Any:
    """``model(batch)``; ``model(values, lengths)`` for a :class:`Padded` batch, ``model(*batch)``
    for a tuple and ``model(**batch)`` for a dict."""
    if isinstance(batch, Padded):
        return model(batch.values, batch.lengths)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def _split_n(output: Any, n: int) -> list[Any]:
    torch = sys.modules.get("torch")
    if output is None:
        return [None] * n
    if torch is not None and isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] != n:
            raise ValueError(f"the model returned a tensor of shape {tuple(output.shape)} for a "
                             f"batch of {n} items; pass split=")
        return list(output.unbind(0))  # views; _pack copies them into one buffer
    if type(output).__module__ == "numpy" and hasattr(output, "shape"):
        if not output.shape or output.shape[0] != n:
            raise ValueError(f"the model returned an array of shape {output.shape} for a batch "
                             f"of {n} items; pass split=")
        return [output[i].copy() for i in range(n)]
    if isinstance(output, Mapping):
        keys = list(output)
        columns = [_split_n(output[k], n) for k in keys]
        return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]
    if isinstance(output, tuple):
        columns = [_split_n(v, n) for v in output]
        rows = [tuple(r) for r in zip(*columns, strict=True)]
        return [type(output)(*r) for r in rows] if hasattr(output, "_fields") else rows
    if isinstance(output, list) and len(output) == n:
        return output
    raise TypeError(f"cannot split a model output of type {type(output).__name__} into {n} "
                    "items; pass split=")


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Padded):
        return len(batch)
    if isinstance(batch, Mapping):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, tuple):
        return _batch_len(batch[0])
    if hasattr(batch, "shape"):
        return int(batch.shape[0])
    return len(batch)


def default_split(output: Any, batch: Any) -> list[Any]:
    """One output per item: rows of a tensor or array (copied), per-item dicts and tuples."""
    return [_compact(v) for v in _split_n(output, _batch_len(batch))]


def trim_padding(output: Any, batch: Any) -> list[Any]:
    """Like :func:`default_split`, but each item of a :class:`Padded` batch keeps only its own
    length along the sequence dimension (dimension 1 of the output)."""
    if not isinstance(batch, Padded):
        return default_split(output, batch)
    lengths = [int(v) for v in batch.lengths]
    return [output[i, :n] for i, n in enumerate(lengths)]


def _to_device(obj: Any, device: Any) -> Any:
    torch = sys.modules["torch"]
    if isinstance(obj, torch.Tensor):
        # Asynchronous only towards the device: a copy back to pageable host memory must be
        # complete before anything reads it.
        return obj.to(device, non_blocking=str(device) != "cpu")
    if isinstance(obj, Padded):
        return Padded(*(_to_device(v, device) for v in (obj.values, obj.lengths, obj.mask)))
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        moved = [_to_device(v, device) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
