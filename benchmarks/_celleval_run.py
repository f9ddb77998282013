"""Run cell-eval in its own environment on a real and a predicted .h5ad; write its per-perturbation metrics.

Called by ``benchmarks/celleval_parity.py`` with the interpreter of ``benchmarks/.envs/celleval``:
``python _celleval_run.py real.h5ad pred.h5ad pert_col control outdir results.csv``. Both files hold
log1p-normalised values in ``X`` with the same genes in the same order (cell-eval requires it) and
their own control cells; cell-eval's ``MetricsEvaluator`` runs its ``full`` profile with one thread.
"""

import json
import sys
import time
from importlib.metadata import version

import anndata as ad
from cell_eval import MetricsEvaluator

real_path, pred_path, pert_col, control, outdir, out_path = sys.argv[1:7]
real, pred = ad.read_h5ad(real_path), ad.read_h5ad(pred_path)
t0 = time.perf_counter()
evaluator = MetricsEvaluator(adata_pred=pred, adata_real=real, control_pert=control, pert_col=pert_col,
                             num_threads=1, outdir=outdir)  # fmt: skip
results, _ = evaluator.compute(profile="full", write_csv=False, break_on_error=True)
results.write_csv(out_path)
print(json.dumps({"seconds": time.perf_counter() - t0, "cell_eval": version("cell-eval"), "pdex": version("pdex")}))
