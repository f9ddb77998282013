"""Parity of ``cm.tl.evaluate_perturbation`` with cell-eval 0.8.2 on a small shared fixture.

The fixture (seeded, written to ``tests/tl/_data/celleval_fixture.npz``): 60 genes named ``G00`` …
``G59``; six perturbations named after genes (so cell-eval's "leave the target gene out" rule of the
discrimination score applies), two of them with nearly the same effect; 50 cells per perturbation
and 80 control cells in the real data; a prediction with its own 60 control cells and 50 cells per
perturbation, drawn from damped, noisy effects. Both hold raw counts (negative binomial).

cell-eval (``MetricsEvaluator``, profile ``full``) runs in its own virtual environment
``benchmarks/.envs/celleval`` (created on first use; ``--python`` names another interpreter), on
the log1p values cellmint computes from those counts (cellmint's one normalisation, float64);
cellmint evaluates the counts themselves. The script prints both side by side with the largest
absolute difference per metric and writes cell-eval's values to
``tests/tl/_data/celleval_reference.csv``, which ``tests/tl/test_evaluate_perturbation.py``
compares with (without cell-eval installed).

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
#: cellmint column → cell-eval column, where the two definitions coincide
SHARED = {
    "pearson_delta": "pearson_delta",
    "mse": "mse",
    "mae": "mae",
    "mse_delta": "mse_delta",
    "mae_delta": "mae_delta",
    "discrimination_score_l1": "discrimination_score_l1",
    "overlap_at_N": "overlap_at_N",
    f"overlap_at_{TOP_K}": f"overlap_at_{TOP_K}",
    "precision_at_N": "precision_at_N",
    f"precision_at_{TOP_K}": f"precision_at_{TOP_K}",
    "de_nsig_real": "de_nsig_counts_real",
    "de_nsig_pred": "de_nsig_counts_pred",
}


def make_fixture(seed: int = 7) -> dict[str, np.ndarray]:
    """Counts, perturbation labels and gene names of the real and predicted cells (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n_genes = 60
    genes = np.array([f"G{g:02d}" for g in range(n_genes)])
    perturbations = ["G02", "G09", "G17", "G25", "G38", "G51"]
    mean = rng.gamma(2.0, 1.5, n_genes) + 0.2
    effects = np.zeros((len(perturbations), n_genes))
    for i, p in enumerate(perturbations):
        changed = rng.choice(n_genes, 12, replace=False)
        effects[i, changed] = rng.choice([-1.0, 1.0], 12) * rng.normal(1.0, 0.3, 12)
        effects[i, genes == p] = -2.0  # the knocked-down target
    effects[5] = effects[4] + rng.normal(0.0, 0.1, n_genes)  # two perturbations with nearly the same effect
    damped = 0.8 * effects
    for i in range(len(perturbations)):
        noisy = rng.choice(n_genes, 10, replace=False)
        damped[i, noisy] += rng.normal(0.0, 0.4, 10)

    def cells(log_effect: np.ndarray, n: int) -> np.ndarray:
        size = rng.lognormal(0.0, 0.2, (n, 1))
        rate = rng.gamma(5.0, mean * np.exp(log_effect) * size / 5.0)  # negative binomial, dispersion 1/5
        return rng.poisson(rate).astype(np.uint16)

    def dataset(effect_matrix: np.ndarray, n_control: int) -> tuple[np.ndarray, np.ndarray]:
        blocks = [cells(np.zeros(n_genes), n_control)] + [cells(e, 50) for e in effect_matrix]
        labels = [CONTROL] * n_control + [p for p in perturbations for _ in range(50)]
        return np.concatenate(blocks), np.array(labels)

    real_counts, real_labels = dataset(effects, 80)
    pred_counts, pred_labels = dataset(damped, 60)
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


def run_celleval(python: Path, real, pred, work: Path) -> tuple[pd.DataFrame, dict]:
    log1p_values(real).write_h5ad(work / "real.h5ad")
    log1p_values(pred).write_h5ad(work / "pred.h5ad")
    command = [str(python), str(HERE / "_celleval_run.py"), str(work / "real.h5ad"), str(work / "pred.h5ad"), PERT_COL,
               CONTROL, str(work / "celleval_out"), str(work / "results.csv")]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cell-eval failed:\n{out.stderr[-3000:]}")
    return pd.read_csv(work / "results.csv"), json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", type=Path, help="interpreter with cell-eval 0.8.2 (default: benchmarks/.envs)")
    parser.add_argument("--full", action="store_true", help="accepted for `nox -s bench -- --full`: one size only")
    args = parser.parse_args()
    from cellmint.tl._evaluate_perturbation import evaluate_perturbation

    fixture = make_fixture()
    DATA.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(DATA / "celleval_fixture.npz", **fixture)
    real, pred = fixture_anndata(fixture)
    with tempfile.TemporaryDirectory() as work:
        reference, info = run_celleval(args.python or ensure_celleval(), real, pred, Path(work))
    reference = reference.set_index("perturbation").sort_index()
    kept = reference[list(SHARED.values())]
    kept.to_csv(DATA / "celleval_reference.csv", float_format="%.10g")
    ours = evaluate_perturbation(pred, real, perturbation_key=PERT_COL, control=CONTROL, baselines=(),
                                top_k=TOP_K, normalize_to=None)  # fmt: skip
    ours = ours.set_index("perturbation").sort_index()
    rows = []
    for column, theirs in SHARED.items():
        difference = np.abs(ours[column].to_numpy(dtype=float) - kept[theirs].to_numpy(dtype=float))
        rows.append({"metric": column, "cellmint (mean)": ours[column].mean(), "cell-eval (mean)": kept[theirs].mean(),
                     "max |difference|": difference.max()})  # fmt: skip
    print(
        f"cell-eval {info['cell_eval']} (pdex {info['pdex']}), {len(kept)} perturbations, {len(fixture['genes'])} genes"
    )
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {DATA / 'celleval_reference.csv'} and {DATA / 'celleval_fixture.npz'}")


if __name__ == "__main__":
    main()
