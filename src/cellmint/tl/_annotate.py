"""``cm.tl.annotate``: map query cells onto a trained annotator — aligned genes, calibrated labels, Unknown.

The query is read a chunk of cells at a time (in memory, backed or a path), its genes matched to the
model's panel by name (genes the query lacks are zero, as gene-dropout augmentation trained the
model to expect), and its library size taken over all of its own genes. Per level the calibrated
probabilities give a label, a confidence and a margin; the latent gives the distance to the nearest
reference cell kept with the model (relative to the spacing of the reference cells of that cell's
class: the open-set score), and optionally a nearest-neighbour vote among reference cells.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._utils import _logging as logg
from .._utils._chunks import iter_row_chunks
from .._utils._device import resolve_device
from .._utils._docs import doc_params
from ..io._models import resolve_model
from ..models._annotator import Annotator, relative_distance
from ..store._inputs import without_ensembl_versions
from ._knn import reference_search

UNKNOWN = "Unknown"
#: below this share of the model's genes found in the query, annotation refuses to run
MIN_OVERLAP = 0.3
#: below this share, a warning says labels may suffer
WARN_OVERLAP = 0.8


def align_genes(query: pd.Index, model_genes: pd.Index, *, strip_versions: bool) -> tuple[np.ndarray, dict]:
    """For each model gene, its column in the query (-1: missing), and a summary of the overlap."""
    if strip_versions:
        query, model_genes = without_ensembl_versions(query), without_ensembl_versions(model_genes)
    if not query.is_unique:
        dup = query[query.duplicated()].unique()
        raise ValueError(f"The query's gene names are not unique ({len(dup)}, e.g. {list(dup[:3])}); "
                         "make them unique (adata.var_names_make_unique()) or pass gene_key=.")  # fmt: skip
    columns = query.get_indexer(model_genes).astype(np.int64)
    present = columns >= 0
    overlap = {
        "n_model_genes": len(model_genes),
        "n_found": int(present.sum()),
        "fraction": float(present.mean()) if len(present) else 0.0,
        "missing": np.asarray(model_genes[~present][:100].astype(str), dtype=object),
    }
    return columns, overlap


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


def _open_set_rule(annotator: Annotator, max_distance: float | str) -> tuple[np.ndarray, np.ndarray, float]:
    """The open-set rule: per-class scales, the reference cells' codes at their level, and the threshold.

    Model folders written before the relative rule hold no class scales: their distances stay
    absolute (scale 1), compared with the absolute threshold they were saved with.
    """
    open_set = annotator.manifest.get("open_set", {})
    level = open_set.get("level", annotator.label_keys[-1])
    scale = np.asarray(open_set.get("scale", np.ones(len(annotator.classes[level]))), dtype=np.float64)
    codes = np.asarray(annotator.reference["codes"][level])
    threshold = float(open_set.get("threshold", np.inf) if max_distance == "auto" else max_distance)
    return scale, codes, threshold


def _vote(neighbours: np.ndarray, distances: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Per cell, the share of its neighbours' (inverse-distance) weight per class."""
    weights = 1.0 / (distances + 1e-6)
    votes = np.zeros((len(neighbours), n_classes), dtype=np.float32)
    np.add.at(votes, (np.repeat(np.arange(len(neighbours)), neighbours.shape[1]), codes[neighbours].ravel()),
              weights.ravel())  # fmt: skip
    return votes / votes.sum(axis=1, keepdims=True)


def _top_two(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the largest value's column, the largest value, and its lead over the second largest."""
    label = values.argmax(axis=1)
    first = np.take_along_axis(values, label[:, None], axis=1)[:, 0]
    if values.shape[1] < 2:
        return label, first, first.copy()
    second = np.partition(values, -2, axis=1)[:, -2]
    return label, first, first - second


class _Decision:
    """Per level, the calls of one chunk of cells (coarse to fine): codes, confidence, margin, flags.

    ``codes`` index the level's classes, with ``len(classes)`` for cells called Unknown (or, with
    ``unknown=False``, for no cell). A fine level only considers the children of the coarse call.
    """

    def __init__(self, annotator: Annotator, *, min_confidence: float, min_margin: float, unknown: bool):
        self.annotator = annotator
        self.min_confidence, self.min_margin, self.unknown = min_confidence, min_margin, unknown
        levels = annotator.label_keys
        self.parent_of = {}  # fine level → per fine class, its parent's code at the level before (-1: none)
        for coarse, fine in itertools.pairwise(levels):
            tree = annotator.hierarchy.get(fine)
            if tree is not None:
                index = {c: i for i, c in enumerate(annotator.classes[coarse])}
                self.parent_of[fine] = np.array([index.get(tree["parents"].get(c, ""), -1)
                                                 for c in annotator.classes[fine]])  # fmt: skip

    def doubtful(self, proba: dict[str, np.ndarray]) -> np.ndarray:
        """Cells whose network confidence or margin is low at some level (candidates for refinement)."""
        low = [self._low(*_top_two(p)[1:]) for p in proba.values()]
        return np.logical_or.reduce(low)

    def _low(self, confidence: np.ndarray, margin: np.ndarray) -> np.ndarray:
        return (confidence < self.min_confidence) | (margin < self.min_margin)

    def __call__(self, proba: dict[str, np.ndarray], votes: dict[str, np.ndarray], voted: np.ndarray,
                 refine_all: bool, far: np.ndarray) -> dict[str, dict[str, np.ndarray]]:  # fmt: skip
        """``{level: {"codes", "confidence", "margin", "unknown", "refined", "proba"}}`` for the chunk.

        ``votes[level]`` holds the neighbour votes of the cells ``voted`` (row positions); a voted
        cell is refined when its call is low-confidence (or always, ``refine_all``).
        """
        out, parent, n_parent = {}, None, 0
        for level, classes in self.annotator.classes.items():
            p, n_classes = proba[level], len(classes)
            allowed = None
            if parent is not None and level in self.parent_of:
                # keep the levels consistent: children of the coarse call; under an Unknown coarse
                # call the fine probabilities stay as they are (the fine call is Unknown too)
                allowed = (self.parent_of[level][None, :] == parent[:, None]) | (parent == n_parent)[:, None]
                p = np.where(allowed, p, 0.0)
                total = p.sum(axis=1, keepdims=True)
                p = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
            label, confidence, margin = _top_two(p)
            low = self._low(confidence, margin)
            refine = np.zeros(len(p), dtype=bool)
            if len(voted):
                refine[voted] = True
                refine &= low | refine_all
            if refine.any():
                # the refined call's confidence and margin are the vote's, so all three columns
                # describe the same call and a split vote stays a low-confidence (Unknown) cell
                row = np.full(len(p), -1)
                row[voted] = np.arange(len(voted))
                vote = votes[level][row[refine]]
                if allowed is not None:
                    vote = np.where(allowed[refine], vote, 0.0)
                label[refine], confidence[refine], margin[refine] = _top_two(vote)
                low[refine] = self._low(confidence[refine], margin[refine])
            is_unknown = low | far
            if parent is not None:
                is_unknown |= parent == n_parent  # no fine call under an unknown coarse one
            codes = np.where(is_unknown, n_classes, label) if self.unknown else label
            out[level] = {"codes": codes.astype(np.int32), "confidence": confidence.astype(np.float32),
                          "margin": margin.astype(np.float32), "unknown": is_unknown, "refined": refine,
                          "proba": p.astype(np.float32, copy=False)}  # fmt: skip
            parent, n_parent = codes, n_classes
        return out


@doc_params()
def annotate(
    adata: ad.AnnData | str | Path,
    model: Annotator | str | Path | None = None,
    *,
    layer: str | None = None,
    key_added: str = "cellmint",
    gene_key: str | None = None,
    strip_ensembl_versions: bool = False,
    chunk_size: int | None = None,
    knn: str = "low_confidence",
    n_neighbors: int = 15,
    unknown: bool = True,
    min_confidence: float = 0.5,
    min_margin: float = 0.1,
    max_distance: float | str = "auto",
    project: bool = True,
    cluster_key: str | None = None,
    unknown_label: str = UNKNOWN,
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
        of dense values over the model's genes (1,048 cells for 2,000 genes). Peak memory grows
        with this number; on a GPU, larger chunks (e.g. 16,384) feed it better. The latents of
        consecutive chunks are searched against the reference 8,192 cells at a time.
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
        ``"auto"`` takes the model's: 1.25 times the relative distance within which 99% of its
        validation cells lie (the allowance is for queries from another technology than the
        reference's). Model folders saved before cellmint used relative distances hold an absolute
        threshold (99% of the validation cells), applied to absolute distances.
    project
        Write the model's embedding projections (models trained with ``embedding_keys``).
    cluster_key
        ``obs`` column of an existing clustering (e.g. ``"leiden"``): also label each cluster by a soft
        majority vote — the class with the largest summed probability over the cluster's cells — in
        ``obs[f"{{key_added}}_{{level}}_majority"]``.
    unknown_label
        The label of cells not trusted at a level; it must differ from every class of the model (some
        references have a class of unassigned cells called "Unknown": pass another name then).
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

    With ``cluster_key``, also ``obs[f"{{key_added}}_{{level}}_majority"]`` per level. Also
    ``obs[f"{{key_added}}_distance"]`` (the relative distance to the reference of ``max_distance``),
    ``obsm[f"X_{{key_added}}_{{name}}"]`` for each projected embedding, and
    ``uns[key_added]["annotation"]`` (model folder, gene overlap, thresholds, counts of Unknown and
    refined cells).
    """
    if cluster_key is not None and (isinstance(adata, str | Path) or cluster_key not in adata.obs.columns):
        raise KeyError(f"adata.obs has no cluster column {cluster_key!r}.")
    if knn not in ("low_confidence", "all", "off"):
        raise ValueError(f"knn must be 'low_confidence', 'all' or 'off', not {knn!r}.")
    is_path = isinstance(adata, str | Path)
    annotator = resolve_model(adata if not is_path else None, model, key_added, Annotator)
    clashes = [level for level, classes in annotator.classes.items() if unknown_label in classes]
    if clashes:
        raise ValueError(f"The model has a class named {unknown_label!r} (level {clashes[0]!r}); pass another "
                         "unknown_label= so that untrusted cells stay distinguishable.")  # fmt: skip
    target = adata.copy() if copy and not is_path else adata
    if is_path:
        from .._utils._chunks import open_root

        with open_root(adata) as root:  # obs: its names only (a file's obs columns can be large)
            index_key = root["obs"].attrs["_index"]
            names = pd.Index(ad.io.read_elem(root["obs"][index_key]), name=None if index_key == "_index" else index_key)
            obs = pd.DataFrame(index=names)
            var = ad.io.read_elem(root["var"])
    else:
        obs, var = target.obs, target.var
    if gene_key is not None and gene_key not in var.columns:
        raise KeyError(f"gene_key={gene_key!r} is not a column of the query's var (columns: {list(var.columns)}); "
                       "pass the column holding the gene names the model uses, or gene_key=None for "
                       "var_names.")  # fmt: skip
    names = pd.Index(var[gene_key].astype(str)) if gene_key is not None else pd.Index(var.index.astype(str))
    columns, overlap = align_genes(names, annotator.genes, strip_versions=strip_ensembl_versions)
    if overlap["fraction"] < MIN_OVERLAP:
        raise ValueError(f"Only {overlap['n_found']} of the model's {overlap['n_model_genes']} genes "
                         f"({overlap['fraction']:.0%}) are in the query, below the {MIN_OVERLAP:.0%} floor: check "
                         "gene identifiers (symbols or Ensembl ids; strip_ensembl_versions=True).")  # fmt: skip
    if overlap["fraction"] < WARN_OVERLAP:
        warnings.warn(f"Only {overlap['fraction']:.0%} of the model's genes are in the query; labels may be less "
                      "accurate (missing genes are treated as not detected).", UserWarning, stacklevel=2)  # fmt: skip
    torch_device = resolve_device(device)
    start = logg.info(f"annotating {len(obs):,} cells with {annotator!r}")
    present = np.flatnonzero(columns >= 0)
    if annotator.reference is not None:
        index = reference_search(annotator, torch_device)
        scale, reference_codes, threshold = _open_set_rule(annotator, max_distance)
    else:  # no reference kept with the model: no open-set call, no refinement
        index, threshold = None, float("inf")
    decide = _Decision(annotator, min_confidence=min_confidence, min_margin=min_margin, unknown=unknown)
    keep_proba = cluster_key is not None or not (return_table or is_path)
    calls = {level: [] for level in annotator.classes}
    projections, distances = {}, []
    chunk_size = chunk_size or max(64, DENSE_CHUNK_BYTES // (4 * max(1, len(annotator.genes))))
    pending: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []  # network outputs not yet searched

    def judge() -> None:
        """Search the pending cells' nearest reference cells and make their calls (one batch, any chunks)."""
        latent = np.concatenate([part[0] for part in pending])
        proba = {level: np.concatenate([part[1][level] for part in pending]) for level in annotator.classes}
        pending.clear()
        distance = np.zeros(len(latent))
        votes, voted = {}, np.zeros(0, dtype=np.int64)
        if index is not None:
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
                found, dist = index.query(latent[rest], k=1)
                nearest[rest], nearest_distance[rest] = found[:, 0], dist[:, 0]
            if len(voted):
                neighbours, dist = index.query(latent[voted], k=n_neighbors)
                nearest[voted], nearest_distance[voted] = neighbours[:, 0], dist[:, 0]
                votes = {level: _vote(neighbours, dist, np.asarray(annotator.reference["codes"][level]), len(classes))
                         for level, classes in annotator.classes.items()}  # fmt: skip
            distance = relative_distance(nearest_distance, reference_codes[nearest], scale)
        distances.append(distance.astype(np.float32))
        for level, result in decide(proba, votes, voted, knn == "all", distance > threshold).items():
            if not keep_proba:
                del result["proba"]
            calls[level].append(result)

    for chunk in iter_row_chunks(adata, layer=layer, chunk_size=chunk_size, fmt="csr", progress=progress,
                                 desc="annotating"):  # fmt: skip
        X = chunk.X
        library = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        dense = np.zeros((X.shape[0], len(annotator.genes)), dtype=np.float32)
        dense[:, present] = X[:, columns[present]].toarray()
        latent, proba, projected = annotator.forward(dense, library, device=torch_device)
        del dense
        if project:
            for key, values in projected.items():
                projections.setdefault(key, []).append(values)
        pending.append((latent, proba))
        if sum(len(part[0]) for part in pending) >= SEARCH_BATCH:
            judge()
    if pending:
        judge()
    n = len(obs)
    table = pd.DataFrame(index=obs.index)
    info = {"overlap": overlap, "min_confidence": min_confidence, "min_margin": min_margin, "knn": knn,
            "max_distance": float(threshold), "n_neighbors": n_neighbors, "unknown": {}, "refined": {}}  # fmt: skip
    probabilities = {}
    for level, classes in annotator.classes.items():
        parts = calls.pop(level)
        column = {name: np.concatenate([part[name] for part in parts]) if parts else np.zeros(0)
                  for name in ("codes", "confidence", "margin", "unknown", "refined")}  # fmt: skip
        key = f"{key_added}_{level}"
        codes = column["codes"].astype(np.int32)
        table[key] = pd.Categorical.from_codes(codes, categories=[*classes, unknown_label])
        table[f"{key}_confidence"] = column["confidence"].astype(np.float32)
        table[f"{key}_margin"] = column["margin"].astype(np.float32)
        table[f"{key}_unknown"] = column["unknown"].astype(bool)
        info["unknown"][level] = int(column["unknown"].sum())
        info["refined"][level] = int(column["refined"].sum())
        if keep_proba:
            proba = np.concatenate([part["proba"] for part in parts]) if parts else np.zeros((0, len(classes)))
            probabilities[level] = pd.DataFrame(proba, index=obs.index, columns=classes)
        if cluster_key is not None:  # soft majority vote: summed probabilities per cluster
            clusters = obs[cluster_key].astype(str)
            votes_per_cluster = probabilities[level].groupby(clusters.to_numpy()).sum()
            winner = votes_per_cluster.idxmax(axis=1)
            table[f"{key}_majority"] = pd.Categorical(clusters.map(winner).to_numpy(), categories=classes)
        del parts
    table[f"{key_added}_distance"] = np.concatenate(distances) if distances else np.zeros(n, dtype=np.float32)
    logg.info(f"    finished: {', '.join(f'{k}: {v:,} Unknown' for k, v in info['unknown'].items())}", time=start)
    if return_table or is_path:
        return table
    for column in table.columns:
        target.obs[column] = table[column].to_numpy() if table[column].dtype != "category" else table[column]
    for level, frame in probabilities.items():
        target.obsm[f"{key_added}_{level}_proba"] = frame
    for key, parts in projections.items():
        target.obsm[f"X_{key_added}_{key.removeprefix('X_')}"] = np.concatenate(parts)
    meta = dict(target.uns.get(key_added, {}))
    meta["annotation"] = {**info, "model_dir": str(annotator.path) if annotator.path else ""}
    target.uns[key_added] = meta
    return target if copy else None
