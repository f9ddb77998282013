"""cm.tl.train_annotator: learns real cell types, across technologies; safe, reproducible artifacts."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import cellmint as cm

SMALL = {"hidden": (64,), "max_epochs": 8, "lr": 1e-3, "batch_size": 64, "progress": False}  # quick to train


@pytest.fixture(scope="module")
def cellbench_model(tmp_path_factory):
    """Trained on CEL-seq2, tested on Drop-seq: the same cell lines measured by another technology."""
    adata = cm.datasets.cellbench()
    adata.obs["part"] = np.where(adata.obs["technology"] == "CEL-seq2", "train", "test")
    folder = tmp_path_factory.mktemp("models") / "cellbench"
    model = cm.tl.train_annotator(adata, "cell_line", split="part", model_dir=folder, **SMALL)
    return adata, model, folder


def test_learns_cell_lines_across_technologies(cellbench_model):
    adata, model, _ = cellbench_model
    report = model.metrics["cell_line"]
    assert report["evaluated_on"] == "test"
    assert report["n_cells"] == (adata.obs["technology"] == "Drop-seq").sum()
    assert report["accuracy"] > 0.9
    assert report["macro_f1"] > 0.9
    assert model.manifest["params"]["validation"].startswith("10% of the training cells")
    assert model.manifest["data"]["n_test"] == 210
    dropseq = adata[adata.obs["technology"] == "Drop-seq"]
    predicted = model.predict(dropseq[:, model.genes].X, library_size=np.asarray(dropseq.X.sum(1)).ravel())
    agreement = predicted["cell_line"].astype(str).to_numpy() == dropseq.obs["cell_line"].astype(str).to_numpy()
    assert agreement.mean() == pytest.approx(report["accuracy"])


def test_save_load_gives_identical_predictions_and_refuses_tampering(cellbench_model, tmp_path):
    adata, model, folder = cellbench_model
    X = adata[:40, model.genes].X
    library = np.asarray(adata[:40].X.sum(1)).ravel()
    loaded = cm.io.read_model(folder)
    assert isinstance(loaded, cm.Annotator)
    # the reference kept for nearest-neighbour refinement and open-set distances survives the round trip
    n_train = model.manifest["data"]["n_train"]
    assert loaded.reference["latent"].shape == (n_train, 64)
    np.testing.assert_array_equal(loaded.reference["codes"]["cell_line"], model.reference["codes"]["cell_line"])
    assert 0 < model.manifest["open_set"]["floor"] < np.inf
    for level, probabilities in model.forward(X, library)[1].items():
        np.testing.assert_array_equal(loaded.forward(X, library)[1][level], probabilities)
    copy = cm.io.write_model(loaded, tmp_path / "copy")
    weights = (copy / "weights.pt").read_bytes()
    (copy / "weights.pt").write_bytes(weights[:-20] + bytes([weights[-20] ^ 1]) + weights[-19:])  # one bit
    with pytest.raises(ValueError, match="does not match the checksum"):
        cm.io.read_model(copy)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "weights.pt").write_bytes((folder / "weights.pt").read_bytes())
    (tmp_path / "newer" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 99.*Upgrade cellmint"):
        cm.Annotator.load(tmp_path / "newer")
    with pytest.raises(FileNotFoundError, match="not a cellmint model folder"):
        cm.io.read_model(tmp_path)


def test_uns_metadata_round_trips_through_h5ad(cellbench_model, tmp_path):
    adata, model, folder = cellbench_model
    meta = adata.uns["cellmint"]
    assert meta["model_dir"] == str(folder)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["cellmint"]
    assert back["model_dir"] == str(folder)
    assert list(back["classes"]["cell_line"]) == model.classes["cell_line"]
    assert list(back["genes"]) == list(model.genes)
    assert back["metrics"]["cell_line"]["macro_f1"] == pytest.approx(model.metrics["cell_line"]["macro_f1"])
    assert back["files"]["weights.pt"] == json.loads((folder / "manifest.json").read_text())["files"]["weights.pt"]


def test_same_seed_same_weights_and_global_rng_untouched():
    adata = cm.datasets.cellbench()[::3].copy()
    state = torch.random.get_rng_state()
    first = cm.tl.train_annotator(adata, "cell_line", random_state=7, **{**SMALL, "max_epochs": 2})
    assert torch.equal(torch.random.get_rng_state(), state)
    second = cm.tl.train_annotator(adata, "cell_line", random_state=7, **{**SMALL, "max_epochs": 2})
    third = cm.tl.train_annotator(adata, "cell_line", random_state=8, **{**SMALL, "max_epochs": 2})
    for name, tensor in first.net.state_dict().items():
        assert torch.equal(tensor, second.net.state_dict()[name]), name
    assert any(not torch.equal(t, third.net.state_dict()[n]) for n, t in first.net.state_dict().items())
    assert (adata.obs["cellmint_split"].astype(str) != "").all()  # the split made here is recorded


def test_hierarchy_of_two_label_levels(shared_data):
    adata = cm.datasets.zeisel_brain(data_dir=shared_data)
    model = cm.tl.train_annotator(adata, ["level1_class", "level2_class"], **{**SMALL, "max_epochs": 3})
    # Zeisel's values are log1p of counts: detected, and turned back into counts (count-space augmentation)
    assert model.recipe.kind == "counts"
    assert model.manifest["data"]["input"]["kind"] == "log"
    assert model.manifest["data"]["input"]["base"] == "e"
    tree = model.hierarchy["level2_class"]
    truth = pd.crosstab(adata.obs["level2_class"], adata.obs["level1_class"])
    expected = {str(fine): str(row.idxmax()) for fine, row in truth.iterrows()}
    assert tree["parent_level"] == "level1_class"
    # parents are learned from the training cells: every fine class seen in training maps as in the data
    assert {fine: tree["parents"][fine] for fine in tree["parents"]} == {f: expected[f] for f in tree["parents"]}
    assert len(tree["parents"]) >= 0.9 * len(expected)
    assert set(model.metrics) == {"level1_class", "level2_class"}


def test_trains_from_a_store(tmp_path):
    adata = cm.datasets.synthetic(3000, 200, n_cell_types=4, n_subtypes=2, n_donors=10, random_state=2, progress=False)
    store = cm.pp.build_store(adata, tmp_path / "s.zarr", label_keys=["cell_type", "cell_subtype"],
                              group_key="donor", progress=False)  # fmt: skip
    model = cm.tl.train_annotator(store, ["cell_type", "cell_subtype"], **{**SMALL, "max_epochs": 4})
    assert model.manifest["data"]["source"] == "store"
    assert model.metrics["cell_type"]["evaluated_on"] == "test"
    assert model.metrics["cell_type"]["accuracy"] > 0.8
    assert model.hierarchy["cell_subtype"]["purity"] == {k: 1.0 for k in model.hierarchy["cell_subtype"]["purity"]}


def test_bad_requests_are_refused_clearly():
    adata = cm.datasets.cellbench()[:60].copy()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            cm.tl.train_annotator(adata, "cell_line", device="cuda", **SMALL)
    with pytest.raises(KeyError, match="no label column 'tissue'"):
        cm.tl.train_annotator(adata, "tissue", **SMALL)
    nan = adata.copy()
    nan.obs["cell_line"] = nan.obs["cell_line"].astype(object)
    nan.obs.iloc[0, nan.obs.columns.get_loc("cell_line")] = np.nan
    with pytest.raises(ValueError, match="empty \\(NaN or blank\\) for 1 cells"):
        cm.tl.train_annotator(nan, "cell_line", **SMALL)
    negative = adata.copy()
    negative.X = negative.X.astype(np.float32) * -1.5
    with pytest.raises(ValueError, match="negative values"):
        cm.tl.train_annotator(negative, "cell_line", **SMALL)
    with pytest.raises(ValueError, match="balance must be"):
        cm.tl.train_annotator(adata, "cell_line", balance="equal", **SMALL)


def test_linear_path_round_trips(tmp_path):
    adata = cm.datasets.cellbench()[::2].copy()
    model = cm.tl.train_annotator(
        adata, "cell_line", linear=True, model_dir=tmp_path / "m", **{**SMALL, "max_epochs": 2}
    )
    assert model.net.linear["cell_line"].in_features == adata.n_vars
    loaded = cm.io.read_model(tmp_path / "m")
    X, library = adata[:10].X, np.asarray(adata[:10].X.sum(1)).ravel()
    np.testing.assert_array_equal(loaded.forward(X, library)[1]["cell_line"], model.forward(X, library)[1]["cell_line"])


def test_regression_heads_project_into_the_reference_embedding():
    adata = cm.datasets.cellbench()
    adata.obsm["X_pca"] = np.asarray(
        sc_pca(adata), dtype=np.float32
    )  # a reference embedding the heads learn to reproduce from expression
    model = cm.tl.train_annotator(adata, "cell_line", embedding_keys=["X_pca"], **{**SMALL, "max_epochs": 15})
    assert model.net.regressors["X_pca"].out_features == 5
    assert model.manifest["embedding_r2"]["X_pca"] > 0.5
    _, _, projected = model.forward(adata[:20, model.genes].X, np.asarray(adata[:20].X.sum(1)).ravel())
    assert projected["X_pca"].shape == (20, 5)
    assert np.corrcoef(projected["X_pca"][:, 0], adata.obsm["X_pca"][:20, 0])[0, 1] > 0.8
    with pytest.raises(KeyError, match="obsm has no 'X_umap'"):
        cm.tl.train_annotator(adata, "cell_line", embedding_keys=["X_umap"], **SMALL)


def sc_pca(adata) -> np.ndarray:
    import scanpy as sc

    work = adata.copy()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    sc.pp.pca(work, n_comps=5, random_state=0)
    return work.obsm["X_pca"]


def test_backed_and_in_memory_anndata_train_the_same_model(tmp_path):
    adata = cm.datasets.cellbench()[::2].copy()
    adata.obs["part"] = np.where(adata.obs["technology"] == "CEL-seq2", "train", "test")
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    settings = {**SMALL, "max_epochs": 2, "split": "part"}
    from_disk = cm.tl.train_annotator(backed, "cell_line", **settings)
    in_memory = cm.tl.train_annotator(adata, "cell_line", **settings)
    for name, tensor in in_memory.net.state_dict().items():
        assert torch.equal(tensor, from_disk.net.state_dict()[name]), name
    backed.file.close()


def test_progress_bar_counts_batches(capsys):
    adata = cm.datasets.cellbench()[::3].copy()
    cm.tl.train_annotator(adata, "cell_line", **{**SMALL, "max_epochs": 2, "progress": True})
    err = capsys.readouterr().err
    assert "training" in err
    assert "batch" in err
    assert "epoch=2" in err


def test_progress_without_a_bar_is_one_info_line_per_epoch_and_an_estimate(monkeypatch):
    """stderr not a terminal (no bar): each epoch logs loss, validation score and time left; the run is estimated,
    as a warning with how to shorten it when it would be long on a CPU."""
    import io

    import scanpy as sc

    from cellmint.tl import _train_annotator as module

    adata = cm.datasets.synthetic(300, 60, n_cell_types=3, random_state=0, progress=False)
    old_verbosity, old_file = sc.settings.verbosity, sc.settings.logfile
    buffer = io.StringIO()
    sc.settings.logfile, sc.settings.verbosity = buffer, "info"
    monkeypatch.setattr(module, "LONG_RUN_S", 0)  # every run is "long": the warning must appear
    try:
        cm.tl.train_annotator(adata, "cell_type", max_epochs=3, early_stopping=None, progress=False)
    finally:
        sc.settings.verbosity, sc.settings.logfile = old_verbosity, old_file
    text = buffer.getvalue()
    for epoch in (1, 2, 3):
        assert re.search(rf"epoch {epoch}/3: loss \d\.\d{{4}}, validation macro-F1 \d\.\d{{4}}, .* left \(ETA", text)
    assert re.search(r"training will take up to about \d+ s on this CPU \(3 epochs of \d+ cells", text)
    assert "pass device='cuda'" in text


def test_default_epochs_bound_large_references():
    from cellmint.tl._train_annotator import default_max_epochs

    assert default_max_epochs(1_000) == default_max_epochs(50_000) == 60
    assert default_max_epochs(100_000) == 30
    assert default_max_epochs(167_000) == 18  # the README's old 167k-cell atlas: 24 min -> about 7 on that CPU
    assert default_max_epochs(10_000_000) == 3


def test_batch_size_and_learning_rate_are_chosen_for_the_device():
    from cellmint.tl._train_annotator import batch_lr, device_batch

    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object: no GPU needed
    assert device_batch(cpu, 10_000_000) == 256  # a CPU keeps today's batches at every size
    assert device_batch(gpu, 5_000) == device_batch(gpu, 32_767) == 256  # small references learn as on a CPU
    assert device_batch(gpu, 32_768) == 512
    assert device_batch(gpu, 300_000) == 4096
    assert device_batch(gpu, 524_288) == device_batch(gpu, 10_000_000) == 8192
    for batch in (512, 1024, 2048, 4096, 8192):  # each batch from the size that gives it 64 steps per epoch
        assert device_batch(gpu, batch * 64) == batch
        assert device_batch(gpu, batch * 64 - 1) == batch // 2
    assert batch_lr(256) == pytest.approx(1e-3)
    assert batch_lr(1024) == pytest.approx(2e-3)
    assert batch_lr(8192) == pytest.approx(1e-3 * 32**0.5)


def test_chosen_batch_and_learning_rate_are_recorded():
    adata = cm.datasets.synthetic(300, 60, n_cell_types=3, random_state=0, progress=False)
    model = cm.tl.train_annotator(adata, "cell_type", max_epochs=1, progress=False)
    assert (model.manifest["params"]["batch_size"], model.manifest["params"]["lr"]) == (256, pytest.approx(1e-3))
    model = cm.tl.train_annotator(adata, "cell_type", max_epochs=1, batch_size=64, progress=False)
    assert model.manifest["params"]["lr"] == pytest.approx(5e-4)  # the square-root rule for a given batch
    model = cm.tl.train_annotator(adata, "cell_type", max_epochs=1, batch_size=64, lr=3e-3, progress=False)
    assert model.manifest["params"]["lr"] == pytest.approx(3e-3)  # a given rate is kept


def test_a_class_named_unknown_gets_another_unknown_label(tmp_path):
    adata = cm.datasets.synthetic(300, 60, n_cell_types=3, random_state=0, progress=False)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.rename_categories({"type_0": "Unknown"})
    model = cm.tl.train_annotator(adata, "cell_type", max_epochs=2, model_dir=tmp_path / "m", progress=False)
    assert model.unknown_label == "Unassigned"
    assert cm.io.read_model(tmp_path / "m").unknown_label == "Unassigned"  # recorded in the model folder
    cm.tl.annotate(adata, model, progress=False)
    assert adata.uns["cellmint"]["annotation"]["unknown_label"] == "Unassigned"
    assert set(adata.obs["cellmint_cell_type"].cat.categories) >= {"Unknown", "Unassigned"}
    with pytest.raises(ValueError, match="is a class of the reference"):
        cm.tl.train_annotator(adata, "cell_type", max_epochs=1, unknown_label="Unknown", progress=False)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):  # checked before training
        cm.tl.train_annotator(adata, "cell_type", max_epochs=1, model_dir=tmp_path / "m", progress=False)


def test_the_device_augmentation_path_learns_as_the_host_path(monkeypatch):
    """The GPU's training step (batches moved first, augmented by torch's draws), run on the CPU.

    Per-cell choices are the host path's, per-value draws are torch's: the same distributions, other draws, so
    the model is not bit-identical; on CellBench's cross-technology test it must be as good (both learn it
    fully, 8 epochs).
    """
    from cellmint.tl import _train_annotator

    adata = cm.datasets.cellbench()
    adata.obs["part"] = np.where(adata.obs["technology"] == "CEL-seq2", "train", "test")
    host = cm.tl.train_annotator(adata, "cell_line", split="part", **SMALL)
    called = []
    monkeypatch.setattr(_train_annotator, "augments_on_device", lambda device: called.append(device) or True)
    device = cm.tl.train_annotator(adata, "cell_line", split="part", **SMALL)
    assert called
    assert all(d.type == "cpu" for d in called)
    weights = [torch.cat([p.flatten() for p in m.net.state_dict().values()]) for m in (host, device)]
    assert not torch.equal(*weights)  # other per-value draws: another model
    for model in (host, device):
        assert model.metrics["cell_line"]["macro_f1"] > 0.95
    assert abs(host.metrics["cell_line"]["macro_f1"] - device.metrics["cell_line"]["macro_f1"]) < 0.03


def test_staged_counts_train_the_gpu_path_as_streaming_does(monkeypatch, tmp_path):
    """The whole GPU path on the CPU: counts staged on the device, batches cut and augmented there.

    Another batch order (the epoch shuffled as a whole) and other draws: not bit-identical; as good on
    CellBench's cross-technology test, from an AnnData and from a store.
    """
    from cellmint.tl import _train_annotator

    adata = cm.datasets.cellbench()
    adata.obs["part"] = np.where(adata.obs["technology"] == "CEL-seq2", "train", "test")
    streamed = cm.tl.train_annotator(adata, "cell_line", split="part", **SMALL)
    assert streamed.manifest["params"]["staged"] is False  # a CPU streams unless asked
    monkeypatch.setattr(_train_annotator, "augments_on_device", lambda device: True)
    staged = cm.tl.train_annotator(adata, "cell_line", split="part", stage=True, **SMALL)
    assert staged.manifest["params"]["staged"] is True
    store = cm.pp.build_store(adata, tmp_path / "s.zarr", label_keys=["cell_line"], group_key="technology",
                              progress=False)  # fmt: skip
    from_store = cm.tl.train_annotator(store, "cell_line", stage=True, **SMALL)
    assert from_store.manifest["params"]["staged"] is True
    for model in (streamed, staged):
        assert model.metrics["cell_line"]["macro_f1"] > 0.95
    assert abs(streamed.metrics["cell_line"]["macro_f1"] - staged.metrics["cell_line"]["macro_f1"]) < 0.03
    assert from_store.metrics["cell_line"]["accuracy"] > 0.9
