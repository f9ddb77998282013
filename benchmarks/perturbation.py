"""Perturbation responses of unseen contexts: the stacked default, the network alone and every baseline, on a 0–1 scale.

Tasks:

- ``glioblastoma``: 5 patients, DMSO vs 0.2 µM panobinostat (Zhao et al. 2021). Leave one patient
  out: train on the other four, predict the held-out patient's panobinostat cells from its DMSO
  cells (its DMSO cells are not trained on). Units: 5 patients × seeds.
- ``papalexi``: THP-1 ECCITE-seq CRISPR knock-outs (25 targets, non-targeting controls; cells
  without a confident guide dropped), contexts = the 3 biological replicates; hold out one. Units:
  3 replicates × seeds.
- ``synthetic``: :func:`cellmint.datasets.synthetic`, 12,000 cells × 300 genes, 24 donors as
  contexts whose responses depend on each donor's latent state (``context_response=1``, known
  truth), 6 perturbations moving 15% of the genes each (``perturbation_fraction=0.15``); 4 folds
  hold out 6 donors each. Units: 24 donors.
- ``wide``: training time when every gene is predicted — synthetic 2,000 cells × 7,000 genes, 4 cell
  types as contexts, one held out (the networks' panel: the 2,000 most variable genes).

Every held-out unit is scored by :func:`cellmint.tl.evaluate_perturbation` with, side by side
on the same cells and bootstrap draws: ``default`` (the stacked prediction), ``network`` (the
network alone), ``baselines`` (the stack without the network), ``pls`` (the stack's
partial-least-squares component alone), each baseline (control, perturbation mean, context mean,
linear ridge) and the split-half ``replicate``. :func:`cellmint.tl.perturbation_summary`
gives, per unit and pooled, the raw value and the 0–1 scaled score (0 = the best simple baseline,
1 = the replicate) with bootstrap 95% intervals over cells.

Targets (issue "scored as the field scores them"): the default's pooled scaled score > 0 with its
interval above 0 on ``pearson_delta_top100`` and ``energy_distance`` on the synthetic task, and ≥ 0
(interval covering or above 0) on glioblastoma and Papalexi.

``--full`` runs all tasks at the sizes quoted in the docs (3 seeds); without it, a smoke run (one
seed, few epochs, fewer units). ``--threads`` sets torch's threads (1 by default: on a shared
2-core machine more threads oversubscribe the cores and run several times slower).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).parent
RESULTS = HERE / "results"
#: the two figures of the acceptance target first, then others worth a look
TARGETS = ["pearson_delta_top100", "energy_distance"]
HEADLINE = [*TARGETS, "pearson_delta", "mse_delta", "discrimination_score_l1", "overlap_at_N"]
PREDICTORS = {"default": "stack", "network": "network", "baselines": "baselines"}


def load(task: str, quick: bool):
    """(AnnData, perturbation key, control, context key, list of held-out context groups)."""
    import cellmint as cm

    if task == "glioblastoma":
        adata = cm.datasets.glioblastoma_panobinostat()
        key, control, context = "condition", "ctrl", "patient_id"
    elif task == "papalexi":
        adata = cm.datasets.papalexi_crispr()
        adata = adata[adata.obs["perturbation"] != "unassigned"].copy()
        adata.obs["perturbation"] = adata.obs["perturbation"].astype(str)
        key, control, context = "perturbation", "non-targeting", "bio_rep"
    elif task == "synthetic":
        adata = cm.datasets.synthetic(*((6000, 200) if quick else (12000, 300)), n_donors=24, n_perturbations=6,
                                      perturbation_fraction=0.15, context_response=1.0, random_state=0,
                                      progress=False)  # fmt: skip
        key, control, context = "perturbation", "control", "donor"
        donors = sorted(adata.obs[context].astype(str).unique())
        order = list(np.random.default_rng(0).permutation(donors))
        return adata, key, control, context, [sorted(order[i::4]) for i in range(4)]
    elif task == "wide":
        # every gene predicted, at the size of a PBMC stimulation set (~2,000 cells × 7,000 genes; cell types as
        # contexts): the networks work on the 2,000 most variable genes, the baselines' stack predicts the rest
        adata = cm.datasets.synthetic(2000, 7000, n_cell_types=4, n_perturbations=1, perturbation_fraction=0.05,
                                      random_state=0, progress=False)  # fmt: skip
        key, control, context = "perturbation", "control", "cell_type"
        return adata, key, control, context, [["type_0"]]
    else:
        raise ValueError(f"unknown task {task!r}")
    return adata, key, control, context, [[c] for c in sorted(adata.obs[context].astype(str).unique())]


def split_controls(real, key: str, control: str, context: str, seed: int):
    """``(inputs, scored)``: each held-out context's control cells split at random in two halves.

    Every method predicts from the first half (``inputs``: those controls); ``scored`` holds the
    perturbed cells and the second half, which the real deltas and DE are taken against.
    """
    rng = np.random.default_rng([seed, 17])
    is_control = (real.obs[key].astype(str) == control).to_numpy()
    first = np.zeros(real.n_obs, dtype=bool)
    for c in real.obs[context].astype(str).unique():
        rows = np.flatnonzero(is_control & (real.obs[context].astype(str) == c).to_numpy())
        first[rng.permutation(rows)[: len(rows) // 2]] = True
    return real[first].copy(), real[~first].copy()


def run_fold(adata, key, control, context, held_out, settings, seed, n_bootstrap, split=False):
    """Train on the other contexts; the table of every predictor and baseline on the held-out ones.

    ``split``: every method predicts from one half of the held-out control cells and is scored against
    the other half (:func:`split_controls`), so that no delta shares the scoring controls' noise.
    """
    import cellmint as cm

    cm.tl.perturbation_split(adata, key, control, context_key=context, contexts=held_out, key_added="part")
    train = adata[adata.obs["part"] == "train"].copy()
    held = adata[adata.obs["part"] != "train"].copy()
    start = time.perf_counter()
    model = cm.tl.train_perturbation(train, key, control, context_key=context, device="cpu", progress=False,
                                     random_state=seed, **settings)  # fmt: skip
    seconds = time.perf_counter() - start
    known = sorted((set(held.obs[key].astype(str)) - {control}) & set(model.perturbations))
    real = held[held.obs[key].astype(str).isin([*known, control])].copy()
    inputs, scored = split_controls(real, key, control, context, seed) if split else (real, real)
    preds = {}
    # the network alone predicts its panel only: scored where the panel is every gene (not in the task "wide")
    predictors = {k: v for k, v in PREDICTORS.items() if v != "network" or len(model.genes) == real.n_vars}
    for name, predictor in predictors.items():
        preds[name] = cm.tl.predict_perturbation(inputs, model, known, device="cpu", predictor=predictor,
                                                 random_state=seed)  # fmt: skip
    # the stack's pls component alone (not a simple baseline: it does not set the scaled score's zero)
    preds["pls"] = cm.tl.perturbation_baselines(train, inputs, known, perturbation_key=key, control=control,
                                                context_key=context, baselines=["pls"])["pls"]  # fmt: skip
    start = time.perf_counter()
    table = cm.tl.evaluate_perturbation(preds, scored, perturbation_key=key, control=control, context_key=context,
                                        train=train, n_bootstrap=n_bootstrap, random_state=seed,
                                        controls=inputs if split else None)  # fmt: skip
    info = {"train_seconds": round(seconds, 1), "evaluate_seconds": round(time.perf_counter() - start, 1),
            "genes_predicted": int(preds["default"].n_vars), "panel": len(model.genes),
            "networks": [n["epochs"] for n in model.manifest["networks"]],
            "weights": model.stack["weights"].round(4).tolist() if model.stack else None,
            "out_of_fold": model.stack["out_of_fold"] if model.stack else None}  # fmt: skip
    return table.assign(seed=seed), info


def compact(summary: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One column per metric: ``value [low, high] | scaled [low, high]``."""
    out = summary[[c for c in summary.columns if c in ("method", "context", "seed")]].copy()
    for m in metrics:
        if m not in summary:
            continue

        def cell(row, m=m):
            raw = f"{row[m]:.3f}" + (f" [{row[m + '_low']:.3f}, {row[m + '_high']:.3f}]"
                                     if np.isfinite(row[m + "_low"]) else "")  # fmt: skip
            rel = f"{row[m + '_scaled']:+.2f}" + (f" [{row[m + '_scaled_low']:+.2f}, {row[m + '_scaled_high']:+.2f}]"
                                                  if np.isfinite(row[m + "_scaled_low"]) else "")  # fmt: skip
            return f"{raw} | {rel}"

        out[m] = summary.apply(cell, axis=1)
    return out


def run_task(task, args, settings):

    adata, key, control, context, groups = load(task, not args.full and not args.folds)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.folds or not args.full:
        groups = groups[: args.folds or 2]
    tables, infos = [], []
    for seed in seeds:
        for held_out in groups:
            table, info = run_fold(adata, key, control, context, held_out, settings, seed, args.bootstrap,
                                   split=args.split_controls)  # fmt: skip
            tables.append(table)
            infos.append({"held_out": held_out, "seed": seed, **info})
            # every finished fold is kept (tables with their bootstrap replicates), so a run stopped by a time
            # limit can still be summarised: --summarise <this file>
            partial = Path(args.out).with_name(f"{Path(args.out).stem}.{task}.tables.pkl")
            partial.parent.mkdir(parents=True, exist_ok=True)
            pd.to_pickle({"tables": tables, "folds": infos, "settings": settings}, partial)
            print(f"== {task} · held out {held_out} · seed {seed}: trained {info['train_seconds']} s "
                  f"(epochs {info['networks']}), {info['genes_predicted']} genes predicted (panel "
                  f"{info['panel']}), evaluated {info['evaluate_seconds']} s", flush=True)  # fmt: skip
    return summarise(task, tables, infos, settings, seeds, groups)


def summarise(task, tables, infos, settings, seeds, groups=None):
    """Print and return the pooled and per-unit summaries of a task's fold tables."""
    import cellmint as cm

    groups = groups if groups is not None else [f["held_out"] for f in infos if f["seed"] == seeds[0]]
    metrics = [m for m in HEADLINE if m in tables[0]]
    pooled = cm.tl.perturbation_summary(tables, metrics=metrics)
    per_unit = cm.tl.perturbation_summary(tables, by=["method", "context", "seed"], metrics=metrics)
    print(f"\n## {task}: pooled over {len(tables)} folds ({sum(len(g) for g in groups)} units × {len(seeds)} seeds); "
          "value [95% interval] | scaled (0 = best baseline, 1 = replicate) [95% interval]")  # fmt: skip
    print(compact(pooled, metrics).to_string(index=False))
    default = per_unit[per_unit["method"] == "default"]
    for m in TARGETS:
        if f"{m}_scaled" in default:
            values = default[f"{m}_scaled"]
            above = int((default[f"{m}_scaled_low"] > 0).sum())
            below = int((default[f"{m}_scaled_high"] < 0).sum())
            print(f"   {m}: default's scaled score per unit: median {values.median():+.2f}; "
                  f"{int((values > 0).sum())}/{len(values)} above 0, significantly above in {above}, "
                  f"significantly below in {below}")  # fmt: skip
    if len(per_unit) > 8:
        print(compact(per_unit[per_unit["method"].isin(["default", "network"])], TARGETS).to_string(index=False))
    return {"task": task, "settings": settings, "seeds": seeds, "folds": infos,
            "pooled": pooled.to_dict(orient="records"), "per_unit": per_unit.to_dict(orient="records")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every task, unit and 3 seeds (the figures in the docs)")
    parser.add_argument("--tasks", help="comma-separated (default: synthetic,glioblastoma,papalexi)")
    parser.add_argument("--seeds", type=int, help="seeds per unit (full: 3; smoke: 1)")
    parser.add_argument("--split-controls", action="store_true",
                        help="predict from one half of each held-out context's control cells, score against the "
                        "other half")  # fmt: skip
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run: first-seed, first-seed + 1, ...")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates over cells")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--settings", default="{}", help="JSON keyword dict for train_perturbation")
    parser.add_argument("--folds", type=int, help="only the first N held-out groups of each task")
    parser.add_argument("--out", default=str(RESULTS / "perturbation.json"))
    parser.add_argument("--summarise", help="summarise the fold tables a run kept (a .tables.pkl file), then stop")
    args = parser.parse_args()
    if args.summarise:
        kept = pd.read_pickle(args.summarise)
        seeds = sorted({f["seed"] for f in kept["folds"]})
        task = Path(args.summarise).name.split(".")[-3]
        summarise(task, kept["tables"], kept["folds"], kept["settings"], seeds)
        return
    args.tasks = args.tasks or "synthetic,glioblastoma,papalexi"
    args.seeds = args.seeds or (3 if args.full else 1)
    settings = json.loads(args.settings)
    if not args.full and not args.folds:
        settings = {"max_epochs": 5, **settings}  # smoke: checks the script, not the model
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    torch.set_num_threads(args.threads)
    report = {"torch": torch.__version__, "threads": args.threads, "bootstrap": args.bootstrap, "runs": []}
    for task in args.tasks.split(","):
        report["runs"].append(run_task(task, args, settings))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
