from __future__ import annotations

import subprocess
import sys

import pytest

from cellmint.cli import main


def test_datasets_command_verifies_and_summarises_bundled_data(capsys, tmp_path):
    out = tmp_path / "summary.csv"
    assert main(["datasets", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("cellbench", "cellbench_10x", "glioblastoma_panobinostat", "papalexi_crispr"):
        assert name in text
    assert "4 dataset(s) verified (sha256) and summarised; 0 not found." in text
    import pandas as pd

    table = pd.read_csv(out, index_col=0)
    assert table.loc["cellbench", "cells"] == 510
    assert table.loc["papalexi_crispr", "genes"] == 299
    assert table["integer_counts"].all()  # bundled files hold raw counts
    assert (table["median_counts"] > 0).all()
    assert main(["datasets", "cellbench", "--out", str(out)]) == 2  # never replaced silently
    assert main(["datasets", "cellbench", "--out", str(out), "--overwrite"]) == 0


def test_datasets_command_reports_missing_files(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLMINT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CELLMINT_DATA_DIR", raising=False)
    assert main(["datasets", "pbmc3k", "--data-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "0 dataset(s) verified" in captured.out
    assert "not bundled" in captured.err


def test_unknown_dataset_is_a_clear_error(capsys):
    assert main(["datasets", "no_such_data"]) == 2
    assert "Unknown dataset 'no_such_data'" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "cellmint.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "datasets" in result.stdout
    assert "synthetic" in result.stdout


def test_synthetic_command_streams_a_file(tmp_path, capsys):
    path = tmp_path / "s.h5ad"
    assert main(["synthetic", str(path), "--n-obs", "600", "--n-vars", "150", "--no-progress"]) == 0
    import anndata as ad

    adata = ad.read_h5ad(path)
    assert adata.shape == (600, 150)
    assert "resources:" in capsys.readouterr().out
    assert main(["synthetic", str(path), "--n-obs", "600", "--n-vars", "150"]) == 2  # exists, no --overwrite


@pytest.mark.realdata
def test_datasets_command_with_shared_data_dir(shared_data, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLMINT_CACHE_DIR", str(tmp_path))
    assert main(["datasets", "pbmc3k", "cbmc_citeseq", "--data-dir", str(shared_data)]) == 0
    assert "2 dataset(s) verified" in capsys.readouterr().out


def test_build_store_train_annotate_pipeline(tmp_path, capsys):
    import anndata as ad
    import numpy as np
    import pandas as pd

    import cellmint as cm

    reference = cm.datasets.synthetic(800, 100, n_cell_types=3, n_donors=8, random_state=1, progress=False)
    reference.write_h5ad(tmp_path / "ref.h5ad")
    store, model = tmp_path / "ref.zarr", tmp_path / "model"
    assert main(["build-store", str(tmp_path / "ref.h5ad"), str(store), "--label-keys", "cell_type",
                 "--group-key", "donor", "--no-progress"]) == 0  # fmt: skip
    assert "800 cells × 100 genes" in capsys.readouterr().out
    assert main(["train", str(store), str(model), "--label-keys", "cell_type", "--max-epochs", "3",
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "cell_type: accuracy" in out
    assert (model / "manifest.json").is_file()
    query = cm.datasets.synthetic(200, 100, n_cell_types=3, random_state=2, progress=False)
    query.write_h5ad(tmp_path / "query.h5ad")
    assert main(["annotate", str(tmp_path / "query.h5ad"), str(model), str(tmp_path / "labels.csv")]) == 0
    table = pd.read_csv(tmp_path / "labels.csv", index_col=0)
    assert list(table.index) == list(ad.read_h5ad(tmp_path / "query.h5ad").obs_names)
    assert {"cellmint_cell_type", "cellmint_cell_type_confidence", "cellmint_cell_type_unknown"} <= set(table)
    assert np.isfinite(table["cellmint_cell_type_confidence"]).all()
    assert main(["annotate", str(tmp_path / "query.h5ad"), str(tmp_path / "nothing"), str(tmp_path / "x.csv")]) == 2
    assert "not a cellmint model folder" in capsys.readouterr().err
    # an annotated .h5ad annotated again: the new annotation replaces the old one's obsm, obs and uns
    first = tmp_path / "annotated.h5ad"
    assert main(["annotate", str(tmp_path / "query.h5ad"), str(model), "-o", str(first), "--no-progress"]) == 0
    import h5py

    with h5py.File(first, "r+") as f:  # a stale earlier annotation: probabilities all 0
        frame = f["obsm/cellmint_cell_type_proba"]  # a DataFrame: one dataset per class
        for column in frame.attrs["column-order"]:
            frame[column][...] = 0
    again = tmp_path / "again.h5ad"
    assert main(["annotate", str(first), str(model), "-o", str(again), "--no-progress"]) == 0
    proba = ad.read_h5ad(again).obsm["cellmint_cell_type_proba"]
    assert np.allclose(np.asarray(proba).sum(axis=1), 1, atol=1e-4)


def test_pipeline_commands_have_help():
    for command in ("build-store", "train", "annotate"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0


def test_demo_runs_the_main_job_end_to_end(tmp_path, capsys):
    import pandas as pd

    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reference: 300 CEL-seq2 cells of 5 cell lines; query: 210 Drop-seq cells" in out
    metrics = pd.read_csv(tmp_path / "metrics.csv", index_col=0)
    assert metrics.loc["Drop-seq query", "macro-F1 (model's labels)"] > 0.9
    assert metrics.loc["Drop-seq query", "accuracy of labelled cells"] > 0.9
    assert (tmp_path / "confidence.png").stat().st_size > 10_000
    assert (tmp_path / "model" / "manifest.json").is_file()


def test_help_imports_nothing_heavy_and_is_fast():
    """`cellmint --help` never imports numpy, pandas, scanpy or torch; cellmint's own imports take < 1 s."""
    code = (
        "import sys, time, contextlib, io\n"
        "t0 = time.perf_counter()\n"
        "from cellmint.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "elapsed = time.perf_counter() - t0\n"
        "heavy = sorted(m for m in ('numpy', 'pandas', 'scanpy', 'torch', 'anndata', 'h5py', 'zarr', 'sklearn')"
        " if m in sys.modules)\n"
        "print(heavy, elapsed)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, elapsed = result.stdout.rsplit("]", 1)
    assert heavy == "[", f"imported by --help: {heavy}]"
    assert float(elapsed) < 1.0, f"cellmint --help took {float(elapsed):.2f} s of imports and parsing"
    for command in ("build-store", "train", "annotate"):  # each command's help is as light
        code_command = code.replace("['--help']", f"[{command!r}, '--help']")
        out = subprocess.run([sys.executable, "-c", code_command], capture_output=True, text=True, check=True).stdout
        assert out.startswith("[]"), (command, out)


def test_user_errors_are_one_line_with_exit_2_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.h5ad")
    assert main(["annotate", missing, str(tmp_path), str(tmp_path / "out.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellmint annotate: error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert main(["annotate", missing, str(tmp_path), str(tmp_path / "out.csv"), "--debug"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


@pytest.mark.realdata
def test_cbmc_pipeline_with_a_class_named_unknown(shared_data, tmp_path, capsys):
    """build-store → train → annotate on CBMC, whose reference has a class called "Unknown" (171 cells).

    Training chooses "Unassigned" for untrusted cells and records it in the model, so that annotate
    needs no option; the annotated .h5ad and the table are written; outputs are never overwritten
    silently; the build-store order of cellmint 0.1 still works, with a warning.
    """
    import anndata as ad
    import numpy as np
    import pandas as pd

    from cellmint.io import read_model

    cbmc = ad.read_h5ad(shared_data / "cbmc_citeseq_8617.h5ad")
    assert "Unknown" in set(cbmc.obs["cell_type"])
    held = np.random.default_rng(0).random(cbmc.n_obs) < 0.2  # a query of cells never trained on
    cbmc[~held].write_h5ad(tmp_path / "reference.h5ad")
    query = cbmc[held].copy()
    query.obs = query.obs.rename(columns={"cell_type": "truth"})[["truth"]]
    query.write_h5ad(tmp_path / "query.h5ad")
    store, model, out = tmp_path / "reference.zarr", tmp_path / "model", tmp_path / "annotated.h5ad"

    assert main(["build-store", str(tmp_path / "reference.h5ad"), str(store), "--label-keys", "cell_type",
                 "--no-progress", "-q"]) == 0  # fmt: skip
    assert f"{(~held).sum():,} cells × 500 genes" in capsys.readouterr().out
    assert main(["train", str(store), str(model), "--label-keys", "cell_type", "--max-epochs", "8",
                 "--no-progress", "-q"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "untrusted cells will be labelled 'Unassigned'" in printed
    assert read_model(model).unknown_label == "Unassigned"
    assert main(["train", str(store), str(model), "--label-keys", "cell_type", "-q"]) == 2  # exists
    assert "pass --overwrite" in capsys.readouterr().err

    assert main(["annotate", str(tmp_path / "query.h5ad"), str(model), "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "cells 'Unassigned'" in printed
    assert "resources: " in printed
    assert "cells/s" in printed
    annotated = ad.read_h5ad(out)
    assert list(annotated.obs_names) == list(query.obs_names)
    assert (annotated.X != query.X).nnz == 0  # the query's data, untouched
    labels, truth = annotated.obs["cellmint_cell_type"].astype(str), annotated.obs["truth"].astype(str)
    assert "Unknown" in set(labels)  # the reference class, predicted like any other
    trusted = labels != "Unassigned"
    assert (labels[trusted] == truth[trusted]).mean() > 0.85
    assert annotated.uns["cellmint"]["annotation"]["unknown_label"] == "Unassigned"
    assert annotated.uns["cellmint"]["annotation"]["resources"]["n_cells"] == held.sum()
    table = pd.read_csv(out.with_suffix(".csv"), index_col=0)
    assert (table["cellmint_cell_type"].astype(str).to_numpy() == labels.to_numpy()).all()

    assert main(["annotate", str(tmp_path / "query.h5ad"), str(model), str(out)]) == 2  # no silent overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["annotate", str(tmp_path / "query.h5ad"), str(model), str(out), "--overwrite", "--no-progress",
                 "--min-confidence", "0.99", "--cluster-key", "truth"]) == 0  # fmt: skip
    stricter = ad.read_h5ad(out).obs
    assert (stricter["cellmint_cell_type"] == "Unassigned").sum() > (~trusted).sum()
    assert "cellmint_cell_type_majority" in stricter

    old = tmp_path / "old-order.zarr"  # cellmint 0.1: STORE INPUT...
    assert main(["build-store", str(old), str(tmp_path / "reference.h5ad"), "--label-keys", "cell_type",
                 "--no-progress", "-q"]) == 0  # fmt: skip
    assert "the order STORE INPUT... is deprecated" in capsys.readouterr().err
    assert (old / "manifest.json").is_file()


def test_label_keys_typed_first_do_not_swallow_the_paths(tmp_path):
    from cellmint.cli import _give_back_paths, build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--label-keys", "level1,level2", str(tmp_path / "ref.zarr"), "model/"])
    _give_back_paths(args, args.n_paths)
    assert args.label_keys == ["level1", "level2"]
    assert args.paths == [str(tmp_path / "ref.zarr"), "model/"]
    args = parser.parse_args(["build-store", "--label-keys", "cell_type", "a.h5ad", "b.h5ad", "out.zarr"])
    _give_back_paths(args, args.n_paths)
    assert args.label_keys == ["cell_type"]
    assert args.paths == ["a.h5ad", "b.h5ad", "out.zarr"]
