"""train_perturbation / predict_perturbation / perturbation_split / pl.perturbation on generated screens."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellmint as cm

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SMALL = {"hidden": 16, "gene_dim": 4, "n_heads": 2, "n_layers": 1, "set_size": 16, "sets_per_batch": 4,
         "max_epochs": 3, "device": "cpu", "progress": False}  # fmt: skip
N_GENES = 40
DATA = Path(__file__).parent / "_data"
#: log fold changes of the two perturbations on the first genes
EFFECTS = {"KO_A": np.r_[np.full(5, 1.5), np.zeros(N_GENES - 5)], "KO_B": np.r_[np.zeros(5), np.full(5, -1.2),
                                                                               np.zeros(N_GENES - 10)]}  # fmt: skip


def screen(n_contexts: int = 4, cells: int = 60, seed: int = 0) -> ad.AnnData:
    """Counts of control and knocked-out cells in several contexts with their own baselines."""
    rng = np.random.default_rng(seed)
    blocks, obs = [], []
    for c in range(n_contexts):
        base = np.exp(rng.normal(1.0, 0.8, N_GENES))
        for label in ("control", *EFFECTS):
            mean = base * np.exp(EFFECTS.get(label, 0))
            blocks.append(rng.poisson(mean, size=(cells, N_GENES)))
            obs += [{"perturbation": label, "donor": f"d{c}"}] * cells
    frame = pd.DataFrame(obs, index=[f"cell{i}" for i in range(len(obs))])
    var = pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)])
    adata = ad.AnnData(sp.csr_matrix(np.vstack(blocks).astype(np.float32)), obs=frame, var=var)
    return adata


@pytest.fixture(scope="module")
def trained():
    adata = screen()
    train = adata[adata.obs["donor"] != "d3"].copy()
    model = cm.tl.train_perturbation(train, "perturbation", "control", context_key="donor", **SMALL)
    return adata, train, model


def test_predicts_each_control_cell_of_each_context(trained):
    adata, train, model = trained
    held = adata[adata.obs["donor"] == "d3"].copy()
    pred = cm.tl.predict_perturbation(held, model, ["KO_A", "KO_B"], device="cpu")
    assert pred.n_vars == N_GENES
    assert list(pred.var_names) == list(adata.var_names)
    counts = pred.obs.groupby(["perturbation", "is_predicted"], observed=True).size().to_dict()
    assert counts == {("KO_A", True): 60, ("KO_B", True): 60, ("control", False): 60}
    assert set(pred.obs["donor"]) == {"d3"}
    assert pred.obs["perturbation"].dtype == "category"
    assert (pred.X >= 0).all()
    # the effects are learned in the right genes and direction
    real = cm.tl.evaluate_perturbation(pred, held, perturbation_key="perturbation", control="control",
                                       context_key="donor", train=train)  # fmt: skip
    model_rows = real[real["method"] == "model"].set_index("perturbation")
    control_rows = real[real["method"] == "control"].set_index("perturbation")
    assert (model_rows["pearson_delta"] > 0.8).all()
    assert (model_rows["mse_delta"] < 0.5 * control_rows["mse_delta"]).all()
    assert train.uns["cellmint_perturbation"]["perturbations"].tolist() == ["KO_A", "KO_B"]


def test_untrained_model_is_the_perturbation_mean_baseline():
    adata = screen(seed=1)
    train = adata[adata.obs["donor"] != "d3"].copy()
    model = cm.tl.train_perturbation(train, "perturbation", "control", context_key="donor",
                                     **{**SMALL, "lr": 0.0, "effect_bins": 1})  # fmt: skip
    held = adata[(adata.obs["donor"] == "d3") & (adata.obs["perturbation"] == "control")].copy()
    pred = cm.tl.predict_perturbation(held, model, "KO_A", device="cpu", predictor="network")
    baseline = cm.tl.perturbation_baselines(train, held, ["KO_A"], perturbation_key="perturbation",
                                            control="control", context_key="donor",
                                            baselines=["perturbation_mean"])["perturbation_mean"]  # fmt: skip
    ours = pred[pred.obs["is_predicted"].to_numpy()]
    theirs = baseline[baseline.obs["is_predicted"].to_numpy()]
    np.testing.assert_allclose(np.sort(ours.X.mean(0)), np.sort(np.asarray(theirs.X).mean(0)), atol=1e-4)


def test_binned_means_average_to_the_mean_and_follow_the_sorted_values():
    from cellmint.tl._train_perturbation import binned_means

    values = torch.as_tensor(np.random.default_rng(0).gamma(0.5, size=(103, 7)), dtype=torch.float32)
    bins = binned_means(values, 10)
    assert bins.shape == (10, 7)
    np.testing.assert_allclose(bins.mean(0), values.mean(0), rtol=1e-5)
    assert (bins.diff(dim=0) >= 0).all()
    even = binned_means(values[:100], 4)
    np.testing.assert_allclose(even, values[:100].sort(0).values.reshape(4, 25, 7).mean(1), rtol=1e-5)


def test_untrained_binned_model_follows_how_the_training_responses_spread():
    """A perturbation that narrows each gene's spread: binned effects narrow the prediction, one bin does not."""
    rng = np.random.default_rng(0)
    blocks, obs = [], []
    for c in range(4):
        centre = rng.uniform(1, 3, N_GENES)
        for label in ("control", "narrow"):
            x = centre + rng.normal(0, 0.6, (200, N_GENES))
            blocks.append(np.clip(x if label == "control" else centre + 0.5 + 0.3 * (x - centre), 0, None))
            obs += [{"perturbation": label, "donor": f"d{c}"}] * 200
    frame = pd.DataFrame(obs, index=[f"c{i}" for i in range(len(obs))])
    adata = ad.AnnData(np.vstack(blocks).astype(np.float32), obs=frame,
                       var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))  # fmt: skip
    train, held = adata[adata.obs["donor"] != "d3"].copy(), adata[adata.obs["donor"] == "d3"].copy()
    controls = held[held.obs["perturbation"] == "control"].copy()
    spread = {}
    for bins in (1, 10):
        model = cm.tl.train_perturbation(train, "perturbation", "control", context_key="donor", input="lognorm",
                                         **{**SMALL, "set_size": 100, "lr": 0.0, "effect_bins": bins})  # fmt: skip
        pred = cm.tl.predict_perturbation(controls, model, "narrow", device="cpu", predictor="network")
        predicted = pred.X[pred.obs["is_predicted"].to_numpy()]
        np.testing.assert_allclose(predicted.mean(0) - controls.X.mean(0), 0.5, atol=0.1)
        spread[bins] = np.median(predicted.std(0) / controls.X.std(0))
    assert spread[1] == pytest.approx(1.0, abs=0.05)
    assert spread[10] == pytest.approx(0.3, abs=0.1)


def test_folders_written_before_binned_effects_still_load(trained, tmp_path):
    from cellmint.models._artifact import write_artifact

    adata, _, _ = trained
    train = adata[adata.obs["donor"] != "d3"].copy()
    model = cm.tl.train_perturbation(train, "perturbation", "control", context_key="donor", stack=False,
                                     **{**SMALL, "effect_bins": 1, "effect_input": False})  # fmt: skip
    state = dict(model.net.state_dict())
    state["average_effect"] = state.pop("binned_effect")[:, 0]  # the old format: one mean effect per perturbation
    manifest = model._manifest()
    manifest["architecture"] = {k: v for k, v in manifest["architecture"].items()
                                if k not in ("effect_bins", "effect_input")}  # fmt: skip
    write_artifact(tmp_path / "old", manifest, state, kind="cellmint.PerturbationModel", format_version=1)
    held = adata[(adata.obs["donor"] == "d3") & (adata.obs["perturbation"] == "control")].copy()
    old = cm.tl.predict_perturbation(held, cm.io.read_model(tmp_path / "old"), "KO_A", device="cpu")
    np.testing.assert_array_equal(old.X, cm.tl.predict_perturbation(held, model, "KO_A", device="cpu").X)


def test_unknown_perturbation_or_context_without_controls_raise(trained):
    adata, _, model = trained
    held = adata[adata.obs["donor"] == "d3"].copy()
    with pytest.raises(ValueError, match="Unknown perturbation"):
        cm.tl.predict_perturbation(held, model, ["KO_A", "KO_Z"], device="cpu")
    with pytest.raises(ValueError, match="control itself"):
        cm.tl.predict_perturbation(held, model, "control", device="cpu")
    no_controls = held[held.obs["perturbation"] != "control"].copy()
    with pytest.raises(ValueError, match="no control cells"):
        cm.tl.predict_perturbation(no_controls, model, "KO_A", device="cpu")
    with pytest.raises(ValueError, match="have no control cells"):
        cm.tl.predict_perturbation(held, model, "KO_A", contexts=["d3", "d9"], device="cpu")


def test_gene_order_and_extra_genes_do_not_change_predictions(trained):
    adata, _, model = trained
    held = adata[(adata.obs["donor"] == "d3") & (adata.obs["perturbation"] == "control")].copy()
    first = cm.tl.predict_perturbation(held, model, "KO_B", device="cpu", random_state=3)
    order = np.random.default_rng(0).permutation(N_GENES)
    shuffled = held[:, order].copy()
    second = cm.tl.predict_perturbation(shuffled, model, "KO_B", device="cpu", random_state=3)
    assert list(second.var_names) == list(shuffled.var_names)  # every gene of the input, in its order
    np.testing.assert_allclose(first[:, second.var_names].X, second.X, rtol=1e-6, atol=1e-6)
    alone = cm.tl.predict_perturbation(shuffled, model, "KO_B", device="cpu", random_state=3, predictor="network")
    np.testing.assert_array_equal(
        cm.tl.predict_perturbation(held, model, "KO_B", device="cpu", random_state=3, predictor="network").X, alone.X
    )
    assert list(alone.var_names) == list(model.genes)
    missing = held[:, 1:].copy()
    with pytest.raises(ValueError, match="missing from adata"):
        cm.tl.predict_perturbation(missing, model, "KO_B", device="cpu")


def test_save_load_round_trip_and_damage_refused(trained, tmp_path):
    adata, _, model = trained
    held = adata[(adata.obs["donor"] == "d3") & (adata.obs["perturbation"] == "control")].copy()
    folder = cm.io.write_model(model, tmp_path / "model")
    loaded = cm.io.read_model(folder)
    assert isinstance(loaded, cm.PerturbationModel)
    assert loaded.perturbations == model.perturbations
    a = cm.tl.predict_perturbation(held, model, "KO_A", device="cpu")
    b = cm.tl.predict_perturbation(held, loaded, "KO_A", device="cpu")
    np.testing.assert_array_equal(a.X, b.X)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "cellmint.PerturbationModel"
    assert "weights.pt" in manifest["files"]
    # format 4: a stack with pls, which a cellmint reading format 3 would predict without (so it refuses it)
    assert manifest["format_version"] == 4
    assert manifest["stack"]["components"][-1] == "pls"
    with open(folder / "weights.pt", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="checksum"):
        cm.io.read_model(folder)


def test_log_normalised_input_and_bad_labels():
    adata = screen(n_contexts=3, seed=2)
    log = adata.copy()
    cm_norm = log.X.multiply(1e4 / log.X.sum(axis=1)).tocsr()
    cm_norm.data = np.log1p(cm_norm.data)
    log.X = cm_norm
    model = cm.tl.train_perturbation(log, "perturbation", "control", context_key="donor", **SMALL)
    assert model.recipe.kind == "lognorm"
    with pytest.raises(ValueError, match="trained on log-normalised values, but adata holds raw counts"):
        cm.tl.predict_perturbation(adata, model, "KO_A", device="cpu")
    broken = adata.copy()
    broken.obs["perturbation"] = broken.obs["perturbation"].astype(object)
    broken.obs.iloc[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"Perturbation .perturbation. is empty \(NaN or blank\) for 1 cells"):
        cm.tl.train_perturbation(broken, "perturbation", "control", context_key="donor", **SMALL)
    with pytest.raises(ValueError, match="control label"):
        cm.tl.train_perturbation(adata, "perturbation", "DMSO", context_key="donor", **SMALL)


def test_split_context_and_perturbation_holdout_with_state_toml(tmp_path):
    adata = screen()
    split = cm.tl.perturbation_split(adata, "perturbation", "control", context_key="donor", contexts=["d1"],
                                     toml=tmp_path / "split.toml", dataset_name="screen")  # fmt: skip
    held = adata.obs["donor"] == "d1"
    assert (split[~held] == "train").all()
    assert (split[held & (adata.obs["perturbation"] == "control")] == "test_control").all()
    assert (split[held & (adata.obs["perturbation"] != "control")] == "test").all()
    toml = tomllib.loads((tmp_path / "split.toml").read_text())
    assert toml["zeroshot"] == {"screen.d1": "test"}
    assert toml["training"] == {"screen": "train"}
    with pytest.raises(FileExistsError, match="split.toml exists; pass overwrite=True"):
        cm.tl.perturbation_split(adata, "perturbation", "control", context_key="donor", toml=tmp_path / "split.toml")

    split = cm.tl.perturbation_split(adata, "perturbation", "control", context_key="donor", holdout="perturbation",
                                     contexts=["d0", "d2"], perturbations={"d0": ["KO_A"], "d2": ["KO_B"]},
                                     toml=tmp_path / "few.toml")  # fmt: skip
    test = adata.obs[split.to_numpy() == "test"]
    assert set(map(tuple, test[["donor", "perturbation"]].drop_duplicates().to_numpy())) == {("d0", "KO_A"),
                                                                                           ("d2", "KO_B")}  # fmt: skip
    assert (split[adata.obs["perturbation"] == "control"] == "train").all()
    few = tomllib.loads((tmp_path / "few.toml").read_text())
    assert few["fewshot"]["cellmint.d0"]["test"] == ["KO_A"]
    model = cm.tl.train_perturbation(adata, "perturbation", "control", context_key="donor",
                                     split_key="perturbation_split", stack=False, **SMALL)  # fmt: skip
    assert model.manifest["data"]["n_cells"] == int((split == "train").sum())
    assert model.stack is None
    assert len(model.nets) == 1


def test_plots_draw(trained):
    adata, train, model = trained
    held = adata[adata.obs["donor"] == "d3"].copy()
    pred = cm.tl.predict_perturbation(held, model, ["KO_A", "KO_B"], device="cpu")
    fig = cm.pl.perturbation(pred, held, perturbation_key="perturbation", control="control", perturbation="KO_A",
                             return_fig=True)  # fmt: skip
    assert fig.axes[0].get_title().startswith("KO_A: Pearson r = ")
    plt.close(fig)
    table = cm.tl.evaluate_perturbation(pred, held, perturbation_key="perturbation", control="control",
                                        context_key="donor", train=train)  # fmt: skip
    fig = cm.pl.perturbation(table, kind="metrics", return_fig=True)
    assert len(fig.axes) >= 3
    assert fig.axes[0].get_title().startswith("pearson_delta")
    plt.close(fig)
    fig = cm.pl.perturbation(table, kind="scaled", metrics=["pearson_delta", "energy_distance"], return_fig=True)
    assert [ax.get_title() for ax in fig.axes] == ["pearson_delta (scaled)", "energy_distance (scaled)"]
    assert next(t.get_text() for t in fig.axes[0].get_yticklabels()) == "model"
    plt.close(fig)


def test_embedding_model_predicts_genes_through_its_decoder(tmp_path):
    adata = screen(seed=2)
    logged = np.log1p(adata.X.toarray() / adata.X.sum(1).A * 1e4)
    centred = logged - logged.mean(0)
    adata.obsm["X_pca"] = (centred @ np.linalg.svd(centred, full_matrices=False)[2][:12].T).astype(np.float32)
    train = adata[adata.obs["donor"] != "d3"].copy()
    model = cm.tl.train_perturbation(train, "perturbation", "control", context_key="donor", use_rep="X_pca",
                                     **{**SMALL, "max_epochs": 8})  # fmt: skip
    assert model.use_rep == "X_pca"
    assert model.decoder["weight"].shape == (12, N_GENES)
    held = adata[adata.obs["donor"] == "d3"].copy()
    pred = cm.tl.predict_perturbation(held, model, ["KO_A", "KO_B"], device="cpu")
    assert list(pred.var_names) == list(adata.var_names)  # decoded back to the genes
    assert (pred.X >= 0).all()
    # the effects come out in the right genes: KO_A raises genes 0-4, KO_B lowers genes 5-9
    control = pred[~pred.obs["is_predicted"].to_numpy()].X.mean(0)
    for label, genes, sign in (("KO_A", slice(0, 5), 1), ("KO_B", slice(5, 10), -1)):
        delta = pred[(pred.obs["perturbation"] == label).to_numpy()].X.mean(0) - control
        assert (sign * delta[genes] > 0.3).all()
        assert np.abs(delta[10:]).max() < np.abs(delta[genes]).min()
    # a folder round trip keeps the decoder; the embedding must be there at prediction time
    loaded = cm.io.read_model(cm.io.write_model(model, tmp_path / "rep_model"))
    again = cm.tl.predict_perturbation(held, loaded, ["KO_A", "KO_B"], device="cpu")
    np.testing.assert_allclose(again.X, pred.X, atol=1e-6)
    del held.obsm["X_pca"]
    with pytest.raises((KeyError, ValueError), match="X_pca"):
        cm.tl.predict_perturbation(held, model, "KO_A", device="cpu")


# -- the stacked default -----------------------------------------------------------------------------------------


def test_simplex_least_squares_finds_the_best_convex_combination():
    from cellmint.tl._perturbation_stack import simplex_least_squares

    rng = np.random.default_rng(0)
    components = rng.normal(size=(4, 200))
    exact = components[2]
    weights = simplex_least_squares(components @ components.T, components @ exact)
    np.testing.assert_allclose(weights, [0, 0, 1, 0], atol=1e-8)
    mixed = 0.3 * components[0] + 0.7 * components[3]
    np.testing.assert_allclose(simplex_least_squares(components @ components.T, components @ mixed),
                               [0.3, 0, 0, 0.7], atol=1e-8)  # fmt: skip
    # outside the simplex (2 × a component): the nearest point on it, never a weight below 0
    weights = simplex_least_squares(components @ components.T, components @ (2 * components[1]))
    assert weights.min() >= 0
    assert weights.sum() == pytest.approx(1.0)
    assert weights[1] == pytest.approx(1.0)


def shifted_screen(n_contexts: int = 5, cells: int = 80, seed: int = 4) -> ad.AnnData:
    """Log-normalised cells whose response is the same shift in every context: the perturbation mean is exact."""
    rng = np.random.default_rng(seed)
    shift = {"up": np.r_[np.full(6, 1.2), np.zeros(N_GENES - 6)], "down": np.r_[np.zeros(6), np.full(6, -0.8),
                                                                              np.zeros(N_GENES - 12)]}  # fmt: skip
    blocks, obs = [], []
    for c in range(n_contexts):
        centre = rng.uniform(2.0, 4.0, N_GENES)
        for label in ("control", *shift):
            blocks.append(np.clip(centre + shift.get(label, 0) + rng.normal(0, 0.4, (cells, N_GENES)), 0, None))
            obs += [{"perturbation": label, "donor": f"d{c}"}] * cells
    frame = pd.DataFrame(obs, index=[f"c{i}" for i in range(len(obs))])
    return ad.AnnData(np.vstack(blocks).astype(np.float32), obs=frame,
                      var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))  # fmt: skip


def test_stacked_default_is_never_below_an_exact_baseline():
    adata = shifted_screen()
    train, held = adata[adata.obs["donor"] != "d4"].copy(), adata[adata.obs["donor"] == "d4"].copy()
    # a network that learns fast and wrongly (large learning rate, few epochs) next to an exact baseline
    model = cm.tl.train_perturbation(train, "perturbation", "control", context_key="donor",
                                     **{**SMALL, "lr": 0.05, "max_epochs": 4, "early_stopping": None})  # fmt: skip
    weights = model.stack_weights()
    # pls fits the same effect in every context as well (its latent part only fits the noise)
    assert (weights["perturbation_mean"] + weights["pls"] + weights["network"] > 0.8).all()
    scores = {}
    for predictor in ("stack", "network"):
        pred = cm.tl.predict_perturbation(held, model, ["up", "down"], device="cpu", predictor=predictor)
        table = cm.tl.evaluate_perturbation(pred, held, perturbation_key="perturbation", control="control",
                                            context_key="donor", train=train, metrics=["mse_delta", "pearson_delta"],
                                            n_bootstrap=0)  # fmt: skip
        scores[predictor] = table.groupby("method", sort=False)[["mse_delta", "pearson_delta"]].mean()
    stack, baselines = scores["stack"].loc["model"], scores["stack"].drop(index=["model", "replicate"])
    assert stack["mse_delta"] <= baselines["mse_delta"].min() * 1.1
    assert stack["pearson_delta"] >= baselines["pearson_delta"].max() - 0.01
    # the stack is at least as good as the network alone
    assert stack["mse_delta"] <= scores["network"].loc["model", "mse_delta"] * 1.05


def test_every_gene_of_the_input_is_predicted_and_its_source_recorded(tmp_path, monkeypatch):
    adata = screen(seed=5)
    train = adata[adata.obs["donor"] != "d3"].copy()
    panel = list(adata.var_names[:20])
    model = cm.tl.train_perturbation(train, "perturbation", "control", context_key="donor", genes=panel, **SMALL)
    assert list(model.genes) == panel
    assert len(model.stack["genes"]) == N_GENES
    held = adata[(adata.obs["donor"] == "d3") & (adata.obs["perturbation"] == "control")].copy()
    extra = ad.AnnData(sp.hstack([held.X, held.X[:, :1]]).tocsr(), obs=held.obs,
                       var=pd.DataFrame(index=[*held.var_names, "new_gene"]))  # fmt: skip
    pred = cm.tl.predict_perturbation(extra, model, ["KO_A", "KO_B"], device="cpu")
    assert list(pred.var_names) == [*adata.var_names, "new_gene"]
    source = pred.var["prediction_source"].astype(str)
    assert (source.iloc[:20] == "network+baselines").all()
    assert (source.iloc[20:40] == "baselines").all()
    assert source.iloc[40] == "control (gene not in training data)"
    is_control = ~pred.obs["is_predicted"].to_numpy()
    for p in ("KO_A", "KO_B"):  # a gene never trained on keeps its control values
        rows = (pred.obs["perturbation"] == p).to_numpy()
        np.testing.assert_allclose(pred.X[rows, 40], pred.X[is_control, 40])
    assert set(pred.uns["cellmint_perturbation"]["weights"].columns) == {"network", "control", "perturbation_mean",
                                                                         "context_mean", "linear", "pls"}  # fmt: skip
    # the stack without the network is the weighted sum of perturbation_baselines' predictions, cell by cell
    only = cm.tl.predict_perturbation(held, model, ["KO_A"], device="cpu", predictor="baselines")
    weights = model.stack_weights(baselines_only=True).loc["KO_A"]
    baselines = cm.tl.perturbation_baselines(train, held, ["KO_A"], perturbation_key="perturbation",
                                             control="control", context_key="donor",
                                             baselines=list(weights.index))  # fmt: skip
    expected = sum(weights[b] * np.asarray(baselines[b].X[baselines[b].obs["is_predicted"].to_numpy()])
                   for b in weights.index)  # fmt: skip
    np.testing.assert_allclose(only.X[only.obs["is_predicted"].to_numpy()], expected, atol=1e-5)
    # a model stacked before ``pls`` existed (four baselines) predicts with the components it was trained with
    older = model.stack | {"components": model.stack["components"][:-1], "weights": model.stack["weights"][:, :-1],
                           "baseline_weights": np.full((2, 4), 0.25)}  # fmt: skip
    model.stack = older
    before = cm.tl.predict_perturbation(held, model, ["KO_A"], device="cpu", predictor="baselines")
    expected = sum(0.25 * np.asarray(baselines[b].X[baselines[b].obs["is_predicted"].to_numpy()])
                   for b in ("control", "perturbation_mean", "context_mean", "linear"))  # fmt: skip
    np.testing.assert_allclose(before.X[before.obs["is_predicted"].to_numpy()], expected, atol=1e-5)
    # ... also from a folder of that format (3), read by this one
    import cellmint.models._perturbation as module

    with monkeypatch.context() as patch:
        patch.setattr(module, "FORMAT_VERSION", 3)
        folder = cm.io.write_model(model, tmp_path / "format3")
    assert json.loads((folder / "manifest.json").read_text())["format_version"] == 3
    again = cm.tl.predict_perturbation(held, cm.io.read_model(folder), ["KO_A"], device="cpu", predictor="baselines")
    np.testing.assert_array_equal(again.X, before.X)


def test_folders_of_the_first_format_still_load_and_predict():
    """A model folder written by cellmint before stacking (format 1, frozen in tests/tl/_data) predicts as it did."""
    folder = DATA / "perturbation_model_v1"
    stored = np.load(DATA / "perturbation_model_v1_prediction.npz", allow_pickle=False)
    model = cm.io.read_model(folder)
    assert model.stack is None
    assert len(model.nets) == 1
    adata = screen()
    held = adata[(adata.obs["donor"] == "d3") & (adata.obs["perturbation"] == "control")].copy()
    pred = cm.tl.predict_perturbation(held, model, ["KO_A", "KO_B"], device="cpu")  # falls back to the network
    assert pred.uns["cellmint_perturbation"]["predictor"] == "network"
    assert list(pred.var_names) == list(stored["genes"])
    np.testing.assert_allclose(pred.X, stored["X"], rtol=1e-5, atol=1e-5)
