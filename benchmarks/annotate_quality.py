"""Quality of ``cm.tl.annotate`` on other labs' data, next to CellTypist and logistic regression.

Real data from ../shared/data (or ``--data-dir``, or ``CELLMINT_DATA_DIR``); every method sees the
same reference and query cells.

Tasks (reference → query):

- ``cellbench_cs_ds__10x``, ``cellbench_10x__cs_ds``, ``cellbench_ds__cs``, ``cellbench_cs__ds`` —
  CellBench cell lines measured with CEL-seq2 and Drop-seq (singlets) and with 10x, on the genes
  the two files share when they are crossed. Another technology: every Unknown call on a line the
  reference has is a false alarm. The 10x and Drop-seq experiments hold 3 of the 5 lines, so the
  queries ``10x__cs_ds`` and ``ds__cs`` hold 2 lines their reference lacks (A549, H838): a
  cross-study query with new types.
- ``cbmc_cd34_eryth``, ``cbmc_mouse_mono`` — cord-blood CITE-seq RNA; ``CD34+`` and ``Eryth`` (or
  ``Mouse`` and ``CD16+ Mono``) left out of the reference; the reference is 80% of the other cells,
  the query the rest (a random 20%, per seed).
- ``cbmc_same`` — the same split with every type known (same technology).
- ``pbmc_facs`` — FACS-sorted PBMC (B, CD4 T, CD8 T), half the cells as reference.
- ``zeisel_1k`` — mouse brain, log-normalised values (log1p of counts) only, 48 classes
  (``level2_class``); a reference of 1,000 random cells, the rest as query.

Figures per task and method (means over seeds; ``--full``: 3 seeds): macro-F1 over the known
classes of the query with Unknown counted wrong (``f1``), macro-F1 with a label for every cell
(``f1_all``: cellmint ``unknown=False``, CellTypist best match, logistic regression),
false-Unknown share of known-type cells (``false_unknown``), share of new-type cells called Unknown
(``novel_unknown``), and for cellmint's prediction sets (``alpha=0.1``) the coverage on known-type
cells and the mean set size. Methods:

- **cellmint**: ``cm.tl.train_annotator`` and ``cm.tl.annotate`` with their defaults;
- **CellTypist** 1.7.1 (its own environment, see ``benchmarks/annotator.py``): ``best match`` and
  ``prob match`` with ``p_thres=0.5``, no majority voting;
- **logistic regression**: scikit-learn ``LogisticRegression(C=0.1)`` on log1p(10,000-normalised)
  values z-scored on the reference and clipped at ±10 (CellTypist's preprocessing).

Results in ``benchmarks/results/annotate_quality.json`` (resumable: finished task/seed/method rows
are kept; ``--fresh`` starts over). About 30 minutes with ``--full`` on a 2-core laptop.
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

import numpy as np

HERE = Path(__file__).parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
UNASSIGNED = "Unassigned"
RESULTS = HERE / "results" / "annotate_quality.json"
TASKS = ["cellbench_cs_ds__10x", "cellbench_10x__cs_ds", "cellbench_ds__cs", "cellbench_cs__ds", "cbmc_cd34_eryth",
         "cbmc_mouse_mono", "cbmc_same", "pbmc_facs", "zeisel_1k"]  # fmt: skip


def task_data(name: str, data_dir: Path, seed: int):
    """``(reference, query, novel)``: AnnData with ``obs["cell_type"]``, and which query cells are of new types."""
    import anndata as ad

    def cellbench_5cl():
        cells = ad.read_h5ad(data_dir / "cellbench_5cl_celseq2_dropseq.h5ad")
        cells = cells[cells.obs["demuxlet_cls"] == "SNG"].copy()
        cells.obs["cell_type"] = cells.obs["cell_line"].astype(str)
        return cells

    def cellbench_10x():
        cells = ad.read_h5ad(data_dir / "cellbench_3cl_10x.h5ad")
        cells.obs["cell_type"] = cells.obs["cell_line"].astype(str)
        del cells.layers["logcounts"]
        return cells

    def shared(x, y):
        genes = x.var_names.intersection(y.var_names)
        return x[:, genes].copy(), y[:, genes].copy()

    rng = np.random.default_rng(seed)
    if name == "cellbench_cs_ds__10x":
        reference, query = shared(cellbench_5cl(), cellbench_10x())
    elif name == "cellbench_10x__cs_ds":
        reference, query = shared(cellbench_10x(), cellbench_5cl())
    elif name in ("cellbench_ds__cs", "cellbench_cs__ds"):
        cells = cellbench_5cl()
        first, second = ("Drop-seq", "CEL-seq2") if name == "cellbench_ds__cs" else ("CEL-seq2", "Drop-seq")
        reference, query = (cells[cells.obs["technology"] == t].copy() for t in (first, second))
    elif name.startswith("cbmc"):
        cells = ad.read_h5ad(data_dir / "cbmc_citeseq_8617.h5ad")
        cells.obs["cell_type"] = cells.obs["cell_type"].astype(str)
        held = {"cbmc_cd34_eryth": ["CD34+", "Eryth"], "cbmc_mouse_mono": ["Mouse", "CD16+ Mono"], "cbmc_same": []}
        left_out = cells.obs["cell_type"].isin(held[name]).to_numpy()
        in_query = rng.random(cells.n_obs) < 0.2
        reference, query = cells[~left_out & ~in_query].copy(), cells[in_query].copy()
    elif name == "pbmc_facs":
        cells = ad.read_h5ad(data_dir / "pbmc_facs_sorted_800.h5ad")
        cells.obs["cell_type"] = cells.obs["FACS_type"].astype(str)
        in_query = rng.random(cells.n_obs) < 0.5
        reference, query = cells[~in_query].copy(), cells[in_query].copy()
    elif name == "zeisel_1k":
        cells = ad.read_h5ad(data_dir / "zeisel_brain_hier.h5ad")
        cells.obs["cell_type"] = cells.obs["level2_class"].astype(str)
        in_reference = np.zeros(cells.n_obs, dtype=bool)
        in_reference[rng.choice(cells.n_obs, 1000, replace=False)] = True
        reference, query = cells[in_reference].copy(), cells[~in_reference].copy()
    else:
        raise KeyError(name)
    reference.obs["part"] = "train"
    novel = ~query.obs["cell_type"].isin(set(reference.obs["cell_type"])).to_numpy()
    return reference, query, novel


def macro_f1(truth, predicted) -> float:
    """Macro-F1 over the classes present in ``truth``; any other label (Unassigned) is wrong."""
    from sklearn.metrics import f1_score

    truth, predicted = np.asarray(truth, dtype=str), np.asarray(predicted, dtype=str)
    return float(f1_score(truth, predicted, labels=sorted(set(truth)), average="macro", zero_division=0))


def lognormalised(adata):
    """log1p(10,000-normalised) values as dense float64 (from counts, or from log1p of counts)."""
    import scanpy as sc

    from cellmint.models._scale import detect_scale, recover_counts

    out = adata.copy()
    scale = detect_scale(out.X, where="X")
    if scale.kind == "log":
        out.X = recover_counts(out.X, scale)
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def annotated_with_nearest_class(query, model, **kwargs):
    """``cm.tl.annotate(..., return_table=True)`` and each cell's nearest reference cell's class (what the rule saw)."""
    import cellmint as cm
    from cellmint.models import _open_set as rule

    seen, threshold = {}, rule.query_threshold

    def query_threshold(open_set, scores, max_distance, nearest_class=None):
        seen["nearest_class"] = nearest_class
        return threshold(open_set, scores, max_distance, nearest_class)

    rule.query_threshold = query_threshold
    try:
        table = cm.tl.annotate(query, model, return_table=True, progress=False, **kwargs)
    finally:
        rule.query_threshold = threshold
    return table, seen["nearest_class"]


def cellmint_run(reference, query, seed: int) -> dict:
    import cellmint as cm

    start = time.perf_counter()
    model = cm.tl.train_annotator(reference, "cell_type", split="part", random_state=seed, progress=False)
    seconds = time.perf_counter() - start
    table, nearest = annotated_with_nearest_class(query, model, unknown_label=UNASSIGNED)
    every = cm.tl.annotate(query, model, unknown=False, unknown_label=UNASSIGNED, alpha=None, return_table=True,
                           progress=False)  # fmt: skip
    sets = table["cellmint_cell_type_set"].astype(str).to_numpy()
    # the open-set rule's ablation: the same model and query, the far call made four ways
    open_set = model.manifest["open_set"]
    own, score = table["cellmint_cell_distance"].to_numpy(), table["cellmint_distance"].to_numpy()
    low = ((table["cellmint_cell_type_confidence"] < 0.5) | (table["cellmint_cell_type_margin"] < 0.1)).to_numpy()

    def adaptive(values):  # the default rule (models/_open_set.py)
        from cellmint.models._open_set import query_threshold

        return query_threshold(open_set, values, "auto", nearest)[0]

    def product(values):  # the rule before: the floor (validation cells' tail included) times the widening
        shift = max(1.0, np.quantile(values, open_set["shift_quantile"]) / open_set["reference_q25"])
        return open_set["floor"] * shift ** open_set["shift_power"]

    variants = {
        "cell distance, 1.25 x validation q99 (before)": own > 1.25 * open_set["validation_q99"],
        "cell distance, adaptive threshold": own > adaptive(own),
        "neighbourhood score, reference floor only": score > open_set["floor"],
        "neighbourhood score, floor x shift^2.5 (before)": score > product(score),
        "neighbourhood score, adaptive threshold (default)": score > adaptive(score),
    }
    ablation = {name: far | low for name, far in variants.items()}
    return {"labels": table["cellmint_cell_type"].astype(str).to_numpy(), "ablation": ablation,
            "every": every["cellmint_cell_type"].astype(str).to_numpy(),
            "reason": table["cellmint_cell_type_unknown_reason"].astype(str).to_numpy(),
            "sets": sets, "train_seconds": seconds, "epochs": model.manifest["resources"]["epochs"]}  # fmt: skip


def logistic_run(reference, query) -> dict:
    from sklearn.linear_model import LogisticRegression

    ref, qry = lognormalised(reference), lognormalised(query)
    X = np.asarray(ref.X.toarray() if hasattr(ref.X, "toarray") else ref.X, dtype=np.float64)
    Y = np.asarray(qry.X.toarray() if hasattr(qry.X, "toarray") else qry.X, dtype=np.float64)
    mean, std = X.mean(0), X.std(0)
    std[std == 0] = 1
    start = time.perf_counter()
    model = LogisticRegression(C=0.1, max_iter=1000).fit(np.clip((X - mean) / std, -10, 10),
                                                         reference.obs["cell_type"].to_numpy())  # fmt: skip
    seconds = time.perf_counter() - start
    return {"every": model.predict(np.clip((Y - mean) / std, -10, 10)), "train_seconds": seconds}


def celltypist_run(reference, query, work: Path) -> dict:
    """CellTypist in its own environment: best-match and prob-match (0.5) labels."""
    import pandas as pd
    from annotator import ensure_celltypist

    python = ensure_celltypist()
    if python is None:
        raise RuntimeError("celltypist could not be installed")
    for part, name in ((reference, "train.h5ad"), (query, "test.h5ad")):
        values = lognormalised(part)
        values.obs = values.obs[["cell_type"]].astype(str)
        values.write_h5ad(work / name)
    env = {**os.environ, "CELLTYPIST_FOLDER": str(work / "celltypist_home")}  # never touch ~/.celltypist
    out = subprocess.run([str(python), __file__, "--celltypist-worker", str(work)], capture_output=True, text=True,
                         env=env)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    frame = pd.read_csv(work / "celltypist.csv", index_col=0)
    return {"every": frame["best"].to_numpy().astype(str), "labels": frame["prob"].to_numpy().astype(str),
            "train_seconds": float(frame["train_seconds"].iloc[0])}  # fmt: skip


def celltypist_worker(work: Path) -> None:  # runs in the CellTypist environment (no cellmint there)
    import anndata as ad
    import celltypist
    import pandas as pd

    train, test = ad.read_h5ad(work / "train.h5ad"), ad.read_h5ad(work / "test.h5ad")
    start = time.perf_counter()
    model = celltypist.train(train, labels="cell_type", n_jobs=2)
    seconds = time.perf_counter() - start
    best = celltypist.annotate(test, model=model, majority_voting=False)
    prob = celltypist.annotate(test, model=model, mode="prob match", p_thres=0.5, majority_voting=False)
    pd.DataFrame({
        "best": best.predicted_labels["predicted_labels"].astype(str),
        # several classes above 0.5 ("A|B") is no single label: counted as Unassigned
        "prob": [x if "|" not in x else UNASSIGNED for x in prob.predicted_labels["predicted_labels"].astype(str)],
        "train_seconds": seconds,
    }).to_csv(work / "celltypist.csv")  # fmt: skip


def figures(run: dict, truth: np.ndarray, novel: np.ndarray) -> dict:
    known = ~novel
    out = {}
    if "labels" in run:
        called = run["labels"]
        out["f1"] = macro_f1(truth[known], called[known])
        out["false_unknown"] = float(np.mean(called[known] == UNASSIGNED))
        out["novel_unknown"] = float(np.mean(called[novel] == UNASSIGNED)) if novel.any() else float("nan")
    if "every" in run:
        out["f1_all"] = macro_f1(truth[known], run["every"][known])
    if "sets" in run:
        members = [s.split("|") if s else [] for s in run["sets"]]
        out["set_coverage"] = float(np.mean([t in m for t, m, k in zip(truth, members, known, strict=True) if k]))
        out["set_size"] = float(np.mean([len(m) for m in members]))
        out["novel_empty_set"] = float(np.mean([len(m) == 0 for m, n in zip(members, novel, strict=True) if n])) \
            if novel.any() else float("nan")  # fmt: skip
    if "ablation" in run:
        for name, unknown in run["ablation"].items():
            out[f"ablation: {name}: false_unknown"] = float(unknown[known].mean())
            out[f"ablation: {name}: novel_unknown"] = float(unknown[novel].mean()) if novel.any() else float("nan")
    if "reason" in run:
        for reason in ("distance", "confidence", "margin"):
            out[f"false_unknown_{reason}"] = float(np.mean(run["reason"][known] == reason))
    out["train_seconds"] = run["train_seconds"]
    return out


def print_table(rows: list[dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    ablation = [c for c in frame.columns if c.startswith("ablation: ")]
    if ablation:
        table = frame[frame["method"] == "cellmint"].groupby("task", sort=False)[ablation].mean().T
        table.index = pd.MultiIndex.from_tuples([tuple(c.split(": ")[1:]) for c in table.index])
        with pd.option_context("display.width", 250, "display.max_columns", 20):
            print("open-set rule ablation (Unknown shares, confidence and margin calls included):")
            print((100 * table).round(1).to_string())
    columns = ["f1", "f1_all", "false_unknown", "novel_unknown", "set_coverage", "set_size", "train_seconds"]
    summary = frame.groupby(["task", "method"], sort=False)[columns].mean()
    summary["seeds"] = frame.groupby(["task", "method"], sort=False)["seed"].nunique()
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 200):
        print(summary.round(3).to_string())


def markdown_tables(rows: list[dict]) -> str:
    """The documented tables (docs/unknown.md, docs/benchmarks.md): means ± standard deviation over seeds."""
    import pandas as pd

    frame = pd.DataFrame(rows)

    def cell(values: pd.Series, digits: int = 3, percent: bool = False) -> str:
        values = values.dropna()
        if values.empty:
            return "–"
        scale = 100 if percent else 1
        text = f"{scale * values.mean():.{1 if percent else digits}f}"
        if len(values) > 1:
            text += f" ± {scale * values.std():.{1 if percent else digits}f}"
        return text + (" %" if percent else "")

    lines = [
        "| task | method | seeds | macro-F1 (Unknown wrong) | macro-F1 (every cell labelled) | false Unknown "
        "| new types called Unknown | set coverage | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, method), group in frame.groupby(["task", "method"], sort=False):
        lines.append(
            f"| {task} | {method} | {group['seed'].nunique()} | {cell(group.get('f1', pd.Series(dtype=float)))} "
            f"| {cell(group['f1_all'])} | {cell(group.get('false_unknown', pd.Series(dtype=float)), percent=True)} "
            f"| {cell(group.get('novel_unknown', pd.Series(dtype=float)), percent=True)} "
            f"| {cell(group.get('set_coverage', pd.Series(dtype=float)), 2)} | {group['train_seconds'].mean():.0f} |"
        )
    ablation = [c for c in frame.columns if c.startswith("ablation: ")]
    if ablation:
        mint = frame[frame["method"] == "cellmint"]
        tasks = list(dict.fromkeys(mint["task"]))
        rules = list(dict.fromkeys(c.split(": ")[1] for c in ablation))
        lines += ["", "| open-set rule | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for rule in rules:
            cells = []
            for task in tasks:
                group = mint[mint["task"] == task]
                false = group[f"ablation: {rule}: false_unknown"].mean()
                novel = group[f"ablation: {rule}: novel_unknown"].mean()
                cells.append(f"{100 * false:.1f} / {100 * novel:.1f}" if novel == novel else f"{100 * false:.1f} / –")
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CELLMINT_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--full", action="store_true", help="three seeds (the documented figures)")
    parser.add_argument("--seeds", type=int, help="seeds (default 1; --full: 3)")
    parser.add_argument("--tasks", nargs="*", default=TASKS)
    parser.add_argument("--methods", nargs="*", default=["cellmint", "celltypist", "logistic"])
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results")
    parser.add_argument("--markdown", action="store_true", help="print the documented tables from stored results")
    parser.add_argument("--celltypist-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.celltypist_worker is not None:
        celltypist_worker(args.celltypist_worker)
        return
    if args.markdown:
        print(markdown_tables(json.loads(RESULTS.read_text())))
        return
    if not args.data_dir.is_dir():
        sys.exit(f"{args.data_dir} not found: pass --data-dir or set CELLMINT_DATA_DIR (see docs/data.md).")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # pandas notices from third-party code
    RESULTS.parent.mkdir(exist_ok=True)
    rows = [] if args.fresh or not RESULTS.exists() else json.loads(RESULTS.read_text())
    done = {(r["task"], r["method"], r["seed"]) for r in rows}
    for task in args.tasks:
        for seed in range(args.seeds or (3 if args.full else 1)):
            reference, query, novel = task_data(task, args.data_dir, seed)
            truth = query.obs["cell_type"].astype(str).to_numpy()
            runs = {}
            if "cellmint" in args.methods and (task, "cellmint", seed) not in done:
                runs["cellmint"] = cellmint_run(reference, query, seed)
            if "logistic" in args.methods and (task, "logistic regression", seed) not in done:
                runs["logistic regression"] = logistic_run(reference, query)
            # CellTypist is deterministic: one run per split (CellBench splits do not depend on the seed)
            if "celltypist" in args.methods and (task, "CellTypist", seed) not in done and \
                    (seed == 0 or not task.startswith("cellbench")):  # fmt: skip
                with tempfile.TemporaryDirectory() as work:
                    runs["CellTypist"] = celltypist_run(reference, query, Path(work))
            for method, run in runs.items():
                rows.append(
                    {
                        "task": task,
                        "method": method,
                        "seed": seed,
                        "n_reference": reference.n_obs,
                        "n_query": query.n_obs,
                        "n_novel": int(novel.sum()),
                        **figures(run, truth, novel),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            RESULTS.write_text(json.dumps(rows, indent=1))
    print_table([r for r in rows if r["task"] in args.tasks])


if __name__ == "__main__":
    main()
