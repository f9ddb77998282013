"""select_hvgs on a dask-backed AnnData computed by a dask.distributed LocalCluster of 1, 2 and 4 workers.

The same ``.h5ad`` (synthetic counts) is opened lazily (``anndata.experimental.read_lazy``) and
``cm.pp.select_hvgs(flavor="seurat_v3")`` runs with a ``LocalCluster`` of 1, 2 and 4 single-threaded
worker processes attached, two ways:

- ``ordered one by one``: one ``.compute()`` per row chunk, the next asked for when the previous has
  been added up (what cellmint did before chunks were submitted ahead);
- ``submitted ahead``: chunks submitted to the cluster two per worker ahead of the client, which adds
  them up in row order as they arrive (:meth:`cellmint._utils._chunks._Dask.read_all`).

Every run is checked against the in-memory answer (same genes, identical ``variances_norm``). Besides
wall time, the CPU time of the client process and of the workers is recorded: on a busy or small
machine wall times say little, while ``(client + workers) / client`` CPU is the most speed-up any
number of workers can give (the client's part is serial).
Default size is a smoke run (20,000 × 1,000); ``--full`` is 200,000 cells × 2,000 genes. Results:
``benchmarks/results/hvg_cluster.json``. Speed-up is relative to the 1-worker run of the same way; on
a machine with fewer cores than workers + client the extra workers only share the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="200,000 cells × 2,000 genes")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--path", type=Path, help="an existing counts .h5ad to use instead")
    args = parser.parse_args()
    os.environ.setdefault("CELLMINT_PROGRESS", "0")
    import anndata as ad
    import numpy as np
    from anndata.experimental import read_lazy
    from distributed import Client, LocalCluster

    import cellmint as cm
    from cellmint._utils import _chunks

    n_obs, n_vars = (200_000, 2_000) if args.full else (20_000, 1_000)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if path is None:
            path = Path(tmp) / "counts.h5ad"
            cm.datasets.synthetic(n_obs, n_vars, random_state=0, path=path, progress=False).file.close()
        adata = ad.read_h5ad(path)
        n_obs, n_vars = adata.shape
        hvg = {"flavor": "seurat_v3", "n_top_genes": 500, "inplace": False}
        start = time.perf_counter()
        expected = cm.pp.select_hvgs(adata, **hvg)
        in_memory = time.perf_counter() - start
        del adata
        rows = []
        lookahead = _chunks._cluster_client
        for n_workers in args.workers:
            with (
                LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as c,
                Client(c) as client,
            ):
                lazy = read_lazy(path)
                for way, client_lookup in (("ordered one by one", lambda: None), ("submitted ahead", lookahead)):
                    _chunks._cluster_client = client_lookup
                    try:
                        workers_cpu = sum(client.run(time.process_time).values())
                        client_cpu, start = time.process_time(), time.perf_counter()
                        got = cm.pp.select_hvgs(lazy, **hvg)
                        seconds = time.perf_counter() - start
                        client_cpu = time.process_time() - client_cpu
                        workers_cpu = sum(client.run(time.process_time).values()) - workers_cpu
                    finally:
                        _chunks._cluster_client = lookahead
                    assert set(got.index[got["highly_variable"]]) == set(expected.index[expected["highly_variable"]])
                    np.testing.assert_array_equal(got["variances_norm"], expected["variances_norm"])
                    rows.append({"workers": n_workers, "way": way, "seconds": seconds, "cells_per_s": n_obs / seconds,
                                 "client_cpu_s": client_cpu, "workers_cpu_s": workers_cpu,
                                 # Amdahl: the client's serial share bounds the speed-up more workers can give
                                 "max_speedup": (client_cpu + workers_cpu) / client_cpu})  # fmt: skip
                    print(f"{n_workers} workers, {way}: {seconds:.1f} s ({n_obs / seconds:,.0f} cells/s), exact; CPU "
                          f"client {client_cpu:.1f} s, workers {workers_cpu:.1f} s")  # fmt: skip
    for row in rows:
        base = next(r for r in rows if r["way"] == row["way"] and r["workers"] == min(args.workers))
        row["speedup"] = base["seconds"] / row["seconds"]
    RESULTS.mkdir(exist_ok=True)
    result = {"cells": n_obs, "genes": n_vars, "cpu_count": os.cpu_count(), "in_memory_seconds": in_memory,
              "runs": rows}  # fmt: skip
    (RESULTS / "hvg_cluster.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
