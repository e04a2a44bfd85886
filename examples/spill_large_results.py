"""Large results under a fixed memory budget: spilled to disk, read back lazily."""

from __future__ import annotations

import numpy as np

import amortune


def render_tile(i: int) -> np.ndarray:
    """A 1 MiB result per item."""
    rng = np.random.default_rng(i)
    return rng.random((256, 512))


if __name__ == "__main__":
    tiles = amortune.process_in_batches(
        render_tile, range(400), spill="disk", max_memory_bytes=64 * 2**20, verbose=True)
    print(type(tiles).__name__, len(tiles), "tiles; tile 123 mean", float(tiles[123].mean()))
    tiles.close()  # removes the spill folder (it is also removed when collected or at exit)
