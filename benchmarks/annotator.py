"""Annotator: cellmint next to CellTypist, logistic regression and kNN on PCA, on real tasks; training speed.

Tasks (real data from ../shared/data, or ``--data-dir``, or ``CELLMINT_DATA_DIR``):

- ``cellbench``: CellBench CEL-seq2 singlets → Drop-seq singlets (``cell_line``): another technology;
- ``zeisel_level1`` / ``zeisel_level2``: Zeisel mouse brain, 7 / 48 classes, 20% of cells held out at random;
- ``cbmc``: cord blood CITE-seq RNA, 13 types, 20% held out at random.

Peers, each on the same split:

- CellTypist (its defaults: logistic regression on log1p(10,000-normalised) values, best match) in its
  own virtual environment ``benchmarks/.envs/celltypist`` (created on first use), because celltypist
  1.7.1's default trainer fails with scikit-learn ≥ 1.8 (pinned to 1.7.2 there);
- scikit-learn ``LogisticRegression(max_iter=1000)`` on log1p(10,000-normalised) values;
- kNN (15 neighbours) on 50 principal components of the scaled log-values, fitted on the training cells.

cellmint trains with its defaults (``cm.tl.train_annotator``), three seeds per task (mean reported).
``--ablation`` compares augmentation settings on the same tasks (the evidence for the defaults);
``--speed`` measures training throughput on a synthetic 200,000 × 2,000 store (``--full``; 20,000
cells otherwise). ``--small-reference`` times training on references of about 1,000 cells × 2,000
genes (CellBench CEL-seq2 + Drop-seq singlets on their 2,000 most variable genes, counts; Zeisel,
1,000 random cells on 2,000 of its genes, log-normalised): ``cm.tl.train_annotator`` with its
defaults in a fresh process (first-call costs included) next to ``celltypist.train`` on the same
cells, in the same run, and reports the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
RESULTS = HERE / "results"
CELLTYPIST_ENV = HERE / ".envs" / "celltypist"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"


def load_task(name: str, data_dir: Path):
    """(AnnData with obs["part"] = train/test, label key, "counts" | "lognorm")."""
    import cellmint as cm

    rng = np.random.default_rng(0)
    if name == "cellbench":
        adata = cm.datasets.cellbench()
        adata.obs["part"] = np.where(adata.obs["technology"] == "CEL-seq2", "train", "test")
        return adata, "cell_line", "counts"
    if name.startswith("zeisel"):
        adata = cm.datasets.zeisel_brain(data_dir=data_dir)
        adata.obs["part"] = np.where(rng.random(adata.n_obs) < 0.2, "test", "train")
        return adata, "level1_class" if name == "zeisel_level1" else "level2_class", "lognorm"
    adata = cm.datasets.cbmc_citeseq(data_dir=data_dir)
    adata.obs["part"] = np.where(rng.random(adata.n_obs) < 0.2, "test", "train")
    return adata, "cell_type", "counts"


def lognormalised(adata, kind: str):
    """log1p(10,000-normalised) values, what CellTypist expects (log-values are re-normalised to 10,000)."""
    import scanpy as sc

    out = adata.copy()
    if kind == "lognorm":
        out.X = np.expm1(out.X)
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def scores(truth, predicted) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    truth, predicted = np.asarray(truth).astype(str), np.asarray(predicted).astype(str)
    return {"macro_f1": float(f1_score(truth, predicted, average="macro")),
            "accuracy": float(accuracy_score(truth, predicted))}  # fmt: skip


def ensure_celltypist() -> Path | None:
    python = CELLTYPIST_ENV / "bin" / "python"
    if not python.exists():
        print("creating the CellTypist environment (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(CELLTYPIST_ENV)], check=True)
        install = [str(python), "-m", "pip", "install", "-q", "celltypist==1.7.1", "scikit-learn==1.7.2"]
        if subprocess.run(install).returncode != 0:
            return None
    return python


def run_celltypist(adata, key: str, kind: str, work: Path) -> tuple[np.ndarray | None, dict]:
    python = ensure_celltypist()
    if python is None:
        return None, {"error": "celltypist could not be installed"}
    values = lognormalised(adata, kind)
    train, test = values[values.obs["part"] == "train"].copy(), values[values.obs["part"] == "test"].copy()
    for part, name in ((train, "train.h5ad"), (test, "test.h5ad")):
        part.obs = part.obs[[key]].astype(str)
        part.write_h5ad(work / name)
    env = {**os.environ, "CELLTYPIST_FOLDER": str(work / "celltypist_home")}  # never touch ~/.celltypist
    out = subprocess.run([str(python), str(HERE / "_celltypist_run.py"), str(work / "train.h5ad"),
                          str(work / "test.h5ad"), key, str(work / "pred.csv")], capture_output=True, text=True,
                         env=env)  # fmt: skip
    if out.returncode != 0:
        return None, {"error": out.stderr.strip().splitlines()[-1]}
    import pandas as pd

    predicted = pd.read_csv(work / "pred.csv", index_col=0).iloc[:, 0].to_numpy()
    return predicted, json.loads(out.stdout.strip().splitlines()[-1])


def run_sklearn(adata, key: str, kind: str) -> dict[str, tuple[np.ndarray, float]]:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    values = lognormalised(adata, kind)
    train = (values.obs["part"] == "train").to_numpy()
    X = values.X.toarray() if hasattr(values.X, "toarray") else np.asarray(values.X)
    y = values.obs[key].astype(str).to_numpy()
    out = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notices at max_iter
        logistic = LogisticRegression(max_iter=1000).fit(X[train], y[train])
    out["logistic regression"] = (logistic.predict(X[~train]), time.perf_counter() - t0)
    t0 = time.perf_counter()
    scaler = StandardScaler().fit(X[train])
    pca = PCA(n_components=min(50, X.shape[1] - 1), random_state=0).fit(np.clip(scaler.transform(X[train]), -10, 10))
    embed = lambda rows: pca.transform(np.clip(scaler.transform(X[rows]), -10, 10))  # noqa: E731
    knn = KNeighborsClassifier(n_neighbors=15).fit(embed(train), y[train])
    out["kNN on PCA"] = (knn.predict(embed(~train)), time.perf_counter() - t0)
    return out


def run_cellmint(adata, key: str, **kwargs) -> tuple[np.ndarray, float, dict]:
    import cellmint as cm

    t0 = time.perf_counter()
    model = cm.tl.train_annotator(adata, key, split="part", progress=False, **kwargs)
    test = adata[adata.obs["part"] == "test"]
    X = test[:, model.genes].X
    library = np.asarray(test.X.sum(axis=1)).ravel()
    predicted = model.predict(X, library_size=library)[key].astype(str).to_numpy()
    return predicted, time.perf_counter() - t0, model.metrics[key]


def compare(tasks: list[str], data_dir: Path, seeds: int) -> list[dict]:
    rows = []
    for task in tasks:
        adata, key, kind = load_task(task, data_dir)
        truth = adata.obs[key][adata.obs["part"] == "test"].astype(str).to_numpy()
        runs = [run_cellmint(adata, key, random_state=seed) for seed in range(seeds)]
        per_seed = [scores(truth, predicted) for predicted, _, _ in runs]
        rows.append({"task": task, "method": f"cellmint (mean of {seeds} seeds)",
                     **{k: float(np.mean([s[k] for s in per_seed])) for k in ("macro_f1", "accuracy")},
                     "macro_f1_sd": float(np.std([s["macro_f1"] for s in per_seed])),
                     "seconds": float(np.mean([r[1] for r in runs])),
                     "ece": float(np.mean([r[2]["ece"] for r in runs])),
                     "ece_uncalibrated": float(np.mean([r[2]["ece_uncalibrated"] for r in runs]))})  # fmt: skip
        with tempfile.TemporaryDirectory() as work:
            predicted, info = run_celltypist(adata, key, kind, Path(work))
        if predicted is None:
            rows.append({"task": task, "method": "CellTypist", "error": info["error"]})
        else:
            rows.append({"task": task, "method": "CellTypist", **scores(truth, predicted),
                         "seconds": info["train_s"] + info["annotate_s"]})  # fmt: skip
        for method, (predicted, seconds) in run_sklearn(adata, key, kind).items():
            rows.append({"task": task, "method": method, **scores(truth, predicted), "seconds": seconds})
        for row in rows[-4:]:
            figures = (f"macro-F1 {row['macro_f1']:.3f}  accuracy {row['accuracy']:.3f}  {row['seconds']:6.1f} s"
                       if "macro_f1" in row else f"failed: {row['error']}")  # fmt: skip
            print(f"{task:<15}{row['method']:<32}{figures}", flush=True)
    return rows


ABLATION = {
    "none": False,
    "default": True,
    "no thinning": {"thinning": None},
    "no gene dropout": {"gene_dropout": None},
    "stronger (thinning 0.3-1, dropout 0-0.3, masking 0.05)": {
        "thinning": (0.3, 1.0),
        "gene_dropout": (0.0, 0.3),
        "masking": 0.05,
    },
    "with Poisson noise (0.5)": {"poisson": 0.5},
}


def ablation(tasks: list[str], data_dir: Path, seeds: int) -> list[dict]:
    rows = []
    for task in tasks:
        adata, key, _ = load_task(task, data_dir)
        truth = adata.obs[key][adata.obs["part"] == "test"].astype(str).to_numpy()
        for name, setting in ABLATION.items():
            f1 = [scores(truth, run_cellmint(adata, key, augment=setting, random_state=s)[0])["macro_f1"]
                  for s in range(seeds)]  # fmt: skip
            rows.append({"task": task, "augment": name, "macro_f1": float(np.mean(f1)), "sd": float(np.std(f1))})
            print(f"{task:<15}{name:<58}macro-F1 {np.mean(f1):.3f} ± {np.std(f1):.3f}", flush=True)
    return rows


def speed(n_obs: int) -> dict:
    import cellmint as cm

    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "synthetic.h5ad"
        cm.datasets.synthetic(n_obs, 2000, n_cell_types=10, path=source, progress=False).file.close()
        store = cm.pp.build_store(source, Path(work) / "s.zarr", label_keys=["cell_type"], group_key="donor",
                                  progress=False)  # fmt: skip
        model = cm.tl.train_annotator(store, "cell_type", max_epochs=2, early_stopping=None, progress=False)
    resources = model.manifest["resources"]
    epoch_cells = model.manifest["data"]["n_train"]
    out = {"n_obs": n_obs, "train_cells_per_epoch": epoch_cells, **resources}
    print(
        f"training on {n_obs:,} × 2,000 synthetic cells (store, CPU): {resources['cells_per_s']:,.0f} cells/s over "
        f"{resources['epochs']} epochs incl. validation, peak RSS {resources['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    return out


_CELLMINT_TRAIN = """
import sys, time, json, warnings
warnings.filterwarnings("ignore")
import anndata as ad
import cellmint as cm
adata = ad.read_h5ad(sys.argv[1])
adata.obs["part"] = "train"
start = time.perf_counter()
model = cm.tl.train_annotator(adata, sys.argv[2], split="part", progress=False)
print(json.dumps({"train_s": time.perf_counter() - start, "epochs": model.manifest["resources"]["epochs"]}))
"""


def small_references(data_dir: Path, repeats: int = 3) -> list[dict]:
    """Training time of a ~1,000-cell × 2,000-gene reference: cellmint (fresh process) next to celltypist.train."""
    import anndata as ad
    import scanpy as sc

    cells = ad.read_h5ad(data_dir / "cellbench_5cl_celseq2_dropseq.h5ad")
    cells = cells[cells.obs["demuxlet_cls"] == "SNG"].copy()
    sc.pp.highly_variable_genes(cells, n_top_genes=2000, flavor="seurat_v3")
    references = {"cellbench_1k (counts)": (cells[:, cells.var["highly_variable"]].copy(), "cell_line", "counts")}
    zeisel = ad.read_h5ad(data_dir / "zeisel_brain_hier.h5ad")
    rng = np.random.default_rng(0)
    zeisel = zeisel[np.sort(rng.choice(zeisel.n_obs, 1000, replace=False)), :2000].copy()
    references["zeisel_1k (log1p)"] = (zeisel, "level2_class", "lognorm")
    python = ensure_celltypist()
    rows = []
    for name, (adata, key, kind) in references.items():
        adata.obs = adata.obs[[key]].astype(str)
        with tempfile.TemporaryDirectory() as work:
            path = Path(work) / "reference.h5ad"
            adata.write_h5ad(path)
            ours = [json.loads(subprocess.run([sys.executable, "-c", _CELLMINT_TRAIN, str(path), key], check=True,
                                              capture_output=True, text=True).stdout.splitlines()[-1])
                    for _ in range(repeats)]  # fmt: skip
            theirs = []
            if python is not None:
                values = lognormalised(adata, kind)
                values.obs["part"] = "train"
                values.write_h5ad(Path(work) / "train.h5ad")
                values[:50].write_h5ad(Path(work) / "test.h5ad")
                env = {**os.environ, "CELLTYPIST_FOLDER": str(Path(work) / "celltypist_home")}
                for _ in range(repeats):
                    out = subprocess.run([str(python), str(HERE / "_celltypist_run.py"), str(Path(work) / "train.h5ad"),
                                          str(Path(work) / "test.h5ad"), key, str(Path(work) / "pred.csv")],
                                         capture_output=True, text=True, env=env, check=True)  # fmt: skip
                    theirs.append(json.loads(out.stdout.strip().splitlines()[-1])["train_s"])
        row = {"reference": name, "cells": adata.n_obs, "genes": adata.n_vars,
               "cellmint_train_s": float(np.median([o["train_s"] for o in ours])),
               "cellmint_epochs": ours[0]["epochs"],
               "celltypist_train_s": float(np.median(theirs)) if theirs else float("nan")}  # fmt: skip
        row["ratio"] = row["cellmint_train_s"] / row["celltypist_train_s"]
        rows.append(row)
        print(f"{name:<24}{adata.n_obs:>6,} × {adata.n_vars:,}  cellmint {row['cellmint_train_s']:6.1f} s "
              f"({row['cellmint_epochs']} epochs)  celltypist.train {row['celltypist_train_s']:6.1f} s  "
              f"ratio {row['ratio']:.2f}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="speed on 200,000 cells (else 20,000)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CELLMINT_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--tasks", nargs="*", default=["cellbench", "zeisel_level1", "zeisel_level2", "cbmc"])
    parser.add_argument("--ablation", action="store_true", help="compare augmentation settings")
    parser.add_argument("--seeds", type=int, default=3, help="cellmint seeds per task or ablation setting")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--small-reference", action="store_true", help="training time of 1,000-cell references")
    args = parser.parse_args()
    if args.small_reference:
        RESULTS.mkdir(exist_ok=True)
        rows = small_references(args.data_dir)
        (RESULTS / "annotator_small_reference.json").write_text(json.dumps(rows, indent=2))
        return
    tasks = [t for t in args.tasks if t == "cellbench" or args.data_dir.is_dir()]
    if len(tasks) < len(args.tasks):
        print(f"{args.data_dir} not found: running the bundled task only")
    out = {}
    if args.ablation:
        out["ablation"] = ablation(tasks, args.data_dir, args.seeds)
    else:
        out["comparison"] = compare(tasks, args.data_dir, args.seeds)
        if not args.skip_speed:
            out["speed"] = speed(200_000 if args.full else 20_000)
    RESULTS.mkdir(exist_ok=True)
    name = "annotator_ablation.json" if args.ablation else "annotator.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
