"""The open-set rule: which query cells are unlike every cell of the reference (a type it lacks).

**Distance.** A cell's relative distance is its latent distance to the nearest reference cell divided
by the *scale* of that reference cell's class (finest level): the median distance between the
class's reference cells and their nearest other reference cell. Dense classes thus get tight limits
and diffuse ones loose limits.

**Score: the neighbourhood's distance.** A cell's open-set score is the median relative distance of
the cell and its :data:`NEIGHBOURS` nearest *query* cells (in the model's latent, projected on the
reference latent's first :data:`PROJECTION_DIMS` principal axes; among up to :data:`POOL_CELLS`
query cells drawn at random when the query is larger). A cell of a type the reference lacks lies
among cells like itself, all far from the reference; a cell of a known type that is far on its own
(a noisy or shallow cell, a cell measured with another chemistry) has neighbours that are not. On
the shared real data this halves the far tail of known cells (CEL-seq2 → Drop-seq: 99th percentile
3.6× the scale → 2.4×) and keeps novel types where they were (CBMC CD34+ and erythroid cells
left out of the reference: median 2.2×).

**Threshold: the reference's spread, widened by the query's shift.** A query of the reference's
own technology sits as close to the reference as reference cells sit to each other; a query of
another technology or chemistry sits farther — all of it, known types included, with a long tail.
Known cells lie far for two reasons, and the threshold covers the larger of the two:

``max(validation_q99, spacing_q99 · max(1, shift) ** SHIFT_POWER)``,
``shift = q25(query scores) / q25(reference spacing)``

``spacing_q99`` is the 99th percentile of the reference cells' relative distance to their nearest
other reference cell: the reference's own spread. ``validation_q99`` is the validation cells' to
their nearest reference cell: new cells of the reference's own kind, which a network that memorised
a small reference holds farther away than its training cells (FACS-sorted PBMC, 417 reference
cells: 1.36 against 2.07). An unshifted query is judged by the larger of the two (the ``floor``).
``shift`` compares the query's closer quarter with the reference's — the closer quarter, so that a
query with many cells of a new type (far away) does not widen its own threshold. A shifted query's
tail grows faster than its bulk: over the CellBench cross-technology queries, known cells' 99th
percentile lies 2–3 times farther out (in log scale) than their lower quartile, hence the power of
:data:`SHIFT_POWER` on the reference's spread. The validation cells' tail is not widened again:
multiplying it by the widening (the rule before) compounded the two causes: for pbmc3k (10x) on
the 800 FACS-sorted PBMC it turned a floor of 5.6–6.2 into thresholds of 16–32 and called none of
the monocytes (a type the reference lacks, median scores 7.6–10.7) Unknown, while the known T and B
cells' 99th percentile stays at 7–10 (``benchmarks/open_set_rules.py``). ``benchmarks/annotate_quality.py``
measures the rule; the docs page "Reading Unknown and prediction sets" explains it for biologists.
"""

from __future__ import annotations

import weakref

import numpy as np

#: reference cells per class whose nearest other reference cell gives the class's scale
SCALE_CELLS = 500
#: query cells whose distances, with the cell's own, give its open-set score
NEIGHBOURS = 10
#: principal axes of the reference latent the query neighbourhoods are found in
PROJECTION_DIMS = 16
#: query cells searched for neighbours (a random sample of larger queries)
POOL_CELLS = 20_000
#: the quantile of the reference spacing (and of the validation distances) that bounds an unshifted query's scores
FLOOR_QUANTILE = 0.99
#: the quantile of query scores and reference spacing whose ratio measures the shift
SHIFT_QUANTILE = 0.25
#: how much faster than a query's shift the reference's spread is widened (log scale)
SHIFT_POWER = 2.5


def relative_distance(distance: np.ndarray, nearest_class: np.ndarray, scale) -> np.ndarray:
    """Latent distance to the nearest reference cell over the scale of that cell's class."""
    return np.asarray(distance, np.float64) / np.asarray(scale, np.float64)[np.asarray(nearest_class)]


def calibration(spacing: np.ndarray, spacing_class: np.ndarray, n_classes: int, *, distance: np.ndarray,
                nearest_class: np.ndarray) -> dict:  # fmt: skip
    """The open-set rule's reference side, JSON-writable.

    ``spacing``: for reference cells of class ``spacing_class``, the latent distance to their nearest
    other reference cell (a class's scale is its median); ``distance``, ``nearest_class``: the
    validation cells' distance to their nearest reference cell and its class (recorded, for
    comparison). Returns ``{"rule", "scale", "floor", "reference_q25", ...}``.
    """
    spacing, spacing_class = np.asarray(spacing, np.float64), np.asarray(spacing_class)
    overall = float(np.median(spacing)) if len(spacing) else 1.0
    scale = np.full(n_classes, overall if overall > 0 else 1.0)
    for c in np.unique(spacing_class):
        median = float(np.median(spacing[spacing_class == c]))
        scale[c] = median if median > 0 else scale[c]  # duplicated cells: keep the overall scale
    relative = relative_distance(spacing, spacing_class, scale) if len(spacing) else np.ones(1)
    validation = relative_distance(distance, nearest_class, scale) if len(distance) else np.zeros(0)
    spacing_floor = float(np.quantile(relative, FLOOR_QUANTILE))
    validation_floor = float(np.quantile(validation, FLOOR_QUANTILE)) if len(validation) else 0.0
    return {
        "rule": "neighbourhood",
        "scale": scale.tolist(),
        "floor": max(spacing_floor, validation_floor),
        "spacing_q99": spacing_floor,
        "reference_q25": float(np.quantile(relative, SHIFT_QUANTILE)),
        "floor_quantile": FLOOR_QUANTILE,
        "shift_quantile": SHIFT_QUANTILE,
        "shift_power": SHIFT_POWER,
        "neighbours": NEIGHBOURS,
        "n_spacing": len(spacing),
        "n_validation": len(distance),
        "validation_q99": validation_floor if len(validation) else float("nan"),
    }


#: projections computed for model objects (a notebook annotating sample after sample computes it once)
_PROJECTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def projection(annotator) -> tuple[np.ndarray, np.ndarray]:
    """Mean and first :data:`PROJECTION_DIMS` principal axes (dims × latent) of the model's reference latent."""
    latent = annotator.reference["latent"]
    cached = _PROJECTIONS.get(annotator)
    if cached is None or cached[0] is not latent:  # a replaced reference is projected anew
        values = np.asarray(latent, np.float32)
        mean = values.mean(axis=0)
        # the principal axes from the latent's covariance (dims × dims), not an SVD of the cells × dims
        # matrix: the same axes up to sign (which distances ignore), 40,000 × 256 in 0.1 s instead of
        # seconds, paid by the first annotate call of every model object
        centred = values - mean
        covariance = centred.T.astype(np.float64) @ centred.astype(np.float64)
        _, vectors = np.linalg.eigh(covariance)
        axes = vectors[:, ::-1][:, :PROJECTION_DIMS].astype(np.float32)
        cached = _PROJECTIONS[annotator] = (latent, mean, np.ascontiguousarray(axes))
    return cached[1], cached[2]


def neighbourhood_scores(coordinates: np.ndarray, distance: np.ndarray, *, random_state: int = 0) -> np.ndarray:
    """Each cell's open-set score: the median relative distance of the cell and its nearest query cells.

    ``coordinates``: the cells in the projected latent; neighbours are searched among up to
    :data:`POOL_CELLS` of them (all, or a seeded random sample).
    """
    from ._knn import NearestReference  # the one nearest-cell search

    n = len(distance)
    if n < 2:
        return np.asarray(distance, np.float32)
    rng = np.random.default_rng(random_state)
    pool = np.arange(n) if n <= POOL_CELLS else np.sort(rng.choice(n, POOL_CELLS, replace=False))
    k = min(NEIGHBOURS + 1, len(pool))
    found, _ = NearestReference(np.asarray(coordinates[pool], np.float32)).query(
        np.asarray(coordinates, np.float32), k=k
    )
    neighbours = pool[found]  # query rows; a pooled cell finds itself among them
    values = np.asarray(distance, np.float32)[neighbours]
    itself = (neighbours == np.arange(n)[:, None]).any(axis=1)
    values[~itself, -1] = distance[~itself]  # the cell's own distance counts once, always
    return np.median(values, axis=1).astype(np.float32)


def query_threshold(open_set: dict, scores: np.ndarray, max_distance: float | str) -> tuple[float, dict]:
    """The threshold on a query's open-set scores, and how it was set (h5ad-writable).

    Models saved before the neighbourhood rule keep the threshold they were saved with.
    """
    if max_distance != "auto":
        return float(max_distance), {"rule": "given (max_distance)"}
    if open_set.get("rule") != "neighbourhood":
        threshold = float(open_set.get("threshold", np.inf))
        return threshold, {"rule": "reference (model saved before the neighbourhood rule)"}
    floor, reference = float(open_set["floor"]), float(open_set["reference_q25"])
    spread = float(open_set.get("spacing_q99", floor))
    query = float(np.quantile(scores, open_set["shift_quantile"])) if len(scores) else reference
    shift = max(1.0, query / reference) if reference > 0 else 1.0
    widened = spread * shift ** float(open_set["shift_power"])
    threshold = max(floor, widened)  # the validation cells' tail (in floor) as it is, the spread widened
    return threshold, {"rule": "neighbourhood", "floor": floor, "spacing_q99": spread, "query_q25": query,
                       "reference_q25": reference, "shift": shift, "widened_spread": widened,
                       "threshold": threshold}  # fmt: skip
