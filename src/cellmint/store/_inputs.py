"""Inputs of a store build: AnnData objects and files, opened lazily, fingerprinted and aligned by gene.

A file input is identified by its path, size, modification time and a sha256 of its first and last
8 MiB (a fingerprint that is quick on files of many GB and changes with any rewrite in practice);
an in-memory AnnData by its shape and a sha256 of its cell and gene names. A resumed build refuses
inputs whose identity changed since the build began.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._utils._panel import gene_panel as panel_of
from .._utils._panel import panel_mask, unique_gene_names

_EDGE = 8 * 2**20


@dataclass
class Input:
    """One input: how to read its matrix, its annotations, and how to recognise it again."""

    name: str
    data: Any  # what the chunk reader takes (AnnData or path)
    adata: ad.AnnData  # obs/var (X backed or in memory)
    identity: dict

    @property
    def n_obs(self) -> int:
        return self.adata.n_obs


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    size = 0
    for file in files:
        size += file.stat().st_size
        with open(file, "rb") as fh:
            digest.update(fh.read(_EDGE))
            if file.stat().st_size > 2 * _EDGE:
                fh.seek(-_EDGE, 2)
                digest.update(fh.read(_EDGE))
    return {"path": str(path.resolve()), "bytes": size, "mtime": stat.st_mtime, "fingerprint": digest.hexdigest()}


def _adata_identity(adata: ad.AnnData) -> dict:
    digest = hashlib.sha256()
    for names in (adata.obs_names, adata.var_names):
        digest.update("\n".join(map(str, names)).encode())
    return {"path": None, "shape": [int(adata.n_obs), int(adata.n_vars)], "fingerprint": digest.hexdigest()}


def open_input(item: Any, index: int) -> Input:
    """Open one input: AnnData, ``.h5ad`` (backed), ``.zarr``, 10x ``.h5`` or a 10x mtx folder."""
    if isinstance(item, ad.AnnData):
        return Input(f"adata[{index}]", item, item, _adata_identity(item))
    if not isinstance(item, str | Path):
        raise TypeError(f"Input {index} is a {type(item).__name__}; expected an AnnData or a path.")
    path = Path(item)
    if not path.exists():
        raise FileNotFoundError(f"Input {index}: no such file or folder: {path}")
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        from .._utils._chunks import read_h5ad

        adata = read_h5ad(path, backed="r")
        return Input(str(path), adata, adata, _file_identity(path))
    if suffix == ".zarr":
        return Input(str(path), path, _zarr_annotations(path), _file_identity(path))
    import scanpy as sc

    if suffix == ".h5":  # 10x Genomics HDF5: read whole (these files are per sample)
        adata = sc.read_10x_h5(path)
    elif path.is_dir() and any(p.name.startswith("matrix.mtx") for p in path.iterdir()):
        adata = sc.read_10x_mtx(path)
    else:
        raise ValueError(f"Input {index}: cannot read {path} (expected .h5ad, .zarr, 10x .h5 or a 10x mtx folder).")
    return Input(str(path), adata, adata, _file_identity(path))


def close_inputs(inputs: list[Input]) -> None:
    """Close the files :func:`open_input` opened (backed ``.h5ad``), so that the user can rewrite them at once."""
    for inp in inputs:
        if inp.identity.get("path") is not None and inp.adata.isbacked:
            inp.adata.file.close()


def _zarr_annotations(path: Path) -> ad.AnnData:
    """The obs and var of a zarr AnnData, without its matrix (which the chunk reader streams)."""
    import zarr

    root = zarr.open_group(path, mode="r")
    obs, var = ad.io.read_elem(root["obs"]), ad.io.read_elem(root["var"])
    return ad.AnnData(obs=obs, var=var)


def gene_names(inp: Input, strip_versions: bool) -> pd.Index:
    """Gene names of an input, with Ensembl version suffixes removed on request (ENSG….12 → ENSG…)."""
    return unique_gene_names(inp.adata.var_names, where=inp.name, strip_versions=strip_versions)


def gene_panel(inputs: list[Input], genes: Any, strip_versions: bool) -> pd.Index:
    """The ordered gene panel of the store (see ``build_store``'s ``genes``)."""
    names = [gene_names(inp, strip_versions) for inp in inputs]
    if genes is None:
        for inp, other in zip(inputs[1:], names[1:], strict=True):
            if not other.equals(names[0]):
                raise ValueError(
                    f"{inp.name} has other genes than {inputs[0].name}; pass genes='intersection', 'union' or a list."
                )
        panel = names[0]
    elif isinstance(genes, str) and genes == "intersection":
        panel = names[0]
        for other in names[1:]:
            panel = panel[panel.isin(other)]
    elif isinstance(genes, str) and genes == "union":
        panel = names[0]
        for other in names[1:]:
            panel = panel.append(other[~other.isin(panel)])
    elif isinstance(genes, str):
        panel = names[0][panel_mask(inputs[0].adata.var, genes, where=inputs[0].name,
                                    alternatives="'intersection', 'union'")]  # fmt: skip
    else:  # genes the inputs lack: check_missing_genes decides
        panel = panel_of(names[0], inputs[0].adata.var, genes, require_present=False)
    if len(panel) == 0:
        raise ValueError("The gene panel is empty: the inputs share no genes.")
    return panel


def column_map(inp: Input, panel: pd.Index, strip_versions: bool) -> np.ndarray:
    """For every gene of the input, its column in the panel (-1: not in the panel)."""
    return panel.get_indexer(gene_names(inp, strip_versions)).astype(np.int64)


#: what build_store and Store.append do with panel genes an input lacks
MISSING_GENES = ("error", "zero")


def missing_panel_genes(inputs: list[Input], panel: pd.Index, strip_versions: bool) -> list[list[str]]:
    """For every input, the genes of the panel it lacks (in panel order)."""
    return [[str(g) for g in panel[~panel.isin(gene_names(inp, strip_versions))]] for inp in inputs]


def check_missing_genes(inputs: list[Input], missing: list[list[str]], mode: str, *, allowed: bool = False) -> None:
    """Refuse inputs that lack panel genes unless ``mode == "zero"`` (or ``allowed``: a ``"union"`` panel)."""
    if mode not in MISSING_GENES:
        raise ValueError(f"missing_genes must be 'error' or 'zero', not {mode!r}.")
    lacking = [(inp, genes) for inp, genes in zip(inputs, missing, strict=True) if genes]
    if mode == "zero" or allowed or not lacking:
        return
    detail = "; ".join(f"{inp.name} lacks {len(genes)}: {genes[:8]}{' …' if len(genes) > 8 else ''}"
                       for inp, genes in lacking[:4])  # fmt: skip
    raise ValueError(
        f"Genes of the panel are missing from {len(lacking)} input(s) ({detail}). Check the gene names (e.g. "
        "symbols vs Ensembl ids; strip_ensembl_versions=True), drop those genes from `genes`, or pass "
        "missing_genes='zero' to store them as zero counts (recorded in the manifest)."
    )


def repeated_input(inputs: list[Input], records: list[dict]) -> tuple[Input, str] | None:
    """An input given twice, or already in the store (``records``): ``(input, where the other one is)``."""
    seen = {(r.get("fingerprint"), r.get("bytes"), tuple(r.get("shape") or ())): r["name"] for r in records}
    for inp in inputs:
        key = (inp.identity.get("fingerprint"), inp.identity.get("bytes"), tuple(inp.identity.get("shape") or ()))
        if key in seen:
            return inp, seen[key]
        seen[key] = inp.name
    return None


def duplicate_names(inputs: list[Input], existing: Any = ()) -> tuple[list[str], str] | None:
    """Cell names found twice among the inputs, or in an input and ``existing`` (chunks of the store's names).

    Returns up to five examples and where they clash, or ``None``.
    """
    names = pd.Index(np.concatenate([np.asarray(inp.adata.obs_names, dtype=object) for inp in inputs]))
    if not names.is_unique:
        clashes = names[names.duplicated()].unique()
        owners = [inp.name for inp in inputs if inp.adata.obs_names.isin(clashes[:1]).any()]
        return list(map(str, clashes[:5])), f"in {' and '.join(owners[:2])}"
    for chunk in existing:  # the store's names, a chunk at a time; the inputs' names hashed once
        hit = names.get_indexer(pd.Index(chunk)) >= 0
        if hit.any():
            return list(map(str, np.asarray(chunk)[hit][:5])), "in the store already"
    return None
