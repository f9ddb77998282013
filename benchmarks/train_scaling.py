"""Data-parallel training: cells/s of ``cm.tl.train_annotator`` with 1, 2 and 4 processes (torchrun, gloo, CPU).

A synthetic store (default 30,000 cells × 2,000 genes; ``--full`` 200,000) is trained for two epochs
with the default network (512, 256), a global batch of 256 cells and early stopping off, launched
with ``torchrun --standalone --nproc_per_node N`` (one thread per process, torchrun's default), and
once as a single process with all cores' threads for reference. Throughput is the cells of the
global batches trained per second of the epoch loop (``manifest["training"]["cells_per_s"]``);
efficiency is throughput / (N × the 1-process throughput). The test macro-F1 of each run is
reported too (the same global batches, so it should not move).

On a machine with fewer free cores than processes the processes only share the same cores; the
figure to read is then the overhead of the collectives, not a speed-up. Results:
``benchmarks/results/train_scaling.json``. ``--worker`` is the entry point torchrun runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def worker(store: str, out: str) -> None:
    import cellmint as cm

    model = cm.tl.train_annotator(cm.Store(store), "cell_type", max_epochs=2, early_stopping=None, progress=False)
    if os.environ.get("RANK", "0") == "0":
        training = model.manifest["training"]
        Path(out).write_text(json.dumps({**training, "macro_f1": model.metrics["cell_type"]["macro_f1"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="200,000 cells")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--worker", nargs=2, metavar=("STORE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    os.environ.setdefault("CELLMINT_PROGRESS", "0")
    import cellmint as cm

    n_obs = 200_000 if args.full else 30_000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adata = cm.datasets.synthetic(n_obs, 2000, random_state=0, progress=False)
        cm.pp.build_store(adata, Path(tmp) / "s.zarr", label_keys=["cell_type"], group_key="donor", progress=False)
        del adata
        launches = [("1 process, all threads", 1, [sys.executable])]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launches += [(f"{n} processes (torchrun, gloo)", n, [*torchrun, f"--nproc_per_node={n}"])
                     for n in args.processes]  # fmt: skip
        for label, n, command in launches:
            out = Path(tmp) / f"{n}-{len(rows)}.json"
            env = {**os.environ, "OMP_NUM_THREADS": "1"} if label.startswith(f"{n} processes") else dict(os.environ)
            start = time.perf_counter()
            subprocess.run([*command, __file__, "--worker", str(Path(tmp) / "s.zarr"), str(out)], check=True, env=env)
            result = json.loads(out.read_text())
            rows.append({"run": label, "processes": n, "cells_per_s": result["cells_per_s"],
                         "train_seconds": result["seconds"], "wall_seconds": time.perf_counter() - start,
                         "macro_f1": result["macro_f1"]})  # fmt: skip
            print(f"{label}: {result['cells_per_s']:,.0f} cells/s, macro-F1 {result['macro_f1']:.3f}")
    one = next(r for r in rows if r["processes"] == 1 and "torchrun" in r["run"])
    for row in rows:
        row["efficiency"] = row["cells_per_s"] / (row["processes"] * one["cells_per_s"])
    RESULTS.mkdir(exist_ok=True)
    result = {"cells": n_obs, "genes": 2000, "cpu_count": os.cpu_count(), "runs": rows}
    (RESULTS / "train_scaling.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
