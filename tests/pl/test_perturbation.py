"""cm.pl.perturbation(kind="delta"): the real effects are read as the evaluation reads cells; keys from tl."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import cellmint as cm

matplotlib.use("Agg")
import matplotlib.pyplot as plt

N_GENES = 40


def _cells(values: np.ndarray, labels: list[str]) -> ad.AnnData:
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"g{j}" for j in range(values.shape[1])])
    return ad.AnnData(values, obs=obs, var=var)


@pytest.fixture(scope="module")
def screen():
    """Real cells as raw counts (library sizes spread widely) and predicted cells as log values."""
    rng = np.random.default_rng(0)
    labels = ["control"] * 60 + ["KO"] * 60
    rate = rng.gamma(2.0, 2.0, size=N_GENES)
    effect = np.where(np.arange(N_GENES) < 8, 4.0, 1.0)  # the KO raises the first genes fourfold
    depth = rng.lognormal(0, 0.6, size=len(labels))[:, None]  # uneven depths: raw means differ from log means
    mean = rate * depth * np.where(np.array(labels)[:, None] == "KO", effect, 1.0)
    counts = _cells(rng.poisson(mean).astype(np.float32), labels)
    pred = _cells(np.log1p(rng.gamma(2.0, 1.0, size=(len(labels), N_GENES))).astype(np.float32), labels)
    pred.uns["cellmint_perturbation"] = {"perturbations": np.asarray(["KO"], dtype=object)}
    return counts, pred


def _plotted(pred, real, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    fig = cm.pl.perturbation(pred, real, perturbation_key="perturbation", control="control", return_fig=True,
                             **kwargs)  # fmt: skip
    offsets = np.asarray(fig.axes[0].collections[0].get_offsets())
    title = fig.axes[0].get_title()
    plt.close(fig)
    assert title.startswith("KO: Pearson r = ")  # the perturbation named in uns[key]["perturbations"]
    return offsets[:, 0], offsets[:, 1]


def test_counts_and_their_log_normalised_values_give_the_same_deltas(screen):
    counts, pred = screen
    lognorm = counts.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    real_from_counts, predicted = _plotted(pred, counts)
    real_from_log, predicted_again = _plotted(pred, lognorm)
    np.testing.assert_allclose(real_from_counts, real_from_log, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(predicted, predicted_again)
    # the means of the raw counts (what the plot drew before) are not these log effects
    ko = counts.obs["perturbation"].to_numpy() == "KO"
    raw = counts.X[ko].mean(axis=0) - counts.X[~ko].mean(axis=0)
    assert not np.allclose(raw, real_from_counts, atol=0.1)
    assert set(np.argsort(-real_from_counts)[:8]) == set(range(8))  # the fourfold genes lead


def test_the_default_perturbation_comes_from_the_key_predict_wrote(screen):
    counts, pred = screen
    other = pred.copy()
    other.uns["my_prediction"] = other.uns.pop("cellmint_perturbation")
    other.uns["unrelated"] = {"perturbations": np.asarray(["control"], dtype=object)}  # never guessed from
    _plotted(other, counts, key="my_prediction")
    with pytest.raises(ValueError, match=r"Name the perturbation to draw: perturbation= \(data.uns\['cellmint_pe"):
        cm.pl.perturbation(other, counts, perturbation_key="perturbation", control="control")
