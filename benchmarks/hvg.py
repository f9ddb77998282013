"""Highly variable genes: cellmint's ``pp.select_hvgs`` side by side with ``scanpy.pp.highly_variable_genes``.

(a) In memory: the same synthetic counts loaded in RAM, each tool timed on the same matrix in a
    fresh process (so each peak RSS is its own); ratios cellmint / scanpy.
(b) Backed: cellmint on a backed ``.h5ad`` far larger than its memory budget (``seurat_v3`` and
    ``pearson_residuals``, 3 batches). scanpy refuses backed data, so its side is the memory the
    matrix needs once loaded (and, at the smaller size, its measured peak relative to the matrix).

Memory is the peak resident memory a call adds on top of the loaded data (``+MiB``), measured in
the call's own window. Every run checks that both tools select the same genes. Default sizes are a smoke run; ``--full``
is (a) 200,000 × 20,000 and (b) 1,000,000 × 20,000, the figures quoted in the docs. ``--flavors`` runs
only some flavours (e.g. ``--flavors pearson_residuals``). scanpy's ``pearson_residuals`` is
``sc.experimental.pp.highly_variable_genes``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _rss import peak_rss_bytes, rss_bytes

RESULTS = Path(__file__).parent / "results"
CASES = [  # flavour, batch key; "seurat" runs on log-normalised data, the others on counts
    ("seurat_v3", None),
    ("seurat_v3", "batch"),
    ("seurat", "batch"),
    ("pearson_residuals", None),
    ("pearson_residuals", "batch"),
]
BACKED = ["seurat_v3", "pearson_residuals"]  # with 3 batches


def _scanpy_hvg(adata, **kwargs):
    import scanpy as sc

    if kwargs["flavor"] == "pearson_residuals":
        return sc.experimental.pp.highly_variable_genes(adata, **kwargs)
    return sc.pp.highly_variable_genes(adata, **kwargs)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _warm_up(tool: str, flavor: str, batch_key: str | None) -> None:
    import scanpy as sc

    import cellmint as cm

    tiny = cm.datasets.synthetic(300, 200, n_batches=3, n_donors=3, progress=False)
    if flavor == "seurat":
        sc.pp.log1p(tiny)
    run = _scanpy_hvg if tool == "scanpy" else cm.pp.select_hvgs
    run(tiny, flavor=flavor, n_top_genes=50, batch_key=batch_key, inplace=False)


def worker(tool: str, path: str, flavor: str, batch_key: str, mode: str, n_top: int) -> dict:
    import hashlib

    import anndata as ad
    import numba
    import scanpy as sc

    import cellmint as cm

    batch_key = None if batch_key == "-" else batch_key
    _warm_up(tool, flavor, batch_key)  # numba compilation is a one-off cost: keep it out of the timing
    if mode == "backed":
        adata = ad.read_h5ad(path, backed="r")
    else:
        adata = ad.read_h5ad(path)
        if flavor == "seurat":  # dispersion flavours expect log-normalised data (prepared, not timed)
            sc.pp.normalize_total(adata, target_sum=1e4)
            sc.pp.log1p(adata)
    loaded = peak_rss_bytes()
    _reset_peak()
    start_rss = rss_bytes()
    t0 = time.perf_counter()
    if tool == "scanpy":
        table = _scanpy_hvg(adata, flavor=flavor, n_top_genes=n_top, batch_key=batch_key, inplace=False)
    else:
        table = cm.pp.select_hvgs(adata, flavor=flavor, n_top_genes=n_top, batch_key=batch_key, inplace=False)
    wall = time.perf_counter() - t0
    hvg = sorted(table.index[table["highly_variable"].to_numpy()])
    X = adata.X if mode != "backed" else None
    matrix_bytes = (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) if X is not None else None
    return {
        "tool": tool,
        "mode": mode,
        "flavor": flavor,
        "batch_key": batch_key,
        "wall_s": wall,
        "peak_rss_bytes": peak_rss_bytes(),  # the call's own window (reset after loading)
        "extra_rss_bytes": peak_rss_bytes() - start_rss,  # what the call itself added on top of the data
        "rss_after_load_bytes": loaded,
        "matrix_bytes": matrix_bytes,
        "hvg_digest": hashlib.sha256("\n".join(hvg).encode()).hexdigest(),
        "n_hvg": len(hvg),
        "numba_threads": numba.get_num_threads(),
    }


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _make(path: Path, n_obs: int, n_vars: int) -> None:
    import cellmint as cm

    if not path.exists():
        t0 = time.perf_counter()
        cm.datasets.synthetic(n_obs, n_vars, n_batches=3, n_donors=6, path=path, progress=False).file.close()
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)


def _matrix_bytes_on_disk(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return sum(f["X"][k].size * f["X"][k].dtype.itemsize for k in ("data", "indices", "indptr"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="(a) 200k × 20k in memory, (b) 1M × 20k backed")
    parser.add_argument("--workdir", type=Path, help="keep the generated files here (reused when present)")
    parser.add_argument("--n-top-genes", type=int, default=2000)
    flavors = sorted({flavor for flavor, _ in CASES})
    parser.add_argument("--flavors", nargs="+", choices=flavors, default=flavors, help="flavours to run (default: all)")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tool, path, flavor, batch_key, mode, n_top = args.worker
        print(json.dumps(worker(tool, path, flavor, batch_key, mode, int(n_top))))
        return

    tmp = tempfile.TemporaryDirectory()
    workdir = args.workdir or Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = (
        {"memory": (200_000, 20_000), "backed": (1_000_000, 20_000)}
        if args.full
        else {"memory": (20_000, 5_000), "backed": (50_000, 5_000)}
    )
    n_top = str(args.n_top_genes)
    record = {"sizes": sizes, "memory": [], "backed": {}}
    cases = [(flavor, batch_key) for flavor, batch_key in CASES if flavor in args.flavors]

    path = workdir / f"hvg_{sizes['memory'][0]}x{sizes['memory'][1]}.h5ad"
    _make(path, *sizes["memory"])
    print(f"\n(a) in memory, {sizes['memory'][0]:,} cells × {sizes['memory'][1]:,} genes")
    print(
        f"{'flavor':<19}{'batch':>7}{'scanpy s':>10}{'cellmint s':>12}{'ratio':>7}"
        f"{'scanpy +MiB':>13}{'cellmint +MiB':>15}{'same genes':>12}"
    )
    for flavor, batch_key in cases:
        row = [_run(tool, str(path), flavor, batch_key or "-", "memory", n_top) for tool in ("scanpy", "cellmint")]
        scanpy, ours = row
        same = scanpy["hvg_digest"] == ours["hvg_digest"]
        print(
            f"{flavor:<19}{batch_key or '-':>7}{scanpy['wall_s']:>10.2f}{ours['wall_s']:>12.2f}"
            f"{ours['wall_s'] / scanpy['wall_s']:>7.2f}{scanpy['extra_rss_bytes'] / 2**20:>13,.0f}"
            f"{ours['extra_rss_bytes'] / 2**20:>15,.0f}{same!s:>12}",
            flush=True,
        )
        if not same:
            raise SystemExit("cellmint and scanpy selected different genes")
        record["memory"].append({"scanpy": scanpy, "cellmint": ours})

    path = workdir / f"hvg_{sizes['backed'][0]}x{sizes['backed'][1]}.h5ad"
    _make(path, *sizes["backed"])
    needed = _matrix_bytes_on_disk(path)
    print(f"\n(b) backed, {sizes['backed'][0]:,} cells × {sizes['backed'][1]:,} genes, 3 batches")
    print(f"scanpy: refuses backed data; loading the matrix alone needs {needed / 2**30:.2f} GiB")
    record["backed"] = {"scanpy_matrix_bytes": needed}
    for flavor in (f for f in BACKED if f in args.flavors):
        ours = _run("cellmint", str(path), flavor, "batch", "backed", n_top)
        print(
            f"cellmint {flavor}: {ours['wall_s']:.1f} s, peak RSS {ours['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"(after opening the file: {ours['rss_after_load_bytes'] / 2**30:.2f} GiB; "
            f"peak / matrix = {ours['peak_rss_bytes'] / needed:.2f})",
            flush=True,
        )
        record["backed"][flavor] = {"cellmint": ours}
    RESULTS.mkdir(exist_ok=True)
    name = "hvg.json" if set(args.flavors) == set(flavors) else f"hvg_{'_'.join(sorted(args.flavors))}.json"
    (RESULTS / name).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
