"""The ``cellmint`` command line: pipeline steps for scripts and schedulers.

``cellmint datasets`` checks and summarises the real datasets cellmint ships or can find;
``cellmint synthetic`` writes a synthetic counts matrix to h5ad, streamed with bounded memory;
``cellmint build-store``, ``train`` and ``annotate`` run the main steps on files, for pipelines;
``cellmint demo`` runs them end to end on bundled real data.

Errors a user can fix (a missing or damaged file, a wrong column name, a store another process is
writing) print one line, ``cellmint COMMAND: error: ...``, and exit with status 2; ``--debug`` shows
the Python traceback instead. An unexpected error (a bug) prints one line asking for a report and
exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

# Nothing heavy at module level: `cellmint --help` must not import numpy, pandas, scanpy or torch
# (tests/test_cli.py measures it); each command imports what it needs.


def _dataset_summary(name: str, *, data_dir: str | None) -> dict:
    """Verify one dataset's checksum and compute per-cell count statistics chunk by chunk."""
    import numpy as np

    from ._utils._chunks import iter_row_chunks
    from .datasets import load

    adata = load(name, data_dir=data_dir, backed=True)
    try:
        library, detected, integer = [], [], True
        for chunk in iter_row_chunks(adata, chunk_size=2048, fmt="csr"):
            library.append(np.asarray(chunk.X.sum(axis=1)).ravel())
            detected.append(np.diff(chunk.X.indptr))
            integer &= bool(np.all(chunk.X.data == np.round(chunk.X.data)))
        library, detected = np.concatenate(library), np.concatenate(detected)
        return {
            "dataset": name,
            "cells": adata.n_obs,
            "genes": adata.n_vars,
            "median_counts": float(np.median(library)),
            "median_genes": float(np.median(detected)),
            "sparsity": 1 - detected.sum() / (adata.n_obs * adata.n_vars),
            "integer_counts": integer,
            "labels": "; ".join(f"{key}: {adata.obs[key].nunique()}" for key in _label_keys(name) if key in adata.obs),
            "sha256": adata.uns["dataset"]["sha256"][:12] + "…",
        }
    finally:
        adata.file.close()


def _label_keys(name: str) -> tuple[str, ...]:
    from .datasets._registry import DATASETS

    return DATASETS[name].labels


def _cmd_datasets(args: argparse.Namespace) -> int:
    import pandas as pd

    from .datasets import available

    if args.out:
        _output_folder(args.out, "summary CSV", overwrite=args.overwrite)
    table = available()
    names = args.names or [n for n, row in table.iterrows() if row["bundled"] or args.data_dir]
    rows, missing = [], []
    for name in names:
        try:
            rows.append(_dataset_summary(name, data_dir=args.data_dir))
        except FileNotFoundError as err:
            missing.append((name, str(err)))
    summary = pd.DataFrame(rows).set_index("dataset") if rows else pd.DataFrame()
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        print(summary.to_string(float_format=lambda v: f"{v:,.3g}") if rows else "no dataset found")
    for name, message in missing:
        print(f"\n{name}: {message}", file=sys.stderr)
    if args.out:
        summary.to_csv(args.out)
        print(f"\nwrote {args.out}")
    print(f"\n{len(rows)} dataset(s) verified (sha256) and summarised; {len(missing)} not found.")
    return 1 if missing and args.names else 0


def _cmd_synthetic(args: argparse.Namespace) -> int:
    from ._utils._resources import ResourceMonitor
    from .datasets import synthetic

    _output_folder(args.out, "output file")

    with ResourceMonitor(n_cells=args.n_obs) as monitor:
        adata = synthetic(
            args.n_obs,
            args.n_vars,
            n_perturbations=args.n_perturbations,
            path=args.out,
            random_state=args.seed,
            overwrite=args.overwrite,
            progress=args.progress,
        )
        adata.file.close()
    print(f"wrote {args.out}: {args.n_obs:,} cells × {args.n_vars:,} genes")
    print(f"resources: {monitor.report}")
    return 0


def _is_store(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "manifest.json").is_file()


def _deprecated_order(command: str, old: str, new: str) -> None:
    print(f"cellmint {command}: warning: the order {old} is deprecated and will stop working in the next "
          f"release; write {new} (inputs first, output last).", file=sys.stderr)  # fmt: skip


def _store_and_inputs(paths: list[str]) -> tuple[str, list[str]]:
    """``INPUT... STORE``; the order of cellmint 0.1 (``STORE INPUT...``) is read with a deprecation message.

    The old order is recognised when the first path is not an input (missing, or a cellmint store)
    while the last is an existing input: in the new order the first path is always an existing input.
    """
    first, last = paths[0], paths[-1]
    if (not Path(first).exists() or _is_store(first)) and Path(last).exists() and not _is_store(last):
        _deprecated_order("build-store", "STORE INPUT...", "INPUT... STORE")
        return first, paths[1:]
    return last, paths[:-1]


def _cmd_build_store(args: argparse.Namespace) -> int:
    from . import pp

    if len(args.paths) < 2:
        raise ValueError("build-store needs at least one input and the store: cellmint build-store INPUT... STORE")
    store_path, inputs = _store_and_inputs(args.paths)
    store = pp.build_store(inputs, store_path, genes=args.genes, label_keys=args.label_keys,
                           group_key=args.group_key, layer=args.layer, overwrite=args.overwrite,
                           random_state=args.seed, progress=args.progress)  # fmt: skip
    print(store)
    print(f"verified: {store.verify()}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ._utils._chunks import read_h5ad
    from .store import Store
    from .tl import train_annotator

    source = Path(args.data)
    if not source.exists():
        raise FileNotFoundError(f"No such store or .h5ad file: {source}")
    if source.is_dir() and not (source / "manifest.json").is_file():
        raise ValueError(f"{source} is a folder but not a cellmint store (no manifest.json): give a store built by "
                         "`cellmint build-store`, or an .h5ad file.")  # fmt: skip
    if not args.label_keys:
        raise ValueError("Name the label column(s) to learn: --label-keys KEY (coarse to fine: --label-keys A,B).")
    _output_folder(args.model, "model folder", folder=True, overwrite=args.overwrite)
    data = Store(source) if source.is_dir() else read_h5ad(source, backed="r")
    model = train_annotator(data, args.label_keys, split=args.split, model_dir=args.model, layer=args.layer,
                            genes=args.genes, group_key=args.group_key, max_epochs=args.max_epochs,
                            early_stopping=args.early_stopping or None, batch_size=args.batch_size,
                            device=args.device, unknown_label=args.unknown_label, overwrite=args.overwrite,
                            random_state=args.seed, progress=args.progress, checkpoint_dir=args.checkpoint_dir,
                            checkpoint_every=args.checkpoint_every)  # fmt: skip
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank trains; rank 0 reports
        return 0
    print(model)
    for level, report in model.metrics.items():
        print(f"{level}: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}, "
              f"ECE {report['ece']:.3f} ({report['evaluated_on']}, {int(report['n_cells']):,} cells)")  # fmt: skip
    print(f"untrusted cells will be labelled {model.unknown_label!r}")
    print(f"saved to {args.model}")
    return 0


def _output_folder(path: Path, what: str, *, folder: bool = False, overwrite: bool = False) -> None:
    """Refuse early an output that cannot or may not be written (before a long computation)."""
    path = Path(path)
    parent = path.absolute().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"The folder of the {what} {path} does not exist; create it first.")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"The {what} {path} is a folder; give a file name.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"The {what} {path} exists; pass --overwrite to replace it, or choose another name.")


#: table formats ``annotate`` writes (by suffix); an ``.h5ad`` output also gets the table beside it, as CSV
_TABLES = {".csv": ",", ".tsv": "\t"}


def _annotate_outputs(args: argparse.Namespace) -> tuple[Path | None, Path]:
    """The annotated-AnnData path (or None) and the table path of ``cellmint annotate``."""
    out = args.output or args.out
    if out is None:
        raise ValueError("Name the output: cellmint annotate QUERY MODEL OUT (.h5ad: the annotated AnnData and a "
                         "table beside it; .csv/.tsv: the table only).")  # fmt: skip
    if args.output is not None and args.out is not None and args.output != args.out:
        raise ValueError(f"Two outputs given ({args.out} and --output {args.output}); give one.")
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"The output {out} is a folder; give a file name (OUT.h5ad, OUT.csv or OUT.tsv).")
    suffix = out.suffix.lower()
    if suffix not in (".h5ad", *_TABLES):
        raise ValueError(f"The output {out} must end in .h5ad (annotated AnnData + table), .csv or .tsv (table).")
    adata_path = out if suffix == ".h5ad" else None
    table = Path(args.table) if args.table else (out.with_suffix(".csv") if adata_path else out)
    if table.suffix.lower() not in _TABLES:
        raise ValueError(f"The table {table} must end in .csv or .tsv.")
    if adata_path is not None and Path(args.query).resolve() == adata_path.resolve():
        raise ValueError(f"The output {out} is the query itself; write the annotated AnnData to another file.")
    for path, what in ((adata_path, "output AnnData"), (table, "output table")):
        if path is not None:
            _output_folder(path, what, overwrite=args.overwrite)
    return adata_path, table


def _write_annotated(query: Path, adata, out: Path, key: str) -> None:
    """The query file with the annotation's ``obs``, ``obsm`` and ``uns`` written into a copy (X never loaded).

    ``obsm`` entries of the annotation (``{key}_...``, ``X_{key}_...``) replace those of an earlier one.
    """
    import shutil

    import h5py
    from anndata.io import write_elem

    from ._utils._files import write_file_via

    def fill(tmp: Path) -> None:
        shutil.copyfile(query, tmp)
        with h5py.File(tmp, "r+") as f:
            write_elem(f, "obs", adata.obs)
            if "obsm" not in f:
                write_elem(f, "obsm", {})
            obsm = f["obsm"]  # entries written into the group: anndata >= 0.13 refuses "obsm/name" keys
            for name, value in adata.obsm.items():
                if name.startswith((f"{key}_", f"X_{key}_")) and name in obsm:
                    del obsm[name]  # an earlier annotation's, replaced
                if name not in obsm:
                    write_elem(obsm, name, value)
            write_elem(f, "uns", dict(adata.uns))

    write_file_via(out, fill)


def _resources_line(report: dict) -> str:
    """A resource report from ``uns`` on one line (the units of ``ResourceReport.__str__``)."""
    from ._utils._resources import ResourceReport

    fields = {k: report[k] for k in ResourceReport.__dataclass_fields__ if k in report and k != "extra"}
    return str(ResourceReport(**fields))


def _cmd_annotate(args: argparse.Namespace) -> int:
    from ._utils._chunks import read_h5ad
    from .tl import annotate

    adata_path, table_path = _annotate_outputs(args)
    alpha = None if args.alpha == 0 else args.alpha
    query = read_h5ad(args.query, backed="r")
    try:
        annotate(query, args.model, layer=args.layer, key_added=args.key, gene_key=args.gene_key,
                 strip_ensembl_versions=args.strip_ensembl_versions, knn=args.knn,
                 min_confidence=args.min_confidence, min_margin=args.min_margin, max_distance=args.max_distance,
                 alpha=alpha, class_conditional=args.class_conditional, cluster_key=args.cluster_key,
                 unknown_label=args.unknown_label, unknown=not args.no_unknown, device=args.device,
                 progress=args.progress)  # fmt: skip
        columns = [c for c in query.obs.columns if c == args.key or c.startswith(f"{args.key}_")]
        table = query.obs[columns]
        if adata_path is not None:
            _write_annotated(Path(args.query), query, adata_path, args.key)
    finally:
        query.file.close()
    table.to_csv(table_path, sep=_TABLES[table_path.suffix.lower()])
    info = query.uns[args.key]["annotation"]
    for level, count in info["unknown"].items():
        print(f"{level}: {int(count):,} of {len(table):,} cells {info['unknown_label']!r}")
    print(f"resources: {_resources_line(info['resources'])}")
    print(f"wrote {adata_path} and {table_path}" if adata_path else f"wrote {table_path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Reference → store → annotator → annotate another technology → metrics and confidence plots."""
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    from sklearn.metrics import f1_score

    from . import datasets, pl, pp, tl
    from ._metrics._classification import ECE_BINS, expected_calibration_error

    t0, out = time.perf_counter(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = datasets.cellbench()
    reference = cells[cells.obs["technology"] == "CEL-seq2"].copy()
    query = cells[cells.obs["technology"] == "Drop-seq"].copy()
    print(f"reference: {reference.n_obs} CEL-seq2 cells of {reference.obs['cell_line'].nunique()} cell lines; "
          f"query: {query.n_obs} Drop-seq cells (another technology)")  # fmt: skip
    store = pp.build_store(reference, out / "reference.zarr", label_keys=["cell_line"], overwrite=True,
                           progress=False)  # fmt: skip
    print(f"store: {store}")
    model = tl.train_annotator(store, "cell_line", model_dir=out / "model", overwrite=True, random_state=args.seed,
                               progress=False)  # fmt: skip
    holdout = model.metrics["cell_line"]
    print(f"model: {model}; holdout ({holdout['evaluated_on']}, {int(holdout['n_cells'])} CEL-seq2 cells): accuracy "
          f"{holdout['accuracy']:.3f}, ECE {holdout['ece_uncalibrated']:.3f} → {holdout['ece']:.3f} after "
          f"temperature scaling (ECE: {ECE_BINS} equal-width bins, as everywhere in cellmint)")  # fmt: skip
    tl.annotate(query, model, progress=False)
    truth, labels = query.obs["cell_line"].astype(str), query.obs["cellmint_cell_line"].astype(str)
    unknown = query.obs["cellmint_cell_line_unknown"].to_numpy()
    reason = query.obs["cellmint_cell_line_unknown_reason"].astype(str)
    raw = np.asarray(model.classes["cell_line"])[query.obsm["cellmint_cell_line_proba"].to_numpy().argmax(1)]
    sets = query.obs["cellmint_cell_line_set"].astype(str)
    covered = [t in s.split("|") for t, s in zip(truth, sets, strict=True)]
    proba = query.obsm["cellmint_cell_line_proba"].to_numpy()
    ece = expected_calibration_error(proba.max(1), raw == truth.to_numpy())
    table = pd.DataFrame({
        "cells": [len(truth)],
        "accuracy (Unknown counted wrong)": [f"{(labels == truth).mean():.3f}"],
        "accuracy of labelled cells": [f"{(labels[~unknown] == truth[~unknown]).mean():.3f}" if (~unknown).any()
                                       else "-"],
        "macro-F1 (model's labels)": [f"{f1_score(truth, raw, average='macro'):.3f}"],
        "Unknown": [f"{unknown.mean():.3f}"],
        "  of which: far from the reference": [f"{(reason == 'distance').mean():.3f}"],
        "  of which: low confidence or margin": [f"{reason.isin(['confidence', 'margin']).mean():.3f}"],
        "prediction sets (alpha 0.1): coverage": [f"{np.mean(covered):.3f}"],
        "prediction sets: mean size": [f"{query.obs['cellmint_cell_line_set_size'].mean():.2f}"],
        "median confidence": [f"{query.obs['cellmint_cell_line_confidence'].median():.3f}"],
        f"ECE ({ECE_BINS} bins, as in the figure)": [f"{ece:.3f}"],
    }, index=["Drop-seq query"])  # fmt: skip
    print(table.astype(str).T.to_string())
    table.to_csv(out / "metrics.csv")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    pl.confidence(query, kind="unknown", ax=axes[0], show=False)
    pl.confidence(query, kind="reliability", truth_key="cell_line", ax=axes[1], show=False)
    pl.confidence(query, kind="confusion", truth_key="cell_line", ax=axes[2], show=False)
    fig.suptitle(f"CellBench: {reference.n_obs:,} CEL-seq2 reference cells → {query.n_obs:,} Drop-seq query cells")
    fig.tight_layout()
    fig.savefig(out / "confidence.png", dpi=100)
    plt.close(fig)
    print(f"wrote {out / 'metrics.csv'}, {out / 'confidence.png'} and the model folder {out / 'model'} "
          f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    return 0


class _Keys(argparse.Action):
    """``--label-keys A B`` or ``--label-keys A,B``; paths swallowed when typed before the positionals go back."""

    def __call__(self, parser, namespace, values, option_string=None):
        keys = [key for value in values for key in value.split(",") if key]
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *keys])


def _looks_like_path(token: str) -> bool:
    return (
        Path(token).exists()
        or "/" in token
        or Path(token).suffix.lower() in {".h5ad", ".zarr", ".h5", ".csv", ".tsv", ".hdf5", ".loom"}
    )


def _give_back_paths(args: argparse.Namespace, needed: int) -> None:
    """Paths that ``--label-keys`` (any number of values) swallowed when typed before the positionals.

    ``cellmint train --label-keys cell_type ref.zarr model`` reads ``ref.zarr`` and ``model`` as label
    keys; the trailing ones that look like paths (existing, with a data suffix or a slash) are moved
    back to the positionals until the command has its ``needed`` paths.
    """
    keys = getattr(args, "label_keys", None) or []
    while len(args.paths) < needed and len(keys) > 1 and _looks_like_path(keys[-1]):
        args.paths.insert(0, keys.pop())
    if args.command == "build-store":  # any number of inputs: every trailing path-like key is an input
        while len(keys) > 1 and _looks_like_path(keys[-1]):
            args.paths.insert(0, keys.pop())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cellmint`` command (exposed for the docs and tests)."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="cellmint",
        description="cellmint: atlas-scale single-cell data to trusted annotators and perturbation models. "
        "Every command takes its inputs first and its output last.",
    )
    parser.add_argument("--version", action="version", version=f"cellmint {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("datasets", help="verify and summarise the real datasets (bundled ones by default)")
    p.add_argument("names", nargs="*", help="dataset names (default: all bundled, or all when --data-dir is given)")
    p.add_argument("--data-dir", help="folder holding the larger, non-bundled dataset files")
    p.add_argument("--out", type=Path, help="also write the summary table to this CSV file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_cmd_datasets)

    p = sub.add_parser("synthetic", help="stream a synthetic counts matrix to an .h5ad file")
    p.add_argument("out", type=Path, help="output .h5ad path")
    p.add_argument("--n-obs", type=int, default=10_000, help="cells (default: 10000)")
    p.add_argument("--n-vars", type=int, default=2_000, help="genes (default: 2000)")
    p.add_argument("--n-perturbations", type=int, default=0, help="perturbations besides control (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="force the progress bar")
    p.set_defaults(func=_cmd_synthetic)

    p = sub.add_parser("demo", help="the main job end to end on bundled real data (about a minute)")
    p.add_argument("--out", default="cellmint-demo", help="folder for the store, model, metrics and plot; an "
                   "earlier demo's results there are replaced (default: cellmint-demo)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_cmd_demo)

    progress = {"action": argparse.BooleanOptionalAction, "default": None,
                "help": "show or hide the progress bar (default: shown on a terminal)"}  # fmt: skip
    device = {"default": "auto", "help": "torch device: auto, cpu, cuda, cuda:1, mps (default: auto)"}
    keys_help = "obs columns of labels, coarse to fine (A B or A,B)"
    p = sub.add_parser("build-store", help="build (or resume) a training store from .h5ad/.zarr/10x inputs",
                       usage="cellmint build-store [options] INPUT [INPUT ...] STORE")  # fmt: skip
    p.add_argument("paths", nargs="*", metavar="INPUT... STORE",
                   help="input files (.h5ad, .zarr, 10x .h5 or mtx folders), then the store folder to write "
                   "(.zarr). The order STORE INPUT... of cellmint 0.1 still works, with a warning")  # fmt: skip
    p.add_argument("--label-keys", nargs="+", action=_Keys, default=[], metavar="KEY", help=keys_help)
    p.add_argument("--group-key", help="obs column kept whole by splits (e.g. donor)")
    p.add_argument("--genes", help="'intersection', 'union' or a boolean var column (default: same genes)")
    p.add_argument("--layer", help="layer holding the raw counts (default: X)")
    p.add_argument("--seed", type=int, default=0, help="seed of the default split (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store (default: resume it)")
    p.add_argument("--progress", **progress)
    p.set_defaults(func=_cmd_build_store, n_paths=2)

    p = sub.add_parser("train", help="train an annotator from a store or an .h5ad file into a model folder",
                       usage="cellmint train [options] DATA MODEL --label-keys KEY [KEY ...]")  # fmt: skip
    p.add_argument("paths", nargs="*", metavar="DATA MODEL",
                   help="store folder or .h5ad file, then the model folder to write")  # fmt: skip
    p.add_argument("--label-keys", nargs="+", action=_Keys, default=[], metavar="KEY", help=keys_help)
    p.add_argument("--split", default="default", help="store split, or obs column of train/val/test")
    p.add_argument("--layer", help=".h5ad layer to train on (default: X)")
    p.add_argument("--genes", help=".h5ad: boolean var column of the gene panel, e.g. highly_variable (default: all)")
    p.add_argument("--group-key", help=".h5ad: obs column kept whole when cells are split (e.g. donor)")
    p.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="passes over the training cells (default: 60, fewer on large data: see the docs)",
    )
    p.add_argument(
        "--early-stopping",
        type=int,
        default=10,
        help="stop after this many epochs without a better validation score; 0: never (default: 10)",
    )
    p.add_argument("--batch-size", type=int, help="cells per mini-batch (default: chosen for the device: 256 on a "
                   "CPU, up to 8,192 on a GPU for large references)")  # fmt: skip
    p.add_argument("--unknown-label", help="label of untrusted cells, recorded in the model (default: Unknown, "
                   "or Unassigned when a reference class is called Unknown)")  # fmt: skip
    p.add_argument("--device", **device)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder (atomically)")
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="training checkpoint folder (default: MODEL.checkpoint); rerun the command to resume",
    )
    p.add_argument("--checkpoint-every", default="10 min", help="'10 min', '2 epochs' or '500 steps' (default: 10 min)")
    p.add_argument("--progress", **progress)
    p.set_defaults(func=_cmd_train, n_paths=2)

    p = sub.add_parser("annotate", help="annotate an .h5ad query with a model folder; write .h5ad and/or a table",
                       usage="cellmint annotate [options] QUERY MODEL OUT")  # fmt: skip
    p.add_argument("query", type=Path, help="query .h5ad (read chunk by chunk)")
    p.add_argument("model", type=Path, help="model folder written by `cellmint train`")
    p.add_argument("out", type=Path, nargs="?", help="OUT.h5ad: the annotated AnnData (the query with the "
                   "results in obs/obsm/uns) and OUT.csv beside it; OUT.csv or OUT.tsv: the table only")  # fmt: skip
    p.add_argument("-o", "--output", type=Path, help="the same as OUT")
    p.add_argument("--table", type=Path, help="where to write the table (.csv/.tsv) instead")
    p.add_argument("--layer", help="layer to annotate (default: X)")
    p.add_argument("--key", default="cellmint", help="column prefix (default: cellmint)")
    p.add_argument("--gene-key", help="var column of the gene names to match (default: var_names)")
    p.add_argument("--strip-ensembl-versions", action="store_true", help="match ENSG….16 with ENSG…")
    p.add_argument("--cluster-key", help="obs column of a clustering: also label each cluster by majority")
    p.add_argument("--unknown-label", help="label of untrusted cells (default: the model's, usually Unknown)")
    p.add_argument("--no-unknown", action="store_true", help="keep every label (the _unknown flags are still written)")
    p.add_argument("--min-confidence", type=float, default=0.5, help="confidence below which a label is not "
                   "trusted (default: 0.5)")  # fmt: skip
    p.add_argument("--min-margin", type=float, default=0.1, help="margin below which a label is not trusted "
                   "(default: 0.1)")  # fmt: skip
    p.add_argument("--max-distance", type=_distance, default="auto", help="open-set threshold on the relative "
                   "distance to the reference, or auto: the model's rule (default: auto)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.1, help="prediction sets holding the true class with "
                   "probability 1 - alpha; 0: no sets (default: 0.1)")  # fmt: skip
    p.add_argument("--class-conditional", action="store_true", help="calibrate the prediction sets per class")
    p.add_argument("--knn", choices=("low_confidence", "all", "off"), default="low_confidence",
                   help="nearest-neighbour refinement (default: low_confidence)")  # fmt: skip
    p.add_argument("--device", **device)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--progress", **progress)
    p.set_defaults(func=_cmd_annotate)
    for name in ("build-store", "train", "annotate"):
        sub.choices[name].add_argument(
            "-q",
            "--quiet",
            action="store_true",
            help="log warnings only (default: one line per step, per training epoch)",
        )
    for command in sub.choices.values():  # --debug after the command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the Python traceback of an error")  # fmt: skip
    return parser


def _distance(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', not {value!r}") from None


#: errors a user can act on (bad input, missing or damaged files, a busy store): one line, exit status 2
USER_ERRORS = (ValueError, KeyError, TypeError, IndexError, OSError, RuntimeError)


def _one_line(err: BaseException) -> str:
    """An exception's message (and notes) on one line."""
    message = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in message:
        message = f"{message}: {err.filename}"
    parts = [str(message), *getattr(err, "__notes__", [])]
    return " ".join(" ".join(part.replace("\n- ", "; ").split()) for part in parts if part)


def _run_logged(args: argparse.Namespace) -> int:
    """Steps of a pipeline log at info level (one line per training epoch, resources), ``--quiet``: warnings only."""
    import scanpy as sc

    before = sc.settings.verbosity
    sc.settings.verbosity = "warning" if args.quiet else "info"
    try:
        return args.func(args)
    finally:  # main() may be called in a running Python (tests, notebooks)
        sc.settings.verbosity = before


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellmint`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "n_paths"):  # build-store, train: positionals checked here (see _give_back_paths)
        _give_back_paths(args, args.n_paths)
        expected = {"build-store": "INPUT... STORE", "train": "DATA MODEL"}[args.command]
        if len(args.paths) < args.n_paths or (args.command == "train" and len(args.paths) > 2):
            print(f"cellmint {args.command}: error: expected {expected}, got {len(args.paths)} path(s): "
                  f"{' '.join(args.paths) or '-'}", file=sys.stderr)  # fmt: skip
            return 2
        if args.command == "train":
            args.data, args.model = args.paths[0], Path(args.paths[1])
    try:
        return _run_logged(args) if hasattr(args, "quiet") else args.func(args)
    except KeyboardInterrupt:
        print(f"cellmint {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(args, "debug", False):
            traceback.print_exc()
        if isinstance(err, USER_ERRORS):
            print(f"cellmint {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        print(f"cellmint {args.command}: internal error ({type(err).__name__}: {_one_line(err)}); this is a bug in "
              "cellmint: please report it with the output of the same command run with --debug.",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
