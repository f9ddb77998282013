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
    assert main(["build-store", str(store), str(tmp_path / "ref.h5ad"), "--label-keys", "cell_type",
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
