"""``cm.tl.annotate``: map query cells onto a trained annotator — aligned genes, calibrated labels, Unknown.

The query is read a chunk of cells at a time (in memory, backed or a path), its genes matched to the
model's panel by name (genes the query lacks are zero, as gene-dropout augmentation trained the
model to expect), and its library size taken over all of its own genes. Per level the calibrated
probabilities give a label, a confidence and a margin; the latent gives the distance to the nearest
reference cell kept with the model (relative to the spacing of the reference cells of that cell's
class: the open-set score), and optionally a nearest-neighbour vote among reference cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .._keys import Key
from .._utils import _logging as logg
from .._utils._device import resolve_device
from .._utils._docs import doc_params
from .._utils._resources import ResourceMonitor
from ..io._models import resolve_model
from ..models import _conformal as conformal
from ..models import _open_set as open_set_rule
from ..models._annotator import UNKNOWN, Annotator, host_densifies
from ..models._knn import NearestReference, reference_search
from ._annotation_calls import Calls, Decision, Rules, level_results, vote
from ._annotation_query import MIN_OVERLAP, WARN_OVERLAP, QueryRows, align_genes

__all__ = ["MIN_OVERLAP", "UNKNOWN", "WARN_OVERLAP", "align_genes", "annotate"]


#: with ``chunk_size=None``, cells per chunk such that the chunk densified over the model's genes takes about
#: this much (1,048 cells for 2,000 genes). Larger chunks gain no speed on a CPU and cost memory: blocks of
#: tens of MiB allocated and freed per chunk fragment the heap (1M backed cells: peak RSS 1.37 GB at
#: 32 MiB, 1.12 GB at 8 MiB; benchmarks/annotate.py)
DENSE_CHUNK_BYTES = 8 * 2**20
#: cells whose latents are searched together (chunks are gathered until they hold this many): the
#: inverted lists' many small products run faster on more cells at a time (100,000 cells' nearest
#: reference cell on 2 cores: 2.7 s in batches of 1,048, 2.0 s in 8,192); the latents held
#: meanwhile take 8 MiB at 256 dimensions
SEARCH_BATCH = 8192
#: with ``chunk_size=None`` off the CPU, cells per chunk such that the chunk densified on the device takes
#: about this much (65,536 cells for 2,000 genes): a GPU is fed in few large steps, each a CSR sent and
#: densified there
DEVICE_CHUNK_BYTES = 512 * 2**20


@dataclass
class _Search:
    """The reference search and the open-set scale: per reference class, the spacing distances are divided by."""

    index: NearestReference
    scale: np.ndarray  # per class of the open-set level
    codes: np.ndarray  # reference cells' classes at that level

    @classmethod
    def of(cls, annotator: Annotator, device) -> _Search | None:
        """The model's search on ``device``; ``None`` for a model without reference cells.

        Model folders written before the relative rule hold no class scales: their distances stay
        absolute (scale 1).
        """
        if annotator.reference is None:
            return None
        open_set = annotator.manifest.get("open_set", {})
        level = open_set.get("level", annotator.label_keys[-1])
        scale = np.asarray(open_set.get("scale", np.ones(len(annotator.classes[level]))), dtype=np.float64)
        return cls(reference_search(annotator, device), scale, np.asarray(annotator.reference["codes"][level]))


def _searched(pending: list, search: _Search | None, decide: Decision, annotator: Annotator, knn: str,
              n_neighbors: int) -> tuple[dict, dict, np.ndarray, np.ndarray]:  # fmt: skip
    """Search the pending cells' nearest reference cells and make their calls (one batch, any chunks).

    Returns the calls per level, the network's probabilities per level, the cells' relative
    distances to the reference and their nearest reference cell's class (zeros without a search).
    """
    latent = np.concatenate([part[0] for part in pending])
    proba = {level: np.concatenate([part[1][level] for part in pending]) for level in annotator.classes}
    distance, nearest_class = np.zeros(len(latent), dtype=np.float32), np.zeros(len(latent), dtype=np.int32)
    votes, voted = {}, np.zeros(0, dtype=np.int64)
    if search is not None:
        # every cell needs its nearest reference cell (open set); only the cells that may be
        # refined need all n_neighbors: the network's confidence or margin is low at some
        # level (knn="low_confidence"), or every cell (knn="all"). Each cell is searched once:
        # its first neighbour is the one a search for the nearest alone finds (same lists probed)
        if knn == "all":
            voted = np.arange(len(latent))
        elif knn == "low_confidence":
            voted = np.flatnonzero(decide.doubtful(proba))
        nearest, nearest_distance = np.zeros(len(latent), np.int64), np.zeros(len(latent), np.float32)
        rest = np.ones(len(latent), dtype=bool)
        rest[voted] = False
        if rest.any():
            found, dist = search.index.query(latent[rest], k=1)
            nearest[rest], nearest_distance[rest] = found[:, 0], dist[:, 0]
        if len(voted):
            neighbours, dist = search.index.query(latent[voted], k=n_neighbors)
            nearest[voted], nearest_distance[voted] = neighbours[:, 0], dist[:, 0]
            votes = {level: vote(neighbours, dist, np.asarray(annotator.reference["codes"][level]), len(classes))
                     for level, classes in annotator.classes.items()}  # fmt: skip
        nearest_class = search.codes[nearest].astype(np.int32)
        distance = open_set_rule.relative_distance(nearest_distance, nearest_class, search.scale).astype(np.float32)
    return decide(proba, votes, voted, knn == "all"), proba, distance, nearest_class


def _calibration(annotator: Annotator, alpha: float | None, class_conditional: bool) -> dict | None:
    """Per level, the class thresholds of the prediction sets at ``alpha`` and what the model recorded of them."""
    if alpha is None:
        return None
    if annotator.calibration is None:
        logg.warning("    this model keeps no conformal calibration (saved before cellmint had it): no prediction sets")
        return None
    out = {"thresholds": {}, "summary": {}}
    recorded = annotator.manifest.get("conformal", {})
    for level, classes in annotator.classes.items():
        stored = annotator.calibration[level]
        out["thresholds"][level] = conformal.thresholds(stored["score"], stored["class"], len(classes), alpha,
                                                        class_conditional=class_conditional)  # fmt: skip
        out["summary"][level] = {"alpha": alpha, "class_conditional": class_conditional,
                                 "n_calibration": len(stored["score"]),
                                 "trained_coverage": recorded.get(level, {}).get(
                                     "class" if class_conditional else "marginal", {})}  # fmt: skip
    return out


@doc_params()
def annotate(
    adata: ad.AnnData | str | Path,
    model: Annotator | str | Path | None = None,
    *,
    layer: str | None = None,
    key_added: str = Key.uns.annotate,
    gene_key: str | None = None,
    strip_ensembl_versions: bool = False,
    chunk_size: int | None = None,
    knn: str = "low_confidence",
    n_neighbors: int = 15,
    unknown: bool = True,
    min_confidence: float = 0.5,
    min_margin: float = 0.1,
    max_distance: float | str = "auto",
    alpha: float | None = 0.1,
    class_conditional: bool = False,
    project: bool = True,
    cluster_key: str | None = None,
    unknown_label: str | None = None,
    device: str = "auto",
    copy: bool = False,
    return_table: bool = False,
    progress: bool | None = None,
) -> ad.AnnData | pd.DataFrame | None:
    """Annotate query cells with a trained annotator: labels, calibrated confidence, margins and Unknown.

    Parameters
    ----------
    {doc_adata} A path gives the results as a table (``return_table`` implied).
    model
        An :class:`~cellmint.Annotator`, a model folder, or ``None`` for the folder named in
        ``adata.uns[key_added]["model_dir"]``.
    {doc_layer} Raw counts or log-normalised values, whichever the model was trained on.
    {doc_key_added}
    gene_key
        ``var`` column holding the gene names to match (default: ``var_names``).
    strip_ensembl_versions
        Match ``ENSG….16`` with ``ENSG…``.
    chunk_size
        Cells read and put through the network at a time; ``None`` picks enough for about 8 MiB
        of dense values over the model's genes on a CPU (1,048 cells for 2,000 genes), and 512 MiB
        on a GPU (65,536 cells), which is sent each chunk's stored values and densifies them itself.
        Peak memory grows with this number. The latents of consecutive chunks are searched against
        the reference at least 8,192 cells at a time.
    knn
        Nearest-neighbour refinement among the reference cells kept with the model, in the model's
        latent space: ``"low_confidence"`` (cells whose network confidence or margin is below
        ``min_confidence`` or ``min_margin`` at some level; default), ``"all"`` or ``"off"``.
        A refined cell takes the label of the distance-weighted majority of its ``n_neighbors``
        reference neighbours; its confidence and margin are the vote's (the top
        share, and the top minus the second share). Only those cells are searched for all their
        neighbours; every cell is searched for its nearest one (the open-set distance). The search
        is exact up to 10,000 reference cells or on a GPU, and through inverted lists above it (on
        a 40,000-cell reference it found the true nearest cell of 99.9% of query cells), built on
        the first call with a model object and reused by later ones.
    n_neighbors
        Reference neighbours per cell.
    unknown
        Call cells ``"Unknown"`` at a level when their confidence is below ``min_confidence``, their
        margin below ``min_margin``, or their relative distance to the reference above
        ``max_distance`` (open set: a type the reference lacks). ``False`` keeps every label (the
        ``_unknown`` flags are still written).
    min_confidence
        Calibrated probability below which a label is not trusted.
    min_margin
        Gap between the two most probable classes below which a label is not trusted.
    max_distance
        Open-set threshold on the relative distance: a cell's latent distance to its nearest
        reference cell, divided by the scale of that reference cell's class (finest level): the
        median distance between the class's reference cells and their nearest other reference cell.
        ``"auto"``: the model's rule, fitted to this query: the reference's spread, widened by how far
        the query's closer quarter sits beyond the reference's, each cell's score first divided by its
        nearest reference class's factor (see :func:`~cellmint.models._open_set.query_threshold` and
        the docs page "Reading Unknown and prediction sets"); a number fixes the threshold.
    alpha
        Prediction sets: each cell gets the set of classes that holds its true class with
        probability at least ``1 - alpha`` (split conformal, calibrated on the model's held-out
        reference cells; a guarantee for cells like those, not under a shift of technology).
        ``None``: no sets.
    class_conditional
        Calibrate the sets per class, so that the coverage holds within every class (larger sets).
    project
        Write the model's embedding projections (models trained with ``embedding_keys``).
    cluster_key
        ``obs`` column of an existing clustering (e.g. ``"leiden"``): also label each cluster by a soft
        majority vote — the class with the largest summed probability over the cluster's cells — in
        ``obs[f"{{key_added}}_{{level}}_majority"]``.
    unknown_label
        The label of cells not trusted at a level; it must differ from every class of the model.
        ``None``: the model's (:attr:`~cellmint.Annotator.unknown_label`, recorded at training):
        ``"Unknown"``, or ``"Unassigned"`` for a reference with a class called ``"Unknown"``.
    {doc_device}
    {doc_copy}
    return_table
        Return the per-cell results as a DataFrame instead of writing them to ``adata``.
    {doc_progress}

    Returns
    -------
    ``None`` (``adata`` is annotated), the annotated copy (``copy=True``), or a DataFrame of the
    ``obs`` columns below (``return_table=True`` or a path). Per label level ``level``:

    - ``obs[f"{{key_added}}_{{level}}"]``: label (categorical; the model's classes and ``"Unknown"``);
    - ``obs[f"{{key_added}}_{{level}}_confidence"]``, ``..._margin`` (float), ``..._unknown`` (bool);
    - ``obsm[f"{{key_added}}_{{level}}_proba"]``: calibrated probabilities (DataFrame, classes as columns).

    - ``obs[f"{{key_added}}_{{level}}_unknown_reason"]``: why a cell is Unknown (categorical:
      ``"distance"``, ``"confidence"``, ``"margin"``, ``"coarse level"``, or ``""`` for a trusted call;
      the first that applies, in that order);
    - ``obs[f"{{key_added}}_{{level}}_set"]``, ``..._set_size``: the prediction set (classes joined by
      ``"|"``, ``""`` when empty) and its size (with ``alpha``).

    With ``cluster_key``, also ``obs[f"{{key_added}}_{{level}}_majority"]`` per level. Also
    ``obs[f"{{key_added}}_distance"]`` (the open-set score compared with ``max_distance``: the median
    relative distance to the reference of the cell and its nearest query cells, found in the query's
    own expression over the model's genes; a query of more than 10,000 cells is read a second time
    for it),
    ``obs[f"{{key_added}}_cell_distance"]`` (the cell's own relative distance),
    ``obsm[f"X_{{key_added}}_{{name}}"]`` for each projected embedding, and
    ``uns[key_added]["annotation"]`` (model folder, gene overlap, the input scale detected, thresholds
    and how the open-set one was set, the label of untrusted cells (``unknown_label``), counts of
    them per level and reason, of refined cells, the prediction sets' alpha, calibration and mean
    size, ``resources``: wall time, cells/s, peak RSS and GPU peak of the run, and ``levels``: the label
    levels annotated, coarse to fine, where :func:`cellmint.pl.confidence` finds them).
    """
    is_path = isinstance(adata, str | Path)
    _check_options(adata, knn=knn, cluster_key=cluster_key)
    annotator = resolve_model(adata if not is_path else None, model, key_added, Annotator)
    unknown_label = _unknown_label(annotator, unknown_label)
    calibration = _calibration(annotator, alpha, class_conditional)
    target = adata.copy() if copy and not is_path else adata
    rows = QueryRows(adata, target, annotator.genes, annotator.recipe, layer=layer, gene_key=gene_key,
                     strip_versions=strip_ensembl_versions)  # fmt: skip
    torch_device = resolve_device(device)
    start = logg.info(f"annotating {len(rows.obs):,} cells with {annotator!r}")
    monitor = ResourceMonitor(n_cells=len(rows.obs), device=torch_device).start()
    search = _Search.of(annotator, torch_device)
    decide = Decision(annotator, min_confidence=min_confidence, min_margin=min_margin, unknown=unknown)
    keep_proba = cluster_key is not None or not (return_table or is_path)
    found = Calls(annotator, keep_proba=keep_proba, calibration=calibration)
    budget = DENSE_CHUNK_BYTES if host_densifies(torch_device) else DEVICE_CHUNK_BYTES
    chunk_size = chunk_size or max(64, budget // (4 * max(1, len(annotator.genes))))
    expression = open_set_rule.QueryExpression(len(rows.obs)) if search is not None else None
    projections = _network_pass(rows, annotator, found, search, decide, expression, knn=knn,
                                n_neighbors=n_neighbors, project=project, chunk_size=chunk_size, device=torch_device,
                                progress=progress)  # fmt: skip
    distance, nearest_class = found.distances()
    score = distance
    if expression is not None:
        coordinates = _expression_coordinates(rows, annotator, expression, chunk_size=chunk_size,
                                              device=torch_device, progress=progress)  # fmt: skip
        score = open_set_rule.neighbourhood_scores(coordinates, distance, device=torch_device)
    threshold, open_set = _open_set_threshold(annotator, search, score, max_distance, nearest_class)
    monitor.stop()
    rules = Rules(unknown=unknown, min_confidence=min_confidence, min_margin=min_margin, label=unknown_label)
    table, probabilities, counts = level_results(found, annotator, rows.obs, score > threshold, rules,
                                                  key_added=key_added, calibration=calibration,
                                                  keep_proba=keep_proba, cluster_key=cluster_key)  # fmt: skip
    table[Key.obs.distance(key_added)] = score
    table[Key.obs.cell_distance(key_added)] = distance
    info = {"overlap": rows.overlap, "input": rows.scale.to_dict() if rows.scale is not None else {},
            "min_confidence": min_confidence, "min_margin": min_margin, "knn": knn, "max_distance": float(threshold),
            "open_set": open_set, "n_neighbors": n_neighbors, **counts, "unknown_label": unknown_label,
            "resources": monitor.report.to_dict()}  # fmt: skip
    unknowns = ", ".join(f"{k}: {v:,} {unknown_label}" for k, v in info["unknown"].items())
    logg.info(f"    finished: {unknowns}; {monitor.report}", time=start)
    if return_table or is_path:
        return table
    info |= {"model_dir": str(annotator.path) if annotator.path else "", Key.uns.levels: list(annotator.classes)}
    _write(target, key_added, table, probabilities, projections, info)
    return target if copy else None


def _check_options(adata: ad.AnnData | str | Path, *, knn: str, cluster_key: str | None) -> None:
    if cluster_key is not None and (isinstance(adata, str | Path) or cluster_key not in adata.obs.columns):
        raise KeyError(f"adata.obs has no cluster column {cluster_key!r}.")
    if knn not in ("low_confidence", "all", "off"):
        raise ValueError(f"knn must be 'low_confidence', 'all' or 'off', not {knn!r}.")


def _unknown_label(annotator: Annotator, unknown_label: str | None) -> str:
    """The label of untrusted cells: the one asked for, or the model's; never one of the model's classes."""
    if unknown_label is None:
        unknown_label = annotator.unknown_label
    clashes = [level for level, classes in annotator.classes.items() if unknown_label in classes]
    if clashes:
        raise ValueError(f"The model has a class named {unknown_label!r} (level {clashes[0]!r}); pass another "
                         "unknown_label= so that untrusted cells stay distinguishable.")  # fmt: skip
    return unknown_label


def _network_pass(rows: QueryRows, annotator: Annotator, found: Calls, search: _Search | None, decide: Decision,
                  expression: open_set_rule.QueryExpression | None, *, knn: str, n_neighbors: int, project: bool,
                  chunk_size: int, device, progress: bool | None) -> dict[str, list[np.ndarray]]:  # fmt: skip
    """Put the query through the network a chunk at a time, its calls into ``found``; returns the projections.

    The network outputs of consecutive chunks wait until ``SEARCH_BATCH`` cells are gathered, then are
    searched against the reference together. ``expression`` keeps its sample of the cells' network inputs.
    """
    projections: dict[str, list[np.ndarray]] = {}
    pending: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []  # network outputs not yet searched
    dense = host_densifies(device)
    for start, _, values, library in rows.chunks(chunk_size, progress=progress, dense=dense):
        inputs = annotator.inputs(values, library, device=device)  # normalised once, on the device
        del values
        if expression is not None:
            expression.add(inputs[torch.from_numpy(expression.wanted(start, len(inputs))).to(inputs.device)])
        latent, proba, projected = annotator.outputs(inputs)
        del inputs
        if project:
            for key, coordinates in projected.items():
                projections.setdefault(key, []).append(coordinates)
        pending.append((latent, proba))
        if sum(len(part[0]) for part in pending) >= SEARCH_BATCH:
            found.add(*_searched(pending, search, decide, annotator, knn, n_neighbors))
            pending = []
    if pending:
        found.add(*_searched(pending, search, decide, annotator, knn, n_neighbors))
    return projections


def _expression_coordinates(rows: QueryRows, annotator: Annotator, expression: open_set_rule.QueryExpression, *,
                            chunk_size: int, device, progress: bool | None) -> np.ndarray:  # fmt: skip
    """Every cell's place in the query's expression space (a second read of the query when it was sampled).

    The second read normalises and projects each chunk on ``device``, as the network pass did.
    """
    sampled = expression.fit()
    if expression.complete:
        return sampled
    coordinates = np.empty((len(rows.obs), expression.axes.shape[1]), dtype=np.float16)
    dense = host_densifies(device)
    for start, stop, values, library in rows.chunks(chunk_size, progress=progress, desc="open-set neighbourhoods",
                                                    dense=dense):  # fmt: skip
        coordinates[start:stop] = expression.project(annotator.inputs(values, library, device=device))
    return coordinates


def _open_set_threshold(annotator: Annotator, search: _Search | None, score: np.ndarray, max_distance: float | str,
                        nearest_class: np.ndarray) -> tuple[float, dict]:  # fmt: skip
    """The open-set threshold on the cells' scores, and how it was set."""
    if search is None:  # no reference kept with the model: no open-set call, no refinement
        return float("inf"), {"rule": "none (the model keeps no reference cells)"}
    return open_set_rule.query_threshold(annotator.manifest.get("open_set", {}), score, max_distance, nearest_class)


def _write(target: ad.AnnData, key_added: str, table: pd.DataFrame, probabilities: dict[str, pd.DataFrame],
           projections: dict[str, list[np.ndarray]], info: dict) -> None:  # fmt: skip
    """Write the results into ``target``: ``obs`` columns, ``obsm`` probabilities and projections, ``uns``."""
    for column in table.columns:
        target.obs[column] = table[column].to_numpy() if table[column].dtype != "category" else table[column]
    for level, frame in probabilities.items():
        target.obsm[Key.obsm.proba(key_added, level)] = frame
    for key, parts in projections.items():
        target.obsm[Key.obsm.projection(key_added, key)] = np.concatenate(parts)
    meta = dict(target.uns.get(key_added, {}))
    meta[Key.uns.annotation] = info
    target.uns[key_added] = meta
