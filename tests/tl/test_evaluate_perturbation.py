"""evaluate_perturbation, perturbation_baselines and the metric formulas: by hand, against cell-eval, on real data."""

from __future__ import annotations

import itertools
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

import cellmint as cm
from cellmint.models import _perturbation_metrics as pm
from cellmint.tl._evaluate_perturbation import evaluate_perturbation
from cellmint.tl._perturbation_baselines import perturbation_baselines

DATA = Path(__file__).parent / "_data"
KEYS = {"perturbation_key": "perturbation", "control": "ctrl"}
GENES = [f"G{g}" for g in range(6)]
PERTURBATIONS = ["G1", "G2", "G4"]


def make_cells(values: dict, *, context: str | None = None, prefix: str = "c") -> ad.AnnData:
    """AnnData from ``{perturbation: cells × genes array}`` (and one context)."""
    labels = [p for p, block in values.items() for _ in range(len(block))]
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(labels)}, index=[f"{prefix}{context}{i}" for i in range(len(labels))]
    )
    if context is not None:
        obs["context"] = context
    return ad.AnnData(np.concatenate(list(values.values())).astype(np.float64), obs=obs, var=pd.DataFrame(index=GENES))


def tiny(seed: int, shift: float = 0.0, *, context: str | None = None, prefix: str = "c") -> ad.AnnData:
    """Log-normalised values: 5 control cells and 4 cells for each of 3 perturbations, 6 genes."""
    rng = np.random.default_rng(seed)
    effect = {"ctrl": 0.0, "G1": 1.0, "G2": -0.5, "G4": 0.7}
    values = {}
    for p, size in effect.items():
        n = 5 if p == "ctrl" else 4
        pattern = np.linspace(-1, 1, 6) * size * (1 + 0.5 * PERTURBATIONS.index(p) if p != "ctrl" else 0)
        values[p] = np.clip(2.0 + pattern + shift + rng.normal(0, 0.3, (n, 6)), 0.01, None)
    return make_cells(values, context=context, prefix=prefix)


def dense(adata: ad.AnnData, perturbation: str) -> np.ndarray:
    return np.asarray(adata[adata.obs["perturbation"] == perturbation].X, dtype=np.float64)


# -- metric formulas ---------------------------------------------------------------------------------------------


def test_pseudobulk_metrics_match_numpy():
    real, pred = tiny(0), tiny(1, shift=0.2)
    table = evaluate_perturbation(pred, real, **KEYS, baselines=(), normalize_to=None).set_index("perturbation")
    for p in PERTURBATIONS:
        real_bulk, pred_bulk = dense(real, p).mean(0), dense(pred, p).mean(0)
        real_delta, pred_delta = real_bulk - dense(real, "ctrl").mean(0), pred_bulk - dense(pred, "ctrl").mean(0)
        row = table.loc[p]
        assert row["pearson_delta"] == pytest.approx(np.corrcoef(pred_delta, real_delta)[0, 1], abs=1e-12)
        assert row["mse"] == pytest.approx(np.mean((pred_bulk - real_bulk) ** 2), abs=1e-12)
        assert row["mae"] == pytest.approx(np.mean(np.abs(pred_bulk - real_bulk)), abs=1e-12)
        assert row["mse_delta"] == pytest.approx(np.mean((pred_delta - real_delta) ** 2), abs=1e-12)
        assert row["mae_delta"] == pytest.approx(np.mean(np.abs(pred_delta - real_delta)), abs=1e-12)
        assert (row["n_real"], row["n_pred"], row["n_top_genes"]) == (4, 4, 6)  # top_k=100 > 6 genes: all of them


def test_discrimination_score_ranks_and_leaves_the_target_gene_out():
    genes = ["A", "B", "C"]
    real = np.array([[0.0, 0, 0], [1, 1, 0], [5, 5, 0]])
    # p0's prediction is nearest the real delta of p1 (rank 1 of 3), p1's its own, p2's p1's then p0's (rank 2)
    pred = np.array([[1.0, 0.9, 0], [1, 1, 0], [1.2, 1.2, 0]])
    assert pm.discrimination_scores(real, pred, genes, ["x", "y", "z"]) == pytest.approx([2 / 3, 1, 1 / 3])
    # named like a gene, a perturbation's own gene is ignored: a huge error there changes nothing
    pred_with_target = pred.copy()
    pred_with_target[0, 0] = 100.0
    assert pm.discrimination_scores(real, pred_with_target, genes, ["A", "y", "z"]) == pytest.approx([2 / 3, 1, 1 / 3])
    assert pm.discrimination_scores(real, pred_with_target, genes, ["x", "y", "z"])[0] == pytest.approx(1 / 3)


def test_energy_distance_matches_brute_force_and_subsamples_with_a_fixed_seed():
    rng = np.random.default_rng(3)
    x, y = rng.normal(0, 1, (7, 4)), rng.normal(0.5, 1, (9, 4))

    def mean_distance(a, b):
        return np.mean([np.linalg.norm(u - v) for u, v in itertools.product(a, b)])

    expected = 2 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)
    assert pm.energy_distance(x, y) == pytest.approx(expected, abs=1e-8)
    assert pm.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert pm.energy_distance(x, y, max_cells=5) == pm.energy_distance(x, y, max_cells=5)
    assert pm.energy_distance(x, y, max_cells=5) == pytest.approx(
        pm.energy_distance(pm.subsample(x, 5), pm.subsample(y, 5), max_cells=None)
    )


def test_differential_expression_matches_scipy():
    rng = np.random.default_rng(4)
    perturbed = np.round(rng.gamma(2, 1, (30, 5)), 1)  # rounded: ties, as in sparse expression
    control = np.round(rng.gamma(2, 1, (25, 5)), 1)
    perturbed[:, 1] += 1.5
    perturbed[:, 4] = control[:, 4] = 0.0  # a gene never expressed: no evidence, p = 1
    de = pm.differential_expression(perturbed, control)
    expected = stats.mannwhitneyu(perturbed[:, :4], control[:, :4], axis=0, method="asymptotic", use_continuity=True)
    assert de["p_value"][:4] == pytest.approx(expected.pvalue, rel=1e-12)
    assert de["p_value"][4] == 1.0
    order = np.argsort(de["p_value"])
    bh = np.minimum.accumulate((de["p_value"][order] * 5 / np.arange(1, 6))[::-1])[::-1]
    assert de["fdr"][order] == pytest.approx(np.minimum(bh, 1.0))
    lfc = np.log2(np.expm1(perturbed.mean(0)[:4]) / np.expm1(control.mean(0)[:4]))
    assert de["log2_fold_change"][:4] == pytest.approx(lfc)
    assert de["log2_fold_change"][4] == 0.0  # 0/0 is no change


def test_overlap_and_precision_cut_both_lists():
    real, pred = np.array([5, 1, 3, 7]), np.array([1, 9, 5])
    assert pm.overlap(real, pred) == pytest.approx(2 / 4)  # k_eff = 4 real genes, pred cut to 4
    assert pm.overlap(real, pred, 2) == pytest.approx(1 / 2)  # {5, 1} ∩ {1, 9}
    assert pm.overlap(real, pred, metric="precision") == pytest.approx(2 / 3)  # k_eff = 3: {5, 1, 3} ∩ {1, 9, 5}
    assert pm.overlap(real, pred, 1, metric="precision") == 0.0
    assert pm.overlap(real, np.array([], dtype=int), metric="precision") == 0.0


def test_top_genes_fall_back_to_lowest_p_values():
    de = {"fdr": np.array([0.01, 0.5, 0.02, 0.3]), "p_value": np.array([0.001, 0.2, 0.004, 0.1]),
          "log2_fold_change": np.array([0.5, 3.0, -2.0, 1.0])}  # fmt: skip
    assert list(pm.significant_genes(de)) == [2, 0]
    assert list(pm.top_genes(de, 1)) == [2]
    assert list(pm.top_genes(de, 3)) == [0, 2, 3]  # two significant genes < 3: lowest p-values


# -- evaluate_perturbation ---------------------------------------------------------------------------------------


def test_perfect_prediction():
    real = tiny(0)
    table = evaluate_perturbation(real, real, **KEYS, baselines=(), normalize_to=None)
    assert table["method"].eq("model").all()
    assert list(table["perturbation"]) == PERTURBATIONS
    assert table["pearson_delta"].to_numpy() == pytest.approx(1.0)
    assert table[["mse", "mae", "mse_delta", "mae_delta"]].to_numpy() == pytest.approx(0.0)
    assert table["discrimination_score_l1"].to_numpy() == pytest.approx(1.0)
    assert table["energy_distance"].to_numpy() == pytest.approx(0.0, abs=1e-6)
    assert (table["de_nsig_real"] == table["de_nsig_pred"]).all()


def test_gene_order_does_not_matter_and_extra_genes_are_ignored():
    real, pred = tiny(0), tiny(1, shift=0.2)
    order = [5, 7, 2, 0, 4, 6, 1, 3]  # with two extra genes
    permuted = ad.AnnData(np.hstack([pred.X, pred.X[:, :2]])[:, order], obs=pred.obs,
                          var=pd.DataFrame(index=np.array([*GENES, "extra1", "extra2"])[order]))  # fmt: skip
    expected = evaluate_perturbation(pred, real, **KEYS, baselines=("control",))
    pd.testing.assert_frame_equal(evaluate_perturbation(permuted, real, **KEYS, baselines=("control",)), expected)


def test_counts_are_normalised_like_log1p_values():
    rng = np.random.default_rng(5)
    counts = {p: rng.poisson(rng.gamma(2, 3, 6) * (1 + i), (10, 6)) for i, p in enumerate(["ctrl", *PERTURBATIONS])}
    real, pred = make_cells(counts), make_cells({p: c[::-1] + (p == "G2") for p, c in counts.items()})
    real.X = sp.csr_matrix(real.X)
    logged = []
    for adata in (real, pred):
        counts = np.asarray(sp.csr_matrix(adata.X).toarray(), dtype=np.float64)
        logged.append(ad.AnnData(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4), obs=adata.obs, var=adata.var))
    from_counts = evaluate_perturbation(pred, real, **KEYS, baselines=("control",))
    from_logs = evaluate_perturbation(logged[1], logged[0], **KEYS, baselines=("control",))
    pd.testing.assert_frame_equal(from_counts, from_logs, rtol=1e-6)
    assert sp.issparse(real.X)  # the caller's data is untouched
    assert real.X.max() > 15


def test_contexts_are_evaluated_separately_with_their_own_controls():
    real = ad.concat([tiny(0, context="A"), tiny(2, shift=1.0, context="B")])
    pred = ad.concat([tiny(1, shift=0.1, context="A", prefix="p"), tiny(3, shift=0.9, context="B", prefix="p")])
    both = evaluate_perturbation(pred, real, **KEYS, context_key="context", baselines=(), normalize_to=None)
    assert list(both["context"]) == ["A"] * 3 + ["B"] * 3
    for context in ("A", "B"):
        alone = evaluate_perturbation(pred[pred.obs["context"] == context], real[real.obs["context"] == context],
                                      **KEYS, baselines=(), normalize_to=None)  # fmt: skip
        part = both[both["context"] == context].drop(columns="context").reset_index(drop=True)
        pd.testing.assert_frame_equal(part, alone.drop(columns="context"))


def test_prediction_without_controls_uses_the_real_ones():
    real, pred = tiny(0), tiny(1, shift=0.2)
    without = pred[pred.obs["perturbation"] != "ctrl"].copy()
    with_real_controls = ad.concat([real[real.obs["perturbation"] == "ctrl"], without])
    expected = evaluate_perturbation(with_real_controls, real, **KEYS, baselines=())
    pd.testing.assert_frame_equal(evaluate_perturbation(without, real, **KEYS, baselines=()), expected)


def test_mismatched_inputs_raise_clear_errors():
    real, pred = tiny(0), tiny(1)
    other = pred.copy()
    other.obs["perturbation"] = other.obs["perturbation"].cat.rename_categories({"G4": "G5"})
    with pytest.raises(ValueError, match=r"have no cells in real.*G5"):
        evaluate_perturbation(other, real, **KEYS)
    with pytest.raises(ValueError, match=r"have no cells in pred.*G4"):
        evaluate_perturbation(pred[pred.obs["perturbation"] != "G4"], real, **KEYS)
    no_controls = real[real.obs["perturbation"] != "ctrl"]
    with pytest.raises(ValueError, match="No control cells"):
        evaluate_perturbation(pred[pred.obs["perturbation"] != "ctrl"], no_controls, **KEYS, baselines=())
    with pytest.raises(ValueError, match=r"missing from pred: \['G3'\]"):
        evaluate_perturbation(pred[:, [0, 1, 2, 4, 5]], real, **KEYS)
    renamed = pred.copy()
    renamed.var_names = [f"X{g}" for g in range(6)]
    with pytest.raises(ValueError, match="shares no gene"):
        evaluate_perturbation(renamed, real, **KEYS)
    with pytest.raises(ValueError, match="Unknown metrics"):
        evaluate_perturbation(pred, real, **KEYS, metrics=["pearson"])
    with pytest.raises(ValueError, match="normalize_to='linear'"):
        evaluate_perturbation(pred, real, **KEYS, train=real, baselines=("control",), normalize_to="linear")


def test_metric_choice_and_scores():
    real, pred = tiny(0), tiny(1, shift=0.2)
    table = evaluate_perturbation(pred, real, **KEYS, metrics=["mse", "overlap_at_3"], top_k=3, normalize_to="control")
    assert list(table.columns) == ["method", "context", "perturbation", "n_real", "n_pred", "mse", "overlap_at_3",
                                   "mse_score", "overlap_at_3_score"]  # fmt: skip
    assert list(table["method"].unique()) == ["model", "control"]  # no train: only the control baseline
    model, control = (table[table["method"] == m].set_index("perturbation") for m in ("model", "control"))
    assert model["mse_score"].to_numpy() == pytest.approx(1 - model["mse"] / control["mse"])
    assert control["mse_score"].to_numpy() == pytest.approx(0.0)


# -- baselines ---------------------------------------------------------------------------------------------------


def contexts_with_response(response, t_values, *, prefix="t") -> ad.AnnData:
    """Contexts of 3 identical control cells ``1.5 + t·v`` and 3 cells ``response(p, control)`` per perturbation."""
    v = np.linspace(0.1, 0.6, 6)
    blocks = []
    for i, t in enumerate(t_values):
        control = 1.5 + t * v
        values = {"ctrl": np.tile(control, (3, 1))} | {p: np.tile(response(p, control), (3, 1)) for p in ("G1", "G2")}
        blocks.append(make_cells(values, context=f"{prefix}{i}", prefix=prefix))
    return ad.concat(blocks)


def predicted_delta(adata: ad.AnnData, context: str, perturbation: str) -> np.ndarray:
    obs = adata.obs
    cells = np.asarray(adata[(obs["context"] == context) & (obs["perturbation"] == perturbation)].X, dtype=np.float64)
    control = np.asarray(adata[(obs["context"] == context) & (obs["perturbation"] == "ctrl")].X, dtype=np.float64)
    return cells.mean(0) - control.mean(0)


def test_perturbation_mean_recovers_a_constant_shift_and_control_predicts_none():
    shift = {"G1": np.array([0.5, -0.3, 0.0, 0.2, 0.1, -0.4]), "G2": np.full(6, 0.25)}
    train = contexts_with_response(lambda p, control: control + shift[p], [0.0, 1.0, 2.0])
    target = contexts_with_response(lambda p, control: control, [3.0], prefix="new")
    out = perturbation_baselines(train, target, ["G1", "G2"], **KEYS, context_key="context",
                                 baselines=("control", "perturbation_mean", "context_mean"))  # fmt: skip
    predicted = out["perturbation_mean"]
    assert predicted.n_obs == 3 + 2 * 3
    assert predicted.obs["is_predicted"].sum() == 6
    for p in ("G1", "G2"):
        assert predicted_delta(predicted, "new0", p) == pytest.approx(shift[p], abs=1e-6)
        assert predicted_delta(out["control"], "new0", p) == pytest.approx(0.0)
        average = (shift["G1"] + shift["G2"]) / 2
        assert predicted_delta(out["context_mean"], "new0", p) == pytest.approx(average, abs=1e-6)
    assert out["context_mean"].uns["perturbation_baseline"]["source"] == {"new0": "all"}  # a context unseen in train


def test_linear_baseline_recovers_a_linear_response():
    # the perturbation doubles a context's departure along v: perturbed = control + d + t·v
    d = {"G1": np.array([0.3, 0.1, -0.2, 0.0, 0.4, 0.2]), "G2": np.full(6, -0.1)}
    response = lambda p, control: control + d[p] + (control - 1.5)  # noqa: E731
    train = contexts_with_response(response, [0.0, 1.0, 2.0])
    target = contexts_with_response(response, [3.0], prefix="new")
    controls = target[target.obs["perturbation"] == "ctrl"]
    out = perturbation_baselines(train, controls, [("new0", "G1"), ("new0", "G2")], **KEYS, context_key="context",
                                 baselines=("linear", "perturbation_mean"), alpha=1e-8)  # fmt: skip
    v = np.linspace(0.1, 0.6, 6)
    for p in ("G1", "G2"):
        assert predicted_delta(out["linear"], "new0", p) == pytest.approx(d[p] + 3 * v, abs=1e-5)
        # the average effect over the training contexts, whose mean t is 1
        assert predicted_delta(out["perturbation_mean"], "new0", p) == pytest.approx(d[p] + 1 * v, abs=1e-6)
    table = evaluate_perturbation(out["linear"], target, **KEYS, context_key="context", train=train,
                                  baselines=("perturbation_mean",), metrics=["mse_delta"])  # fmt: skip
    assert table.loc[table["method"] == "model", "mse_delta"].to_numpy() == pytest.approx(0.0, abs=1e-9)
    assert (table.loc[table["method"] == "model", "mse_delta_score"] > 0.99).all()


def test_context_mean_uses_the_target_context_and_unknown_perturbations_raise():
    train = contexts_with_response(lambda p, control: control + (0.2 if p == "G1" else 0.6), [0.0, 1.0])
    controls = train[train.obs["perturbation"] == "ctrl"]
    out = perturbation_baselines(train, controls, ["G3"], **KEYS, context_key="context",
                                 baselines=("context_mean", "control"))  # fmt: skip
    assert predicted_delta(out["context_mean"], "t1", "G3") == pytest.approx(np.full(6, 0.4), abs=1e-6)
    assert out["context_mean"].uns["perturbation_baseline"]["source"] == {"t0": "context", "t1": "context"}
    with pytest.raises(ValueError, match=r"not found there: \['G3'\]"):
        perturbation_baselines(train, controls, ["G3"], **KEYS, context_key="context")
    with pytest.raises(ValueError, match="need train="):
        perturbation_baselines(None, controls, ["G1"], **KEYS, context_key="context")


# -- cell-eval parity and real data ------------------------------------------------------------------------------


def test_parity_with_cell_eval():
    """cell-eval 0.8.2's values on a shared fixture (written by benchmarks/celleval_parity.py)."""
    fixture = np.load(DATA / "celleval_fixture.npz")
    reference = pd.read_csv(DATA / "celleval_reference.csv", index_col="perturbation")

    def cells(which):
        labels = fixture[f"{which}_labels"]
        obs = pd.DataFrame({"target": labels}, index=[f"{which}{i}" for i in range(len(labels))])
        var = pd.DataFrame(index=fixture["genes"])
        return ad.AnnData(fixture[f"{which}_counts"].astype(np.float32), obs=obs, var=var)

    ours = evaluate_perturbation(cells("pred"), cells("real"), perturbation_key="target", control="non-targeting",
                                 baselines=(), top_k=50, normalize_to=None).set_index("perturbation")  # fmt: skip
    shared = {"pearson_delta": "pearson_delta", "mse": "mse", "mae": "mae", "mse_delta": "mse_delta",
              "mae_delta": "mae_delta", "discrimination_score_l1": "discrimination_score_l1",
              "overlap_at_N": "overlap_at_N", "overlap_at_50": "overlap_at_50", "precision_at_N": "precision_at_N",
              "precision_at_50": "precision_at_50", "de_nsig_real": "de_nsig_counts_real",
              "de_nsig_pred": "de_nsig_counts_pred"}  # fmt: skip
    assert list(ours.index) == list(reference.index)
    for column, theirs in shared.items():
        assert ours[column].to_numpy(dtype=float) == pytest.approx(reference[theirs].to_numpy(), abs=1e-6), column
    assert reference["discrimination_score_l1"].min() < 1  # the fixture has confusable perturbations


def test_glioblastoma_held_out_patient():
    adata = cm.datasets.glioblastoma_panobinostat()
    held_out = (adata.obs["patient_id"] == "PW034").to_numpy()
    real, train = adata[held_out], adata[~held_out]
    table = evaluate_perturbation(real, real, perturbation_key="condition", control="ctrl", context_key="patient_id",
                                  train=train).set_index("method")  # fmt: skip
    assert list(table.index) == ["model", "control", "perturbation_mean", "context_mean", "linear"]
    assert table.loc["model", "pearson_delta"] == pytest.approx(1.0)
    assert np.isnan(table.loc["model", "discrimination_score_l1"])  # one perturbation per context
    assert table["de_nsig_real"].eq(table.loc["model", "de_nsig_pred"]).all()
    assert table["de_nsig_real"].iloc[0] > 50
    # the average training effect of panobinostat predicts the held-out patient better than no effect
    for metric in ("mse_delta", "energy_distance"):
        assert table.loc["perturbation_mean", metric] < table.loc["control", metric]
    assert table.loc["perturbation_mean", "overlap_at_N"] > 0.5 > table.loc["control", "overlap_at_N"]
    assert table.loc["perturbation_mean", "pearson_delta"] > 0.4
    assert np.isnan(table.loc["control", "pearson_delta"])  # a zero delta has no correlation
    assert table.loc["control", "mse_delta_score"] < 0 == table.loc["perturbation_mean", "mse_delta_score"]
