"""Benchmark: stream cellmint.datasets.synthetic to an .h5ad file; wall time, cells/s, peak RSS, file size.

The smoke default (20,000 cells) takes seconds. The acceptance case, one million cells × 20,000
genes (peak RSS must stay under 2 GB)::

    python benchmarks/synthetic.py --n-obs 1000000 --n-vars 20000 --out /tmp/synthetic_1m.h5ad

One JSON line of results is appended to benchmarks/results/synthetic.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "synthetic.json"


def _peak_rss_bytes() -> int | None:
    """Process high-water mark of resident memory (``VmHWM``), Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Acceptance run: --n-obs 1000000 --n-vars 20000 --out /tmp/synthetic_1m.h5ad "
        "(about a minute or two on 2 cores, peak RSS well under 2 GB, ~8 GB file).",
    )
    parser.add_argument("--full", action="store_true", help="the acceptance size: 1,000,000 cells × 20,000 genes")
    parser.add_argument("--n-obs", type=int, default=20_000, help="cells (default: %(default)s)")
    parser.add_argument("--n-vars", type=int, default=20_000, help="genes (default: %(default)s)")
    parser.add_argument("--n-perturbations", type=int, default=0, help="perturbations (default: %(default)s)")
    parser.add_argument("--mean-library-size", type=float, default=2000.0, help="(default: %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=10_000, help="cells per write (default: %(default)s)")
    parser.add_argument("--n-jobs", type=int, default=None, help="threads (default: up to 4, one per core)")
    parser.add_argument("--compression", choices=["gzip", "lzf"], default=None, help="HDF5 compression of X")
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/cellmint_synthetic_benchmark.h5ad"),
        help="file to write (default: %(default)s); replaced if it exists",
    )
    parser.add_argument("--keep", action="store_true", help="keep the file (deleted by default)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines file (default: %(default)s)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    if args.full:
        args.n_obs, args.n_vars = 1_000_000, 20_000

    import h5py

    from cellmint.datasets import synthetic

    t0 = time.perf_counter()
    adata = synthetic(
        args.n_obs,
        args.n_vars,
        n_perturbations=args.n_perturbations,
        mean_library_size=args.mean_library_size,
        path=args.out,
        overwrite=True,
        chunk_size=args.chunk_size,
        compression=args.compression,
        n_jobs=args.n_jobs,
        random_state=args.random_state,
        progress=True if args.progress else None,
    )
    wall = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    adata.file.close()
    with h5py.File(args.out, "r") as f:
        nnz = int(f["X/data"].shape[0])
    size = args.out.stat().st_size
    if not args.keep:
        args.out.unlink()

    result = {
        "benchmark": "datasets.synthetic",
        "n_obs": args.n_obs,
        "n_vars": args.n_vars,
        "n_perturbations": args.n_perturbations,
        "mean_library_size": args.mean_library_size,
        "chunk_size": args.chunk_size,
        "n_jobs": args.n_jobs,
        "compression": args.compression,
        "wall_time_s": round(wall, 2),
        "cells_per_s": round(args.n_obs / wall, 1),
        "s_per_100k_cells": round(wall / args.n_obs * 1e5, 2),
        "peak_rss_bytes": peak,
        "peak_rss_gib": None if peak is None else round(peak / 2**30, 3),
        "nnz": nnz,
        "nnz_per_cell": round(nnz / args.n_obs, 1),
        "file_bytes": size,
        "file_gib": round(size / 2**30, 3),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
