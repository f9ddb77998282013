"""Nearest reference cells in a model's latent space (``cm.tl.annotate``'s open-set distance and kNN vote).

Training calibrates the open-set rule on this module's exact search too (``exact=True``).

Small references (up to :data:`EXACT_SEARCH` cells), and any reference on a GPU, are searched exactly
(all distances, in blocks). Larger references on a CPU are searched through inverted lists: k-means
splits the reference into about √n lists and a query cell is compared with the members of its
:data:`PROBE_FRACTION` nearest lists only. Torch does the work (but for the low-dimensional pass
below); no index is kept on disk.

Why not pynndescent (measured on a 40,000-cell, 256-dimensional reference and 20,000 query cells,
``benchmarks/annotate.py``): its graph search for the single nearest cell — the open-set distance
every cell needs — found the true nearest cell for 45% of the cells (94% when asked for 15), which
overstated distances and tripled the false Unknown calls at the reference's own threshold (0.19% →
0.59%); and compiling it costs about 0.5 GB of memory and 20 s in every process. The inverted lists
find the true nearest cell for 99.9% of the cells and all 15 neighbours for 99.7%, at the same speed.

Through inverted lists, low-dimensional latents (at most :data:`LOW_DIMENSIONS`, such as the
open-set rule's projection of query cells onto the reference's first principal axes) are compared
by one numba pass instead of torch's products: distances summed directly and each cell's k nearest
kept as they are found. The same cells are compared (the members of the same probed lists), and
torch's top-k over every compared pair, which took 80% of the time there, is gone: 20,000 cells'
11 nearest among themselves in 16 dimensions in 0.11 s instead of 0.52 s (one thread).
"""

from __future__ import annotations

import itertools
import math
import weakref
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

#: references up to this many cells are searched exactly on a CPU (on a GPU, every reference is)
EXACT_SEARCH = 10_000
#: the exact search holds the distances of this many (query, reference) pairs at a time: 128 MiB,
#: 3,355 query cells against 10,000 reference cells, 671 against 50,000
EXACT_BLOCK_VALUES = 2**25
#: share of the inverted lists a query cell is compared with (16 of 200 lists for 40,000 cells)
PROBE_FRACTION = 0.08
#: cells searched together for more than their nearest cell: their distances to every member of
#: their probed lists are held at once (cells × probed lists × the largest list × 4 bytes), at most this
#: much: 2,400 cells at 16 lists of at most 427 (a 40,000-cell reference), 5,000 at 12 of 290 (the
#: 20,000-cell pool of the open-set scores). Each block loops over the lists in Python, so fewer, larger
#: blocks cost less: 256 cells per block searched 15 neighbours 1.7× slower than 1,024
PROBE_BLOCK_BYTES = 64 * 2**20
#: the fewest cells per block, whatever the lists' sizes
PROBE_BLOCK = 1024
#: Lloyd iterations of the k-means that builds the lists
KMEANS_ITERATIONS = 10
#: latents of at most this many dimensions are searched through inverted lists by :func:`_nearest_members`,
#: for up to :data:`LOW_DIMENSIONS_NEIGHBOURS` neighbours (it keeps them sorted by insertion)
LOW_DIMENSIONS = 32
LOW_DIMENSIONS_NEIGHBOURS = 64
#: those latents (and the open-set rule's expression axes) get zero columns up to a multiple of this many
#: (:func:`_padded`)
PAD_COLUMNS = 16


def _squared_distances(queries: torch.Tensor, reference: torch.Tensor, reference_norms: torch.Tensor) -> torch.Tensor:
    """``|q|² + |r|² - 2 q·r`` without ``|q|²`` (constant per row, added back by the caller)."""
    return torch.addmm(reference_norms[None], queries, reference.T, alpha=-2)


def kmeans(points: torch.Tensor, n_clusters: int, *, iterations: int = KMEANS_ITERATIONS, seed: int = 0):
    """Centroids and each point's cluster (Lloyd's algorithm from ``n_clusters`` seeded points)."""
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(len(points), generator=generator)[:n_clusters]].clone()
    for _ in range(iterations):
        assigned = _squared_distances(points, centroids, (centroids * centroids).sum(1)).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assigned, points)
        counts = torch.bincount(assigned, minlength=n_clusters).to(points.dtype)
        filled = counts > 0  # an emptied cluster keeps its centroid
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, _squared_distances(points, centroids, (centroids * centroids).sum(1)).argmin(1)


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})  # no "ninf": inf fills
def _nearest_members(queries, reference, probed, offsets, sizes, found, squared):  # pragma: no cover - numba
    """Each query's ``k`` nearest reference rows among the members of its probed lists, nearest first.

    ``probed[i]`` lists the lists query ``i`` is compared with; list ``l`` holds reference rows
    ``offsets[l]`` to ``offsets[l] + sizes[l]``. ``found`` and ``squared`` (queries × k) come filled
    with anything and ``inf``; a row that keeps an ``inf`` had fewer than ``k`` members to compare.
    """
    k = found.shape[1]
    for i in range(queries.shape[0]):
        best, where = squared[i], found[i]
        for p in range(probed.shape[1]):
            start = offsets[probed[i, p]]
            for j in range(start, start + sizes[probed[i, p]]):
                value = np.float32(0.0)
                for d in range(queries.shape[1]):
                    difference = queries[i, d] - reference[j, d]
                    value += difference * difference
                if value < best[k - 1]:  # insert, keeping the row sorted
                    m = k - 1
                    while m > 0 and best[m - 1] > value:
                        best[m], where[m] = best[m - 1], where[m - 1]
                        m -= 1
                    best[m], where[m] = value, j


def _padded(values: np.ndarray) -> np.ndarray:
    """``values`` with zero columns up to a multiple of :data:`PAD_COLUMNS` (the same distances).

    :func:`_nearest_members`' distance loop then runs in whole vector registers: 200,000 cells' 11
    nearest among 20,000 in 30 dimensions took 1.0 s instead of 1.6-2.6 s (2 cores, AVX-512), with
    the same neighbours but for float32 ties (4 in 10^6).
    """
    width = -(-values.shape[1] // PAD_COLUMNS) * PAD_COLUMNS
    if width == values.shape[1]:
        return np.ascontiguousarray(values)
    padded = np.zeros((len(values), width), dtype=values.dtype)
    padded[:, : values.shape[1]] = values
    return padded


class NearestReference:
    """The nearest reference cells (Euclidean) of query latents.

    Parameters
    ----------
    latent
        Reference latents, cells × dimensions.
    device
        Where the search runs; on anything but a CPU it is exact.
    exact
        ``True``: always exact (training calibrates the open-set rule on exact distances);
        ``None``: exact up to :data:`EXACT_SEARCH` reference cells or off the CPU.
    """

    def __init__(self, latent: np.ndarray | torch.Tensor, *, device: torch.device | str = "cpu",
                 exact: bool | None = None):  # fmt: skip
        self.device = torch.device(device)
        reference = torch.as_tensor(latent, dtype=torch.float32)
        self.n_reference = len(reference)
        self.exact = exact or len(reference) <= EXACT_SEARCH or self.device.type != "cpu"
        if self.exact:
            self.reference = reference.to(self.device)
            self.norms = (self.reference * self.reference).sum(1)
            return
        n_lists = round(math.sqrt(len(reference)))
        self.centroids, assigned = kmeans(reference, n_lists)
        self.centroid_norms = (self.centroids * self.centroids).sum(1)
        self.n_probe = max(1, math.ceil(PROBE_FRACTION * n_lists))
        order = torch.argsort(assigned, stable=True)
        self.ids = order  # position in the list layout -> reference row
        self.reference = reference[order].contiguous()
        self.norms = (self.reference * self.reference).sum(1)
        # what _nearest_members compares queries of few dimensions with
        self._low = _padded(self.reference.numpy()) if reference.shape[1] <= LOW_DIMENSIONS else None
        sizes = torch.bincount(assigned, minlength=n_lists)
        self.sizes = sizes.tolist()
        self.offsets = (torch.cumsum(sizes, 0) - sizes).tolist()

    def query(self, latent: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (reference rows) and distances of each cell's ``k`` nearest cells (at most all), nearest first."""
        k = min(k, self.n_reference)
        queries = torch.as_tensor(latent, dtype=torch.float32).to(self.device)
        if len(queries) == 0 or k == 0:
            return np.zeros((len(queries), k), dtype=np.int64), np.zeros((len(queries), k), dtype=np.float32)
        if self.exact:
            indices, squared = self._exact(queries, k)
        elif queries.shape[1] <= LOW_DIMENSIONS and k <= LOW_DIMENSIONS_NEIGHBOURS:
            indices, squared = self._low_dimensional(queries, k)
        else:
            positions, squared = self._probe(queries, k)
            indices = self.ids[positions]
        return indices.cpu().numpy(), squared.clamp_min_(0).sqrt_().cpu().numpy()

    def _probed(self, queries: torch.Tensor) -> torch.Tensor:
        """The lists each cell is compared with: its :attr:`n_probe` nearest centroids (cells × n_probe)."""
        distances = _squared_distances(queries, self.centroids, self.centroid_norms)
        return distances.topk(self.n_probe, largest=False).indices

    def _low_dimensional(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference rows and squared distances of the ``k`` nearest probed members (:func:`_nearest_members`)."""
        values = np.ascontiguousarray(queries.numpy())
        found, squared = self._members(values, k, self._probed(queries).numpy())
        short = np.flatnonzero(np.isinf(squared[:, -1]))  # probed lists held fewer than k cells
        if len(short):
            found[short], squared[short] = self._members(values[short], k, None)
        return self.ids[torch.from_numpy(found)], torch.from_numpy(squared)

    def _members(self, values: np.ndarray, k: int, probed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """:func:`_nearest_members` over the probed lists, or over every reference cell (``probed=None``)."""
        if probed is None:  # one list holding every cell
            probed = np.zeros((len(values), 1), np.int64)
            offsets, sizes = np.zeros(1, np.int64), np.array([self.n_reference], np.int64)
        else:
            offsets, sizes = np.asarray(self.offsets, np.int64), np.asarray(self.sizes, np.int64)
        found = np.zeros((len(values), k), np.int64)
        squared = np.full((len(values), k), np.inf, np.float32)
        reference, values = self._low, _padded(values)

        def search(rows: slice) -> None:  # the kernel releases the GIL: torch's threads share the rows
            _nearest_members(values[rows], reference, probed[rows], offsets, sizes, found[rows], squared[rows])

        threads = max(1, min(torch.get_num_threads(), len(values) // 1024))
        bounds = np.linspace(0, len(values), threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(search, [slice(a, b) for a, b in itertools.pairwise(bounds)]))
        return found, squared

    def _exact(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions in :attr:`reference` and squared distances of each cell's k nearest, over every reference cell."""
        found, squared = [], []
        for block in queries.split(max(1, EXACT_BLOCK_VALUES // max(1, self.n_reference))):
            values, indices = _squared_distances(block, self.reference, self.norms).topk(k, dim=1, largest=False)
            found.append(indices)
            squared.append(values + (block * block).sum(1, keepdim=True))
        return torch.cat(found), torch.cat(squared)

    def _probe(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverted-list search over the members of each cell's probed lists (positions in the list layout).

        For the nearest cell alone, each (cell, probed list) pair keeps its list's nearest member;
        for more, the pairs' distances fill one row per cell (blocks of :data:`PROBE_BLOCK` cells)
        and a single top-k picks the neighbours.
        """
        block = max(PROBE_BLOCK, PROBE_BLOCK_BYTES // (4 * self.n_probe * max(1, max(self.sizes))))
        if k > 1 and len(queries) > block:
            parts = [self._probe(part, k) for part in queries.split(block)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        n, probes = len(queries), self.n_probe
        if k > probes * max(self.sizes):  # more neighbours than any cell's probed lists can hold
            return self._exact(queries, k)
        probed = self._probed(queries)
        flat = probed.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (cell, probe) pairs grouped by list
        lists, counts = torch.unique_consecutive(flat[order], return_counts=True)
        cells = order // probes  # pair -> cell; `order` itself is the pair's row in `found`
        width = 1 if k == 1 else max(self.sizes)
        found = torch.full((n * probes, width), float("inf"))
        where = torch.zeros((n * probes, 1), dtype=torch.long)  # k == 1: the nearest member's position
        start = 0
        for member_list, count in zip(lists.tolist(), counts.tolist(), strict=True):
            pairs = order[start : start + count]
            rows = cells[start : start + count]
            start += count
            offset, size = self.offsets[member_list], self.sizes[member_list]
            if size == 0:
                continue
            members = slice(offset, offset + size)
            squared = _squared_distances(queries[rows], self.reference[members], self.norms[members])
            if k == 1:
                found[pairs], nearest = squared.min(dim=1, keepdim=True)
                where[pairs] = nearest + offset
            else:
                found[pairs, :size] = squared
        if k == 1:
            values, picked = found.view(n, -1).min(dim=1, keepdim=True)
            indices = where.view(n, -1).gather(1, picked)
        else:
            values, picked = found.view(n, -1).topk(k, dim=1, largest=False)
            offsets = torch.as_tensor(self.offsets)[probed.gather(1, picked // width)]
            indices = offsets + picked % width
        short = torch.isinf(values).any(1).nonzero().squeeze(1)  # probed lists held fewer than k cells
        values += (queries * queries).sum(1, keepdim=True)
        if len(short):
            indices[short], values[short] = self._exact(queries[short], k)
        return indices, values


#: searches built for model objects, per device: a notebook annotating sample after sample builds the lists once
_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reference_search(annotator, device: torch.device | str) -> NearestReference:
    """The search over ``annotator.reference["latent"]`` on ``device``, built once per model object and device."""
    latent = annotator.reference["latent"]
    built = _BUILT.setdefault(annotator, {})
    key = str(torch.device(device))
    if key not in built or built[key][0] is not latent:  # a replaced reference is searched anew
        built[key] = (latent, NearestReference(latent, device=device))
    return built[key][1]
