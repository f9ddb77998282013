"""cellmint.datasets.synthetic: seeded negative-binomial counts, in memory or streamed to .h5ad."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellmint.datasets._synthetic_model as synthetic_module
from cellmint.datasets._synthetic import synthetic


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return synthetic(3000, 1000, n_perturbations=3, random_state=0, progress=False)


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def _assert_same_matrix(A: sp.spmatrix, B: sp.spmatrix) -> None:
    assert A.shape == B.shape
    assert A.dtype == B.dtype == np.float32
    assert (A != B).nnz == 0


# ----------------------------------------------------------------------------------------------
# structure


def test_matrix_is_csr_float32_integer_counts(adata):
    X = adata.X
    assert adata.shape == (3000, 1000)
    assert isinstance(X, sp.csr_matrix)
    assert X.dtype == np.float32
    assert X.has_canonical_format  # sorted gene indices, no duplicate entries
    assert np.all(X.data > 0)
    np.testing.assert_array_equal(X.data, np.round(X.data))
    # realistic sparsity: most genes are not seen in a given cell, every cell has counts
    density = X.nnz / np.prod(X.shape)
    assert 0.05 < density < 0.6
    assert np.diff(X.indptr).min() > 0


def test_library_size_near_requested_mean():
    a = synthetic(2000, 500, mean_library_size=800, random_state=4, progress=False)
    totals = np.asarray(a.X.sum(axis=1)).ravel()
    assert 0.8 * 800 < totals.mean() < 1.25 * 800
    assert totals.std() / totals.mean() > 0.2  # library sizes vary between cells


def test_obs_var_uns(adata):
    obs, var, uns = adata.obs, adata.var, adata.uns["synthetic"]
    assert list(obs.columns) == ["cell_type", "cell_subtype", "donor", "batch", "perturbation"]
    for col in obs.columns:
        assert isinstance(obs[col].dtype, pd.CategoricalDtype), col
    assert list(obs["cell_type"].cat.categories) == [f"type_{t}" for t in range(5)]
    assert len(obs["cell_subtype"].cat.categories) == 15
    assert list(obs["donor"].cat.categories) == [f"donor_{d}" for d in range(4)]
    assert list(obs["batch"].cat.categories) == ["batch_0", "batch_1"]
    assert list(obs["perturbation"].cat.categories) == ["control", "pert_0", "pert_1", "pert_2"]
    assert (adata.obs_names[0], adata.obs_names[-1]) == ("cell_0000", "cell_2999")
    assert (adata.var_names[0], adata.var_names[-1]) == ("gene_00000", "gene_00999")
    assert adata.obs_names.is_unique
    assert adata.var_names.is_unique

    programs = set(var["program"].cat.categories)
    assert {"none", "housekeeping", "type_0", "type_4", "type_0.sub_0", "type_4.sub_2"} <= programs
    in_program = ~var["program"].isin(["none", "housekeeping"])
    assert (var.loc[in_program, "program_log2fc"] >= 1.0).all()
    assert (var.loc[~in_program, "program_log2fc"] == 0).all()

    for key in (
        "n_obs",
        "n_vars",
        "n_cell_types",
        "n_subtypes",
        "n_donors",
        "n_batches",
        "n_perturbations",
        "perturbation_effect",
        "mean_library_size",
        "dispersion",
        "donor_effect",
        "batch_effect",
        "random_state",
        "model_version",
        "block_size",
    ):
        assert key in uns, key
    assert (uns["n_obs"], uns["random_state"], uns["dispersion"]) == (3000, 0, 0.5)
    assert set(uns["perturbation_genes"]) == {"pert_0", "pert_1", "pert_2"}
    assert all(
        len(uns["perturbation_genes"][p]) == len(uns["perturbation_log2fc"][p]) >= 5 for p in uns["perturbation_genes"]
    )


def test_hierarchy_every_subtype_in_one_cell_type(adata):
    pairs = adata.obs[["cell_subtype", "cell_type"]].drop_duplicates()
    assert pairs["cell_subtype"].is_unique  # one cell type per subtype
    for sub, typ in pairs.itertuples(index=False):
        assert sub.split(".")[0] == typ
    assert adata.obs["cell_subtype"].nunique() == 15  # all subtypes present at this size


def test_donors_nested_in_batches(adata):
    pairs = adata.obs[["donor", "batch"]].drop_duplicates()
    assert pairs["donor"].is_unique
    for donor, batch in pairs.itertuples(index=False):
        assert int(batch.split("_")[1]) == int(donor.split("_")[1]) % 2


def test_perturbation_column_absent_without_perturbations():
    a = synthetic(300, 200, progress=False)
    assert "perturbation" not in a.obs.columns
    assert "perturbation_genes" not in a.uns["synthetic"]
    assert a.uns["synthetic"]["n_perturbations"] == 0


def test_roughly_half_of_cells_are_controls(adata):
    frac = (adata.obs["perturbation"] == "control").mean()
    assert 0.45 < frac < 0.55


@pytest.mark.parametrize(("n_obs", "n_vars", "n_cell_types"), [(1, 1, 1), (7, 3, 4), (40, 12, 6)])
def test_tiny_shapes(n_obs, n_vars, n_cell_types):
    a = synthetic(n_obs, n_vars, n_cell_types=n_cell_types, n_subtypes=2, n_perturbations=1, progress=False)
    assert a.shape == (n_obs, n_vars)
    assert a.X.dtype == np.float32
    assert a.obs["cell_subtype"].cat.categories.size == 2 * n_cell_types


# ----------------------------------------------------------------------------------------------
# seeds and reproducibility


def test_same_seed_same_data_and_other_seed_differs(adata):
    again = synthetic(3000, 1000, n_perturbations=3, random_state=0, progress=False)
    _assert_same_matrix(adata.X, again.X)
    pd.testing.assert_frame_equal(adata.obs, again.obs)
    pd.testing.assert_frame_equal(adata.var, again.var)
    other = synthetic(3000, 1000, n_perturbations=3, random_state=1, progress=False)
    assert (adata.X != other.X).nnz > 0
    assert not adata.obs["cell_subtype"].equals(other.obs["cell_subtype"])


def test_threads_do_not_change_the_counts():
    one = synthetic(2500, 400, n_jobs=1, random_state=5, progress=False)
    two = synthetic(2500, 400, n_jobs=2, random_state=5, progress=False)
    _assert_same_matrix(one.X, two.X)


def test_global_numpy_rng_untouched():
    np.random.seed(123)  # noqa: NPY002 - the legacy global generator is what must stay untouched
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    synthetic(200, 100, progress=False)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # noqa: NPY002


# ----------------------------------------------------------------------------------------------
# streaming to .h5ad


def _object_names(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its index and categories as object: anndata >= 0.13 with pandas 3 reads names back in
    pandas' string dtype, the same names."""
    frame = frame.copy()
    frame.index = frame.index.astype(object)
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.CategoricalDtype):
            frame[column] = frame[column].cat.set_categories(frame[column].cat.categories.astype(object))
    return frame


@pytest.mark.parametrize(("chunk_size", "compression"), [(700, None), (100_000, None), (2000, "gzip")])
def test_streamed_file_equals_in_memory(adata, tmp_path, chunk_size, compression):
    path = tmp_path / "synthetic.h5ad"
    backed = synthetic(
        3000,
        1000,
        n_perturbations=3,
        random_state=0,
        path=path,
        chunk_size=chunk_size,
        compression=compression,
        progress=False,
    )
    try:
        assert backed.isbacked
        assert backed.shape == (3000, 1000)
        _assert_same_matrix(backed.X[:], adata.X)
    finally:
        backed.file.close()
    loaded = ad.read_h5ad(path)
    _assert_same_matrix(loaded.X, adata.X)
    pd.testing.assert_frame_equal(_object_names(loaded.obs), _object_names(adata.obs))
    pd.testing.assert_frame_equal(_object_names(loaded.var), _object_names(adata.var))
    uns = loaded.uns["synthetic"]
    assert (uns["n_obs"], uns["dispersion"]) == (3000, 0.5)
    np.testing.assert_array_equal(
        uns["perturbation_genes"]["pert_1"], adata.uns["synthetic"]["perturbation_genes"]["pert_1"]
    )
    with h5py.File(path, "r") as f:
        X = f["X"]
        assert X.attrs["encoding-type"] == "csr_matrix"
        assert X.attrs["encoding-version"] == "0.1.0"
        assert tuple(X.attrs["shape"]) == (3000, 1000)
        assert X["data"].dtype == np.float32
        assert X["indices"].dtype == np.int32
        assert X["indptr"].dtype == np.int64
        assert X["data"].compression == compression
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.h5ad"]  # no leftovers


def test_existing_file_needs_overwrite(tmp_path):
    path = tmp_path / "x.h5ad"
    path.write_bytes(b"not an h5ad file")
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic(50, 20, path=path, progress=False)
    assert path.read_bytes() == b"not an h5ad file"
    backed = synthetic(50, 20, path=str(path), overwrite=True, progress=False)
    backed.file.close()
    assert ad.read_h5ad(path).shape == (50, 20)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    real = synthetic_module._block_counts
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic_module, "_block_counts", flaky)
    path = tmp_path / "x.h5ad"
    with pytest.raises(RuntimeError, match="disk on fire"):
        synthetic(5000, 100, mean_library_size=200_000, path=path, chunk_size=8, n_jobs=1, progress=False)
    assert calls["n"] == 3  # it did fail part-way through the cells
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file


def test_failed_overwrite_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.h5ad"
    old = synthetic(30, 20, path=path, progress=False)
    old.file.close()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(synthetic_module, "_block_counts", broken)
    with pytest.raises(RuntimeError, match="boom"):
        synthetic(30, 20, path=path, overwrite=True, random_state=9, progress=False)
    assert ad.read_h5ad(path).uns["synthetic"]["random_state"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5ad"]


def _stream_peak(path, n_obs: int) -> tuple[int, int]:
    """Peak traced memory while streaming ``n_obs`` cells, and the size of the whole CSR matrix."""
    tracemalloc.start()
    try:
        backed = synthetic(n_obs, 1000, mean_library_size=300, chunk_size=2000, path=path, n_jobs=1, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    backed.file.close()
    with h5py.File(path, "r") as f:
        nnz = f["X/data"].shape[0]
    return peak, nnz * (4 + 4) + 8 * (n_obs + 1)


def test_streaming_memory_is_bounded(tmp_path):
    small_peak, small_full = _stream_peak(tmp_path / "small.h5ad", 10_000)
    peak, full = _stream_peak(tmp_path / "big.h5ad", 80_000)
    assert full > 4.5 * small_full
    # 8x the cells: the matrix grows 8x, the peak only by the per-cell annotations (obs names, labels)
    assert peak - small_peak < 0.2 * (full - small_full), (peak / 2**20, small_peak / 2**20, full / 2**20)
    assert peak < full / 3, (peak / 2**20, full / 2**20)


# ----------------------------------------------------------------------------------------------
# biology


def test_counts_are_negative_binomial(monkeypatch):
    """With a fixed library size, each gene's counts have variance mu + dispersion * mu**2."""
    monkeypatch.setattr(synthetic_module, "_LIBRARY_LOG_SD", 0.0)
    for dispersion in (0.0, 0.5, 2.0):
        a = synthetic(
            20_000,
            150,
            n_cell_types=1,
            n_subtypes=1,
            n_donors=1,
            n_batches=1,
            dispersion=dispersion,
            mean_library_size=400,
            random_state=2,
            progress=False,
        )
        X = _dense(a.X)
        mu, var = X.mean(axis=0), X.var(axis=0)
        expressed = mu > 0.2
        assert expressed.sum() > 20
        ratio = var[expressed] / (mu[expressed] + dispersion * mu[expressed] ** 2)
        assert 0.93 < np.median(ratio) < 1.07, (dispersion, np.median(ratio))
        p0 = (X == 0).mean(axis=0)
        expected_p0 = np.exp(-mu) if dispersion == 0 else (1 + dispersion * mu) ** (-1 / dispersion)
        assert np.abs(p0 - expected_p0).max() < 0.03
        np.testing.assert_allclose(X.sum(axis=1).mean(), 400, rtol=0.02)


def test_overdispersed_within_a_subtype(adata):
    sub = adata.obs["cell_subtype"].value_counts().index[0]
    X = _dense(adata[adata.obs["cell_subtype"] == sub].X)
    mu = X.mean(axis=0)
    high = mu > 2
    assert high.sum() >= 10
    assert (X.var(axis=0)[high] / mu[high]).mean() > 1.5


def test_cell_type_programs_are_detectable(adata):
    X = _dense(adata.X)
    X = X / X.sum(axis=1, keepdims=True) * 1e4
    for t in adata.obs["cell_type"].cat.categories:
        genes = (adata.var["program"] == t).to_numpy()
        cells = (adata.obs["cell_type"] == t).to_numpy()
        inside, outside = X[np.ix_(cells, genes)].mean(), X[np.ix_(~cells, genes)].mean()
        assert inside > 2.5 * outside, (t, inside, outside)


def test_subtype_programs_are_detectable(adata):
    X = _dense(adata.X)
    X = X / X.sum(axis=1, keepdims=True) * 1e4
    for s in adata.obs["cell_subtype"].cat.categories:
        genes = (adata.var["program"] == s).to_numpy()
        typ = (adata.obs["cell_type"] == s.split(".")[0]).to_numpy()
        cells = (adata.obs["cell_subtype"] == s).to_numpy()
        inside, siblings = X[np.ix_(cells, genes)].mean(), X[np.ix_(typ & ~cells, genes)].mean()
        assert inside > 1.5 * siblings, (s, inside, siblings)


def test_perturbation_effect_visible_on_its_genes():
    a = synthetic(6000, 1000, n_perturbations=2, perturbation_effect=1.5, random_state=3, progress=False)
    X = _dense(a.X)
    uns = a.uns["synthetic"]
    control = (a.obs["perturbation"] == "control").to_numpy()
    targets = a.var_names.get_indexer(np.concatenate(list(uns["perturbation_genes"].values())))
    others = np.setdiff1d(np.arange(a.n_vars), targets)
    for pert in ("pert_0", "pert_1"):
        cells = (a.obs["perturbation"] == pert).to_numpy()
        genes = a.var_names.get_indexer(uns["perturbation_genes"][pert])
        true = uns["perturbation_log2fc"][pert]
        observed = np.log2((X[np.ix_(cells, genes)].mean(0) + 0.05) / (X[np.ix_(control, genes)].mean(0) + 0.05))
        assert np.corrcoef(true, observed)[0, 1] > 0.8
        strong = np.abs(true) > 1
        assert strong.any()
        assert np.all(np.sign(observed[strong]) == np.sign(true[strong]))
        # the rest of the transcriptome keeps its counts
        shift = np.log2(X[np.ix_(cells, others)].sum() / X[np.ix_(control, others)].sum() * control.sum() / cells.sum())
        assert abs(shift) < 0.1


def test_no_perturbation_effect_when_effect_is_zero():
    a = synthetic(4000, 500, n_perturbations=1, perturbation_effect=0.0, random_state=3, progress=False)
    np.testing.assert_array_equal(a.uns["synthetic"]["perturbation_log2fc"]["pert_0"], 0.0)


def test_earlier_arguments_give_the_counts_of_earlier_versions():
    """context_response draws from its own seed stream, only when used: the counts of earlier calls are pinned."""
    import hashlib

    a = synthetic(600, 200, n_perturbations=2, random_state=1, progress=False)
    digest = hashlib.sha256()
    codes = (a.obs[c].cat.codes.to_numpy().astype(np.int64) for c in a.obs)
    for arr in (a.X.data, a.X.indices.astype(np.int64), a.X.indptr.astype(np.int64), *codes):
        digest.update(np.ascontiguousarray(arr).tobytes())
    assert digest.hexdigest() == "a1f82d065b658cde2aaee73e4e4ce10d0a0ca76ad172d2e665840d15959a1822"
    assert "context_response" not in a.uns["synthetic"]
    assert "donor_state" not in a.uns["synthetic"]


@pytest.fixture(scope="module")
def contexts() -> ad.AnnData:
    return synthetic(12000, 600, n_donors=20, n_perturbations=4, context_response=1.0, random_state=2,
                     progress=False)  # fmt: skip


def test_context_responses_follow_each_donors_state(contexts):
    """Per donor, the observed fold changes follow the recorded truth, which differs between donors."""
    a, uns = contexts, contexts.uns["synthetic"]
    X, obs = _dense(a.X), a.obs
    assert uns["context_response"] == 1.0
    assert uns["donor_state"].shape == (20, 2)
    for pert in ("pert_0", "pert_2"):
        genes = a.var_names.get_indexer(uns["perturbation_genes"][pert])
        truth = uns["perturbation_log2fc_by_donor"][pert]
        assert truth.shape == (20, len(genes))
        assert truth.std(axis=0).max() > 0.3  # the response differs by donor
        observed, expected = [], []
        for d in range(20):
            donor = (obs["donor"] == f"donor_{d}").to_numpy()
            control = donor & (obs["perturbation"] == "control").to_numpy()
            cells = donor & (obs["perturbation"] == pert).to_numpy()
            observed.append(np.log2((X[np.ix_(cells, genes)].mean(0) + 0.05) / (X[np.ix_(control, genes)].mean(0)
                                                                                + 0.05)))  # fmt: skip
            expected.append(truth[d])
        observed, expected = np.concatenate(observed), np.concatenate(expected)
        assert np.corrcoef(observed, expected)[0, 1] > 0.8
        # conditional genes (log2fc 0 at state 0) go up in some donors and down in others
        conditional = uns["perturbation_log2fc"][pert] == 0
        assert conditional.sum() == len(genes) // 2
        assert ((truth[:, conditional] > 0.3).any(0) & (truth[:, conditional] < -0.3).any(0)).any()


def test_perturbation_fraction_sets_how_many_genes_a_perturbation_moves():
    a = synthetic(400, 300, n_perturbations=2, perturbation_fraction=0.1, random_state=1, progress=False)
    assert all(len(g) == 30 for g in a.uns["synthetic"]["perturbation_genes"].values())
    assert a.uns["synthetic"]["perturbation_fraction"] == 0.1


def test_donor_state_shows_in_control_cells(contexts):
    a, uns = contexts, contexts.uns["synthetic"]
    X = _dense(a.X)
    control = (a.obs["perturbation"] == "control").to_numpy()
    library = X.sum(1, keepdims=True)
    for k in range(2):
        genes = a.var_names.get_indexer(uns["state_genes"][f"state_{k}"])
        level = [np.log2((X[control & (a.obs["donor"] == f"donor_{d}").to_numpy()][:, genes]
                          / library[control & (a.obs["donor"] == f"donor_{d}").to_numpy()]).mean() + 1e-6)
                 for d in range(20)]  # fmt: skip
        assert np.corrcoef(level, uns["donor_state"][f"state_{k}"])[0, 1] > 0.8


def test_batches_shift_expression():
    a = synthetic(
        4000,
        500,
        n_cell_types=1,
        n_subtypes=1,
        n_donors=2,
        n_batches=2,
        batch_effect=0.5,
        donor_effect=0.0,
        random_state=6,
        progress=False,
    )
    X = _dense(a.X)
    X = X / X.sum(axis=1, keepdims=True) * 1e4
    b0 = (a.obs["batch"] == "batch_0").to_numpy()
    m0, m1 = X[b0].mean(0), X[~b0].mean(0)
    expressed = (m0 > 1) & (m1 > 1)
    assert np.std(np.log(m0[expressed] / m1[expressed])) > 0.4  # batch effects of sd 0.5 per batch


# ----------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_obs": 0}, "n_obs"),
        ({"n_vars": -3}, "n_vars"),
        ({"n_cell_types": 0}, "n_cell_types"),
        ({"n_subtypes": 0}, "n_subtypes"),
        ({"n_donors": 0}, "n_donors"),
        ({"n_batches": 0}, "n_batches"),
        ({"n_donors": 2, "n_batches": 3}, "n_donors"),
        ({"n_perturbations": -1}, "n_perturbations"),
        ({"perturbation_effect": -1.0}, "perturbation_effect"),
        ({"mean_library_size": 0}, "mean_library_size"),
        ({"mean_library_size": float("inf")}, "mean_library_size"),
        ({"dispersion": -0.1}, "dispersion"),
        ({"dispersion": float("nan")}, "dispersion"),
        ({"donor_effect": -1}, "donor_effect"),
        ({"batch_effect": -1}, "batch_effect"),
        ({"context_response": -0.5}, "context_response"),
        ({"perturbation_fraction": 0.0}, "perturbation_fraction"),
        ({"perturbation_fraction": 1.5}, "perturbation_fraction"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"n_jobs": 0}, "n_jobs"),
        ({"random_state": -1}, "random_state"),
        ({"compression": "zstd"}, "compression"),
        ({"path": "counts.zarr"}, "path"),
        ({"path": "counts"}, "path"),
    ],
)
def test_bad_values_raise_value_error_naming_the_parameter(kwargs, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"`{name}`"):
        synthetic(**{"n_obs": 10, "n_vars": 10, **kwargs})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"n_obs": 2.5}, "n_obs"), ({"n_vars": True}, "n_vars"), ({"dispersion": "high"}, "dispersion")],
)
def test_bad_types_raise_type_error(kwargs, name):
    with pytest.raises(TypeError, match=f"`{name}`"):
        synthetic(**{"n_obs": 10, "n_vars": 10, **kwargs})


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        synthetic(10, 10, path=tmp_path / "nope" / "x.h5ad")


def test_numpy_integers_accepted():
    a = synthetic(np.int64(20), np.int32(10), random_state=np.uint8(3), progress=False)
    assert a.shape == (20, 10)


def test_progress_bar_goes_to_stderr_only(capsys):
    synthetic(3000, 50, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "synthetic" in captured.err
