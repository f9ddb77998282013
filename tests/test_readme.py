"""The README's usage example runs as written: its Python block is executed top to bottom, in a new folder."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_block() -> str:
    """The ```python block right after ``<!-- usage -->`` in README.md."""
    match = re.search(r"<!-- usage -->\n```python\n(.*?)\n```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert match is not None, "README.md has no ```python block after <!-- usage -->"
    return match.group(1)


@pytest.mark.slow
def test_readme_usage_example_runs_as_written(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import scanpy as sc

    monkeypatch.chdir(tmp_path)  # the files it writes (atlas.h5ad, atlas.zarr, ...) go to a new folder
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    verbosity = sc.settings.verbosity
    namespace: dict = {"__name__": "__readme__"}
    try:
        exec(compile(usage_block(), str(README), "exec"), namespace)  # our own README
    finally:
        sc.settings.verbosity = verbosity
        plt.close("all")
    # what the example says it does, it does
    assert int(namespace["atlas"].var["highly_variable"].sum()) == 500
    assert namespace["store"].n_obs == 20_000
    splits = namespace["store"].summary()["splits"]["default"]
    assert min(splits.values()) > 0  # every part of the default split holds cells (donors kept whole)
    query, labels = namespace["query"], namespace["labels"]
    assert query.n_obs == 210
    assert (labels == query.obs["cell_line"].astype(str)).mean() > 0.9  # a meaningful query: another technology
    assert (tmp_path / "annotator" / "manifest.json").is_file()
    assert namespace["model"].metrics["cell_line"]["macro_f1"] > 0.9
    table = namespace["table"]  # the perturbation model, its 4 baselines and the split-half replicate
    assert table["method"].nunique() == 6
    assert "replicate" in set(table["method"])
    assert any(column.endswith("_scaled") for column in table.columns)  # what perturbation_summary reads
    assert namespace["pred"].n_vars == namespace["held"].n_vars  # every gene predicted
