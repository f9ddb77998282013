"""The open-set rule: which query cells are unlike every cell of the reference (a type it lacks).

**Distance.** A cell's relative distance is its latent distance to the nearest reference cell divided
by the *scale* of that reference cell's class (finest level): the median distance between the
class's reference cells and their nearest other reference cell. Dense classes thus get tight limits
and diffuse ones loose limits.

**Score: the neighbourhood's distance.** A cell's open-set score is the median relative distance of
the cell and its :data:`NEIGHBOURS` nearest *query* cells, among up to :data:`POOL_CELLS` query
cells (drawn at random when the query is larger). A cell of a type the reference lacks lies among
cells like itself, all far from the reference; a cell of a known type that is far on its own (a
noisy or shallow cell, a cell measured with another chemistry) has neighbours that are not.

**Where the neighbours are found: the query's own expression.** The neighbours are the nearest
cells in the query's expression over the model's genes (normalised as the network sees them), on
the first :data:`EXPRESSION_DIMS` principal axes of up to :data:`AXES_CELLS` of its cells
(:class:`QueryExpression`). They were found in the model's latent before; but a classifier's
latent keeps only what tells the reference's classes apart, so cells of a type the reference lacks
fall among known cells there (pbmc3k monocytes on a B/T-cell reference), and their neighbourhood
medians were diluted by them. In the query's own expression a new type forms its own neighbourhoods,
and so does each known type, whose far cells are then outvoted by their own kind. On the shared
real data (``benchmarks/open_set_rules.py``, same models and queries) the known cells' scores
above the threshold fall (Drop-seq → CEL-seq2, mean over seeds 0–4: 3.9% → 1.5%) and more new-type
cells rise above it (pbmc3k monocytes on the FACS-sorted B and T cells, share above the known
cells' 98th percentile: 71% → 98%). Queries larger than :data:`AXES_CELLS` cells are read twice:
once through the network, once to place every cell on the axes.

**Threshold: the reference's spread, widened by the query's shift.** A query of the reference's
own technology sits as close to the reference as reference cells sit to each other; a query of
another technology or chemistry sits farther — all of it, known types included, with a long tail.
Known cells lie far for two reasons, and the threshold covers the larger of the two:

``max(validation_q99, spacing_q99 · max(1, shift) ** SHIFT_POWER)``,
``shift = q25(query scores / their nearest class's factor) / q25(reference spacing)``

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
cells' 99th percentile stays at 7–10 (``benchmarks/open_set_rules.py``).

**The shift, class by class.** New cells of some classes sit farther from the reference than new
cells of others, whatever the technology: a network trained on 800 FACS-sorted PBMC holds new CD8
T cells 1.6–4.3 times as far as new cells in general, new B cells 0.9 times (its held-out cells
show it). A query made mostly of such a class (pbmc3k: half T cells) would look shifted though it
is not, and its widened threshold would pass over a new type (pbmc3k's monocytes). So each query
cell's score is divided by its nearest reference class's *factor* before the shift is measured:
the median relative distance of the class's held-out reference cells over that of all held-out
cells (:func:`class_factors`, stored with the model as ``class_factor``; 1 for a class with fewer
than :data:`CLASS_FACTOR_CELLS` held-out cells, and for models saved before it). The scores
compared with the threshold are not divided. With it pbmc3k's monocytes are 84% Unknown over
seeds 0–4 (before: 34%; T and B cells 1.7%). ``benchmarks/annotate_quality.py`` measures the
rule; the docs page "Reading Unknown and prediction sets" explains it for biologists.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

#: reference cells per class whose nearest other reference cell gives the class's scale
SCALE_CELLS = 500
#: query cells whose distances, with the cell's own, give its open-set score
NEIGHBOURS = 10
#: principal axes of the query's own expression the query neighbourhoods are found in
EXPRESSION_DIMS = 30
#: query cells whose expression gives those axes (a seeded random sample of larger queries)
AXES_CELLS = 10_000
#: query cells searched for neighbours (a random sample of larger queries)
POOL_CELLS = 20_000
#: the quantile of the reference spacing (and of the validation distances) that bounds an unshifted query's scores
FLOOR_QUANTILE = 0.99
#: the quantile of query scores and reference spacing whose ratio measures the shift
SHIFT_QUANTILE = 0.25
#: how much faster than a query's shift the reference's spread is widened (log scale)
SHIFT_POWER = 2.5
#: held-out reference cells a class needs (as their nearest reference cell's class) for its own factor
CLASS_FACTOR_CELLS = 10


def relative_distance(distance: np.ndarray, nearest_class: np.ndarray, scale) -> np.ndarray:
    """Latent distance to the nearest reference cell over the scale of that cell's class."""
    return np.asarray(distance, np.float64) / np.asarray(scale, np.float64)[np.asarray(nearest_class)]


def calibration(spacing: np.ndarray, spacing_class: np.ndarray, n_classes: int, *, distance: np.ndarray,
                nearest_class: np.ndarray) -> dict:  # fmt: skip
    """The open-set rule's reference side, JSON-writable.

    ``spacing``: for reference cells of class ``spacing_class``, the latent distance to their nearest
    other reference cell (a class's scale is its median); ``distance``, ``nearest_class``: the
    validation cells' distance to their nearest reference cell and its class. Returns ``{"rule",
    "scale", "floor", "reference_q25", "class_factor", ...}``.
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
        "class_factor": class_factors(validation, np.asarray(nearest_class), n_classes).tolist(),
    }


def class_factors(validation: np.ndarray, nearest_class: np.ndarray, n_classes: int) -> np.ndarray:
    """Per class: how much farther than held-out cells in general its held-out cells sit (medians; 1 if too few).

    ``validation``: the held-out cells' relative distances; ``nearest_class``: their nearest reference
    cell's class. A class needs :data:`CLASS_FACTOR_CELLS` held-out cells for a factor of its own.
    """
    factor = np.ones(n_classes)
    overall = float(np.median(validation)) if len(validation) else 0.0
    if overall <= 0:
        return factor
    for c in np.unique(nearest_class):
        members = validation[nearest_class == c]
        if len(members) >= CLASS_FACTOR_CELLS:
            factor[c] = max(float(np.median(members)), 1e-12) / overall
    return factor


class QueryExpression:
    """The query's own expression space, where open-set neighbourhoods are found.

    The cells' values over the model's genes as the network sees them (the model's normalisation),
    projected on the first :data:`EXPRESSION_DIMS` principal axes of up to :data:`AXES_CELLS` query
    cells (all, or a seeded random sample). During the network pass :meth:`add` keeps the sampled
    cells of each chunk (:meth:`wanted`); :meth:`fit` then gives the axes, and :meth:`project`
    places any cells on them.
    """

    def __init__(self, n_cells: int, *, random_state: int = 0):
        rng = np.random.default_rng(random_state)
        self.n_cells = n_cells
        self.sample = np.arange(n_cells) if n_cells <= AXES_CELLS else np.sort(
            rng.choice(n_cells, AXES_CELLS, replace=False))  # fmt: skip
        self._kept: list[np.ndarray] = []
        self.mean: np.ndarray | None = None
        self.axes: np.ndarray | None = None
        self._on: tuple | None = None  # (device, mean · axes, axes) as tensors there, for project

    @property
    def complete(self) -> bool:
        """Every cell is in the sample (its coordinates come from :meth:`fit`, no second pass)."""
        return len(self.sample) == self.n_cells

    def wanted(self, start: int, n_rows: int) -> np.ndarray:
        """Positions, within the rows ``start, start + n_rows``, of the sampled cells."""
        first, last = np.searchsorted(self.sample, [start, start + n_rows])
        return self.sample[first:last] - start

    def add(self, values: np.ndarray | torch.Tensor) -> None:
        """Keep sampled cells (their normalised values), in row order, chunk after chunk."""
        if len(values):
            values = values.cpu().numpy() if isinstance(values, torch.Tensor) else values
            self._kept.append(np.array(values, dtype=np.float32))

    def fit(self) -> np.ndarray:
        """Principal axes of the kept cells (exact, from the smaller of their two Gram matrices); their coordinates."""
        kept = np.concatenate(self._kept) if self._kept else np.zeros((0, 0), np.float32)
        self._kept = []
        n, genes = kept.shape
        dims = min(EXPRESSION_DIMS, n - 1, genes)
        self.mean = kept.mean(axis=0) if n else np.zeros(genes, np.float32)
        if dims < 1:  # one cell, or no genes: nothing to place cells apart
            self.axes = np.zeros((genes, 1), np.float32)
            self._on = None
            return np.zeros((n, 1), np.float16)
        centred = np.subtract(kept, self.mean, out=kept)  # in place: no second 80 MB block for 10,000 cells
        # only the leading eigenvectors, in float32 (LAPACK's subset driver: 2,000 genes in 0.15 s, not 0.9 s)
        gram = centred.T @ centred if genes <= n else centred @ centred.T  # more genes than cells: cells × cells
        size = len(gram)
        values, vectors = scipy.linalg.eigh(gram, subset_by_index=[size - dims, size - 1],
                                            driver="evr")  # fmt: skip
        values, vectors = values[::-1], vectors[:, ::-1]
        if genes > n:
            vectors = centred.T.astype(np.float64) @ (vectors / np.sqrt(np.maximum(values, 1e-12)))
        self.axes = np.ascontiguousarray(vectors, dtype=np.float32)
        self._on = None
        return (centred @ self.axes).astype(np.float16)

    def project(self, values: np.ndarray | torch.Tensor) -> np.ndarray:
        """Coordinates of cells (normalised values over the model's genes) on the fitted axes.

        A tensor is projected where it lies (on a GPU, only the coordinates come back to the host).
        """
        from ._knn import _padded  # zero columns up to whole vector registers

        values = torch.as_tensor(np.asarray(values, np.float32) if not isinstance(values, torch.Tensor) else values)
        dims = self.axes.shape[1]
        if self._on is None or self._on[0] != values.device:
            # the axes padded with zero columns: a product 30 columns wide ran at half the speed of one 32
            # wide on this project's CPU (AVX-512); and x·A - mean·A, with no centred copy of x
            axes = torch.from_numpy(_padded(self.axes)).to(values.device)
            self._on = (values.device, torch.from_numpy(self.mean).to(values.device) @ axes, axes)
        _, offset, axes = self._on
        return (values @ axes - offset)[:, :dims].to(torch.float16).cpu().numpy()


def neighbourhood_scores(coordinates: np.ndarray, distance: np.ndarray, *, random_state: int = 0,
                         device: torch.device | str = "cpu") -> np.ndarray:  # fmt: skip
    """Each cell's open-set score: the median relative distance of the cell and its nearest query cells.

    ``coordinates``: the cells in the query's expression space (:class:`QueryExpression`);
    neighbours are searched among up to :data:`POOL_CELLS` of them (all, or a seeded random sample),
    on ``device`` (:class:`~cellmint.models._knn.NearestReference`: exact off the CPU).
    """
    from ._knn import NearestReference  # the one nearest-cell search

    n = len(distance)
    if n < 2:
        return np.asarray(distance, np.float32)
    rng = np.random.default_rng(random_state)
    pool = np.arange(n) if n <= POOL_CELLS else np.sort(rng.choice(n, POOL_CELLS, replace=False))
    k = min(NEIGHBOURS + 1, len(pool))
    found, _ = NearestReference(np.asarray(coordinates[pool], np.float32), device=device).query(
        np.asarray(coordinates, np.float32), k=k
    )
    neighbours = pool[found]  # query rows; a pooled cell finds itself among them
    values = np.asarray(distance, np.float32)[neighbours]
    itself = (neighbours == np.arange(n)[:, None]).any(axis=1)
    values[~itself, -1] = distance[~itself]  # the cell's own distance counts once, always
    return np.median(values, axis=1).astype(np.float32)


def query_threshold(open_set: dict, scores: np.ndarray, max_distance: float | str,
                    nearest_class: np.ndarray | None = None) -> tuple[float, dict]:  # fmt: skip
    """The threshold on a query's open-set scores, and how it was set (h5ad-writable).

    ``nearest_class``: each cell's nearest reference cell's class; the shift is measured on the
    scores divided by those classes' factors (``open_set["class_factor"]``; models saved without
    them: none; ``class_factors`` in the record says which). Models saved before the neighbourhood
    rule keep the threshold they were saved with.
    """
    if max_distance != "auto":
        return float(max_distance), {"rule": "given (max_distance)"}
    if open_set.get("rule") != "neighbourhood":
        threshold = float(open_set.get("threshold", np.inf))
        return threshold, {"rule": "reference (model saved before the neighbourhood rule)"}
    floor, reference = float(open_set["floor"]), float(open_set["reference_q25"])
    spread = float(open_set.get("spacing_q99", floor))
    factor = open_set.get("class_factor")
    by_class = factor is not None and nearest_class is not None and len(scores) > 0
    if by_class:
        scores = np.asarray(scores, np.float64) / np.asarray(factor, np.float64)[np.asarray(nearest_class)]
    query = float(np.quantile(scores, open_set["shift_quantile"])) if len(scores) else reference
    shift = max(1.0, query / reference) if reference > 0 else 1.0
    widened = spread * shift ** float(open_set["shift_power"])
    threshold = max(floor, widened)  # the validation cells' tail (in floor) as it is, the spread widened
    return threshold, {"rule": "neighbourhood", "floor": floor, "spacing_q99": spread, "query_q25": query,
                       "reference_q25": reference, "shift": shift, "class_factors": by_class,
                       "widened_spread": widened, "threshold": threshold}  # fmt: skip
