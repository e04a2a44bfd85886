"""The same map on a Dask cluster: ``backend=client``.

Starts a local two-worker cluster (what a real cluster's client looks like too), then maps a
function over it with ``amortune.execute``. The plan, chunking, retries and ordering are
amortune's; the workers are Dask's. Needs ``pip install 'amortune[dask]'``.

    python examples/dask_cluster.py
"""

from __future__ import annotations

import sys


def simulate(seed: int) -> float:
    """About 2 ms of pure-Python work per item."""
    x = float(seed)
    for i in range(20_000):
        x = (x * 1.000001 + i) % 1000.0
    return x


if __name__ == "__main__":
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        print("dask.distributed is not installed; this example needs it: "
              "pip install 'amortune[dask]'")
        sys.exit(0)
    import amortune

    data = range(400)
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None, processes=True) as cluster, Client(cluster) as client:
        results = amortune.execute(simulate, data, backend=client)
    assert results == [simulate(x) for x in data]
    print(f"{len(results)} results from 2 workers on the Dask cluster, same as a plain loop")
