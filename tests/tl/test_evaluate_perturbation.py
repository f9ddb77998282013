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
from cellmint._metrics import _perturbation as pm
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


def tiny(seed: int, shift: float = 0.0, *, context: str | None = None, prefix: str = "c", n: int = 4) -> ad.AnnData:
    """Log-normalised values: n + 1 control cells and n cells for each of 3 perturbations, 6 genes."""
    rng = np.random.default_rng(seed)
    effect = {"ctrl": 0.0, "G1": 1.0, "G2": -0.5, "G4": 0.7}
    values = {}
    for p, size in effect.items():
        size_p = n + 1 if p == "ctrl" else n
        pattern = np.linspace(-1, 1, 6) * size * (1 + 0.5 * PERTURBATIONS.index(p) if p != "ctrl" else 0)
        values[p] = np.clip(2.0 + pattern + shift + rng.normal(0, 0.3, (size_p, 6)), 0.01, None)
    return make_cells(values, context=context, prefix=prefix)


def dense(adata: ad.AnnData, perturbation: str) -> np.ndarray:
    return np.asarray(adata[adata.obs["perturbation"] == perturbation].X, dtype=np.float64)


# -- metric formulas ---------------------------------------------------------------------------------------------


def test_pseudobulk_metrics_match_numpy():
    real, pred = tiny(0), tiny(1, shift=0.2)
    table = evaluate_perturbation(pred, real, **KEYS, baselines=(), normalize_to=None)
    table = table[table["method"] == "model"].set_index("perturbation")
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


def test_de_comparison_metrics_by_hand():
    real = {"fdr": np.array([0.01, 0.2, 0.04, 0.001, 0.5]), "log2_fold_change": np.array([1.0, 2.0, -0.5, -3.0, 0.1])}
    pred = {"fdr": np.array([0.03, 0.01, 0.3, 0.02, 0.6]), "log2_fold_change": np.array([0.5, 1.0, 0.2, -1.0, 0.0])}
    # real significant genes 0, 2, 3 (log2FC 1, -0.5, -3); predicted 0.5, 0.2, -1: signs + + - against + - -
    assert pm.de_direction_match(real, pred) == pytest.approx(2 / 3)
    assert pm.de_spearman_lfc_sig(real, pred) == pytest.approx(1.0)  # ranks 3, 2, 1 on both sides
    assert pm.de_sig_genes_recall(real, pred) == pytest.approx(2 / 3)  # predicted significant: 0, 1, 3
    # scores −log10(FDR) = 1.52, 2, 0.52, 1.70, 0.22; labels 1 0 1 1 0. ROC: 3 of 6 (positive, negative) pairs ordered
    assert pm.significance_auc(real, pred, "roc") == pytest.approx(0.5)
    # ranked: 2 (−), 1.70 (+), 1.52 (+), 0.52 (+), 0.22 (−): precisions 1/2, 2/3, 3/4 at the positives
    assert pm.significance_auc(real, pred, "pr") == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    nothing = {"fdr": np.full(5, 0.9), "log2_fold_change": np.zeros(5)}
    for function in (pm.de_direction_match, pm.de_spearman_lfc_sig, pm.de_sig_genes_recall, pm.significance_auc):
        assert np.isnan(function(nothing, pred)), function.__name__
    # number of significant genes across perturbations (those with real significant genes only)
    assert pm.de_spearman_sig([5, 0, 3, 8], [4, 2, 1, 9]) == pytest.approx(1.0)
    assert pm.de_spearman_sig([5, 3, 8], [4, 9, 1]) == pytest.approx(-1.0)
    assert pm.de_spearman_sig([0, 0], [3, 1]) == 1.0  # cell-eval: agreement when nothing is significant
    assert np.isnan(pm.de_spearman_sig([4, 0], [3, 1]))


def test_discrimination_scores_with_l2_and_cosine_distances():
    genes = ["A", "B", "C"]
    real = np.array([[1.0, 0, 0], [0, 1, 0], [1, 1, 0]])
    pred = np.array([[1.0, 0.1, 0], [0.9, 1, 0], [0, 0, 0]])
    # p0: nearest its own (L2 0.1); p1: nearer p2's delta (L2 0.1) than its own (0.9), and in cosine too
    assert pm.discrimination_scores(real, pred, genes, ["x", "y", "z"], "l2")[:2] == pytest.approx([1, 2 / 3])
    cosine = pm.discrimination_scores(real, pred, genes, ["x", "y", "z"], "cosine")
    # a zero predicted delta is equally far (cosine distance 1) from every real delta: ties count half
    assert cosine == pytest.approx([1, 2 / 3, 1 - (0 + 0.5 * 2) / 3])
    with pytest.raises(ValueError, match="distance must be one of"):
        pm.discrimination_scores(real, pred, genes, ["x", "y", "z"], "l3")


def test_pearson_edistance_matches_brute_force():
    rng = np.random.default_rng(8)

    def energy(x, y):
        def mean_distance(a, b):
            return np.mean([np.linalg.norm(u - v) for u, v in itertools.product(a, b)])

        return 2 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)

    control, pred_control = rng.normal(0, 1, (6, 3)), rng.normal(0, 1, (5, 3))
    real = [rng.normal(shift, 1, (4, 3)) for shift in (0.5, 1.0, 2.0)]
    pred = [rng.normal(shift, 1, (5, 3)) for shift in (0.2, 1.5, 1.8)]
    expected = np.corrcoef([energy(r, control) for r in real], [energy(q, pred_control) for q in pred])[0, 1]
    assert pm.pearson_edistance(real, control, pred, pred_control) == pytest.approx(expected, abs=1e-10)
    assert np.isnan(pm.pearson_edistance(real[:1], control, pred[:1], pred_control))


def test_clustering_agreement_of_identical_and_shuffled_groups():
    pytest.importorskip("igraph", reason="clustering_agreement needs igraph")
    rng = np.random.default_rng(0)
    centres = np.repeat(rng.normal(0, 5, (3, 8)), 6, axis=0)
    real = centres + rng.normal(0, 0.1, centres.shape)
    assert pm.clustering_agreement(real, real + rng.normal(0, 0.01, real.shape)) == pytest.approx(1.0)
    assert pm.clustering_agreement(real, rng.permutation(real)) < 0.5
    assert np.isnan(pm.clustering_agreement(real[:2], real[:2]))


def test_cell_eval_normalization_uses_each_objects_median_library_size():
    from cellmint.tl._perturbation_data import median_normalized

    counts = np.array([[1, 3, 0], [2, 2, 4], [0, 0, 0], [5, 5, 10]], dtype=np.float32)
    adata = ad.AnnData(counts)
    library = counts.sum(1)  # 4, 8, 0, 20: the median over cells with counts is 8
    expected = np.log1p(counts / (library[:, None] / 8).clip(min=1e-12))
    expected[2] = 0.0
    dense = median_normalized(adata, layer=None, what="x").X
    np.testing.assert_allclose(dense, expected, rtol=1e-6)
    # sparse: scanpy takes the median over all cells (4, 8, 0, 20 → 6)
    sparse = median_normalized(ad.AnnData(sp.csr_matrix(counts)), layer=None, what="x").X.toarray()
    np.testing.assert_allclose(sparse, np.log1p(counts / (library[:, None] / 6).clip(min=1e-12)), rtol=1e-6)
    logged = ad.AnnData(np.log1p(counts) + 0.5)
    assert median_normalized(logged, layer=None, what="x") is logged
    real, pred = tiny(0), tiny(1)
    with pytest.raises(ValueError, match="normalization must be one of"):
        evaluate_perturbation(pred, real, **KEYS, normalization="median")


def test_bootstrap_with_every_cell_once_gives_the_point_estimates():
    from cellmint.tl import _perturbation_scores as scores

    rng = np.random.default_rng(2)
    pred, real = rng.gamma(2, 1, (7, 5)), rng.gamma(2, 1, (9, 5))
    pred_control, real_control = rng.gamma(2, 1, (6, 5)), rng.gamma(2, 1, (8, 5))
    ones = [np.ones((1, len(x))) for x in (pred, pred_control, real, real_control)]
    bulks = [scores.weighted_means(w, x) for w, x in zip(ones, (pred, pred_control, real, real_control), strict=True)]
    named = {m: m for m in ("pearson_delta", "mse", "mae", "mse_delta", "mae_delta")} | {"pearson_delta_top": "top"}
    values = scores.bulk_replicates(*bulks, np.array([0, 3]), named)
    delta_pred, delta_real = pred.mean(0) - pred_control.mean(0), real.mean(0) - real_control.mean(0)
    assert values["pearson_delta"][0] == pytest.approx(pm.pearson(delta_pred, delta_real))
    assert values["top"][0] == pytest.approx(pm.pearson(delta_pred[[0, 3]], delta_real[[0, 3]]))
    assert values["mse"][0] == pytest.approx(pm.mean_squared_error(pred.mean(0), real.mean(0)))
    assert values["mae_delta"][0] == pytest.approx(pm.mean_absolute_error(delta_pred, delta_real))
    yy = scores.self_term(real, ones[2])
    energy = scores.energy_replicates(pred, real, ones[0], ones[2], yy)
    assert energy[0] == pytest.approx(pm.energy_distance(pred, real, max_cells=None))
    # a cell drawn twice is not a pair at distance 0: the replicate's self term stays on the data's scale
    doubled = np.concatenate([np.full((1, 8), 1.0), [[2.0]]], axis=1)
    assert scores.self_term(real, doubled)[0] == pytest.approx(scores.self_term(real, ones[2])[0], rel=0.2)


def test_scaled_scores_place_a_value_between_the_best_baseline_and_the_ceiling():
    from cellmint.tl import _perturbation_scores as scores

    # the ceiling: the true response's score, from split halves (n cells split, shared control cells)
    assert scores.noise_ceiling("pearson_delta", 0.6, 100, 400) == pytest.approx(np.sqrt(1.2 / 1.6))
    assert scores.noise_ceiling("overlap_at_50", 0.6, 100, 400) == pytest.approx(1.2 / 1.6)
    assert np.isnan(scores.noise_ceiling("pearson_delta_top100", -0.1, 100, 400))
    assert scores.noise_ceiling("mse_delta", 0.8, 100, 400) == pytest.approx(0.8 * 1.25 / 4)
    assert scores.noise_ceiling("mae", 0.8, 100, 400) == pytest.approx(0.8 * np.sqrt(1.25 / 4))
    assert scores.noise_ceiling("pearson_edistance", 0.8, 100, 400) == pytest.approx(0.8)

    assert scores.scaled(0.7, 0.5, 0.9, 1.0) == pytest.approx(0.5)
    assert scores.scaled(3.0, 5.0, 1.0, 0.0) == pytest.approx(0.5)  # lower is better
    assert scores.scaled(0.4, 0.5, 0.9, 1.0) == pytest.approx(-0.25)
    assert np.isnan(scores.scaled(0.7, 0.9, 0.8, 1.0))  # the replicate is not better than the baseline: no room
    assert scores.interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert np.isnan(scores.interval(np.r_[np.arange(100.0), np.full(150, np.nan)])).all()  # mostly undefined


# -- evaluate_perturbation ---------------------------------------------------------------------------------------


def test_perfect_prediction():
    real = tiny(0)
    table = evaluate_perturbation(real, real, **KEYS, baselines=(), normalize_to=None, ceiling=False)
    assert table["method"].eq("model").all()
    assert list(table["perturbation"]) == PERTURBATIONS
    assert table["pearson_delta"].to_numpy() == pytest.approx(1.0)
    assert table[["mse", "mae", "mse_delta", "mae_delta"]].to_numpy() == pytest.approx(0.0)
    for column in ("discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine",
                   "pearson_edistance", "de_spearman_sig"):  # fmt: skip
        assert table[column].to_numpy() == pytest.approx(1.0), column
    assert table["energy_distance"].to_numpy() == pytest.approx(0.0, abs=1e-6)
    assert (table["de_nsig_real"] == table["de_nsig_pred"]).all()
    # intervals of a perfect prediction scored against itself: resampled real cells, the same prediction
    assert (table["energy_distance_low"] <= table["energy_distance"] + 1e-9).all()
    assert (table["pearson_delta_high"] <= 1.0).all()


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
    options = {"baselines": (), "normalize_to": None, "ceiling": False, "n_bootstrap": 0}
    both = evaluate_perturbation(pred, real, **KEYS, context_key="context", **options)
    assert list(both["context"]) == ["A"] * 3 + ["B"] * 3
    for context in ("A", "B"):
        alone = evaluate_perturbation(pred[pred.obs["context"] == context], real[real.obs["context"] == context],
                                      **KEYS, **options)  # fmt: skip
        part = both[both["context"] == context].drop(columns="context").reset_index(drop=True)
        pd.testing.assert_frame_equal(part, alone.drop(columns="context"))


def test_prediction_without_controls_uses_the_real_ones():
    real, pred = tiny(0), tiny(1, shift=0.2)
    without = pred[pred.obs["perturbation"] != "ctrl"].copy()
    with_real_controls = ad.concat([real[real.obs["perturbation"] == "ctrl"], without])
    expected = evaluate_perturbation(with_real_controls, real, **KEYS, baselines=(), n_bootstrap=0)
    pd.testing.assert_frame_equal(evaluate_perturbation(without, real, **KEYS, baselines=(), n_bootstrap=0), expected)


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
    assert list(table.columns) == ["method", "context", "perturbation", "n_real", "n_pred", "n_control", "mse",
                                   "overlap_at_3", "mse_scaled", "mse_low", "mse_high", "mse_scaled_low",
                                   "mse_scaled_high", "overlap_at_3_scaled", "mse_score",
                                   "overlap_at_3_score"]  # fmt: skip
    # no train: only the control baseline; then the split-half replicate
    assert list(table["method"].unique()) == ["model", "control", "replicate"]
    model, control = (table[table["method"] == m].set_index("perturbation") for m in ("model", "control"))
    assert model["mse_score"].to_numpy() == pytest.approx(1 - model["mse"] / control["mse"])
    assert control["mse_score"].to_numpy() == pytest.approx(0.0)


def test_predictions_made_from_control_cells_are_resampled_with_them():
    real, train = tiny(0), ad.concat([tiny(2, shift=0.3, context="t1"), tiny(3, shift=0.1, context="t2")])
    real.obs["context"] = "held"
    table = evaluate_perturbation(real, real, **KEYS, context_key="context", train=train, n_bootstrap=50)
    boot = table.attrs["bootstrap"]
    for p in PERTURBATIONS:
        # the control baseline's cells are the real control cells: its delta is 0 in every replicate, never noise
        assert np.isnan(boot[("control", "held", p)]["pearson_delta"]).all()
        assert np.isfinite(boot[("perturbation_mean", "held", p)]["pearson_delta"]).all()
        assert boot[("control", "held", p)]["mse_delta"].std() > 0  # the real cells are resampled
    assert pd.concat([table, table]).shape[0] == 2 * len(table)  # attrs do not get in pandas' way


def test_summary_pools_units_against_one_best_baseline():
    real = ad.concat([tiny(0, context="A", n=40), tiny(2, shift=1.0, context="B", n=40)])
    pred = ad.concat([tiny(1, shift=0.1, context="A", prefix="p", n=40),
                      tiny(3, shift=0.9, context="B", prefix="p", n=40)])  # fmt: skip
    train = ad.concat([tiny(4, shift=0.5, context="C", prefix="t"), tiny(5, shift=0.2, context="D", prefix="t")])
    table = evaluate_perturbation(pred, real, **KEYS, context_key="context", train=train, n_bootstrap=40)
    summary = cm.tl.perturbation_summary(table).set_index("method")
    assert list(summary.index) == ["model", "control", "perturbation_mean", "context_mean", "linear", "replicate"]
    rows = table[table["method"] == "model"]
    means = {b: table.loc[table["method"] == b, "mse_delta"].mean() for b in table.attrs["baselines"]}
    best = min(means, key=means.get)
    replicate = table[table["method"] == "replicate"]
    # the truth differs from the real cells by their noise alone; two halves by twice the noise of half the cells
    factor = (1 + replicate["n_real"] / replicate["n_control"]) / 4
    ceiling = (replicate["mse_delta"] * factor).mean()
    assert summary.loc["model", "mse_delta_ceiling"] == pytest.approx(ceiling)
    model = summary.loc["model"]
    assert model["n"] == 6
    assert model["mse_delta"] == pytest.approx(rows["mse_delta"].mean())
    assert model["mse_delta_baseline"] == best
    expected = (rows["mse_delta"].mean() - means[best]) / (ceiling - means[best])
    assert model["mse_delta_scaled"] == pytest.approx(expected)
    assert model["mse_delta_low"] < model["mse_delta_high"]
    assert model["mse_delta_scaled_low"] < model["mse_delta_scaled"] < model["mse_delta_scaled_high"]
    assert model["pearson_delta_low"] < model["pearson_delta"] < model["pearson_delta_high"]
    assert summary.loc[best, "mse_delta_scaled"] == pytest.approx(0.0)
    assert summary.loc["replicate", "mse_delta_scaled"] < 1.0
    assert np.isnan(model["overlap_at_N_low"])  # DE-based metrics are not resampled
    # several tables (seeds, folds), per unit
    again = evaluate_perturbation(pred, real, **KEYS, context_key="context", train=train, n_bootstrap=40,
                                  random_state=1).assign(seed=1)  # fmt: skip
    per_unit = cm.tl.perturbation_summary([table.assign(seed=0), again], by=["method", "context"])
    assert per_unit.set_index(["method", "context"]).loc[("model", "A"), "n"] == 6  # 3 perturbations × 2 tables
    with pytest.raises(KeyError, match="seed"):
        cm.tl.perturbation_summary(table, by=["method", "seed"])


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


def test_pls_learns_one_context_direction_shared_by_every_perturbation():
    # each perturbation scales the context's departure along v by its own factor: one latent direction
    d = {"G1": np.array([0.3, 0.1, -0.2, 0.0, 0.4, 0.2]), "G2": np.full(6, -0.1)}
    factor = {"G1": 1.0, "G2": -0.5}
    response = lambda p, control: control + d[p] + factor[p] * (control - 1.5)  # noqa: E731
    train = contexts_with_response(response, [0.0, 1.0, 2.0])
    # G2 not measured in t2: its effect there is taken as its mean over t0 and t1
    train = train[~((train.obs["context"] == "t2") & (train.obs["perturbation"] == "G2")).to_numpy()].copy()
    target = contexts_with_response(response, [3.0], prefix="new")
    controls = target[target.obs["perturbation"] == "ctrl"]
    out = perturbation_baselines(train, controls, ["G1", "G2"], **KEYS, context_key="context",
                                 baselines=("pls", "perturbation_mean"))  # fmt: skip
    v = np.linspace(0.1, 0.6, 6)
    assert predicted_delta(out["pls"], "new0", "G1") == pytest.approx(d["G1"] + 3 * v, abs=1e-5)
    assert predicted_delta(out["perturbation_mean"], "new0", "G1") == pytest.approx(d["G1"] + 1 * v, abs=1e-6)
    # G2 fitted on the imputed effect: its slope is shrunk towards none, its direction kept
    g2 = predicted_delta(out["pls"], "new0", "G2") - d["G2"]
    slope = g2 @ v / (v @ v)
    assert -0.5 * 3 < slope < 0
    assert np.abs(g2 - slope * v).max() < 1e-5
    # two training contexts: pls is the perturbation mean (a line through two could not be checked out of fold)
    one = train[train.obs["context"].isin(["t0", "t1"]).to_numpy()].copy()
    single = perturbation_baselines(one, controls, ["G1"], **KEYS, context_key="context",
                                    baselines=("pls", "perturbation_mean"))  # fmt: skip
    np.testing.assert_allclose(single["pls"].X, single["perturbation_mean"].X, atol=1e-6)
    # contexts that do not differ have no direction to learn: the perturbation mean, without a warning
    same = contexts_with_response(response, [1.0, 1.0, 1.0])
    flat = perturbation_baselines(same, controls, ["G1"], **KEYS, context_key="context",
                                  baselines=("pls", "perturbation_mean"))  # fmt: skip
    np.testing.assert_allclose(flat["pls"].X, flat["perturbation_mean"].X, atol=1e-6)
    # not a baseline of the scaled score: evaluate_perturbation refuses it there
    with pytest.raises(ValueError, match="baselines must be among"):
        evaluate_perturbation(out["pls"], target, **KEYS, context_key="context", train=train, baselines=("pls",))


def test_pls_is_sklearns_partial_least_squares_solved_exactly():
    from sklearn.cross_decomposition import PLSRegression

    from cellmint.tl._perturbation_baselines import pls_fit, pls_predict

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 80))
    y = x[:, :3] @ rng.normal(size=(3, 400)) + 0.5 * rng.normal(size=(12, 400))
    new = rng.normal(size=(5, 80))
    ours = pls_predict(pls_fit(x, y, 3), new)
    reference = PLSRegression(n_components=3, scale=False, max_iter=5000, tol=1e-14).fit(x, y).predict(new)
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    # exact, so the order of the genes does not matter (sklearn's iteration differs at its tolerance)
    order = rng.permutation(80)
    np.testing.assert_allclose(pls_predict(pls_fit(x[:, order], y, 3), new[:, order]), ours, atol=1e-10)
    assert pls_fit(np.ones((4, 80)), y[:4], 3) is None  # rows that do not differ: nothing to learn


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


@pytest.mark.parametrize("fixture", ["small", "large"])
@pytest.mark.parametrize(("given", "normalization"), [("log1p", "cellmint"), ("counts", "cell-eval")])
def test_parity_with_cell_eval(fixture, given, normalization):
    """cell-eval 0.8.2's values of every metric on two shared fixtures (written by benchmarks/celleval_parity.py).

    ``given="log1p"``: cell-eval was given cellmint's log1p values; ``"counts"``: the counts, which it
    normalises to each object's median library size, as ``normalization="cell-eval"`` does.
    """
    pytest.importorskip("igraph", reason="clustering_agreement needs igraph (cell-eval's Leiden clustering)")
    filename = {"small": "celleval_fixture.npz", "large": "celleval_fixture_large.npz"}[fixture]
    data = np.load(DATA / filename)
    reference = pd.read_csv(DATA / "celleval_reference.csv")
    reference = reference[(reference["fixture"] == fixture) & (reference["input"] == given)]
    reference = reference.drop(columns=["fixture", "input"]).set_index("perturbation")

    def cells(which):
        labels = data[f"{which}_labels"]
        obs = pd.DataFrame({"target": labels}, index=[f"{which}{i}" for i in range(len(labels))])
        return ad.AnnData(data[f"{which}_counts"].astype(np.float32), obs=obs, var=pd.DataFrame(index=data["genes"]))

    ours = evaluate_perturbation(cells("pred"), cells("real"), perturbation_key="target", control="non-targeting",
                                 baselines=(), top_k=50, normalize_to=None, metrics="all", ceiling=False, n_bootstrap=0,
                                 normalization=normalization).set_index("perturbation")  # fmt: skip
    assert list(ours.index) == list(reference.index)
    assert len(reference.columns) == 28  # every metric of cell-eval's "full" profile
    renamed = {"de_nsig_counts_real": "de_nsig_real", "de_nsig_counts_pred": "de_nsig_pred"}
    for theirs in reference.columns:
        mine = ours[renamed.get(theirs, theirs)].to_numpy(dtype=float)
        assert mine == pytest.approx(reference[theirs].to_numpy(), abs=1e-6, nan_ok=True), theirs
    assert reference["discrimination_score_l1"].min() < 1 or fixture == "large"  # confusable perturbations
    if fixture == "large":  # more than 50 and 100 significant genes: the overlaps at k differ
        assert (reference["overlap_at_50"] != reference["overlap_at_N"]).any()
        assert (reference["overlap_at_100"] != reference["overlap_at_200"]).any()


def test_glioblastoma_held_out_patient():
    adata = cm.datasets.glioblastoma_panobinostat()
    held_out = (adata.obs["patient_id"] == "PW034").to_numpy()
    real, train = adata[held_out], adata[~held_out]
    table = evaluate_perturbation(real, real, perturbation_key="condition", control="ctrl", context_key="patient_id",
                                  train=train).set_index("method")  # fmt: skip
    assert list(table.index) == ["model", "control", "perturbation_mean", "context_mean", "linear", "replicate"]
    assert table.loc["model", "pearson_delta"] == pytest.approx(1.0)
    assert np.isnan(table.loc["model", "discrimination_score_l1"])  # one perturbation per context
    assert table["de_nsig_real"].drop(index="replicate").eq(table.loc["model", "de_nsig_pred"]).all()
    assert table["de_nsig_real"].iloc[0] > 50
    # the average training effect of panobinostat predicts the held-out patient better than no effect
    for metric in ("mse_delta", "energy_distance"):
        assert table.loc["perturbation_mean", metric] < table.loc["control", metric]
    assert table.loc["perturbation_mean", "overlap_at_N"] > 0.5 > table.loc["control", "overlap_at_N"]
    assert table.loc["perturbation_mean", "pearson_delta"] > 0.4
    assert np.isnan(table.loc["control", "pearson_delta"])  # a zero delta has no correlation
    assert table.loc["control", "mse_delta_score"] < 0 == table.loc["perturbation_mean", "mse_delta_score"]
    # on the 0–1 scale: the best baseline is 0; 1 the true response, whose score the split halves estimate. The
    # real cells scored against themselves (no sampling noise at all) are above it, a half of them below
    for metric in ("pearson_delta_top100", "energy_distance", "mse_delta"):
        baselines = table.loc[["control", "perturbation_mean", "context_mean", "linear"], f"{metric}_scaled"]
        assert baselines.max() == pytest.approx(0.0), metric
        assert table.loc["model", f"{metric}_scaled"] > 1.0
        assert table.loc["replicate", f"{metric}_scaled"] < 1.0
        low, high = table.loc["linear", [f"{metric}_low", f"{metric}_high"]]
        assert low < table.loc["linear", metric] < high


def test_baselines_predicted_from_other_controls_share_none_of_their_noise():
    """Perturbations without effect: the "training perturbed − this context's control" prediction (the linear
    baseline with two training contexts) correlates with the real delta through the control cells' sampling
    noise when both use the same controls, and not when it predicts from the other half (``controls=``)."""
    rng = np.random.default_rng(0)
    genes = [f"G{g}" for g in range(200)]
    perturbations = ["A", "B", "C"]

    def context(name, n_control):
        labels = ["ctrl"] * n_control + [p for p in perturbations for _ in range(60)]
        values = rng.normal(2.0, 1.0, (len(labels), len(genes))).clip(0, None)  # no perturbation does anything
        obs = pd.DataFrame({"perturbation": labels, "context": name},
                           index=[f"{name}_{i}" for i in range(len(labels))])  # fmt: skip
        return ad.AnnData(values, obs=obs, var=pd.DataFrame(index=genes))

    train = ad.concat([context("t1", 60), context("t2", 60)])
    held = context("h", 40)  # few control cells: a noisy control pseudobulk
    controls = np.flatnonzero(held.obs["perturbation"] == "ctrl")
    half, other = held[controls[:20]].copy(), held[np.setdiff1d(np.arange(held.n_obs), controls[:20])].copy()
    predicted = ad.concat([half, held[held.obs["perturbation"] != "ctrl"]])  # any prediction made from `half`
    kwargs = {**KEYS, "control": "ctrl", "context_key": "context", "train": train, "baselines": ("linear",),
              "normalize_to": None, "ceiling": False, "n_bootstrap": 0}  # fmt: skip
    shared = evaluate_perturbation(held, held, **kwargs)
    split = evaluate_perturbation(predicted, other, controls=half, **kwargs)
    column = "pearson_delta_top100"

    def linear(table):
        return table.loc[table["method"] == "linear", column].mean()

    assert linear(shared) > 0.5  # noise shared with the real delta
    assert abs(linear(split)) < 0.3  # no effect, no shared noise: no correlation
    # the default (controls of `real`) is what it was
    again = evaluate_perturbation(held, held, controls=held, **kwargs)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), shared.reset_index(drop=True))
