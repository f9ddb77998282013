"""Run CellTypist in its own environment: train on one .h5ad, annotate another, write the predictions.

Called by ``benchmarks/annotator.py`` with the interpreter of ``benchmarks/.envs/celltypist``:
``python _celltypist_run.py train.h5ad test.h5ad label_key predictions.csv``. Both files hold
log1p(10,000-normalised) values, what ``celltypist.train``/``annotate`` expect; CellTypist's own
defaults are used (logistic regression, best match, no majority voting).
"""

import json
import sys
import time

import anndata as ad
import celltypist

train_path, test_path, label_key, out_path = sys.argv[1:5]
train, test = ad.read_h5ad(train_path), ad.read_h5ad(test_path)
t0 = time.perf_counter()
model = celltypist.train(train, labels=label_key, n_jobs=2)
t1 = time.perf_counter()
result = celltypist.annotate(test, model=model, majority_voting=False)
t2 = time.perf_counter()
result.predicted_labels["predicted_labels"].astype(str).to_csv(out_path)
print(json.dumps({"train_s": t1 - t0, "annotate_s": t2 - t1, "version": celltypist.__version__}))
