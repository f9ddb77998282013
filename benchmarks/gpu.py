"""Speed on a GPU machine, every stage of the annotator's path in one run: build, loaders, training, annotation.

Sized to finish in about 5 minutes on one H200 (16 cores): a synthetic store of ``--n-obs`` cells ×
2,000 genes (10 cell types; ``cm.datasets.synthetic``), then

- ``build``: ``cm.pp.build_store`` from the ``.h5ad`` (cells/s);
- ``loader``: ``Store.loader`` over the training split, sequential (``shuffle=False``) and shuffled,
  batches moved to the device, after a warm-up pass of each (first-call costs), alternating
  sequential / shuffled / sequential / shuffled and keeping the faster of each (cells/s; the
  ratio shuffled / sequential, target ≥ 0.5);
- ``train``: ``cm.tl.train_annotator(device=...)``, 2 epochs (validation and calibration
  included): its defaults (on a GPU the counts staged in device memory, the batch size and learning
  rate of the device rule), the same streamed from the store (``stage=False``), and ``--large-batch``;
  macro-F1 on 20,000 new cells;
- ``train_cpu``: the same on the CPU with 2 threads and with every core (``torch.set_num_threads``),
  one epoch, for the scaling with cores;
- ``annotate``: ``cm.tl.annotate`` on an in-memory CSR query of ``--n-query`` new cells of the same
  expression model, on the device and on the CPU (cells/s), after a warm-up call.

Results go to ``--out`` (JSON; default ``$OUT/gpu.json`` where ``OUT`` is set, else
``benchmarks/results/gpu.json``).

**On the lent GPU machine** (H200; its image has torch, numba, scipy, pandas, h5py, scikit-learn,
statsmodels, seaborn but not scanpy, anndata, zarr and the rest). Once, on the development
machine, in the repository root (about 12 MB; ``/.whl/`` is in ``.gitignore``)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
        anndata==0.12.19 scanpy==1.11.5 zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 pynndescent==0.7.0 \
        scikit-misc==0.5.3 session-info2==0.4.1 legacy-api-wrap==1.5 natsort==8.4.0 array-api-compat==1.16.0 \
        donfig==0.8.1.post1 umap-learn==0.5.12 scverse-misc==0.0.3

then one device run with ``carry: [".whl"]`` and ``timeout_s`` 600::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 CELLMINT_PROGRESS=0 || exit; \
    nvidia-smi -L; python3 benchmarks/gpu.py --device cuda --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log

(the defaults: 400,000 reference cells, 200,000 query cells, large batch 65,536). If the image's
pandas is 3 or newer, add ``pandas==2.3.3`` to the wheels (anndata needs < 3). On a machine without
CUDA the same script runs with ``--device cpu`` at smoke sizes::

    python benchmarks/gpu.py --device cpu --n-obs 20000 --n-query 10000 --loader-seconds 5 --large-batch 4096
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return out, time.perf_counter() - start


def _loader_rate(store, device, *, shuffle: bool, batch_size: int, seconds: float) -> float:
    import torch

    loader = store.loader(batch_size, "train", shuffle=shuffle, random_state=0, device=device)
    cells, start = 0, time.perf_counter()
    for batch in loader:
        cells += len(batch["X"])
        if time.perf_counter() - start > seconds:
            break
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return cells / (time.perf_counter() - start)


def _macro_f1(model, query, key="cell_type") -> float:
    from sklearn.metrics import f1_score

    import cellmint as cm

    table = cm.tl.annotate(query, model, unknown=False, alpha=None, return_table=True, progress=False)
    return float(f1_score(query.obs[key].astype(str), table[f"cellmint_{key}"].astype(str), average="macro"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-obs", type=int, default=400_000)
    parser.add_argument("--n-query", type=int, default=200_000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--large-batch", type=int, default=65_536)
    parser.add_argument("--loader-seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")) / "gpu.json")
    args = parser.parse_args()

    import torch

    import cellmint as cm
    from cellmint._utils._resources import ResourceMonitor

    rows: dict = {"device": args.device, "torch": torch.__version__, "cores": os.cpu_count(), "n_obs": args.n_obs}
    if torch.cuda.is_available():
        rows["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        # one expression model: the query is new cells of the reference's own kind
        everything = cm.datasets.synthetic(args.n_obs + args.n_query, 2000, n_cell_types=10, path=work / "cells.h5ad",
                                           random_state=0, progress=False)  # fmt: skip
        reference = everything[: args.n_obs].to_memory()
        query = everything[args.n_obs :].to_memory()
        everything.file.close()
        with ResourceMonitor(n_cells=reference.n_obs, device="cpu") as monitor:
            store = cm.pp.build_store(reference, work / "store.zarr", label_keys=["cell_type"], group_key="donor",
                                      progress=False)  # fmt: skip
        rows["build"] = monitor.report.to_dict()
        print(f"build: {monitor.report}", flush=True)

        for shuffle in (False, True):  # warm-up: compiled kernels, first reads
            _loader_rate(store, args.device, shuffle=shuffle, batch_size=4096, seconds=min(2.0, args.loader_seconds))
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(2):  # alternating: the machine's load drifts
            for shuffle in (False, True):
                rates[shuffle].append(_loader_rate(store, args.device, shuffle=shuffle, batch_size=4096,
                                                   seconds=args.loader_seconds))  # fmt: skip
        sequential, shuffled = max(rates[False]), max(rates[True])
        rows["loader"] = {"sequential_cells_per_s": sequential, "shuffled_cells_per_s": shuffled,
                          "ratio": shuffled / sequential, "batch_size": 4096}  # fmt: skip
        print(f"loader: sequential {sequential:,.0f} cells/s, shuffled {shuffled:,.0f} ({shuffled / sequential:.2f}x)")

        rows["train"] = []
        # the defaults (on a GPU: counts staged when they fit, batch and lr by the device rule), the same
        # streamed from the store, and a large batch
        for extra in ({}, {"stage": False}, {"batch_size": args.large_batch}):
            model, seconds = _timed(cm.tl.train_annotator, store, "cell_type", device=args.device, max_epochs=2,
                                    early_stopping=None, progress=False, **extra)  # fmt: skip
            resources, params = model.manifest["resources"], model.manifest["params"]
            f1 = _macro_f1(model, query[:20_000])
            end_to_end = 2 * model.manifest["data"]["n_train"] / seconds
            rows["train"].append({"batch_size": params["batch_size"], "lr": params["lr"], "staged": params["staged"],
                                  "seconds": seconds, "resources": resources, "macro_f1": f1,
                                  "cells_per_s_end_to_end": end_to_end})  # fmt: skip
            print(
                f"train (batch {params['batch_size']}, lr {params['lr']:.2g}, "
                f"{'staged' if params['staged'] else 'streamed'}): {resources['cells_per_s']:,.0f} cells/s "
                f"in the loop, {end_to_end:,.0f} end to end; macro-F1 {f1:.3f}"
            )

        rows["train_cpu"] = []
        for threads in sorted({2, os.cpu_count() or 2}):
            torch.set_num_threads(threads)
            model, seconds = _timed(cm.tl.train_annotator, store, "cell_type", device="cpu", max_epochs=1,
                                    early_stopping=None, progress=False)  # fmt: skip
            rate = model.manifest["resources"]["cells_per_s"]
            rows["train_cpu"].append({"threads": threads, "cells_per_s": rate, "seconds": seconds})
            print(f"train on the CPU, {threads} threads: {rate:,.0f} cells/s")
        torch.set_num_threads(os.cpu_count() or 2)

        rows["annotate"] = []
        for device in dict.fromkeys([args.device, "cpu"]):
            cm.tl.annotate(query[:2000], model, device=device, return_table=True, progress=False)  # warm up
            _, seconds = _timed(cm.tl.annotate, query, model, device=device, return_table=True, progress=False)
            rows["annotate"].append({"device": device, "cells": query.n_obs, "cells_per_s": query.n_obs / seconds})
            print(f"annotate on {device}: {query.n_obs / seconds:,.0f} cells/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
