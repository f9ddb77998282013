"""The nearest-reference search behind cm.tl.annotate: exact below EXACT_SEARCH, inverted lists above."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

import cellmint as cm
from cellmint.models import _knn
from cellmint.models._knn import NearestReference


def _clustered(n: int, dim: int, n_clusters: int, seed: int) -> np.ndarray:
    """Gaussian clusters of unequal spread, non-negative like a ReLU latent (``seed`` also picks the centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_clusters, dim))
    which = rng.integers(n_clusters, size=n)
    spread = rng.uniform(0.5, 1.5, n_clusters)[which, None]
    return np.maximum(centres[which] + rng.normal(0, 1, (n, dim)) * spread, 0).astype(np.float32)


def _brute(queries: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    squared = ((queries[:, None, :].astype(np.float64) - reference[None]) ** 2).sum(-1)
    order = np.argsort(squared, axis=1, kind="stable")[:, :k]
    return order, np.sqrt(np.take_along_axis(squared, order, axis=1))


def test_small_references_are_searched_exactly():
    reference, queries = _clustered(3000, 16, 8, 0), _clustered(400, 16, 8, 1)
    search = NearestReference(reference)
    assert search.exact
    indices, distances = search.query(queries, 10)
    expected_indices, expected_distances = _brute(queries, reference, 10)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-4, atol=1e-4)
    assert (indices == expected_indices).mean() > 0.999  # ties in float32 aside
    assert search.query(queries, k=1)[0].shape == (400, 1)


@pytest.mark.parametrize("dim", [32, 48])  # the numba pass (up to LOW_DIMENSIONS) and torch's products
def test_inverted_lists_find_the_true_neighbours_of_almost_every_cell(dim):
    assert (dim <= _knn.LOW_DIMENSIONS) == (dim == 32)
    cells = _clustered(13_000, dim, 20, 2)
    reference, queries = cells[:12_000], cells[12_000:]
    search = NearestReference(reference)
    assert not search.exact
    assert (search.n_probe, len(search.sizes)) == (9, 110)  # ceil(8% of round(sqrt(12,000))) lists
    indices, distances = search.query(queries, 15)
    expected_indices, expected_distances = _brute(queries, reference, 15)
    assert (indices[:, 0] == expected_indices[:, 0]).mean() >= 0.98
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(indices, expected_indices, strict=True)])
    assert recall >= 0.97
    # the distances are those of the cells returned, sorted, and never below the true ones
    true = np.sqrt(((queries[:, None, :] - reference[indices]) ** 2).sum(-1))
    np.testing.assert_allclose(distances, true, rtol=1e-4, atol=1e-3)
    assert (np.diff(distances, axis=1) >= 0).all()
    assert (distances >= expected_distances - 1e-3).all()
    # cells unlike the reference (other cluster centres): fewer exact hits, but a distance is only
    # ever overstated, so a far cell is never called near
    far = _clustered(500, dim, 20, 3)
    found, far_distances = search.query(far, k=1)
    nearest, exact = _brute(far, reference, 1)
    assert (found == nearest).mean() > 0.8
    assert (far_distances >= exact - 1e-3).all()
    # built the same way every time
    again = NearestReference(reference).query(queries, 15)
    np.testing.assert_array_equal(again[0], indices)


@pytest.mark.parametrize("many", ["beyond any probed lists", "beyond most cells' probed lists"])
def test_more_neighbours_than_the_probed_lists_hold_fall_back_to_an_exact_search(many):
    reference, queries = _clustered(12_000, 8, 200, 4), _clustered(50, 8, 200, 5)
    search = NearestReference(reference)
    # 9 probed lists of ~110 cells: 5,000 is more than any 9 lists hold; 9 × the largest list is
    # more than most cells' 9 lists hold, but fits the table of candidates
    k = 5000 if many == "beyond any probed lists" else search.n_probe * max(search.sizes)
    _, distances = search.query(queries, k)
    assert np.isfinite(distances).all()
    _, expected_distances = _brute(queries, reference, k)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dim", [16, 30])  # 30: the open-set's expression axes, padded with zeros to 32
def test_low_dimensional_search_compares_the_same_cells_as_the_products(monkeypatch, dim):
    reference, queries = _clustered(12_000, dim, 20, 15), _clustered(2000, dim, 20, 16)
    search = NearestReference(reference)
    assert not search.exact
    fast = search.query(queries, 11)
    monkeypatch.setattr(_knn, "LOW_DIMENSIONS", 0)  # the same search through torch's products and top-k
    slow = search.query(queries, 11)
    assert (fast[0] == slow[0]).mean() > 0.999  # float32 ties aside
    np.testing.assert_allclose(fast[1], slow[1], rtol=1e-4, atol=1e-3)
    assert (np.diff(fast[1], axis=1) >= 0).all()
    # the distances are those of the cells returned
    true = np.sqrt(((queries[:, None, :].astype(np.float64) - reference[fast[0]]) ** 2).sum(-1))
    np.testing.assert_allclose(fast[1], true, rtol=1e-5, atol=1e-4)


def test_low_dimensional_search_falls_back_to_every_cell_where_the_probed_lists_are_short():
    reference, queries = _clustered(12_000, 8, 200, 4), _clustered(300, 8, 200, 5)
    search = NearestReference(reference)
    search.n_probe = 1  # one list of about 110 cells per query: shorter than 64 for some
    assert min(search.sizes) < 64
    _, distances = search.query(queries, 64)
    _, expected_distances = _brute(queries, reference, 64)
    probed = ((queries[:, None, :] - search.centroids.numpy()[None]) ** 2).sum(-1).argmin(1)
    short = np.asarray(search.sizes)[probed] < 64
    assert 0 < short.sum() < len(queries)
    np.testing.assert_allclose(distances[short], expected_distances[short], rtol=1e-4, atol=1e-3)
    assert (distances >= expected_distances - 1e-3).all()  # the others: their one list's 64 nearest


def test_empty_query_gives_empty_results():
    search = NearestReference(_clustered(12_000, 8, 10, 6))
    indices, distances = search.query(np.zeros((0, 8), np.float32), 15)
    assert indices.shape == distances.shape == (0, 15)


def test_annotate_through_inverted_lists_agrees_with_the_exact_search(monkeypatch):
    # a query of new cells from the reference's own expression model (another seed would be another model,
    # unlike every reference cell: its labels would say nothing about the search)
    cells = cm.datasets.synthetic(3300, 400, n_cell_types=5, random_state=7, progress=False)
    model = cm.tl.train_annotator(cells[:2500].copy(), "cell_type", hidden=(32,), max_epochs=8, lr=1e-3,
                                  batch_size=128, progress=False)  # fmt: skip
    query = cells[2500:].copy()
    exact = cm.tl.annotate(query, model, knn="all", return_table=True, progress=False)
    assert _knn.reference_search(model, "cpu").exact
    monkeypatch.setattr(_knn, "EXACT_SEARCH", 100)  # the model keeps ~2,000 reference cells
    monkeypatch.setattr(_knn, "_BUILT", weakref.WeakKeyDictionary())  # forget the exact search built above
    listed = cm.tl.annotate(query, model, knn="all", return_table=True, progress=False)
    assert not _knn.reference_search(model, "cpu").exact
    # every cell's label is its 15 neighbours' vote here (knn="all"): cells whose vote is split can flip
    assert (listed["cellmint_cell_type"] == exact["cellmint_cell_type"]).mean() >= 0.97
    own = listed["cellmint_cell_distance"] / exact["cellmint_cell_distance"]
    assert np.median(np.abs(own - 1)) < 1e-4
    assert np.quantile(np.abs(own - 1), 0.99) < 0.2
    # the open-set score also finds the cell's neighbours among the query's cells through the lists, in the
    # query's 30-dimensional expression: they find 75% of the exact neighbours of these structureless
    # synthetic types (any cell of the type is as near), and the neighbourhood medians stay within a few %
    ratio = listed["cellmint_distance"] / exact["cellmint_distance"]
    assert np.median(np.abs(ratio - 1)) < 0.03
    assert np.quantile(np.abs(ratio - 1), 0.99) < 0.25


@pytest.mark.parametrize("n_neighbors", [1, 15])
def test_neighbour_count_is_capped_by_the_reference(n_neighbors):
    search = NearestReference(_clustered(5, 4, 2, 9))
    assert search.query(_clustered(3, 4, 2, 10), n_neighbors)[0].shape == (3, min(n_neighbors, 5))


def test_a_model_object_builds_its_search_once_per_device_and_reference():
    adata = cm.datasets.synthetic(600, 60, n_cell_types=3, random_state=11, progress=False)
    model = cm.tl.train_annotator(adata, "cell_type", hidden=(16,), max_epochs=1, batch_size=128, progress=False)
    first = _knn.reference_search(model, "cpu")
    assert _knn.reference_search(model, "cpu") is first
    model.reference = {**model.reference, "latent": model.reference["latent"][:100].copy()}
    rebuilt = _knn.reference_search(model, "cpu")
    assert rebuilt is not first
    assert rebuilt.n_reference == 100


def test_exact_is_forced_for_training_calibration_above_the_inverted_list_size():
    reference, queries = _clustered(12_000, 8, 20, 12), _clustered(300, 8, 20, 13)
    search = NearestReference(reference, exact=True)
    assert search.exact
    indices, distances = search.query(queries, 3)
    expected_indices, expected_distances = _brute(queries, reference, 3)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-4, atol=1e-3)
    assert (indices[:, 0] == expected_indices[:, 0]).mean() > 0.999


def test_training_nearest_other_cell_skips_the_cell_itself():
    import torch

    from cellmint.tl._annotation_evaluation import nearest as _nearest

    reference = _clustered(500, 6, 5, 14)
    reference[1] = reference[0]  # a duplicated cell: its nearest other cell is at distance 0
    rows = np.array([0, 1, 7, 42])
    distance, index = _nearest(torch.as_tensor(reference[rows]), torch.as_tensor(reference), exclude=rows)
    squared = ((reference[rows, None, :] - reference[None]) ** 2).sum(-1)
    squared[np.arange(len(rows)), rows] = np.inf
    assert (index != rows).all()
    np.testing.assert_allclose(distance, np.sqrt(squared.min(1)), atol=1e-3)
    np.testing.assert_allclose(distance[:2], 0, atol=1e-2)  # float32 products of equal vectors: not always 0
