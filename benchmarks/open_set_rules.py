"""The open-set threshold, before and after: the floor times the widening, against the larger of the two.

For each task of ``annotate_quality.py`` (and ``pbmc3k_facs``: the 800 FACS-sorted PBMC, B, CD4 T and
CD8 T cells, as reference; pbmc3k as query, its monocytes and NK cells — types the reference lacks —
found by their markers) trains the default model once, annotates the query, keeps what the rule sees
(``benchmarks/results/open_set/<task>_<seed>.npz``: the query's open-set scores and nearest reference
classes, the confidence and margin calls, the model's ``open_set`` entry, the reference spacing and
validation distances) and
prints, per task and seed, the threshold and Unknown shares of both rules on the same model and query
(and, for tasks with new types, the share of new-type cells above the known cells' 98th percentile:
the best any threshold on this score could do at about 2% false Unknown):

- **before**: ``floor · max(1, shift) ** 2.5`` with ``floor = max(spacing_q99, validation_q99)``;
- **after** (the default, :func:`cellmint.models._open_set.query_threshold`):
  ``max(floor, spacing_q99 · max(1, shift) ** 2.5)``, the shift measured on the scores divided by
  their nearest reference class's factor (``shift after``).

Unknown counts every reason (distance, confidence, margin). pbmc3k's groups (log1p of counts per
10,000): monocytes ``LYZ > 3`` and ``CD14 > 0`` or ``FCGR3A > 0`` or ``S100A8 > 1`` (DCs included);
NK ``GNLY > 2``, ``NKG7 > 1``, no ``CD3E``/``CD3D``; T ``CD3E`` or ``CD3D``, ``LYZ < 2``; B ``MS4A1``
or ``CD79A``, ``LYZ < 2``; false Unknown is counted on T and B cells.

    PYTHONPATH=src python benchmarks/open_set_rules.py --tasks pbmc3k_facs cellbench_ds__cs --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
OUT = HERE / "results" / "open_set"
TASKS = ["pbmc3k_facs", "cellbench_cs_ds__10x", "cellbench_10x__cs_ds", "cellbench_ds__cs", "cellbench_cs__ds",
         "cbmc_cd34_eryth", "cbmc_mouse_mono", "cbmc_same", "pbmc_facs", "zeisel_1k"]  # fmt: skip


def pbmc3k_markers(query) -> np.ndarray:
    """``"mono"``, ``"nk"``, ``"T"``, ``"B"`` or ``"other"`` per pbmc3k cell, by log1p(CP10k) of marker genes."""
    import scanpy as sc

    values = query.copy()
    sc.pp.normalize_total(values, target_sum=1e4)
    sc.pp.log1p(values)

    def gene(name):
        column = values[:, name].X
        return np.asarray(column.toarray() if hasattr(column, "toarray") else column).ravel()

    mono = (gene("LYZ") > 3) & ((gene("CD14") > 0) | (gene("FCGR3A") > 0) | (gene("S100A8") > 1))
    nk = ~mono & (gene("GNLY") > 2) & (gene("NKG7") > 1) & (gene("CD3E") == 0) & (gene("CD3D") == 0)
    t = ~mono & ~nk & ((gene("CD3E") > 0) | (gene("CD3D") > 0)) & (gene("LYZ") < 2)
    b = ~mono & ~nk & ~t & ((gene("MS4A1") > 0) | (gene("CD79A") > 0)) & (gene("LYZ") < 2)
    return np.select([mono, nk, t, b], ["mono", "nk", "T", "B"], "other")


def task(name: str, data_dir: Path, seed: int):
    import anndata as ad

    if name != "pbmc3k_facs":
        from annotate_quality import task_data

        reference, query, novel = task_data(name, data_dir, seed)
        return reference, query, novel, np.where(novel, "novel", "known")
    reference = ad.read_h5ad(data_dir / "pbmc_facs_sorted_800.h5ad")
    reference.obs["cell_type"] = reference.obs["FACS_type"].astype(str)
    reference.obs["part"] = "train"  # as annotate_quality: 10% of the cells validate
    query = ad.read_h5ad(data_dir / "pbmc3k_raw.h5ad")
    query.var_names_make_unique()
    group = pbmc3k_markers(query)
    return reference, query, np.isin(group, ["mono", "nk"]), group


def dump(name: str, seed: int, data_dir: Path, path: Path) -> None:
    from annotate_quality import annotated_with_nearest_class

    import cellmint as cm
    from cellmint.models import _open_set as rule

    captured = {}
    original = rule.calibration

    def calibration(spacing, spacing_class, n_classes, *, distance, nearest_class):
        out = original(spacing, spacing_class, n_classes, distance=distance, nearest_class=nearest_class)
        scale = np.asarray(out["scale"])
        captured["spacing"] = rule.relative_distance(spacing, spacing_class, scale)
        captured["validation"] = rule.relative_distance(distance, nearest_class, scale)
        captured["validation_class"] = np.asarray(nearest_class)
        return out

    reference, query, novel, group = task(name, data_dir, seed)
    rule.calibration = calibration
    try:
        model = cm.tl.train_annotator(reference, "cell_type", split="part", random_state=seed, progress=False)
    finally:
        rule.calibration = original
    table, captured["nearest_class"] = annotated_with_nearest_class(query, model, unknown_label="Unassigned")
    low = (table["cellmint_cell_type_confidence"] < 0.5) | (table["cellmint_cell_type_margin"] < 0.1)
    np.savez(path, spacing=captured["spacing"], validation=captured["validation"],
             validation_class=captured["validation_class"], score=table["cellmint_distance"].to_numpy(),
             nearest_class=captured["nearest_class"], low=low.to_numpy(), novel=novel, group=group.astype(str),
             open_set=json.dumps(model.manifest["open_set"]))  # fmt: skip


def compare(path: Path) -> dict:
    from cellmint.models._open_set import query_threshold

    stored = np.load(path)
    open_set = json.loads(str(stored["open_set"]))
    score, low, group = stored["score"], stored["low"], stored["group"]
    pbmc3k = path.name.startswith("pbmc3k")
    known = np.isin(group, ["T", "B"]) if pbmc3k else ~stored["novel"]
    novel = group == "mono" if pbmc3k else stored["novel"]
    shift = max(1.0, np.quantile(score, open_set["shift_quantile"]) / open_set["reference_q25"])
    nearest = stored["nearest_class"] if "nearest_class" in stored else None
    after, how = query_threshold(open_set, score, "auto", nearest)
    thresholds = {"before": open_set["floor"] * shift ** open_set["shift_power"], "after": after}
    # the shift as the rule before measured it, and as the rule measures it (scores over their class's factor)
    row = {"floor": open_set["floor"], "spacing_q99": open_set["spacing_q99"], "shift": shift,
           "shift after": how["shift"]}  # fmt: skip
    for rule, threshold in thresholds.items():
        unknown = (score > threshold) | low
        row |= {f"threshold {rule}": threshold, f"false Unknown {rule}": 100 * unknown[known].mean(),
                f"novel Unknown {rule}": 100 * unknown[novel].mean() if novel.any() else np.nan}  # fmt: skip
        if pbmc3k:
            row[f"NK Unknown {rule}"] = 100 * unknown[group == "nk"].mean()
    # what no threshold on this score can beat: new-type cells above the known cells' 98th percentile
    # (a threshold there calls about 2% of the known cells Unknown); the score, not the threshold, limits below it
    if novel.any():
        row["novel above known q98"] = 100 * (score[novel] > np.quantile(score[known & ~low], 0.98)).mean()
    return row


def main() -> None:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--fresh", action="store_true", help="train again (the stored runs are kept otherwise)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.tasks:
        for seed in args.seeds:
            path = OUT / f"{name}_{seed}.npz"
            if args.fresh or not path.exists():
                start = time.perf_counter()
                dump(name, seed, args.data_dir, path)
                print(f"{name} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
            rows.append({"task": name, "seed": seed, **compare(path)})
    frame = pd.DataFrame(rows).set_index(["task", "seed"])
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(frame.round(2).to_string())
        print("\nmeans over seeds:")
        print(frame.groupby(level="task", sort=False).mean().round(2).to_string())


if __name__ == "__main__":
    main()
