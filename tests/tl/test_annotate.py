"""cm.tl.annotate: gene alignment by name, chunked and backed queries, outputs, scanpy's copy habits."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellmint as cm

QUICK = {"hidden": (64,), "max_epochs": 6, "lr": 1e-3, "batch_size": 64, "progress": False}


@pytest.fixture(scope="module")
def trained():
    adata = cm.datasets.synthetic(1200, 150, n_cell_types=4, n_subtypes=2, random_state=3, progress=False)
    model = cm.tl.train_annotator(adata, ["cell_type", "cell_subtype"], **QUICK)
    query = cm.datasets.synthetic(300, 150, n_cell_types=4, n_subtypes=2, random_state=3, progress=False)
    return model, query


def test_writes_labels_confidence_margin_unknown_and_probabilities(trained):
    model, query = trained
    query = query.copy()
    assert cm.tl.annotate(query, model, progress=False) is None
    for level in ("cell_type", "cell_subtype"):
        labels = query.obs[f"cellmint_{level}"]
        assert list(labels.cat.categories) == [*model.classes[level], "Unknown"]
        proba = query.obsm[f"cellmint_{level}_proba"]
        assert list(proba.columns) == model.classes[level]
        np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
        assert query.obs[f"cellmint_{level}_confidence"].between(0, 1).all()
        assert (query.obs[f"cellmint_{level}_margin"] >= 0).all()
        assert query.obs[f"cellmint_{level}_unknown"].dtype == bool
    # cells called Unknown are where the errors are: the model's own label is right less often there
    unknown = query.obs["cellmint_cell_type_unknown"].to_numpy()
    raw = np.asarray(model.classes["cell_type"])[query.obsm["cellmint_cell_type_proba"].to_numpy().argmax(1)]
    correct = raw == query.obs["cell_type"].astype(str).to_numpy()
    assert 0 < unknown.sum() < len(unknown)
    assert correct[~unknown].mean() > max(0.7, correct[unknown].mean())
    # hierarchy: every fine label lies under the coarse label given to the same cell
    parents = model.hierarchy["cell_subtype"]["parents"]
    fine, coarse = query.obs["cellmint_cell_subtype"].astype(str), query.obs["cellmint_cell_type"].astype(str)
    assigned = fine != "Unknown"
    assert all(parents[f] == c for f, c in zip(fine[assigned], coarse[assigned], strict=True))
    assert query.uns["cellmint"]["annotation"]["overlap"]["fraction"] == 1.0


def test_gene_order_and_extra_genes_do_not_change_anything(trained):
    model, query = trained
    reference = cm.tl.annotate(query, model, return_table=True, progress=False)
    rng = np.random.default_rng(0)
    shuffled = query[:, rng.permutation(query.n_vars)].copy()
    extra = ad.AnnData(np.ones((query.n_obs, 5), dtype=np.float32), obs=query.obs[[]])
    extra.var_names = [f"unrelated{i}" for i in range(5)]
    wider = ad.concat([shuffled, extra], axis=1, merge="first")
    wider.obs = query.obs.copy()
    table = cm.tl.annotate(wider, model, return_table=True, progress=False)
    for level in ("cell_type", "cell_subtype"):
        assert (table[f"cellmint_{level}"] == reference[f"cellmint_{level}"]).all()
    # extra genes raise each cell's library size, so confidences move a little; labels do not
    assert np.abs(table["cellmint_cell_type_confidence"] - reference["cellmint_cell_type_confidence"]).max() < 0.2


def test_overlap_floor_and_warning(trained):
    model, query = trained
    none = query.copy()
    none.var_names = [f"other{i}" for i in range(none.n_vars)]
    with pytest.raises(ValueError, match="Only 0 of the model's 150 genes"):
        cm.tl.annotate(none, model, progress=False)
    partial = query[:, :90].copy()  # 60% of the genes
    with pytest.warns(UserWarning, match="Only 60% of the model's genes"):
        cm.tl.annotate(partial, model, progress=False)
    assert partial.uns["cellmint"]["annotation"]["overlap"]["n_found"] == 90


def test_backed_path_and_in_memory_agree(trained, tmp_path):
    model, query = trained
    path = tmp_path / "q.h5ad"
    query.write_h5ad(path)
    in_memory = cm.tl.annotate(query, model, return_table=True, progress=False)
    backed = ad.read_h5ad(path, backed="r")
    from_backed = cm.tl.annotate(backed, model, return_table=True, chunk_size=70, progress=False)
    from_path = cm.tl.annotate(path, model, progress=False)
    backed.file.close()
    # the file's cell names come back in pandas 3's string dtype (anndata >= 0.13): the same names
    pd.testing.assert_frame_equal(from_backed, in_memory, check_index_type=False)
    pd.testing.assert_frame_equal(from_path, in_memory, check_index_type=False)


@pytest.mark.parametrize("knn", ["low_confidence", "all"])
def test_search_batches_spanning_chunks_change_nothing(trained, monkeypatch, knn):
    """Latents are gathered over chunks and searched SEARCH_BATCH at a time: any split gives the same calls."""
    from cellmint.tl import _annotate

    model, query = trained
    whole = cm.tl.annotate(query, model, knn=knn, return_table=True, progress=False)
    monkeypatch.setattr(_annotate, "SEARCH_BATCH", 50)  # batches of 66 cells over chunks of 33
    split = cm.tl.annotate(query, model, knn=knn, chunk_size=33, return_table=True, progress=False)
    assert whole["cellmint_distance"].gt(0).all()  # every cell was searched
    pd.testing.assert_frame_equal(split, whole, check_exact=False, rtol=1e-5)


def test_copy_and_return_table_follow_scanpy(trained, tmp_path):
    model, query = trained
    original = query.copy()
    annotated = cm.tl.annotate(original, model, copy=True, progress=False)
    assert "cellmint_cell_type" in annotated.obs
    assert "cellmint_cell_type" not in original.obs  # copy=True leaves the input alone
    table = cm.tl.annotate(original, model, return_table=True, progress=False)
    assert "cellmint_cell_type" not in original.obs
    pd.testing.assert_series_equal(table["cellmint_cell_type"], annotated.obs["cellmint_cell_type"])
    model.save(tmp_path / "m")
    from_folder = cm.tl.annotate(original, tmp_path / "m", return_table=True, progress=False)
    pd.testing.assert_frame_equal(from_folder, table)
    with pytest.raises(ValueError, match="knn must be"):
        cm.tl.annotate(original, model, knn="sometimes")


def test_a_reference_class_called_unknown_needs_another_unknown_label(trained):
    model, query = trained
    classes = dict(model.classes)
    model.classes = {**classes, "cell_type": ["Unknown", *classes["cell_type"][1:]]}  # e.g. CBMC's unassigned cells
    try:
        with pytest.raises(ValueError, match="has a class named 'Unknown'"):
            cm.tl.annotate(query, model, progress=False)
        table = cm.tl.annotate(query, model, unknown_label="unassigned", return_table=True, progress=False)
        assert "unassigned" in table["cellmint_cell_type"].cat.categories
    finally:
        model.classes = classes


def test_soft_majority_vote_over_clusters(trained):
    model, query = trained
    query = query.copy()
    query.obs["cluster"] = query.obs["cell_type"].astype(str)  # a clustering that found the types
    cm.tl.annotate(query, model, cluster_key="cluster", progress=False)
    majority = query.obs["cellmint_cell_type_majority"]
    assert (majority.groupby(query.obs["cluster"], observed=True).nunique() == 1).all()  # one label per cluster
    proba = query.obsm["cellmint_cell_type_proba"]
    for cells in query.obs.groupby("cluster", observed=True).groups.values():
        assert majority[cells[0]] == proba.loc[cells].sum().idxmax()
    with pytest.raises(KeyError, match="no cluster column 'leiden'"):
        cm.tl.annotate(query, model, cluster_key="leiden")


def test_a_cell_line_missing_from_the_reference_is_unknown_across_technologies():
    # real data, bundled: train on CEL-seq2 without H2228, annotate the Drop-seq cells (another technology)
    cells = cm.datasets.cellbench()
    reference = cells[(cells.obs["technology"] == "CEL-seq2") & (cells.obs["cell_line"] != "H2228")].copy()
    query = cells[cells.obs["technology"] == "Drop-seq"].copy()
    model = cm.tl.train_annotator(reference, "cell_line", hidden=(64,), max_epochs=10, lr=1e-3, batch_size=64,
                                  progress=False)  # fmt: skip
    open_set = model.manifest["open_set"]
    assert open_set["rule"] == "neighbourhood"
    assert len(open_set["scale"]) == 4  # one scale per class of the reference
    assert 1 < open_set["floor"] < 10
    novel = (query.obs["cell_line"] == "H2228").to_numpy()
    annotated = query.copy()
    cm.tl.annotate(annotated, model, progress=False)
    table = annotated.obs
    far = table["cellmint_distance"].to_numpy() > annotated.uns["cellmint"]["annotation"]["max_distance"]
    unknown = table["cellmint_cell_line_unknown"].to_numpy()
    assert far[novel].mean() > 0.8  # the new type: far from every reference cell
    assert unknown[novel].mean() > 0.8
    assert unknown[~novel].mean() < 0.15  # known lines from another technology mostly keep their label
    # the query lacking 10% of the model's genes (treated as not detected) changes little
    kept = np.sort(np.random.default_rng(0).permutation(query.n_vars)[: int(0.9 * query.n_vars)])
    fewer = cm.tl.annotate(query[:, kept].copy(), model, return_table=True, progress=False)
    assert fewer["cellmint_cell_line_unknown"].to_numpy()[~novel].mean() < 0.15


def test_model_folders_with_an_absolute_open_set_threshold_still_annotate(trained):
    model, query = trained
    saved = model.manifest["open_set"]
    try:  # before relative distances, the manifest held only an absolute threshold on the latent distance
        model.manifest["open_set"] = {"metric": "euclidean", "quantile": 0.99, "threshold": 1e9}
        table = cm.tl.annotate(query, model, return_table=True, progress=False)
        assert not (table["cellmint_distance"] > 1e9).any()
        nearest = cm.tl.annotate(query, model, max_distance=0.0, return_table=True, progress=False)
        assert nearest["cellmint_cell_type_unknown"].all()  # every cell is farther than 0 from the reference
        np.testing.assert_allclose(table["cellmint_distance"], nearest["cellmint_distance"])
    finally:
        model.manifest["open_set"] = saved


def test_forward_returns_arrays_that_own_their_memory(trained):
    """Views of torch tensors kept across chunks pinned each chunk's freed memory (8.6 GB for 1M backed cells)."""
    model, query = trained
    latent, proba, _ = model.forward(query.X[:20].toarray(), device="cpu")
    for values in (latent, *proba.values()):
        assert values.flags.owndata


def test_a_model_without_a_reference_makes_no_open_set_call_and_no_refinement(trained):
    model, query = trained
    query = query.copy()
    reference, model.reference = model.reference, None
    try:
        cm.tl.annotate(query, model, knn="all", progress=False)
    finally:
        model.reference = reference
    assert (query.obs["cellmint_distance"] == 0).all()
    annotation = query.uns["cellmint"]["annotation"]
    assert annotation["refined"] == {"cell_type": 0, "cell_subtype": 0}
    assert annotation["max_distance"] == np.inf
    # Unknown comes from confidence and margin alone: the same cells as a call with the distance rule off
    expected = cm.tl.annotate(query, model, max_distance=np.inf, knn="off", return_table=True, progress=False)
    for level in ("cell_type", "cell_subtype"):
        assert (query.obs[f"cellmint_{level}_unknown"] == expected[f"cellmint_{level}_unknown"]).all()


def test_the_gpu_reading_sparse_chunks_densified_on_the_device_gives_the_same_calls(trained, monkeypatch):
    """Off the CPU the reader yields CSR chunks over the panel and the device densifies them: run that path here."""
    from cellmint.models import _annotator
    from cellmint.tl import _annotation_query

    model, query = trained
    host = cm.tl.annotate(query, model, return_table=True, progress=False)
    monkeypatch.setattr(_annotator, "HOST_DENSIFIED", ())
    sent = []
    chunks = _annotation_query.QueryRows.chunks

    def recorded(self, *args, **kwargs):
        for chunk in chunks(self, *args, **kwargs):
            sent.append(chunk[2])
            yield chunk

    monkeypatch.setattr(_annotation_query.QueryRows, "chunks", recorded)
    device = cm.tl.annotate(query, model, return_table=True, chunk_size=70, progress=False)
    assert sent
    assert all(sp.issparse(values) for values in sent)
    pd.testing.assert_frame_equal(device, host, check_exact=False, rtol=1e-5)
