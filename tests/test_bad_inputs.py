"""Hostile input, across the public API and the command line: every case is an error of the right type whose
message names the problem (the argument, column, file or value, and what to do) — never a raw KeyError from
deep inside, a scipy or torch message, a traceback on the command line, or a silently wrong result."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cellmint as cm
from cellmint._utils._files import manifest_bytes
from cellmint._utils._lock import LockBusyError, writer_lock
from cellmint.cli import main

FROZEN = Path(__file__).parent / "models" / "_data"


@dataclass
class Env:
    root: Path
    adata: object
    store: Path
    model: Path
    h5ad: Path
    text_h5ad: Path
    truncated_h5ad: Path
    plain_dir: Path
    n: int = 0

    def fresh(self, name: str = "x") -> Path:
        """A path that does not exist yet."""
        self.n += 1
        return self.root / f"{self.n}_{name}"

    def copy(self, **changes):
        adata = self.adata.copy()
        for key, value in changes.items():
            setattr(adata, key, value)
        return adata

    def store_copy(self) -> Path:
        target = self.fresh("store.zarr")
        shutil.copytree(self.store, target)
        return target

    def model_copy(self) -> Path:
        target = self.fresh("model")
        shutil.copytree(self.model, target)
        return target


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad_inputs")
    adata = cm.datasets.synthetic(200, 30, n_cell_types=3, n_donors=4, random_state=0, progress=False)
    adata.obs["depth"] = np.arange(200, dtype=float)
    store = root / "store.zarr"
    cm.pp.build_store(adata, store, label_keys="cell_type", group_key="donor", obs_keys=["depth"], progress=False)
    model = root / "model"
    cm.tl.train_annotator(adata.copy(), "cell_type", hidden=(8,), max_epochs=2, model_dir=model, progress=False)
    h5ad = root / "good.h5ad"
    adata.write_h5ad(h5ad)
    text = root / "notes.h5ad"
    text.write_text("cell\tcount\nAAAC\t3\n")
    truncated = root / "truncated.h5ad"
    truncated.write_bytes(h5ad.read_bytes()[: h5ad.stat().st_size // 3])
    plain = root / "plain_folder"
    plain.mkdir()
    (plain / "readme.txt").write_text("not data")
    return Env(root, adata, store, model, h5ad, text, truncated, plain)


CASES = []


def case(name: str, error: type[Exception], pattern: str):
    """Register ``call(env)`` as a bad-input case raising ``error`` whose message matches ``pattern``."""

    def register(call):
        CASES.append(pytest.param(call, error, pattern, id=name))
        return call

    return register


def build(e: Env, data=None, **kwargs):
    return cm.pp.build_store(e.adata if data is None else data, kwargs.pop("path", None) or e.fresh("s.zarr"),
                             **{"label_keys": ["cell_type"], "progress": False, **kwargs})  # fmt: skip


def train(e: Env, data=None, **kwargs):
    settings = {"hidden": (8,), "max_epochs": 1, "progress": False, **kwargs}
    return cm.tl.train_annotator(e.adata.copy() if data is None else data, settings.pop("label_keys", "cell_type"),
                                 **settings)  # fmt: skip


def counts_with(e: Env, row: int, value: float):
    X = e.adata.X.tolil()
    X[row, 1] = value
    return e.copy(X=X.tocsr())


# -- build_store ---------------------------------------------------------------------------------
case("build: data is a number", TypeError, r"Input 0 is a int; expected an AnnData or a path")(lambda e: build(e, 5))
case("build: no such file", FileNotFoundError, r"Input 0: no such file or folder: .*nowhere.h5ad")(
    lambda e: build(e, e.root / "nowhere.h5ad")
)
case("build: a text file named .h5ad", ValueError, r"notes.h5ad is not a readable .h5ad file \(file signature not")(
    lambda e: build(e, e.text_h5ad)
)
case("build: a truncated .h5ad", ValueError, r"truncated.h5ad is not a readable .h5ad file .*truncated")(
    lambda e: build(e, e.truncated_h5ad)
)
case("build: a plain folder", ValueError, r"cannot read .*plain_folder \(expected .h5ad, .zarr, 10x")(
    lambda e: build(e, e.plain_dir)
)
case("build: an empty list", ValueError, r"No input given")(lambda e: build(e, []))
case("build: label_keys a number", TypeError, r"label_keys must be a column name or a list of column names, not 5")(
    lambda e: build(e, label_keys=5)
)
case("build: label_keys with a number", TypeError, r"label_keys must be a column name or a list")(
    lambda e: build(e, label_keys=["cell_type", 1])
)
case("build: label key missing", KeyError, r"adata\[0\] has no obs column \['tissue'\]; its columns: \[")(
    lambda e: build(e, label_keys="tissue")
)
case("build: group_key a list", TypeError, r"group_key must be one obs column name, not \['donor'\]")(
    lambda e: build(e, group_key=["donor"])
)
case("build: obs key missing", KeyError, r"has no obs column \['nope'\]")(lambda e: build(e, obs_keys=["nope"]))
case("build: batch_cells=0", ValueError, r"batch_cells must be a positive integer or None, not 0")(
    lambda e: build(e, batch_cells=0)
)
case("build: batch_cells=1.5", ValueError, r"batch_cells must be a positive integer or None, not 1.5")(
    lambda e: build(e, batch_cells=1.5)
)
case("build: a gene that does not exist", ValueError, r"adata\[0\] lacks 1: \['NOT_A_GENE'\].*missing_genes='zero'")(
    lambda e: build(e, genes=["gene_00000", "NOT_A_GENE"])
)
case("build: genes names no column", ValueError, r"genes='nope' is neither 'intersection', 'union' nor a boolean")(
    lambda e: build(e, genes="nope")
)
case("build: a gene listed twice", ValueError, r"The `genes` list has duplicates")(
    lambda e: build(e, genes=["gene_00000", "gene_00000"])
)
case("build: an empty gene list", ValueError, r"The gene panel is empty")(lambda e: build(e, genes=[]))
case("build: missing_genes value", ValueError, r"missing_genes must be 'error' or 'zero', not 'skip'")(
    lambda e: build(e, missing_genes="skip")
)
case("build: layer missing", KeyError, r"Layer 'raw' not found")(lambda e: build(e, layer="raw"))
case("build: log-normalised values", ValueError, r"adata\[0\]: X has non-integer values")(
    lambda e: build(e, e.copy(X=np.log1p(e.adata.X)))
)
case("build: a negative count", ValueError, r"adata\[0\]: X has negative values .*cell 7")(
    lambda e: build(e, counts_with(e, 7, -2))
)
case("build: a NaN count", ValueError, r"adata\[0\]: X contains NaN or infinite values \(cell 9\)")(
    lambda e: build(e, counts_with(e, 9, np.nan))
)
case("build: an empty input", ValueError, r"adata\[0\] is empty \(0 cells × 30 genes\)")(
    lambda e: build(e, e.adata[:0].copy())
)


def _nan_label(e):
    adata = e.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[3, adata.obs.columns.get_loc("cell_type")] = None
    return build(e, adata)


case("build: a label is NaN", ValueError, r"Label 'cell_type' is empty \(NaN or blank\) for 1 cells")(_nan_label)


def _duplicate_names(e):
    adata = e.copy()
    adata.obs_names = ["same"] * adata.n_obs
    return build(e, adata)


case("build: duplicate cell names", ValueError, r"Cell names occur twice \(in adata\[0\]\), e.g. \['same'\]")(
    _duplicate_names
)
case("build: the same input twice", ValueError, r"adata\[1\] is the same input as adata\[0\].*allow_duplicates")(
    lambda e: build(e, [e.adata, e.adata])
)


def _duplicate_genes(e):
    adata = e.copy()
    adata.var_names = ["g"] * adata.n_vars
    return build(e, adata)


case("build: duplicated gene names", ValueError, r"duplicated gene names .*var_names_make_unique")(_duplicate_genes)


def _disjoint(e):
    other = e.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    other.obs_names = [f"o{i}" for i in range(other.n_obs)]
    return build(e, [e.adata, other], genes="intersection")


case("build: inputs share no gene", ValueError, r"The gene panel is empty: the inputs share no genes")(_disjoint)


def _mixed_obs(e):
    other = e.copy()
    other.obs_names = [f"o{i}" for i in range(other.n_obs)]
    other.obs["depth"] = other.obs["depth"].astype(str)
    return build(e, [e.adata, other], obs_keys=["depth"])


case("build: obs column changes type", ValueError, r"obs column 'depth' holds numbers in the first input")(_mixed_obs)
case("build: object values", ValueError, r"holds values of dtype object, not numbers|dtype object")(
    lambda e: build(e, e.copy(X=np.asarray(e.adata.X.toarray(), dtype=object)))
)
case("build: path is a file", FileExistsError, r"good.h5ad is a file; a store is a folder")(
    lambda e: build(e, path=e.h5ad)
)
case("build: path is someone's folder", FileExistsError, r"plain_folder exists and is not a cellmint store")(
    lambda e: build(e, path=e.plain_dir)
)
case("build: existing store, resume=False", FileExistsError, r"A store exists at .*pass resume=True")(
    lambda e: build(e, path=e.store_copy(), label_keys="cell_type", group_key="donor", obs_keys=["depth"], resume=False)
)
case("build: existing store, other parameters", ValueError, r"was begun with other parameters \(\['group_key'")(
    lambda e: build(e, path=e.store_copy())
)


def _more_inputs(e):
    other = e.copy()
    other.obs_names = [f"o{i}" for i in range(other.n_obs)]
    return build(e, [e.adata, other], path=e.store_copy(), group_key="donor", obs_keys=["depth"])


case("build: existing store, other inputs", ValueError, r"inputs changed since .*\(1 inputs then, 2 now\)")(
    _more_inputs
)


def _busy_store(e):
    path = e.store_copy()
    outcome = []
    with writer_lock(path / ".cellmint.lock", what="a test writer"):
        thread = threading.Thread(target=lambda: outcome.append(_catch(lambda: cm.Store(path).make_split("x"))))
        thread.start()
        thread.join()
    raise outcome[0]


def _catch(call):
    try:
        call()
    except Exception as err:
        return err
    return AssertionError("no error")


case("store: written by another writer", LockBusyError, r"the store at .* is being written by another thread")(
    _busy_store
)

# -- Store -----------------------------------------------------------------------------------------
case("store: no such folder", FileNotFoundError, r"nowhere.zarr is not a cellmint store: manifest.json is missing")(
    lambda e: cm.Store(e.root / "nowhere.zarr")
)
case("store: a file", NotADirectoryError, r"good.h5ad is a file, not a cellmint store")(lambda e: cm.Store(e.h5ad))
case("store: a plain folder", FileNotFoundError, r"plain_folder is not a cellmint store: manifest.json is missing")(
    lambda e: cm.Store(e.plain_dir)
)


def _damaged_manifest(e):
    path = e.store_copy()
    (path / "manifest.json").write_text('{"format_version": 3, "n_obs"')
    return cm.Store(path)


case("store: manifest not JSON", ValueError, r"manifest of the store at .* is corrupted \(not JSON")(_damaged_manifest)


def _edited_manifest(e):
    path = e.store_copy()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["n_obs"] = 150
    (path / "manifest.json").write_text(json.dumps(manifest))
    return cm.Store(path)


case("store: manifest edited", ValueError, r"manifest of the store at .* is refused: .*edited or damaged")(
    _edited_manifest
)


def _newer_store(e):
    path = e.store_copy()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 9
    (path / "manifest.json").write_text(json.dumps(manifest))
    return cm.Store(path)


case("store: newer format", ValueError, r"format version 9, written by cellmint .*Upgrade cellmint")(_newer_store)
case("store: rows outside", IndexError, r"Rows 0:1000 are outside the store's 200 cells")(
    lambda e: cm.Store(e.store).read_rows(0, 1000)
)
case("store: unknown split", KeyError, r"No split 'nope' in this store; splits: \['default'\]. Make one")(
    lambda e: cm.Store(e.store).split_codes("nope")
)
case("store: unknown subset", ValueError, r"subset must be one of \('train', 'val', 'test'\), not 'dev'")(
    lambda e: cm.Store(e.store).split_rows("default", "dev")
)
case("store: to_adata unknown split", KeyError, r"No split 'nope' in this store")(
    lambda e: cm.Store(e.store).to_adata("nope")
)
case("split: test_fraction > 1", ValueError, r"test_fraction must be in \[0, 1\), not 1.5")(
    lambda e: cm.Store(e.store_copy()).make_split("x", test_fraction=1.5)
)
case("split: fraction as text", ValueError, r"val_fraction must be in \[0, 1\), not '0.1'")(
    lambda e: cm.Store(e.store_copy()).make_split("x", val_fraction="0.1")
)
case("split: fractions leave no training cells", ValueError, r"test_fraction \+ val_fraction must leave cells")(
    lambda e: cm.Store(e.store_copy()).make_split("x", test_fraction=0.5, val_fraction=0.5)
)
case("split: exists", ValueError, r"A split named 'default' exists; pass overwrite=True to replace it")(
    lambda e: cm.Store(e.store_copy()).make_split("default")
)
case("split: group key missing", KeyError, r"group_key 'patient' is neither the store's group nor one of its obs")(
    lambda e: cm.Store(e.store_copy()).make_split("x", group_key="patient")
)
case("split: label key missing", KeyError, r"label_key 'tissue' is not a label key of the store \(\['cell_type'\]\)")(
    lambda e: cm.Store(e.store_copy()).make_split("x", label_key="tissue")
)
case("split: a name with a slash", ValueError, r"A split's name must be a non-empty string without '/'")(
    lambda e: cm.Store(e.store_copy()).make_split("a/b")
)
case("loader: batch_size=0", ValueError, r"batch_size must be an integer ≥ 1, not 0")(
    lambda e: cm.Store(e.store).loader(0)
)
case("loader: block_size=0", ValueError, r"block_size must be an integer ≥ 1, not 0")(
    lambda e: cm.Store(e.store).loader(8, block_size=0)
)
case("loader: balance", ValueError, r"balance must be None, 'sqrt' or 'inverse', not 'equal'")(
    lambda e: cm.Store(e.store).loader(8, balance="equal")
)
case("loader: label key", KeyError, r"label_key 'tissue' is not a label key of the store")(
    lambda e: cm.Store(e.store).loader(8, balance="sqrt", label_key="tissue")
)
case("loader: rows outside", IndexError, r"rows must lie in 0..199")(
    lambda e: cm.Store(e.store).loader(8, rows=np.array([0, 500]))
)
case("loader: unknown split", KeyError, r"No split 'mine' in this store")(
    lambda e: cm.Store(e.store).loader(8, split="mine:train")
)
case("loader: start method", ValueError, r"worker_start_method must be None, 'fork', 'spawn' or 'forkserver'")(
    lambda e: cm.Store(e.store).loader(8, num_workers=1, worker_start_method="thread")
)


def _appended(e, data, **kwargs):
    return cm.Store(e.store_copy()).append(data, **kwargs)


def _renamed(e, prefix="n", **changes):
    adata = e.copy(**changes)
    adata.obs_names = [f"{prefix}{i}" for i in range(adata.n_obs)]
    return adata


case("append: nothing", ValueError, r"No input given to append")(lambda e: _appended(e, []))
case("append: missing obs column", KeyError, r"has no obs column \['depth'\]")(
    lambda e: _appended(e, _renamed(e, obs=e.adata.obs.drop(columns="depth")))
)
case("append: cells already in the store", ValueError, r"Cell names occur twice \(in the store already\)")(
    lambda e: _appended(e, e.adata[:50].copy())
)
case("append: the same input again", ValueError, r"adata\[1\] is the same input as adata\[0\] \(cell and gene names")(
    lambda e: _appended(e, e.adata)
)
case("append: missing panel genes", ValueError, r"adata\[1\] lacks 5: \['gene_00000'.*missing_genes='zero'")(
    lambda e: _appended(e, _renamed(e)[:, 5:].copy())
)
case("append: no shared gene", ValueError, r"shares no gene with the store's panel")(
    lambda e: _appended(e, _renamed(e, var=e.adata.var.set_axis([f"x{i}" for i in range(30)])), missing_genes="zero")
)
case("append: a bad value", ValueError, r"adata\[1\]: X has non-integer values")(
    lambda e: _appended(e, _renamed(e, X=e.adata.X * 0.5))
)
case("rollback: nothing to undo", ValueError, r"is complete: there is no unfinished append to roll back")(
    lambda e: cm.Store(e.store_copy()).rollback()
)


def _v2_split(e):
    path = e.fresh("v2.zarr")
    shutil.copytree(Path(__file__).parent / "store" / "_data" / "store_v2.zarr", path)
    return cm.Store(path).make_split("mine")


case("store: format 2 is not written", ValueError, r"format version 2, which this cellmint reads but no longer writ")(
    _v2_split
)


def _deleted_label_chunk(e):
    path = e.store_copy()
    (path / "labels" / "cell_type" / "c" / "0").unlink()
    return cm.Store(path).labels


case("store: a deleted label chunk", ValueError, r"chunk file c/0 of the store array labels/cell_type .* is missing")(
    _deleted_label_chunk
)


def _flipped_X_chunk(e):
    path = e.store_copy()
    chunk = path / "X" / "data" / "c" / "0"
    payload = bytearray(chunk.read_bytes())
    payload[40] ^= 0x01
    chunk.write_bytes(bytes(payload))
    return list(cm.Store(path).loader(32, split=None))


case("store: a flipped count chunk", ValueError, r"chunk file c/0 of the store array X/data .* fails its checksum")(
    _flipped_X_chunk
)

# -- models ------------------------------------------------------------------------------------------
case("model: no such folder", FileNotFoundError, r"nowhere is not a cellmint model folder: no such folder")(
    lambda e: cm.io.read_model(e.root / "nowhere")
)
case("model: a file", NotADirectoryError, r"good.h5ad is a file, not a cellmint model folder")(
    lambda e: cm.io.read_model(e.h5ad)
)
case("model: a plain folder", FileNotFoundError, r"plain_folder is not a cellmint model folder: manifest.json is")(
    lambda e: cm.io.read_model(e.plain_dir)
)


def _reseal(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_bytes(manifest_bytes(manifest))


def _pickled_weights(e):
    path = e.model_copy()
    payload = pickle.dumps({"net": print})
    (path / "weights.pt").write_bytes(payload)
    _reseal(path, lambda m: m["files"].__setitem__("weights.pt", hashlib.sha256(payload).hexdigest()))
    return cm.io.read_model(path)


case("model: weights.pt is a pickle", ValueError, r"weights.pt is not a weights file cellmint can read: .*never loads")(
    _pickled_weights
)


def _tensor_list(e):
    path = e.model_copy()
    buffer = io.BytesIO()
    torch.save([torch.zeros(2)], buffer)
    (path / "weights.pt").write_bytes(buffer.getvalue())
    _reseal(path, lambda m: m["files"].__setitem__("weights.pt", hashlib.sha256(buffer.getvalue()).hexdigest()))
    return cm.io.read_model(path)


case("model: weights.pt holds a list", ValueError, r"weights.pt holds a list, not a state dict of named tensors")(
    _tensor_list
)


def _wrong_weights(e):
    path = e.model_copy()
    buffer = io.BytesIO()
    torch.save({"encoder.weight": torch.zeros(2, 2)}, buffer)
    (path / "weights.pt").write_bytes(buffer.getvalue())
    _reseal(path, lambda m: m["files"].__setitem__("weights.pt", hashlib.sha256(buffer.getvalue()).hexdigest()))
    return cm.io.read_model(path)


case("model: weights of another network", ValueError, r"The weights in .* do not fit the architecture in its")(
    _wrong_weights
)


def _truncated_weights(e):
    path = e.model_copy()
    (path / "weights.pt").write_bytes((path / "weights.pt").read_bytes()[:100])
    return cm.io.read_model(path)


case("model: weights truncated", ValueError, r"weights.pt does not match the checksum in its manifest")(
    _truncated_weights
)


def _unknown_kind(e):
    path = e.model_copy()
    _reseal(path, lambda m: m.__setitem__("kind", "cellmint.Embedder"))
    return cm.io.read_model(path)


case("model: unknown kind", ValueError, r"of kind 'cellmint.Embedder', which this cellmint cannot read")(_unknown_kind)


def _swapped_classes(e):
    path = e.model_copy()
    manifest = json.loads((path / "manifest.json").read_text())
    classes = manifest["classes"]["cell_type"]
    classes[0], classes[1] = classes[1], classes[0]
    (path / "manifest.json").write_text(json.dumps(manifest))
    return cm.io.read_model(path)


case("model: class names swapped", ValueError, r"manifest of the model at .* is refused: its content does not match")(
    _swapped_classes
)


def _no_seal(e):
    path = e.model_copy()
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["manifest_sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    return cm.io.read_model(path)


case("model: manifest checksum removed", ValueError, r"lacks its checksum \(manifest_sha256\), which format 2 always")(
    _no_seal
)


def _missing_reference(e):
    path = e.model_copy()
    (path / "reference.npz").unlink()
    return cm.io.read_model(path)


case("model: a file missing", FileNotFoundError, r"is incomplete: reference.npz is missing")(_missing_reference)
case("model: save a non-model", TypeError, r"write_model saves cellmint models, not dict")(
    lambda e: cm.io.write_model({}, e.fresh("m"))
)
case("model: save over a file", NotADirectoryError, r"good.h5ad is a file; a model is saved to a folder")(
    lambda e: cm.io.read_model(e.model).save(e.h5ad)
)
case("model: perturbation model as annotator", TypeError, r"is a PerturbationModel, not a Annotator")(
    lambda e: cm.tl.annotate(e.copy(), FROZEN / "perturbation_v1")
)

# -- train_annotator --------------------------------------------------------------------------------
case("train: batch_size=0", ValueError, r"batch_size must be an integer ≥ 1, not 0")(lambda e: train(e, batch_size=0))
case("train: max_epochs=0", ValueError, r"max_epochs must be an integer ≥ 1, not 0")(lambda e: train(e, max_epochs=0))
case("train: no cells", ValueError, r"The data has 0 cell\(s\); training needs at least 2")(
    lambda e: train(e, e.adata[:0].copy())
)
case("train: one cell", ValueError, r"The data has 1 cell\(s\); training needs at least 2")(
    lambda e: train(e, e.adata[:1].copy())
)


def _one_training_cell(e):
    adata = e.copy()
    adata.obs["part"] = ["train"] + ["test"] * (adata.n_obs - 1)
    return train(e, adata, split="part")


case("train: one training cell", ValueError, r"The split has 1 training cell\(s\) and 0 validation cell\(s\)")(
    _one_training_cell
)
case("train: label_keys a number", TypeError, r"label_keys must be a label column name or a list of them, not 3")(
    lambda e: train(e, label_keys=3)
)
case("train: label_keys empty", ValueError, r"label_keys is empty")(lambda e: train(e, label_keys=[]))
case("train: label missing", KeyError, r"adata.obs has no label column 'tissue'; columns: \[")(
    lambda e: train(e, label_keys="tissue")
)
case("train: balance", ValueError, r"balance must be None, 'sqrt' or 'inverse', not 'max'")(
    lambda e: train(e, balance="max")
)
case("train: input kind", ValueError, r"input must be 'auto', 'counts' or 'lognorm', not 'raw'")(
    lambda e: train(e, input="raw")
)
case("train: device", ValueError, r"device='tpu' is not a torch device; use 'auto', 'cpu'")(
    lambda e: train(e, device="tpu")
)
case("train: negative learning rate", ValueError, r"lr must be > 0 and weight_decay ≥ 0, not lr=-0.1")(
    lambda e: train(e, lr=-0.1)
)
case("train: dropout 1.5", ValueError, r"dropout must be in \[0, 1\), not 1.5")(lambda e: train(e, dropout=1.5))
case("train: early_stopping=0", ValueError, r"early_stopping must be None \(train all epochs\) or an integer ≥ 1")(
    lambda e: train(e, early_stopping=0)
)
case("train: num_workers=-1", ValueError, r"num_workers must be an integer ≥ 0, not -1")(
    lambda e: train(e, num_workers=-1)
)
case("train: hidden empty", ValueError, r"hidden must list at least one layer size")(lambda e: train(e, hidden=()))


def _bad_split_values(e):
    adata = e.copy()
    adata.obs["part"] = "training"
    return train(e, adata, split="part")


case("train: split column values", ValueError, r"Split column 'part' holds \['training'\]; expected train / val")(
    _bad_split_values
)
case("train: a gene list with an absent gene", KeyError, r"1 genes of the `genes` list are not in adata.var_names")(
    lambda e: train(e, genes=["gene_00001", "NOT_A_GENE"])
)
case("train: embedding missing", KeyError, r"adata.obsm has no 'X_umap'")(lambda e: train(e, embedding_keys=["X_umap"]))
case("train: store label missing", KeyError, r"The store has no labels \['tissue'\]; its label keys: \['cell_type'\]")(
    lambda e: train(e, cm.Store(e.store), label_keys="tissue")
)
case("train: store split missing", KeyError, r"No split 'mine' in this store")(
    lambda e: train(e, cm.Store(e.store), split="mine")
)
case("train: store with lognorm", ValueError, r"A store holds raw counts: input='lognorm' does not apply")(
    lambda e: train(e, cm.Store(e.store), input="lognorm")
)

# -- annotate -------------------------------------------------------------------------------------------
case("annotate: gene_key missing", KeyError, r"gene_key='symbol' is not a column of the query's var")(
    lambda e: cm.tl.annotate(e.copy(), e.model, gene_key="symbol")
)
case("annotate: no model", ValueError, r"No model given and adata.uns\['cellmint'\] names no model folder")(
    lambda e: cm.tl.annotate(e.copy())
)
case("annotate: model is a number", TypeError, r"model must be a Annotator or a model folder, not int")(
    lambda e: cm.tl.annotate(e.copy(), 3)
)
case("annotate: knn", ValueError, r"knn must be 'low_confidence', 'all' or 'off', not 'some'")(
    lambda e: cm.tl.annotate(e.copy(), e.model, knn="some")
)
case("annotate: cluster column missing", KeyError, r"adata.obs has no cluster column 'leiden'")(
    lambda e: cm.tl.annotate(e.copy(), e.model, cluster_key="leiden")
)
case("annotate: no shared genes", ValueError, r"Only 0 of the model's 30 genes \(0%\) are in the query")(
    lambda e: cm.tl.annotate(e.copy(var=e.adata.var.set_axis([f"x{i}" for i in range(30)])), e.model)
)
case("annotate: a text file as query", ValueError, r"notes.h5ad is not a readable .h5ad file")(
    lambda e: cm.tl.annotate(e.text_h5ad, e.model)
)
case("annotate: no such query", FileNotFoundError, r"No such file or store: .*nowhere.h5ad")(
    lambda e: cm.tl.annotate(e.root / "nowhere.h5ad", e.model)
)


def _unknown_clash(e):
    classes = cm.io.read_model(e.model).classes["cell_type"]
    return cm.tl.annotate(e.copy(), e.model, unknown_label=classes[0])


case("annotate: unknown_label is a class", ValueError, r"The model has a class named .* pass another unknown_label")(
    _unknown_clash
)
case("hvg: a text file named .h5ad", ValueError, r"notes.h5ad is not a readable .h5ad file")(
    lambda e: cm.pp.select_hvgs(e.text_h5ad, n_top_genes=5)
)


def test_there_are_at_least_80_cases():
    assert len(CASES) >= 80


@pytest.mark.parametrize(("call", "error", "pattern"), CASES)
def test_bad_input_is_a_clear_error(env, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(env)


# -- command line ----------------------------------------------------------------------------------------
CLI_CASES = [
    pytest.param(lambda e: ["build-store", str(e.text_h5ad), str(e.fresh("s.zarr"))], r"is not a readable .h5ad",
                 id="build-store: a text file"),
    pytest.param(lambda e: ["build-store", str(e.truncated_h5ad), str(e.fresh("s.zarr"))], r"truncated",
                 id="build-store: a truncated file"),
    pytest.param(lambda e: ["build-store", str(e.plain_dir), str(e.fresh("s.zarr"))], r"cannot read .*plain_folder",
                 id="build-store: a plain folder"),
    pytest.param(lambda e: ["build-store", str(e.h5ad), str(e.fresh("s.zarr")), "--label-keys", "tissue"],
                 r"has no obs column \['tissue'\]", id="build-store: a missing label column"),
    pytest.param(lambda e: ["build-store", str(e.h5ad), str(e.h5ad)], r"good.h5ad is a file; a store is a folder",
                 id="build-store: the store path is a file"),
    pytest.param(lambda e: ["train", str(e.plain_dir), str(e.fresh("m")), "--label-keys", "cell_type"],
                 r"plain_folder is a folder but not a cellmint store", id="train: a plain folder"),
    pytest.param(lambda e: ["train", str(e.root / "nowhere.h5ad"), str(e.fresh("m")), "--label-keys", "cell_type"],
                 r"No such store or .h5ad file", id="train: no such file"),
    pytest.param(lambda e: ["train", str(e.truncated_h5ad), str(e.fresh("m")), "--label-keys", "cell_type"],
                 r"truncated.h5ad is not a readable .h5ad file", id="train: a truncated file"),
    pytest.param(lambda e: ["train", str(e.store), str(e.fresh("m")), "--label-keys", "cell_type", "--max-epochs",
                            "0"], r"max_epochs must be an integer ≥ 1", id="train: zero epochs"),
    pytest.param(lambda e: ["annotate", str(e.h5ad), str(e.model), str(e.root / "no_folder" / "out.csv")],
                 r"folder of the output table .*no_folder/out.csv does not exist", id="annotate: missing out folder"),
    pytest.param(lambda e: ["annotate", str(e.h5ad), str(e.model), str(e.root)], r"is a folder; give a file name",
                 id="annotate: output is a folder"),
    pytest.param(lambda e: ["annotate", str(e.text_h5ad), str(e.model), str(e.fresh("o.csv"))],
                 r"is not a readable .h5ad file", id="annotate: a text query"),
    pytest.param(lambda e: ["annotate", str(e.h5ad), str(e.plain_dir), str(e.fresh("o.csv"))],
                 r"plain_folder is not a cellmint model folder", id="annotate: not a model folder"),
    pytest.param(lambda e: ["synthetic", str(e.root / "no_folder" / "s.h5ad")], r"does not exist; create it first",
                 id="synthetic: missing out folder"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "pattern"), CLI_CASES)
def test_the_command_line_prints_one_line_and_exits_2(env, capsys, argv, pattern):
    args = argv(env)
    assert main([*args, "--no-progress"] if args[0] in ("build-store", "train", "annotate") else args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"cellmint {args[0]}: error: ")
    assert re.search(pattern, err), err


def test_the_command_line_shows_the_traceback_with_debug(env, capsys):
    assert main(["--debug", "build-store", str(env.text_h5ad), str(env.fresh("s.zarr"))]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("cellmint build-store: error: ")
    assert main(["train", str(env.plain_dir), str(env.fresh("m")), "--label-keys", "x", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_unexpected_error_is_reported_as_a_bug(env, capsys, monkeypatch):
    import cellmint.pp

    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'obs'")

    monkeypatch.setattr(cellmint.pp, "build_store", broken)
    assert main(["build-store", str(env.h5ad), str(env.fresh("s.zarr"))]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "internal error (AttributeError" in err
    assert "this is a bug in cellmint" in err


def test_no_silent_wrong_output_for_inputs_that_are_accepted(env):
    """Inputs the suite accepts on purpose are stored exactly: a label key given as a string, dense float16."""
    half = env.adata.X.toarray().astype(np.float16)
    store = build(env, env.copy(X=half), label_keys="cell_type")
    assert (store.read_rows(0, store.n_obs) != sp.csr_matrix(half.astype(np.float32))).nnz == 0
    assert store.label_keys == ["cell_type"]
