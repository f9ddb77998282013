"""Parity of ``cm.tl.evaluate_perturbation`` with cell-eval 0.8.2 on two small shared fixtures, every metric.

Fixtures (seeded, written to ``tests/tl/_data/``):

- ``celleval_fixture.npz`` (``small``): 60 genes named ``G00`` … ``G59``; six perturbations named
  after genes (so cell-eval's "leave the target gene out" rule of the discrimination scores applies),
  two of them with nearly the same effect; 50 cells per perturbation and 80 control cells in the
  real data; a prediction with its own 60 control cells and 50 cells per perturbation, drawn from
  damped, noisy effects;
- ``celleval_fixture_large.npz`` (``large``): the same design with 400 genes, eight perturbations
  changing 150 genes each and 120 cells per perturbation (150 control cells), so that more than
  50, 100 and 200 genes are significant and the overlaps at 50 … 500 differ.

Both hold raw counts (negative binomial). cell-eval (``MetricsEvaluator``, profile ``full``, which
includes ``clustering_agreement``) runs in its own virtual environment ``benchmarks/.envs/celleval``
(created on first use; ``--python`` names another interpreter) twice per fixture:

- ``input="log1p"``: on the log1p values cellmint computes from the counts (cellmint's one
  normalisation, float64), compared with ``evaluate_perturbation`` on the counts
  (``normalization="cellmint"``);
- ``input="counts"``: on the counts themselves, which cell-eval normalises to each object's median
  library size, compared with ``evaluate_perturbation(..., normalization="cell-eval")``.

The script prints the largest absolute difference per metric and writes cell-eval's values to
``tests/tl/_data/celleval_reference.csv`` (columns ``fixture``, ``input``, ``perturbation`` and
cell-eval's metric columns), which ``tests/tl/test_evaluate_perturbation.py`` compares with (without
cell-eval installed).

Run: ``python benchmarks/celleval_parity.py [--python PATH]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).parent
DATA = HERE.parent / "tests" / "tl" / "_data"
CELLEVAL_ENV = HERE / ".envs" / "celleval"
PERT_COL, CONTROL, TOP_K = "target", "non-targeting", 50
#: cellmint column → cell-eval column; every other cell-eval column has cellmint's name
RENAMED = {"de_nsig_real": "de_nsig_counts_real", "de_nsig_pred": "de_nsig_counts_pred"}
#: fixture name → (file, make_fixture arguments)
FIXTURES = {
    "small": ("celleval_fixture.npz", {}),
    "large": ("celleval_fixture_large.npz", {"seed": 11, "n_genes": 400, "n_changed": 150, "n_perturbations": 8,
                                              "n_cells": 120, "n_control": 150, "n_pred_control": 120}),
}  # fmt: skip


def make_fixture(seed: int = 7, *, n_genes: int = 60, n_changed: int = 12, n_perturbations: int = 6, n_cells: int = 50,
                 n_control: int = 80, n_pred_control: int = 60) -> dict[str, np.ndarray]:  # fmt: skip
    """Counts, perturbation labels and gene names of the real and predicted cells (see the module docstring)."""
    rng = np.random.default_rng(seed)
    genes = np.array([f"G{g:02d}" for g in range(n_genes)])
    perturbations = list(genes[np.linspace(2, n_genes - 9, n_perturbations).round().astype(int)])
    if n_genes == 60:  # the small fixture's perturbations, as first written
        perturbations = ["G02", "G09", "G17", "G25", "G38", "G51"]
    mean = rng.gamma(2.0, 1.5, n_genes) + 0.2
    effects = np.zeros((len(perturbations), n_genes))
    for i, p in enumerate(perturbations):
        changed = rng.choice(n_genes, n_changed, replace=False)
        effects[i, changed] = rng.choice([-1.0, 1.0], n_changed) * rng.normal(1.0, 0.3, n_changed)
        effects[i, genes == p] = -2.0  # the knocked-down target
    effects[-1] = effects[-2] + rng.normal(0.0, 0.1, n_genes)  # two perturbations with nearly the same effect
    damped = 0.8 * effects
    for i in range(len(perturbations)):
        noisy = rng.choice(n_genes, 10, replace=False)
        damped[i, noisy] += rng.normal(0.0, 0.4, 10)

    def cells(log_effect: np.ndarray, n: int) -> np.ndarray:
        size = rng.lognormal(0.0, 0.2, (n, 1))
        rate = rng.gamma(5.0, mean * np.exp(log_effect) * size / 5.0)  # negative binomial, dispersion 1/5
        return rng.poisson(rate).astype(np.uint16)

    def dataset(effect_matrix: np.ndarray, controls: int) -> tuple[np.ndarray, np.ndarray]:
        blocks = [cells(np.zeros(n_genes), controls)] + [cells(e, n_cells) for e in effect_matrix]
        labels = [CONTROL] * controls + [p for p in perturbations for _ in range(n_cells)]
        return np.concatenate(blocks), np.array(labels)

    real_counts, real_labels = dataset(effects, n_control)
    pred_counts, pred_labels = dataset(damped, n_pred_control)
    return {"genes": genes, "real_counts": real_counts, "real_labels": real_labels, "pred_counts": pred_counts,
            "pred_labels": pred_labels}  # fmt: skip


def fixture_anndata(fixture: dict[str, np.ndarray]):
    """(real, pred) AnnData of raw counts with ``obs["target"]``."""
    import anndata as ad

    def one(counts, labels, prefix):
        obs = pd.DataFrame({PERT_COL: pd.Categorical(labels)}, index=[f"{prefix}{i}" for i in range(len(labels))])
        return ad.AnnData(counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=fixture["genes"]))

    return one(fixture["real_counts"], fixture["real_labels"], "real"), one(
        fixture["pred_counts"], fixture["pred_labels"], "pred"
    )


def log1p_values(adata):
    """A copy holding cellmint's log1p(10,000-normalised) values (float64), what cell-eval is given."""
    from cellmint.tl._perturbation_baselines import LogExpression

    out = adata.copy()
    out.X = LogExpression(adata, adata.var_names, layer=None, what="fixture").rows(np.arange(adata.n_obs))
    return out


def ensure_celleval() -> Path:
    python = CELLEVAL_ENV / "bin" / "python"
    if not python.exists():
        print("creating the cell-eval environment (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(CELLEVAL_ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "cell-eval==0.8.2"], check=True)
    return python


def run_celleval(python: Path, real, pred, work: Path, *, counts: bool) -> tuple[pd.DataFrame, dict]:
    """cell-eval's per-perturbation table on the log1p values cellmint computes (or on the counts themselves)."""
    if counts:
        real.write_h5ad(work / "real.h5ad")
        pred.write_h5ad(work / "pred.h5ad")
    else:
        log1p_values(real).write_h5ad(work / "real.h5ad")
        log1p_values(pred).write_h5ad(work / "pred.h5ad")
    command = [str(python), str(HERE / "_celleval_run.py"), str(work / "real.h5ad"), str(work / "pred.h5ad"), PERT_COL,
               CONTROL, str(work / "celleval_out"), str(work / "results.csv")]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cell-eval failed:\n{out.stderr[-3000:]}")
    return pd.read_csv(work / "results.csv"), json.loads(out.stdout.strip().splitlines()[-1])


def compare(ours: pd.DataFrame, theirs: pd.DataFrame) -> pd.DataFrame:
    """Largest absolute difference per cell-eval column (both indexed by perturbation, same order)."""
    rows = []
    for column in theirs.columns:
        mine = {v: k for k, v in RENAMED.items()}.get(column, column)
        difference = np.abs(ours[mine].to_numpy(dtype=float) - theirs[column].to_numpy(dtype=float))
        rows.append({"metric": column, "cellmint (mean)": ours[mine].mean(), "cell-eval (mean)": theirs[column].mean(),
                     "max |difference|": np.nanmax(difference) if np.isfinite(difference).any() else np.nan,
                     "both NaN": int((ours[mine].isna() & theirs[column].isna()).sum())})  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", type=Path, help="interpreter with cell-eval 0.8.2 (default: benchmarks/.envs)")
    parser.add_argument("--full", action="store_true", help="accepted for `nox -s bench -- --full`: one size only")
    args = parser.parse_args()
    from cellmint.tl._evaluate_perturbation import evaluate_perturbation

    python = args.python or ensure_celleval()
    DATA.mkdir(parents=True, exist_ok=True)
    references = []
    for fixture_name, (filename, kwargs) in FIXTURES.items():
        fixture = make_fixture(**kwargs)
        np.savez_compressed(DATA / filename, **fixture)
        real, pred = fixture_anndata(fixture)
        for data_input, normalization in (("log1p", "cellmint"), ("counts", "cell-eval")):
            with tempfile.TemporaryDirectory() as work:
                theirs, info = run_celleval(python, real, pred, Path(work), counts=data_input == "counts")
            theirs = theirs.set_index("perturbation").sort_index()
            ours = evaluate_perturbation(pred, real, perturbation_key=PERT_COL, control=CONTROL, baselines=(),
                                         top_k=TOP_K, normalize_to=None, metrics="all", ceiling=False, n_bootstrap=0,
                                         normalization=normalization)  # fmt: skip
            ours = ours.set_index("perturbation").sort_index()
            print(f"\n== fixture {fixture_name} ({len(fixture['genes'])} genes, {len(theirs)} perturbations), "
                  f"cell-eval given {data_input}; cellmint normalization={normalization!r}; "
                  f"cell-eval {info['cell_eval']} (pdex {info['pdex']})")  # fmt: skip
            print(compare(ours, theirs).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
            references.append(theirs.reset_index().assign(fixture=fixture_name, input=data_input))
    table = pd.concat(references, ignore_index=True)
    table = table[["fixture", "input", *[c for c in table.columns if c not in ("fixture", "input")]]]
    table.to_csv(DATA / "celleval_reference.csv", index=False, float_format="%.12g")
    print(f"\nwrote {DATA / 'celleval_reference.csv'} and the fixtures in {DATA}")


if __name__ == "__main__":
    main()
