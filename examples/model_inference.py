"""Model inference in batches: the model loaded once per worker, batch size found on the device.

``amortune.gpu.map_model`` starts one worker per GPU (here: CPU workers, so it runs anywhere),
calls ``load_model`` once in each, finds the largest batch that fits, and returns one output per
item in input order. Needs torch (``pip install 'amortune[torch]'``).

    python examples/model_inference.py
"""

from __future__ import annotations

import sys


def load_model():
    """Runs once in each worker, never in the caller: build (or load) the model there."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


if __name__ == "__main__":
    try:
        import torch
    except ImportError:
        print("torch is not installed; this example needs it: pip install 'amortune[torch]'")
        sys.exit(0)
    from amortune import gpu

    items = [torch.full((16,), float(i) / 100) for i in range(512)]
    outputs = gpu.map_model(load_model, items, devices="cpu", batch_size=64)
    with torch.inference_mode():
        expected = load_model()(torch.stack(items))
    assert all(torch.allclose(o, e, atol=1e-5) for o, e in zip(outputs, expected, strict=True))
    print(f"{len(outputs)} predictions of shape {tuple(outputs[0].shape)}, same as one big "
          "batch in this process")
