"""CellTypist's side of ``benchmarks/annotate.py``, run with the interpreter of ``benchmarks/.envs/celltypist``.

``python _celltypist_annotate.py train reference.h5ad label_key model.pkl n_cells``
    log1p(10,000-normalise) the reference counts, train CellTypist's default logistic regression
    on a random ``n_cells`` subsample (all genes, no feature selection), write the model.
``python _celltypist_annotate.py annotate query.h5ad label_key model.pkl [majority]``
    load the query counts and the model, log1p(10,000-normalise) the query (timed apart: ``normalise_s``),
    then time ``celltypist.annotate`` on the in-memory AnnData twice: the first call in this fresh
    process (``first_annotate_s``) and the same call again (``annotate_s``, what the ratio uses: cellmint
    is timed warm too). With ``majority`` (majority voting) only once. Prints one JSON line: the
    timings, the accuracy on ``label_key`` and the peak RSS.
"""

import json
import sys
import time

import anndata as ad
import celltypist
import numpy as np
import scanpy as sc
import scipy.sparse as sp
from _rss import peak_rss_bytes


def lognormalise(adata) -> float:
    t0 = time.perf_counter()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return time.perf_counter() - t0


mode, path, label_key, model_path = sys.argv[1:5]
adata = ad.read_h5ad(path)
if mode == "train":
    n_cells = int(sys.argv[5])
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, min(n_cells, adata.n_obs), replace=False))
    adata = adata[rows].copy()
    lognormalise(adata)
    t0 = time.perf_counter()
    model = celltypist.train(adata, labels=label_key, n_jobs=2)
    train_s = time.perf_counter() - t0
    model.write(model_path)
    print(json.dumps({"train_s": train_s, "train_cells": adata.n_obs, "version": celltypist.__version__}))
else:
    majority = len(sys.argv) > 5 and sys.argv[5] == "majority"
    if majority and not hasattr(sp.csr_array, "getnnz"):
        # scanpy 1.11.5's neighbours (majority voting's over-clustering) call csr_array.getnnz, gone in scipy 1.17
        sp.csr_array.getnnz = lambda self, axis=None: self._getnnz(axis=axis)
    model = celltypist.models.Model.load(model_path)
    truth = adata.obs[label_key].astype(str).to_numpy()
    normalise_s = lognormalise(adata)
    calls = []
    for _ in range(1 if majority else 2):  # the first call in this fresh process, then the same call again
        t0 = time.perf_counter()
        result = celltypist.annotate(adata, model=model, majority_voting=majority)
        calls.append(time.perf_counter() - t0)
    column = "majority_voting" if majority else "predicted_labels"
    predicted = result.predicted_labels[column].astype(str).to_numpy()
    print(json.dumps({"n_obs": adata.n_obs, "normalise_s": normalise_s, "annotate_s": calls[-1],
                      "first_annotate_s": calls[0], "accuracy": float(np.mean(predicted == truth)),
                      "peak_rss_bytes": peak_rss_bytes(), "version": celltypist.__version__}))  # fmt: skip
