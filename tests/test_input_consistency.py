"""The same bad input gives the same error from every public function that takes data.

Each kind of bad input — duplicated gene names, a missing layer, a var column that is not boolean
(as ``genes=``), no gene shared with the model, negative values, NaN, a blank label — goes to every function it
applies to; all of them must raise one error type, with one message prefix (after the name of the
object or matrix, which each message gives first). The decisions live in one module,
:mod:`cellmint._utils._panel`.
"""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellmint as cm

N_GENES = 30
TINY_PERTURBATION = {"hidden": 8, "gene_dim": 2, "n_heads": 1, "n_layers": 1, "set_size": 8, "effect_bins": 4,
                     "sets_per_batch": 2, "max_epochs": 1, "stack": False, "device": "cpu",
                     "progress": False}  # fmt: skip

#: kind of bad input -> (error type, the message's prefix: after the object's or matrix's name)
KINDS = {
    "duplicate gene names": (ValueError, r"^(The query|\S+) holds \d+ duplicated gene names \(e\.g\. \["),
    "missing layer": (KeyError, r"^Layer 'nope' not found; available layers: "),
    "var column not boolean": (ValueError, r"^genes='score' is neither .+ nor a boolean var column of "),
    "no shared genes": (ValueError, r"^Only 0 of the model's \d+ genes \(0%\) are in "),
    "negative counts": (ValueError, r"^(The query's |\S+: |\S+\.)?X has negative values \("),
    "NaN": (ValueError, r"^(The query's |\S+: |\S+\.)?X contains NaN or infinite values"),
    "blank label": (ValueError, r"^\w+ '\w+' is empty \(NaN or blank\) for 1 cells \(e\.g\. \['"),
}


def screen(n_contexts: int = 3, cells: int = 12, seed: int = 0) -> ad.AnnData:
    """Counts of control and knocked-out cells in a few contexts."""
    rng = np.random.default_rng(seed)
    blocks, obs = [], []
    for c in range(n_contexts):
        base = np.exp(rng.normal(1.0, 0.8, N_GENES))
        for label, effect in (("control", 0.0), ("KO_A", 1.0), ("KO_B", -1.0)):
            blocks.append(rng.poisson(base * np.exp(effect), size=(cells, N_GENES)))
            obs += [{"perturbation": label, "donor": f"d{c}"}] * cells
    frame = pd.DataFrame(obs, index=[f"cell{i}" for i in range(len(obs))])
    return ad.AnnData(sp.csr_matrix(np.vstack(blocks).astype(np.float32)), obs=frame,
                      var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Good data of each wing and a tiny model of each, trained once."""
    root = tmp_path_factory.mktemp("consistency")
    cells = cm.datasets.synthetic(120, N_GENES, n_cell_types=3, n_donors=2, random_state=0, progress=False)
    annotator = cm.tl.train_annotator(cells.copy(), "cell_type", hidden=(8,), max_epochs=1, progress=False)
    perturbed = screen()
    model = cm.tl.train_perturbation(perturbed.copy(), "perturbation", "control", context_key="donor",
                                     **TINY_PERTURBATION)  # fmt: skip
    return {"root": root, "cells": cells, "annotator": annotator, "perturbed": perturbed, "model": model}


def bad(adata: ad.AnnData, kind: str) -> tuple[ad.AnnData, dict]:
    """A copy of ``adata`` with the bad input of ``kind``, and the arguments that pass it."""
    adata = adata.copy()
    if kind == "duplicate gene names":
        adata.var_names = [adata.var_names[0], *adata.var_names[:-1]]
    elif kind == "var column not boolean":
        adata.var["score"] = np.linspace(0, 1, adata.n_vars)
        return adata, {"genes": "score"}
    elif kind == "missing layer":
        adata.layers["counts"] = adata.X.copy()
        return adata, {"layer": "nope"}
    elif kind == "no shared genes":
        adata.var_names = [f"other{i}" for i in range(adata.n_vars)]
    elif kind == "blank label":  # the column the call learns from: a cell type, or a perturbation
        key = "cell_type" if "cell_type" in adata.obs else "perturbation"
        adata.obs[key] = adata.obs[key].astype(str)
        adata.obs.iloc[4, adata.obs.columns.get_loc(key)] = " "
    elif kind in ("negative counts", "NaN"):
        X = adata.X.toarray()
        X[0, 1] = -1.0 if kind == "negative counts" else np.nan
        adata.X = sp.csr_matrix(X)
    return adata, {}


def _select_hvgs(made, kind):
    adata, kw = bad(made["cells"], kind)
    cm.pp.select_hvgs(adata, n_top_genes=10, inplace=False, **kw)


def _build_store(made, kind):
    adata, kw = bad(made["cells"], kind)
    path = made["root"] / f"store_{kind.replace(' ', '_')}.zarr"
    cm.pp.build_store(adata, path, label_keys="cell_type", progress=False, **kw)


def _cell_sentences(made, kind):
    adata, kw = bad(made["cells"], kind)
    cm.pp.cell_sentences(adata, n_genes=5, copy=True, progress=False, **kw)


def _train_annotator(made, kind):
    adata, kw = bad(made["cells"], kind)
    cm.tl.train_annotator(adata, "cell_type", hidden=(8,), max_epochs=1, progress=False, **kw)


def _annotate(made, kind):
    adata, kw = bad(made["cells"], kind)
    cm.tl.annotate(adata, made["annotator"], progress=False, **kw)


def _train_perturbation(made, kind):
    adata, kw = bad(made["perturbed"], kind)
    cm.tl.train_perturbation(adata, "perturbation", "control", context_key="donor", **TINY_PERTURBATION, **kw)


def _predict_perturbation(made, kind):
    adata, kw = bad(made["perturbed"], kind)
    cm.tl.predict_perturbation(adata, made["model"], ["KO_A"], predictor="network", device="cpu", **kw)


def _evaluate_perturbation(made, kind):
    real, kw = bad(made["perturbed"], kind)
    pred = made["perturbed"]
    cm.tl.evaluate_perturbation(pred, real, perturbation_key="perturbation", control="control", context_key="donor",
                                baselines=(), normalize_to=None, ceiling=False, **kw)  # fmt: skip


#: every public function that takes data -> the kinds of bad input it can be given
#: what every reader of a matrix meets; training also takes a gene panel and labels, annotating a model's genes
READ = ["duplicate gene names", "missing layer", "negative counts", "NaN"]
TRAIN = [*READ, "var column not boolean", "blank label"]
MAPPED = [*READ, "no shared genes"]
APPLIES = {
    _select_hvgs: READ,
    _build_store: TRAIN,
    _cell_sentences: READ,
    _train_annotator: TRAIN,
    _annotate: MAPPED,
    _train_perturbation: TRAIN,
    _predict_perturbation: MAPPED,
    _evaluate_perturbation: READ,
}
CASES = [pytest.param(call, kind, id=f"{kind}-{call.__name__[1:]}") for call, kinds in APPLIES.items()
         for kind in kinds]  # fmt: skip


@pytest.mark.parametrize(("call", "kind"), CASES)
def test_one_error_per_kind_of_bad_input(made, call, kind):
    error, prefix = KINDS[kind]
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is checked below, to name it in the message
        call(made, kind)
    message = str(caught.value.args[0]) if caught.value.args else ""
    assert type(caught.value) is error, f"{call.__name__[1:]} raised {type(caught.value).__name__}: {message}"
    assert re.match(prefix, message), f"{call.__name__[1:]}: {message!r} does not start as {prefix!r}"


def test_every_kind_is_passed_to_several_functions():
    for kind in KINDS:
        assert sum(kind in kinds for kinds in APPLIES.values()) >= 2, kind
