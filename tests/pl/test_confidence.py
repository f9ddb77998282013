"""cm.pl.confidence: every kind draws what it says; image comparison against saved baselines (dpi 40)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest

import cellmint as cm

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.testing.compare import compare_images

BASELINES = Path(__file__).parent / "_images"


@pytest.fixture(scope="module")
def annotated():
    adata = cm.datasets.synthetic(600, 120, n_cell_types=4, random_state=5, progress=False)
    model = cm.tl.train_annotator(adata, "cell_type", hidden=(32,), max_epochs=4, lr=1e-3, progress=False)
    cm.tl.annotate(adata, model, progress=False)
    adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(adata.n_obs, 2))
    return adata


@pytest.mark.parametrize("kind", ["violin", "hist", "reliability", "confusion", "embedding", "unknown"])
def test_every_kind_draws(annotated, kind):
    fig = cm.pl.confidence(annotated, kind=kind, truth_key="cell_type", return_fig=True)
    ax = fig.axes[0]
    assert ax.has_data()
    if kind == "reliability":
        assert ax.get_title().startswith("cell_type: ECE ")
        assert ax.get_title().endswith("(15 bins, 600 cells)")  # the bins of the model's ECE, and how many cells
    if kind == "confusion":
        assert [t.get_text() for t in ax.get_yticklabels()] == sorted(annotated.obs["cell_type"].astype(str).unique())
        boxes = [t.get_text().split("\n") for t in ax.texts]  # each box: the row's share, then its cells
        assert sum(int(n.replace(",", "")) for _, n in boxes) == annotated.n_obs
    if kind == "unknown":  # one point per cell, split by reason; the legend counts add up to every cell
        assert sum(len(c.get_offsets()) for c in ax.collections) == annotated.n_obs
        counts = [int(t.get_text().rsplit("(", 1)[1].rstrip(")").replace(",", "")) for t in ax.get_legend().get_texts()]
        assert sum(counts) == annotated.n_obs
        assert ax.get_title().startswith("cell_type: why cells are Unknown")
    plt.close(fig)


@pytest.mark.parametrize("kind", ["reliability", "confusion"])
def test_images_match_the_baselines(annotated, kind, tmp_path):
    fig = cm.pl.confidence(annotated, kind=kind, truth_key="cell_type", return_fig=True)
    actual = tmp_path / f"{kind}.png"
    fig.savefig(actual, dpi=40)
    plt.close(fig)
    expected = BASELINES / f"confidence_{kind}.png"
    if not expected.exists():  # pragma: no cover - writing a new baseline is a deliberate, reviewed step
        pytest.fail(f"no baseline {expected}; inspect {actual} and copy it there")
    assert compare_images(str(expected), str(actual), tol=15) is None


def test_axes_show_and_errors(annotated):
    _, ax = plt.subplots()
    assert cm.pl.confidence(annotated, ax=ax, show=False) is ax
    plt.close("all")
    with pytest.raises(ValueError, match="needs truth_key"):
        cm.pl.confidence(annotated, kind="reliability")
    with pytest.raises(ValueError, match="kind must be one of"):
        cm.pl.confidence(annotated, kind="pie")
    with pytest.raises(KeyError, match="run cm.tl.annotate"):
        cm.pl.confidence(annotated, key="other")
    with pytest.raises(KeyError, match="obsm has no 'X_tsne'"):
        cm.pl.confidence(annotated, kind="embedding", basis="tsne")


def test_an_annotation_from_before_levels_were_recorded_still_draws(annotated):
    """Files annotated by an older cellmint have no levels entry: its per-level Unknown counts name them."""
    old = annotated.copy()
    record = dict(old.uns["cellmint"]["annotation"])
    del record["levels"]
    old.uns["cellmint"] = {**old.uns["cellmint"], "annotation": record}
    fig = cm.pl.confidence(old, kind="violin", return_fig=True)
    assert fig.axes[0].has_data()
    plt.close(fig)
    del record["unknown"]
    with pytest.raises(KeyError, match="records no levels"):
        cm.pl.confidence(old, kind="violin")
