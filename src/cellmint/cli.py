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
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def _dataset_summary(name: str, *, data_dir: str | None) -> dict:
    """Verify one dataset's checksum and compute per-cell count statistics chunk by chunk."""
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
    from .datasets import available

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


def _cmd_build_store(args: argparse.Namespace) -> int:
    from .pp import build_store

    store = build_store(args.inputs, args.store, genes=args.genes, label_keys=args.label_keys,
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
    data = Store(source) if source.is_dir() else read_h5ad(source, backed="r")
    model = train_annotator(data, args.label_keys, split=args.split, model_dir=args.model, layer=args.layer,
                            max_epochs=args.max_epochs, device=args.device, random_state=args.seed,
                            progress=args.progress)  # fmt: skip
    print(model)
    for level, report in model.metrics.items():
        print(f"{level}: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}, "
              f"ECE {report['ece']:.3f} ({report['evaluated_on']}, {report['n_cells']:,} cells)")  # fmt: skip
    print(f"saved to {args.model}")
    return 0


def _output_folder(path: Path, what: str) -> None:
    """Refuse early an output whose folder does not exist (before a long computation)."""
    folder = Path(path).absolute().parent
    if not folder.is_dir():
        raise FileNotFoundError(f"The folder of the {what} {path} does not exist; create it first.")
    if Path(path).is_dir():
        raise IsADirectoryError(f"The {what} {path} is a folder; give a file name.")


def _cmd_annotate(args: argparse.Namespace) -> int:
    from .tl import annotate

    _output_folder(args.out, "output CSV")

    table = annotate(args.query, args.model, layer=args.layer, key_added=args.key, device=args.device,
                     progress=args.progress)  # fmt: skip
    table.to_csv(args.out)
    for column in table.columns:
        if column.endswith("_unknown"):
            print(f"{column[: -len('_unknown')]}: {int(table[column].sum()):,} of {len(table):,} cells Unknown")
    print(f"wrote {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Reference → store → annotator → annotate another technology → metrics and confidence plots."""
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import f1_score

    from . import datasets, pl, pp, tl

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
    model = tl.train_annotator(store, "cell_line", model_dir=out / "model", random_state=args.seed, progress=False)
    holdout = model.metrics["cell_line"]
    print(f"model: {model}; holdout ({holdout['evaluated_on']}): accuracy {holdout['accuracy']:.3f}, "
          f"ECE {holdout['ece_uncalibrated']:.3f} → {holdout['ece']:.3f} after temperature scaling")  # fmt: skip
    tl.annotate(query, model, progress=False)
    truth, labels = query.obs["cell_line"].astype(str), query.obs["cellmint_cell_line"].astype(str)
    unknown = query.obs["cellmint_cell_line_unknown"].to_numpy()
    reason = query.obs["cellmint_cell_line_unknown_reason"].astype(str)
    raw = np.asarray(model.classes["cell_line"])[query.obsm["cellmint_cell_line_proba"].to_numpy().argmax(1)]
    sets = query.obs["cellmint_cell_line_set"].astype(str)
    covered = [t in s.split("|") for t, s in zip(truth, sets, strict=True)]
    table = pd.DataFrame({
        "cells": [f"{len(truth):,}"],
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
    }, index=["Drop-seq query"])  # fmt: skip
    print(table.T.to_string())
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cellmint`` command (exposed for the docs and tests)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="cellmint",
        description="cellmint: atlas-scale single-cell data to trusted annotators and perturbation models.",
    )
    parser.add_argument("--version", action="version", version=f"cellmint {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("datasets", help="verify and summarise the real datasets (bundled ones by default)")
    p.add_argument("names", nargs="*", help="dataset names (default: all bundled, or all when --data-dir is given)")
    p.add_argument("--data-dir", help="folder holding the larger, non-bundled dataset files")
    p.add_argument("--out", type=Path, help="also write the summary table to this CSV file")
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
    p.add_argument("--out", default="cellmint-demo", help="folder for the store, model, metrics and plot")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_cmd_demo)

    progress = {"action": argparse.BooleanOptionalAction, "default": None, "help": "force the progress bar"}
    p = sub.add_parser("build-store", help="build (or resume) a training store from .h5ad/.zarr/10x inputs")
    p.add_argument("store", type=Path, help="store folder to write (.zarr)")
    p.add_argument("inputs", nargs="+", help="input files: .h5ad, .zarr, 10x .h5 or mtx folders")
    p.add_argument("--label-keys", nargs="*", default=[], help="obs columns of labels, coarse to fine")
    p.add_argument("--group-key", help="obs column kept whole by splits (e.g. donor)")
    p.add_argument("--genes", help="'intersection', 'union' or a boolean var column (default: same genes)")
    p.add_argument("--layer", help="layer holding the raw counts (default: X)")
    p.add_argument("--seed", type=int, default=0, help="seed of the default split (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--progress", **progress)
    p.set_defaults(func=_cmd_build_store)

    p = sub.add_parser("train", help="train an annotator from a store or an .h5ad file")
    p.add_argument("data", help="store folder or .h5ad file")
    p.add_argument("model", type=Path, help="model folder to write")
    p.add_argument("--label-keys", nargs="+", required=True, help="label levels, coarse to fine")
    p.add_argument("--split", default="default", help="store split, or obs column of train/val/test")
    p.add_argument("--layer", help=".h5ad layer to train on (default: X)")
    p.add_argument("--max-epochs", type=int, default=60, help="passes over the training cells (default: 60)")
    p.add_argument("--device", default="auto", help="torch device (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--progress", **progress)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("annotate", help="annotate an .h5ad query with a model folder; results to CSV")
    p.add_argument("query", type=Path, help="query .h5ad (read chunk by chunk)")
    p.add_argument("model", type=Path, help="model folder written by `cellmint train`")
    p.add_argument("out", type=Path, help="CSV file of per-cell labels, confidence, margin, Unknown")
    p.add_argument("--layer", help="layer to annotate (default: X)")
    p.add_argument("--key", default="cellmint", help="column prefix (default: cellmint)")
    p.add_argument("--device", default="auto", help="torch device (default: auto)")
    p.add_argument("--progress", **progress)
    p.set_defaults(func=_cmd_annotate)
    for command in sub.choices.values():  # --debug after the command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the Python traceback of an error")  # fmt: skip
    return parser


#: errors a user can act on (bad input, missing or damaged files, a busy store): one line, exit status 2
USER_ERRORS = (ValueError, KeyError, TypeError, IndexError, OSError, RuntimeError)


def _one_line(err: BaseException) -> str:
    """An exception's message (and notes) on one line."""
    message = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in message:
        message = f"{message}: {err.filename}"
    parts = [str(message), *getattr(err, "__notes__", [])]
    return " ".join(" ".join(part.replace("\n- ", "; ").split()) for part in parts if part)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellmint`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
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
