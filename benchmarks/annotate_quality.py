"""Quality of ``cm.tl.annotate`` next to CellTypist: another technology, unseen cell types, calibration.

Real data from ../shared/data (or ``--data-dir``, or ``CELLMINT_DATA_DIR``); each method sees the
same split.

- **cellbench** — CellBench CEL-seq2 singlets (``demuxlet_cls == "SNG"``) → Drop-seq singlets,
  ``cell_line``: the query comes from another technology and holds only known types, so every Unknown
  is a false alarm. Macro-F1 is averaged over the cell lines in the query, Unknown (CellTypist:
  Unassigned) counted two ways: as a wrong label, and left out (among called cells); and, like for
  like with CellTypist's best match, cellmint with ``unknown=False`` (a label for every cell).
- **cbmc** — cord-blood CITE-seq RNA, 13 types, 20% of the cells held out at random (per seed).
  Trained without ``Mouse`` and ``CD16+ Mono``: the share of the held-out cells of those two types
  called Unknown, and the accuracy on the held-out cells of known types (Unknown counted wrong) next
  to a model trained with every type (the drop, in points). ECE: on the held-out known-type cells
  (cellmint: its calibrated probabilities; CellTypist: the probability of its best match). CBMC has a
  class named ``Unknown`` (unassigned cells): it is a known class here, and cellmint's untrusted cells
  are called ``Unassigned`` (``unknown_label``), CellTypist's name.

cellmint: ``cm.tl.train_annotator`` and ``cm.tl.annotate`` with their defaults; one seed, or three
with ``--full`` (mean, and the range: the figures quoted in docs/annotator.md). CellTypist 1.7.1
(its own environment, see ``benchmarks/annotator.py``): logistic regression on log1p(10,000-
normalised) values, ``mode="best match"`` (a label for every cell) and ``mode="prob match",
p_thres=0.5`` (Unassigned when no class reaches 0.5), no majority voting. About 5 minutes on 2 busy
CPU cores (``--full``: 15); results in ``benchmarks/results/annotate_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
WITHHELD = ["Mouse", "CD16+ Mono"]
UNASSIGNED = "Unassigned"


def macro_f1(truth, predicted, *, called_only: bool = False) -> float:
    """Macro-F1 over the classes present in ``truth``; an Unassigned label is wrong, or left out."""
    from sklearn.metrics import f1_score

    truth, predicted = np.asarray(truth, dtype=str), np.asarray(predicted, dtype=str)
    if called_only:
        keep = predicted != UNASSIGNED
        truth, predicted = truth[keep], predicted[keep]
    return float(f1_score(truth, predicted, labels=sorted(set(truth)), average="macro", zero_division=0))


def cellmint_run(reference, query, seed: int) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    """Labels (Unassigned where untrusted), whether each was Unknown by distance, the model's holdout
    metrics, and the labels with ``unknown=False`` (a label for every cell, as CellTypist's best match)."""
    import cellmint as cm

    model = cm.tl.train_annotator(reference, "cell_type", split="part", random_state=seed, progress=False)
    table = cm.tl.annotate(query, model, unknown_label=UNASSIGNED, return_table=True, progress=False)
    every = cm.tl.annotate(query, model, unknown=False, return_table=True, progress=False)
    far = table["cellmint_distance"].to_numpy() > model.manifest["open_set"]["threshold"]
    return (table["cellmint_cell_type"].astype(str).to_numpy(), far, model.metrics["cell_type"],
            every["cellmint_cell_type"].astype(str).to_numpy())  # fmt: skip


def celltypist_run(reference, query, work: Path) -> dict[str, np.ndarray]:
    """CellTypist in its own environment: best-match and prob-match (0.5) labels, best-match probability."""
    import pandas as pd
    from annotator import ensure_celltypist, lognormalised

    python = ensure_celltypist()
    if python is None:
        raise RuntimeError("celltypist could not be installed")
    for part, name in ((reference, "train.h5ad"), (query, "test.h5ad")):
        values = lognormalised(part, "counts")
        values.obs = values.obs[["cell_type"]].astype(str)
        values.write_h5ad(work / name)
    env = {**os.environ, "CELLTYPIST_FOLDER": str(work / "celltypist_home")}  # never touch ~/.celltypist
    out = subprocess.run([str(python), __file__, "--celltypist-worker", str(work)], capture_output=True, text=True,
                         env=env)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    frame = pd.read_csv(work / "celltypist.csv", index_col=0)
    return {column: frame[column].to_numpy() for column in frame.columns}


def celltypist_worker(work: Path) -> None:  # runs in the CellTypist environment (no cellmint there)
    import anndata as ad
    import celltypist
    import pandas as pd

    train, test = ad.read_h5ad(work / "train.h5ad"), ad.read_h5ad(work / "test.h5ad")
    model = celltypist.train(train, labels="cell_type", n_jobs=2)
    best = celltypist.annotate(test, model=model, majority_voting=False)
    prob = celltypist.annotate(test, model=model, mode="prob match", p_thres=0.5, majority_voting=False)
    pd.DataFrame({
        "best": best.predicted_labels["predicted_labels"].astype(str),
        # several classes above 0.5 ("A|B") is no single label: counted as Unassigned
        "prob": [x if "|" not in x else UNASSIGNED for x in prob.predicted_labels["predicted_labels"].astype(str)],
        "best_probability": best.probability_matrix.max(axis=1),
    }).to_csv(work / "celltypist.csv")  # fmt: skip


def cellbench(data_dir: Path, seeds: int) -> list[dict]:
    import cellmint as cm

    cells = cm.datasets.cellbench_full(data_dir=data_dir)
    cells = cells[cells.obs["demuxlet_cls"] == "SNG"].copy()
    cells.obs["cell_type"] = cells.obs["cell_line"].astype(str)
    reference = cells[cells.obs["technology"] == "CEL-seq2"].copy()
    reference.obs["part"] = "train"
    query = cells[cells.obs["technology"] == "Drop-seq"].copy()
    truth = query.obs["cell_type"].to_numpy()
    rows = []
    runs = [cellmint_run(reference, query, seed) for seed in range(seeds)]
    figures = [{"macro_f1_unknown_wrong": macro_f1(truth, labels),
                "macro_f1_called": macro_f1(truth, labels, called_only=True),
                "macro_f1_no_rejection": macro_f1(truth, every),
                "unknown": float(np.mean(labels == UNASSIGNED)), "unknown_by_distance": float(far.mean())}
               for labels, far, _, every in runs]  # fmt: skip
    rows.append({"task": "cellbench", "method": "cellmint", **summarise(figures)})
    with tempfile.TemporaryDirectory() as work:
        ct = celltypist_run(reference, query, Path(work))
    rows.append({"task": "cellbench", "method": "CellTypist best match", **summarise([{
        "macro_f1_unknown_wrong": macro_f1(truth, ct["best"]), "macro_f1_called": macro_f1(truth, ct["best"]),
        "macro_f1_no_rejection": macro_f1(truth, ct["best"]), "unknown": 0.0}])})  # fmt: skip
    rows.append({"task": "cellbench", "method": "CellTypist prob match 0.5", **summarise([{
        "macro_f1_unknown_wrong": macro_f1(truth, ct["prob"]),
        "macro_f1_called": macro_f1(truth, ct["prob"], called_only=True),
        "unknown": float(np.mean(ct["prob"] == UNASSIGNED))}])})  # fmt: skip
    return rows


def cbmc(data_dir: Path, seeds: int) -> list[dict]:
    import cellmint as cm
    from cellmint.models._metrics import expected_calibration_error

    cells = cm.datasets.cbmc_citeseq(data_dir=data_dir)
    cells.obs["cell_type"] = cells.obs["cell_type"].astype(str)
    types = cells.obs["cell_type"].to_numpy()
    novel = np.isin(types, WITHHELD)
    ours, theirs = [], []
    for seed in range(seeds):
        held_out = np.random.default_rng(seed).random(cells.n_obs) < 0.2
        cells.obs["part"] = np.where(held_out, "test", "train")
        query = cells[held_out].copy()
        truth, query_novel = query.obs["cell_type"].to_numpy(), novel[held_out]
        known = ~query_novel
        # the reference's own held-out cells (known types only) give the model's holdout metrics
        without, everything = cells[~novel].copy(), cells.copy()

        def accuracy(labels, truth=truth, known=known):
            return float(np.mean(labels[known] == truth[known]))

        labels, far, metrics, _ = cellmint_run(without, query, seed)
        labels_all, _, _, _ = cellmint_run(everything, query, seed)
        ours.append({"novel_unknown": float(np.mean(labels[query_novel] == UNASSIGNED)),
                     "novel_unknown_by_distance": float(far[query_novel].mean()),
                     "known_unknown": float(np.mean(labels[known] == UNASSIGNED)),
                     "known_accuracy_withheld": accuracy(labels), "known_accuracy_all": accuracy(labels_all),
                     "accuracy_drop_points": 100 * (accuracy(labels_all) - accuracy(labels)),
                     "ece_holdout": metrics["ece"]})  # fmt: skip
        with tempfile.TemporaryDirectory() as work:
            ct = celltypist_run(cells[~novel & ~held_out], query, Path(work))
        with tempfile.TemporaryDirectory() as work:
            ct_all = celltypist_run(cells[~held_out], query, Path(work))
        confidence, correct = ct["best_probability"][known], ct["best"][known] == truth[known]
        theirs.append({"novel_unknown": float(np.mean(ct["prob"][query_novel] == UNASSIGNED)),
                       "known_unknown": float(np.mean(ct["prob"][known] == UNASSIGNED)),
                       "known_accuracy_withheld": accuracy(ct["prob"]), "known_accuracy_all": accuracy(ct_all["prob"]),
                       "accuracy_drop_points": 100 * (accuracy(ct_all["prob"]) - accuracy(ct["prob"])),
                       "ece_holdout": expected_calibration_error(confidence, correct),
                       "best_match_known_accuracy": float(correct.mean())})  # fmt: skip
    return [{"task": "cbmc", "method": "cellmint", **summarise(ours)},
            {"task": "cbmc", "method": "CellTypist prob match 0.5", **summarise(theirs)}]  # fmt: skip


def summarise(figures: list[dict]) -> dict:
    """Mean of each figure over seeds, and its range when there are several."""
    out = {}
    for key in figures[0]:
        values = np.array([f[key] for f in figures], dtype=float)
        out[key] = float(values.mean())
        if len(values) > 1:
            out[f"{key}_range"] = [float(values.min()), float(values.max())]
    out["seeds"] = len(figures)
    return out


def print_table(rows: list[dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows).set_index(["task", "method"])
    frame = frame[[c for c in frame.columns if not c.endswith("_range") and c != "seeds"]]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        for task, table in frame.groupby(level="task", sort=False):
            print(f"\n{task}")
            print(table.droplevel("task").dropna(axis=1, how="all").T.round(3).to_string())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CELLMINT_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--full", action="store_true", help="three seeds (the documented figures)")
    parser.add_argument("--seeds", type=int, help="seeds, for CBMC also the held-out split (default 1; --full: 3)")
    parser.add_argument("--tasks", nargs="*", default=["cellbench", "cbmc"])
    parser.add_argument("--celltypist-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.celltypist_worker is not None:
        celltypist_worker(args.celltypist_worker)
        return
    if not args.data_dir.is_dir():
        sys.exit(f"{args.data_dir} not found: pass --data-dir or set CELLMINT_DATA_DIR (see docs/data.md).")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # pandas notices from third-party code
    rows = []
    for task in args.tasks:
        rows += {"cellbench": cellbench, "cbmc": cbmc}[task](args.data_dir, args.seeds or (3 if args.full else 1))
    print_table(rows)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "annotate_quality.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
