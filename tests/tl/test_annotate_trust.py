"""Annotation a biologist can trust on another lab's data: any real log scale, checked values, Unknown that
survives a technology shift, prediction sets with their coverage."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import cellmint as cm

SMALL = {"hidden": (64,), "max_epochs": 8, "lr": 1e-3, "batch_size": 64, "progress": False}


def _scaled(adata, transform):
    out = adata.copy()
    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    proportions = counts.multiply(1 / np.asarray(counts.sum(axis=1))).tocsr()
    out.X = sp.csr_matrix(transform(proportions), dtype=np.float32)
    return out


SCALES = {
    "log1p CP10k": lambda p: p.multiply(1e4).log1p(),
    "log2(CPM + 1)": lambda p: (p.multiply(1e6)).log1p() / np.log(2),
    "CP10k": lambda p: p.multiply(1e4),
    "log10(x + 1) of the median library": lambda p: (p.multiply(3e4)).log1p() / np.log(10),
}


@pytest.fixture(scope="module")
def cellbench():
    """Bundled real data: CEL-seq2 reference, Drop-seq query (another technology), counts."""
    cells = cm.datasets.cellbench()
    reference = cells[cells.obs["technology"] == "CEL-seq2"].copy()
    query = cells[cells.obs["technology"] == "Drop-seq"].copy()
    return reference, query


@pytest.fixture(scope="module")
def default_model(cellbench):
    """The defaults, as a user would train them (what the trust figures are about)."""
    reference, _ = cellbench
    return cm.tl.train_annotator(reference, "cell_line", random_state=0, progress=False)


@pytest.fixture(scope="module")
def small_model(cellbench):
    reference, _ = cellbench
    return cm.tl.train_annotator(reference, "cell_line", **SMALL)


@pytest.mark.parametrize("scale", list(SCALES))
def test_log_normalised_queries_get_the_labels_of_their_counts(cellbench, small_model, scale):
    _, query = cellbench
    counts = cm.tl.annotate(query, small_model, return_table=True, progress=False)
    logged = _scaled(query, SCALES[scale])
    cm.tl.annotate(logged, small_model, progress=False)
    assert (logged.obs["cellmint_cell_line"] == counts["cellmint_cell_line"]).all()
    np.testing.assert_allclose(logged.obs["cellmint_cell_line_confidence"], counts["cellmint_cell_line_confidence"],
                               atol=1e-4)  # fmt: skip
    detected = logged.uns["cellmint"]["annotation"]["input"]
    assert detected["kind"] == "log"
    assert detected["base"] == {"log1p CP10k": "e", "log2(CPM + 1)": "2", "CP10k": "none"}.get(scale, "10")


def test_a_reference_stored_as_log_values_trains_the_model_its_counts_train(cellbench, small_model):
    reference, _ = cellbench
    logged = _scaled(reference, SCALES["log2(CPM + 1)"])
    model = cm.tl.train_annotator(logged, "cell_line", **SMALL)
    assert model.recipe.kind == "counts"  # the counts came back: count-space augmentation applies
    assert model.manifest["data"]["input"]["description"] == "log2(x + 1) of counts scaled per cell"
    for name, weights in small_model.net.state_dict().items():
        np.testing.assert_array_equal(weights.numpy(), model.net.state_dict()[name].numpy(), err_msg=name)


def test_a_declared_input_is_verified_not_trusted(cellbench):
    reference, _ = cellbench
    logged = _scaled(reference, SCALES["log1p CP10k"])
    with pytest.raises(ValueError, match=r"input='counts', but adata.X holds log1p \(natural log\) of counts"):
        cm.tl.train_annotator(logged, "cell_line", input="counts", **SMALL)
    with pytest.raises(ValueError, match="input='lognorm', but adata.X holds raw counts"):
        cm.tl.train_annotator(reference, "cell_line", input="lognorm", **SMALL)


def test_every_training_cell_is_checked_not_a_sample(cellbench):
    reference, _ = cellbench
    bad = reference.copy()
    bad.X = sp.csr_matrix(bad.X, dtype=np.float32)
    last = bad.n_obs - 1
    bad.X.data[bad.X.indptr[last]] = np.nan
    with pytest.raises(ValueError, match=rf"NaN or infinite values \(nan in cell '{bad.obs_names[last]}'"):
        cm.tl.train_annotator(bad, "cell_line", **SMALL)


def test_bad_query_values_are_refused_naming_the_problem_and_the_cell(cellbench, small_model):
    _, query = cellbench
    query = query.copy()
    query.X = sp.csr_matrix(query.X, dtype=np.float32)
    nan = query.copy()
    nan.X.data[nan.X.indptr[5]] = np.nan
    with pytest.raises(ValueError, match=rf"The query's X contains NaN .* in cell '{query.obs_names[5]}' \(row 5\)"):
        cm.tl.annotate(nan, small_model, progress=False)
    inf = query.copy()
    inf.X.data[inf.X.indptr[-2]] = np.inf  # in the last cell: every chunk is checked, not a sample
    with pytest.raises(ValueError, match=rf"NaN or infinite values \(inf in cell '{query.obs_names[-1]}'"):
        cm.tl.annotate(inf, small_model, chunk_size=50, progress=False)
    zscored = query.copy()
    zscored.X = (np.log1p(query.X.toarray()) - 1.0).astype(np.float32)
    with pytest.raises(ValueError, match=r"negative values .* look z-scored \(sc\.pp\.scale\)"):
        cm.tl.annotate(zscored, small_model, progress=False)
    mixed = query.copy()
    mixed.X.data[mixed.X.indptr[150] + 2] = 2.5  # a non-integer in cell 150 of a counts matrix
    with pytest.raises(ValueError, match=r"taken for raw counts, but has a non-integer value \(2\.5 in cell"):
        cm.tl.annotate(mixed, small_model, chunk_size=64, progress=False)
    residuals = query.copy()
    residuals.X = sp.csr_matrix(np.abs(np.random.default_rng(0).normal(size=query.shape)).astype(np.float32))
    with pytest.raises(ValueError, match="the model was trained on counts and needs raw counts or log-normalised"):
        cm.tl.annotate(residuals, small_model, progress=False)
    as_is = cm.tl.train_annotator(residuals, "cell_line", **SMALL)  # values of an unrecognised scale: as they are
    assert as_is.recipe.kind == "lognorm"
    with pytest.raises(ValueError, match="holds raw counts, but the model was trained on log-normalised values"):
        cm.tl.annotate(query, as_is, progress=False)
    with pytest.raises(KeyError, match="gene_key='symbol' is not a column of the query's var"):
        cm.tl.annotate(query, small_model, gene_key="symbol", progress=False)


def test_known_types_from_another_technology_are_not_called_unknown(cellbench, default_model):
    """The default rule: Drop-seq cells of lines the CEL-seq2 reference has keep their (right) labels."""
    _, query = cellbench
    table = cm.tl.annotate(query, default_model, return_table=True, progress=False)
    unknown = table["cellmint_cell_line_unknown"].to_numpy()
    assert unknown.mean() <= 0.03
    labelled = ~unknown
    assert (table["cellmint_cell_line"][labelled].astype(str) == query.obs["cell_line"][labelled].astype(str)).all()


@pytest.fixture(scope="module")
def without_h2228(cellbench):
    reference, _ = cellbench
    without = reference[reference.obs["cell_line"] != "H2228"].copy()
    return cm.tl.train_annotator(without, "cell_line", random_state=0, progress=False)


@pytest.mark.parametrize("axes_cells", [None, 64])  # 64: the axes from a sample, every cell placed in a second read
def test_a_cell_line_the_reference_lacks_is_unknown_by_distance(cellbench, without_h2228, axes_cells, monkeypatch):
    from cellmint.models import _open_set

    if axes_cells is not None:
        monkeypatch.setattr(_open_set, "AXES_CELLS", axes_cells)
    _, query = cellbench
    model = without_h2228
    query = query.copy()
    cm.tl.annotate(query, model, progress=False)
    novel = (query.obs["cell_line"] == "H2228").to_numpy()
    reason = query.obs["cellmint_cell_line_unknown_reason"].astype(str).to_numpy()
    assert (reason[novel] != "").mean() >= 0.6
    assert (reason[novel] == "distance").mean() >= 0.5
    assert (reason[~novel] != "").mean() <= 0.05
    counted = query.uns["cellmint"]["annotation"]["unknown_reasons"]["cell_line"]
    assert counted["distance"] == (reason == "distance").sum()
    assert sum(counted.values()) == query.uns["cellmint"]["annotation"]["unknown"]["cell_line"]
    open_set = query.uns["cellmint"]["annotation"]["open_set"]
    assert open_set["rule"] == "neighbourhood"
    assert open_set["threshold"] >= open_set["floor"]
    # the empty prediction set is the same signal, without the model's distances
    assert (query.obs["cellmint_cell_line_set_size"][novel] == 0).mean() >= 0.6


def test_prediction_sets_follow_alpha_and_the_class_conditional_mode(cellbench, small_model):
    _, query = cellbench
    sizes = {}
    for alpha in (0.02, 0.1, 0.3):
        table = cm.tl.annotate(query, small_model, alpha=alpha, return_table=True, progress=False)
        sizes[alpha] = table["cellmint_cell_line_set_size"].mean()
        members = table["cellmint_cell_line_set"].astype(str).str.split("|")
        assert (members.map(lambda m: len([c for c in m if c])) == table["cellmint_cell_line_set_size"]).all()
    assert sizes[0.02] >= sizes[0.1] >= sizes[0.3]
    per_class = cm.tl.annotate(query, small_model, class_conditional=True, return_table=True, progress=False)
    assert "cellmint_cell_line_set" in per_class
    none = cm.tl.annotate(query, small_model, alpha=None, return_table=True, progress=False)
    assert "cellmint_cell_line_set" not in none
    with pytest.raises(ValueError, match="alpha must be between 0 and 1"):
        cm.tl.annotate(query, small_model, alpha=1.5, progress=False)


@pytest.mark.realdata
def test_set_coverage_on_held_out_cells_is_what_alpha_promises(shared_data):
    cells = ad.read_h5ad(shared_data / "cbmc_citeseq_8617.h5ad")
    cells.obs["cell_type"] = cells.obs["cell_type"].astype(str)
    model = cm.tl.train_annotator(cells, "cell_type", **SMALL)  # a random 80/10/10 split (obs["cellmint_split"])
    recorded = model.manifest["conformal"]["cell_type"]
    assert recorded["evaluated_on"] == "test"
    assert recorded["marginal"]["n_cells"] > 700
    assert abs(recorded["marginal"]["coverage"] - 0.9) <= 0.03
    assert recorded["class"]["coverage"] >= 0.87
    test = cells[cells.obs["cellmint_split"] == "test"].copy()
    cm.tl.annotate(test, model, unknown_label="Unassigned", progress=False)
    members = test.obs["cellmint_cell_type_set"].astype(str).str.split("|")
    covered = np.mean([t in m for t, m in zip(test.obs["cell_type"], members, strict=True)])
    assert covered == pytest.approx(recorded["marginal"]["coverage"], abs=1e-9)


def test_a_cross_study_query_has_its_new_type_called_unknown_and_its_known_types_kept(shared_data):
    """pbmc3k (another study) on the 800 FACS-sorted PBMC (B, CD4 T, CD8 T cells): monocytes new, half of it T cells."""
    import scanpy as sc

    reference = ad.read_h5ad(shared_data / "pbmc_facs_sorted_800.h5ad")
    reference.obs["part"] = "train"  # 10% of the cells validate, as in benchmarks/open_set_rules.py
    model = cm.tl.train_annotator(reference, "FACS_type", split="part", random_state=0, progress=False)
    query = ad.read_h5ad(shared_data / "pbmc3k_raw.h5ad")
    query.var_names_make_unique()
    markers = sc.pp.log1p(sc.pp.normalize_total(query, target_sum=1e4, copy=True), copy=True)

    def gene(name):
        return np.asarray(markers[:, name].X.toarray()).ravel()

    monocytes = (gene("LYZ") > 3) & ((gene("CD14") > 0) | (gene("FCGR3A") > 0))
    t_and_b = ((gene("CD3E") > 0) | (gene("MS4A1") > 0)) & (gene("LYZ") < 2)
    cm.tl.annotate(query, model, progress=False)
    unknown = query.obs["cellmint_FACS_type_unknown"].to_numpy()
    assert unknown[monocytes].mean() >= 0.6
    assert unknown[t_and_b].mean() <= 0.03
    # the query's T cells sit far from the reference as new T cells always do, so its shift is measured without them
    open_set = query.uns["cellmint"]["annotation"]["open_set"]
    assert open_set["shift"] < 1.5
