"""Store: conversion speed and memory, and shuffled mini-batch throughput side by side with peer loaders.

(a) Conversion: ``cm.pp.build_store`` on a synthetic sparse ``.h5ad`` (fresh process, peak RSS), with
    every chunk file and folder fsynced before each commit (the default, power-loss safe) and, to
    state what that costs, without (``_format.FSYNC = False``), alternating, twice each.
(b) Loader throughput on a 2,000-gene store, batch 256, shuffled, one process, dense float32 batches:
    - cellmint ``Store.loader`` (block shuffling over the zarr store);
    - scDataset ``BlockShuffling`` over the backed ``.h5ad``: its documented block sampling (blocks of 8,
      fetch_factor 16) and, like for like, cellmint's block sizes (blocks of 256, 16 per fetch);
    - anndata ``AnnLoader`` over the backed ``.h5ad`` (random cells; short run);
    - random rows from a dense float32 zarr with 4,096-row chunks (ginseng's layout; short run).

cellmint and scDataset report the median of three runs (timings on this machine vary by ±20%).
Default sizes are a smoke run; ``--full`` converts 1,000,000 × 20,000 and streams 1,000,000 × 2,000.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _rss import peak_rss_bytes

RESULTS = Path(__file__).parent / "results"
BATCH = 256


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def convert_worker(source: str, target: str, fsync: str = "fsync") -> dict:
    import cellmint as cm
    from cellmint.store import _format

    _format.FSYNC = fsync == "fsync"
    t0 = time.perf_counter()
    store = cm.pp.build_store(source, target, label_keys=["cell_type"], group_key="donor", progress=False)
    wall = time.perf_counter() - t0
    return {
        "cells": store.n_obs,
        "wall_s": wall,
        "cells_per_s": store.n_obs / wall,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _throughput(batches, limit_s: float) -> tuple[int, float]:
    t0, cells = time.perf_counter(), 0
    for batch in batches:
        cells += len(batch)
        if time.perf_counter() - t0 > limit_s:
            break
    return cells, time.perf_counter() - t0


def _median_run(make_batches, limit_s: float, repeats: int) -> tuple[int, float]:
    """The run with the median throughput among ``repeats`` (this machine's timings vary run to run)."""
    runs = sorted((_throughput(make_batches(), limit_s) for _ in range(repeats)), key=lambda r: r[0] / r[1])
    return runs[len(runs) // 2]


def loaders(h5ad: Path, store_path: Path, dense_zarr: Path, limit_s: float, repeats: int = 3) -> list[dict]:
    import anndata as ad
    import scipy.sparse as sp
    import torch
    import zarr

    import cellmint as cm

    rows = []
    store = cm.Store(store_path)
    loader = store.loader(BATCH, split=None, random_state=0)
    rows.append(("cellmint Store.loader (blocks of 256, 16 per fetch)",
                 *_median_run(lambda: (b["X"] for b in loader), limit_s, repeats)))  # fmt: skip

    try:
        from scdataset import BlockShuffling, scDataset

        backed = ad.read_h5ad(h5ad, backed="r")

        def fetch(collection, indices):
            block = collection.X[np.sort(indices)]
            return torch.from_numpy(block.toarray() if sp.issparse(block) else np.asarray(block))

        # scDataset's documented block sampling (small blocks, several fetched together) and, for a
        # like-for-like comparison, the block and fetch sizes cellmint uses
        for block_size, label in ((8, "documented"), (256, "cellmint's block sizes")):
            dataset = scDataset(backed, BlockShuffling(block_size=block_size), batch_size=BATCH, fetch_factor=16,
                                fetch_callback=fetch, seed=0)  # fmt: skip
            name = f"scDataset BlockShuffling({block_size}), {label} (backed h5ad)"
            rows.append((name, *_median_run(lambda dataset=dataset: iter(dataset), limit_s, repeats)))
        backed.file.close()
    except ImportError:
        rows.append(("scDataset (not installed)", 0, float("nan")))

    from anndata.experimental import AnnLoader

    backed = ad.read_h5ad(h5ad, backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # anndata deprecates AnnLoader for annbatch
        annloader = AnnLoader(backed, batch_size=BATCH, shuffle=True)
    rows.append(("anndata AnnLoader (backed h5ad)", *_throughput((b.X for b in annloader), min(limit_s, 20))))
    backed.file.close()

    X = zarr.open_array(dense_zarr, mode="r")
    rng = np.random.default_rng(0)

    def dense_random():
        while True:
            yield X.get_orthogonal_selection((np.sort(rng.choice(X.shape[0], BATCH, replace=False)), slice(None)))

    rows.append(("dense zarr, random rows (ginseng layout)", *_throughput(dense_random(), min(limit_s, 20))))
    return [{"loader": name, "cells": cells, "wall_s": wall, "cells_per_s": cells / wall} for name, cells, wall in rows]


def _warm(path: Path) -> float:
    """Read a file once (so that conversions are timed from the page cache, like the loaders); returns MB/s."""
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        while fh.read(64 * 2**20):
            pass
    return path.stat().st_size / 1e6 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="1M × 20k conversion, 1M × 2k loader comparison")
    parser.add_argument("--workdir", type=Path, help="keep generated files here (reused when present)")
    parser.add_argument("--seconds", type=float, default=30.0, help="time budget of each loader run")
    parser.add_argument("--conversion-only", action="store_true", help="skip the loader comparison (b)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(convert_worker(*args.worker)))
        return

    import shutil

    import zarr

    import cellmint as cm

    tmp = tempfile.TemporaryDirectory()
    work = args.workdir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    convert_size = (1_000_000, 20_000) if args.full else (50_000, 5_000)
    loader_size = (1_000_000, 2_000) if args.full else (50_000, 2_000)

    source = work / f"convert_{convert_size[0]}x{convert_size[1]}.h5ad"
    if not source.exists():
        cm.datasets.synthetic(*convert_size, path=source, progress=False).file.close()
    read_rate = _warm(source)
    runs = {"fsync": [], "no fsync": []}
    for mode in ("fsync", "no fsync", "fsync", "no fsync"):  # alternating: the machine's load drifts
        target = work / f"convert-{time.time_ns()}.zarr"  # a new folder: deleting one just before skews timings
        out = subprocess.run([sys.executable, __file__, "--worker", str(source), str(target), mode.replace(" ", "")],
                             capture_output=True, text=True, check=True)  # fmt: skip
        runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        stored = _size(target)
        shutil.rmtree(target, ignore_errors=True)
    conversion = min(runs["fsync"], key=lambda r: r["wall_s"])
    unsynced = min(runs["no fsync"], key=lambda r: r["wall_s"])
    size_gib = source.stat().st_size / 2**30
    print(f"(a) conversion of {convert_size[0]:,} × {convert_size[1]:,} ({size_gib:.2f} GiB h5ad): "
          f"{conversion['wall_s']:.1f} s, {conversion['cells_per_s']:,.0f} cells/s, "
          f"peak RSS {conversion['peak_rss_bytes'] / 2**30:.2f} GiB; store {stored / 2**30:.2f} GiB; "
          f"the h5ad was read once before at {read_rate:,.0f} MB/s", flush=True)  # fmt: skip
    print(f"    fsync before each commit: {[round(r['wall_s'], 1) for r in runs['fsync']]} s; without: "
          f"{[round(r['wall_s'], 1) for r in runs['no fsync']]} s; best with / best without = "
          f"{conversion['wall_s'] / unsynced['wall_s']:.2f}x", flush=True)  # fmt: skip
    conversion = {**conversion, "runs": runs}
    if args.conversion_only:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "store_conversion.json").write_text(json.dumps({"conversion": conversion}, indent=2))
        return

    h5ad = work / f"loader_{loader_size[0]}x{loader_size[1]}.h5ad"
    if not h5ad.exists():
        cm.datasets.synthetic(*loader_size, path=h5ad, progress=False).file.close()
    store_path = work / "loader.zarr"
    if not store_path.exists():
        cm.pp.build_store(h5ad, store_path, label_keys=["cell_type"], group_key="donor", progress=False)
    dense = work / "dense.zarr"
    if not dense.exists():  # ginseng's layout: dense float32, 4,096-row chunks
        arr = zarr.create_array(dense, shape=loader_size, chunks=(4096, loader_size[1]), dtype="float32")
        for chunk in cm.io.iter_row_chunks(h5ad, chunk_size=4096, fmt="dense"):
            arr[chunk.start : chunk.stop] = chunk.X.astype(np.float32)
    results = loaders(h5ad, store_path, dense, args.seconds)
    print(f"\n(b) shuffled batches of {BATCH} from {loader_size[0]:,} cells × {loader_size[1]:,} genes, one process")
    best_peer = max(r["cells_per_s"] for r in results[1:] if r["cells"])
    for r in results:
        print(f"{r['loader']:<72}{r['cells_per_s']:>12,.0f} cells/s  ({r['cells']:,} cells in {r['wall_s']:.1f} s)")
    print(f"cellmint / best peer: {results[0]['cells_per_s'] / best_peer:.1f}x")
    documented = [
        r["cells_per_s"] for r in results[1:] if "scDataset" not in r["loader"] or "documented" in r["loader"]
    ]

    print(f"cellmint / best peer at its documented settings: {results[0]['cells_per_s'] / max(documented):.1f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "store.json").write_text(json.dumps({"conversion": conversion, "loaders": results}, indent=2))


if __name__ == "__main__":
    main()
