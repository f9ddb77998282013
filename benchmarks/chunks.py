"""Row-chunk reader: peak memory and speed on a backed h5ad, side by side with anndata and a full load.

Each measurement runs in a fresh Python process, so its peak RSS (``VmHWM``) is its own. Three ways
compute the same per-cell and per-gene sums of a CSR h5ad:

- ``cellmint``: ``iter_row_chunks(path, chunk_size=...)`` (bounded memory);
- ``anndata-backed``: ``read_h5ad(path, backed="r")`` then ``adata.X[start:stop]`` in a loop (the peer);
- ``in-memory``: ``read_h5ad(path)`` then the sums (what scanpy needs: the whole matrix in RAM).

Default size is a smoke run (20k cells); ``--full`` is the 200k × 20k figure quoted in the docs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _rss import peak_rss_bytes

RESULTS = Path(__file__).parent / "results"


def worker(method: str, path: str, chunk_size: int) -> dict:
    import anndata as ad
    import numpy as np

    from cellmint._utils._chunks import iter_row_chunks

    baseline = peak_rss_bytes()  # interpreter + imports, before any data
    t0 = time.perf_counter()
    if method == "cellmint":
        row_sums, gene_sums = [], 0
        for chunk in iter_row_chunks(path, chunk_size=chunk_size or None):
            row_sums.append(np.asarray(chunk.X.sum(axis=1, dtype=np.float64)).ravel())
            gene_sums = gene_sums + np.asarray(chunk.X.sum(axis=0, dtype=np.float64)).ravel()
        row_sums = np.concatenate(row_sums)
    elif method == "anndata-backed":
        adata = ad.read_h5ad(path, backed="r")
        row_sums, gene_sums = [], 0
        for start in range(0, adata.n_obs, chunk_size):
            block = adata.X[start : start + chunk_size]
            row_sums.append(np.asarray(block.sum(axis=1, dtype=np.float64)).ravel())
            gene_sums = gene_sums + np.asarray(block.sum(axis=0, dtype=np.float64)).ravel()
        row_sums = np.concatenate(row_sums)
        adata.file.close()
    elif method == "in-memory":
        X = ad.read_h5ad(path).X
        row_sums = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
        gene_sums = np.asarray(X.sum(axis=0, dtype=np.float64)).ravel()
    else:
        raise ValueError(method)
    wall = time.perf_counter() - t0
    return {
        "method": method,
        "chunk_size": chunk_size,
        "wall_s": wall,
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": baseline,
        "checksum": float(row_sums.sum() + np.sum(gene_sums)),
    }


def _run_worker(method: str, path: Path, chunk_size: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, str(path), str(chunk_size)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="200,000 cells × 20,000 genes (default: 20,000 × 2,000)")
    parser.add_argument("--n-obs", type=int)
    parser.add_argument("--n-vars", type=int)
    parser.add_argument("--keep", type=Path, help="reuse/keep the test file at this path")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, path, chunk_size = args.worker
        print(json.dumps(worker(method, path, int(chunk_size))))
        return

    import cellmint as cm

    n_obs = args.n_obs or (200_000 if args.full else 20_000)
    n_vars = args.n_vars or (20_000 if args.full else 2_000)
    tmp = tempfile.TemporaryDirectory()
    path = args.keep or Path(tmp.name) / "bench.h5ad"
    if not path.exists():
        t0 = time.perf_counter()
        cm.datasets.synthetic(n_obs, n_vars, path=path, progress=False).file.close()
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")

    rows = [
        _run_worker("cellmint", path, 1_000),
        _run_worker("cellmint", path, 10_000),
        _run_worker("cellmint", path, 0),  # auto (~256 MiB per chunk)
        _run_worker("anndata-backed", path, 10_000),
        _run_worker("in-memory", path, 0),
    ]
    checksums = {round(r["checksum"]) for r in rows}
    if len(checksums) != 1:
        raise SystemExit(f"methods disagree on the sums: {checksums}")
    full = next(r for r in rows if r["method"] == "in-memory")
    peer = next(r for r in rows if r["method"] == "anndata-backed")
    print(f"{n_obs:,} cells × {n_vars:,} genes, file {path.stat().st_size / 2**20:,.0f} MiB")
    header = ("method", "chunk", "wall s", "peak RSS MiB", "above imports", "RSS/in-mem", "time/peer")
    print("".join(f"{h:<16}" if i == 0 else f"{h:>{max(9, len(h) + 2)}}" for i, h in enumerate(header)))
    for r in rows:
        above = (r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / 2**20
        print(
            f"{r['method']:<16}{r['chunk_size'] or 'auto':>9}{r['wall_s']:>9.2f}{r['peak_rss_bytes'] / 2**20:>14,.0f}"
            f"{above:>15,.0f}{r['peak_rss_bytes'] / full['peak_rss_bytes']:>12.2f}{r['wall_s'] / peer['wall_s']:>11.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    record = {"n_obs": n_obs, "n_vars": n_vars, "file_bytes": path.stat().st_size, "rows": rows}
    (RESULTS / "chunks.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
