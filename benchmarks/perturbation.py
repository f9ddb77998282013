"""Perturbation responses of unseen contexts: cellmint's set model next to simple baselines, one run.

Tasks (real data bundled with cellmint):

- ``glioblastoma``: 5 patients, DMSO vs 0.2 µM panobinostat (Zhao et al. 2021). Leave one patient
  out: train on the other four, predict the held-out patient's panobinostat cells from its DMSO
  cells (its DMSO cells are not trained on).
- ``papalexi``: THP-1 ECCITE-seq CRISPR knock-outs (25 targets, non-targeting controls; cells
  without a confident guide dropped), contexts = the 3 biological replicates. Hold out one
  replicate: predict its knock-out cells from its non-targeting cells.

Every held-out unit is scored by :func:`cellmint.tl.evaluate_perturbation` with the model and the
baselines (control, perturbation mean, context mean, linear ridge) computed on the same split.
Target (issue #7): the model beats the best baseline on Pearson delta of the top-100 DE genes and
on energy distance in at least 4 of 5 held-out patients.

``--full`` runs both tasks with default settings (the figures in the docs; without it, a smoke run
of 10 epochs on glioblastoma). ``--device cuda`` measures training on a GPU; ``--grid`` compares
model settings (JSON list of keyword dicts for ``train_perturbation``).
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
#: the two figures of the acceptance target, and a few more worth a look
HEADLINE = ["pearson_delta_top100", "energy_distance", "pearson_delta", "mse", "discrimination_score_l1",
            "overlap_at_N"]  # fmt: skip


def folds(task: str):
    """(name, AnnData with obs["part"] ∈ train/test/test_control, perturbation key, control, context key)."""
    import cellmint as cm

    if task == "glioblastoma":
        adata = cm.datasets.glioblastoma_panobinostat()
        key, control, context = "condition", "ctrl", "patient_id"
    elif task == "papalexi":
        adata = cm.datasets.papalexi_crispr()
        adata = adata[adata.obs["perturbation"] != "unassigned"].copy()
        adata.obs["perturbation"] = adata.obs["perturbation"].astype(str)
        key, control, context = "perturbation", "non-targeting", "bio_rep"
    else:
        raise ValueError(f"unknown task {task!r}")
    for held in sorted(adata.obs[context].astype(str).unique()):
        cm.tl.perturbation_split(adata, key, control, context_key=context, contexts=[held], key_added="part")
        yield held, adata, key, control, context


def run_fold(adata, key: str, control: str, context: str, settings: dict, device: str):
    import cellmint as cm

    train = adata[adata.obs["part"] == "train"].copy()
    held = adata[adata.obs["part"] != "train"].copy()
    perturbations = sorted(set(held.obs[key].astype(str)) - {control})
    start = time.perf_counter()
    model = cm.tl.train_perturbation(train, key, control, context_key=context, device=device, progress=False,
                                     **settings)  # fmt: skip
    seconds = time.perf_counter() - start
    known = [p for p in perturbations if p in model.perturbations]
    pred = cm.tl.predict_perturbation(held, model, known, device=device)
    real = held[held.obs[key].astype(str).isin([*known, control])].copy()
    table = cm.tl.evaluate_perturbation(pred, real, perturbation_key=key, control=control, context_key=context,
                                        train=train)  # fmt: skip
    return table, seconds, model.manifest["resources"].get("epochs")


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each headline metric per method (over the perturbations of the held-out unit)."""
    return table.groupby("method", sort=False)[HEADLINE].mean()


def wins(per_unit: dict[str, pd.DataFrame]) -> dict:
    """Per target metric: held-out units where the model beats the best baseline, and by how much.

    The margin is model − best baseline, signed so that positive is better for the model; margins
    of a few thousandths are ties in practice.
    """
    out = {}
    for metric, higher in (("pearson_delta_top100", True), ("energy_distance", False)):
        margins = {}
        for unit, summary in per_unit.items():
            model = summary.loc["model", metric]
            baselines = summary.drop(index="model")[metric].dropna()
            best = baselines.max() if higher else baselines.min()
            margins[unit] = round(float(model - best if higher else best - model), 4)
        n = sum(m > 0 for m in margins.values())
        out[metric] = {"wins": f"{n}/{len(per_unit)}", "margins": margins}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="both tasks, default settings (the figures in the docs); else a smoke run")  # fmt: skip
    parser.add_argument("--tasks", help="comma-separated (full: glioblastoma,papalexi; smoke: glioblastoma)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grid", default="[{}]", help="JSON list of train_perturbation keyword dicts")
    parser.add_argument("--out", default=str(RESULTS / "perturbation.json"))
    args = parser.parse_args()
    if args.tasks is None:
        args.tasks = "glioblastoma,papalexi" if args.full else "glioblastoma"
    if not args.full and args.grid == "[{}]":
        args.grid = '[{"max_epochs": 10}]'  # smoke: checks the script, not the model
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = {"device": args.device, "torch": torch.__version__, "runs": []}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    for settings in json.loads(args.grid):
        for task in args.tasks.split(","):
            per_unit, seconds = {}, []
            for held, adata, key, control, context in folds(task):
                table, secs, epochs = run_fold(adata, key, control, context, settings, args.device)
                per_unit[held] = summarise(table)
                seconds.append(secs)
                print(f"\n== {task} · held out {held} · {settings} · trained in {secs:.1f} s ({epochs} epochs)")
                print(per_unit[held].round(4).to_string())
            mean = pd.concat(per_unit.values()).groupby(level=0, sort=False).mean()
            result = {"task": task, "settings": settings, "train_seconds": seconds, "wins": wins(per_unit),
                      "per_unit": {k: v.round(6).to_dict() for k, v in per_unit.items()},
                      "mean": mean.round(6).to_dict()}  # fmt: skip
            print(f"\n## {task} {settings}: model beats the best baseline: {result['wins']}; "
                  f"training {np.mean(seconds):.1f} s per fold")  # fmt: skip
            report["runs"].append(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
