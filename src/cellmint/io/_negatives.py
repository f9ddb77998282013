"""Seeded negative sampling for contrastive datasets: distinct negatives, caption-aware, same batch first.

For every anchor cell a few *negatives* are drawn from the cells of its own split: *caption
negatives* (a cell whose caption differs from the anchor's) and *sentence negatives* (any other
cell). Within one anchor all negatives are distinct and none is the anchor. Each kind is drawn from
the anchor's batch first; when the batch holds fewer eligible cells than needed, all of them are
taken and the rest is drawn from the other batches of the split.

Cells are sorted once by (split, batch, caption) and by (split, caption), so every pool is a range
of positions, and a caption's cells a sub-range to skip; one numba pass then draws with the
caller's :class:`numpy.random.Generator`. Work and memory grow with the number of cells, not with
their square, so a million cells take seconds.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def _taken(cell, anchor, chosen, count):
    if cell == anchor:
        return True
    for i in range(count):  # noqa: SIM110 (numba compiles loops, not generators)
        if chosen[i] == cell:
            return True
    return False


@numba.njit(cache=True)
def _draw(order, lo, hi, skip_lo, skip_hi, need, chosen, count, anchor, rng):
    """Add ``need`` distinct cells of ``order[lo:hi]`` outside ``order[skip_lo:skip_hi]`` to ``chosen``.

    The caller guarantees that enough cells other than the anchor and those chosen exist there.
    Large pools are sampled by rejection (few rejections: the excluded cells are few); small ones
    are listed and shuffled, so a pool of exactly ``need`` cells takes no retries.
    """
    n = (hi - lo) - (skip_hi - skip_lo)
    if n <= 4 * (count + need + 1) + 32:
        pool = np.empty(n, dtype=np.int64)
        m = 0
        for pos in range(lo, hi):
            if skip_lo <= pos < skip_hi or _taken(order[pos], anchor, chosen, count):
                continue
            pool[m] = order[pos]
            m += 1
        for t in range(need):  # partial Fisher-Yates
            j = t + rng.integers(0, m - t)
            pool[t], pool[j] = pool[j], pool[t]
            chosen[count] = pool[t]
            count += 1
        return count
    while need > 0:
        pos = lo + rng.integers(0, n)
        if pos >= skip_lo:
            pos += skip_hi - skip_lo
        if not _taken(order[pos], anchor, chosen, count):
            chosen[count] = order[pos]
            count += 1
            need -= 1
    return count


@numba.njit(cache=True)
def _sample(anchors, group, part, caption, n_captions, by_group, group_keys, by_part, part_keys, is_caption, rng):
    n_cap = int(is_caption.sum())
    n_any = len(is_caption) - n_cap
    out = np.empty((len(anchors), n_cap + n_any), dtype=np.int64)
    chosen = np.empty(n_cap + n_any, dtype=np.int64)
    for row in range(len(anchors)):
        a = anchors[row]
        g, p, c = group[a], part[a], caption[a]
        g0 = np.searchsorted(group_keys, g * n_captions)
        g1 = np.searchsorted(group_keys, (g + 1) * n_captions)
        p0 = np.searchsorted(part_keys, p * n_captions)
        p1 = np.searchsorted(part_keys, (p + 1) * n_captions)
        count = 0
        if n_cap > 0:  # different caption: skip the anchor's caption block, in its batch then in its split
            gc0 = np.searchsorted(group_keys, g * n_captions + c)
            gc1 = np.searchsorted(group_keys, g * n_captions + c + 1)
            take = min(n_cap, (g1 - g0) - (gc1 - gc0))
            count = _draw(by_group, g0, g1, gc0, gc1, take, chosen, count, a, rng)
            pc0 = np.searchsorted(part_keys, p * n_captions + c)
            pc1 = np.searchsorted(part_keys, p * n_captions + c + 1)
            count = _draw(by_part, p0, p1, pc0, pc1, n_cap - take, chosen, count, a, rng)
        if n_any > 0:  # any other cell, in its batch then in its split
            in_batch = 0
            for i in range(count):
                in_batch += group[chosen[i]] == g
            take = min(n_any, (g1 - g0) - 1 - in_batch)
            count = _draw(by_group, g0, g1, g0, g0, take, chosen, count, a, rng)
            count = _draw(by_part, p0, p1, p0, p0, n_cap + n_any - count, chosen, count, a, rng)
        cap_i, any_i = 0, n_cap  # chosen[:n_cap] are caption negatives, the rest sentence negatives
        for slot in range(n_cap + n_any):
            if is_caption[slot]:
                out[row, slot] = chosen[cap_i]
                cap_i += 1
            else:
                out[row, slot] = chosen[any_i]
                any_i += 1
    return out


def slot_kinds(n_caption: int, n_any: int) -> np.ndarray:
    """Whether each negative slot holds a caption negative: they alternate, caption first, leftovers last."""
    return np.array(
        [(j % 2 == 0 and j // 2 < n_caption) or j // 2 >= n_any for j in range(n_caption + n_any)], dtype=bool
    )


def _sorted_keys(outer: np.ndarray, caption: np.ndarray, n_captions: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((caption, outer))
    return order, outer[order] * n_captions + caption[order]


def sample_negatives(
    part: np.ndarray,
    batch: np.ndarray,
    caption: np.ndarray,
    *,
    n_caption: int,
    n_any: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Negatives of every cell, as cell positions (``n_obs × (n_caption + n_any)``, int64).

    Parameters
    ----------
    part
        Split code of every cell (``0..n_parts-1``); negatives stay within a cell's part.
    batch
        Batch code of every cell (``0..n_batches-1``); all zeros without batches.
    caption
        Caption code of every cell (``0..n_captions-1``); all zeros without captions.
    n_caption
        Caption negatives per cell (a different caption).
    n_any
        Sentence negatives per cell (any other cell).
    rng
        The local generator every draw comes from.

    Returns
    -------
    Positions of the negatives; :func:`slot_kinds` tells which columns hold caption negatives
    (they alternate with sentence negatives, caption first).
    """
    part, batch, caption = (np.asarray(v, dtype=np.int64) for v in (part, batch, caption))
    n_captions = int(caption.max(initial=0)) + 1
    group = part * (int(batch.max(initial=0)) + 1) + batch
    by_group, group_keys = _sorted_keys(group, caption, n_captions)
    by_part, part_keys = _sorted_keys(part, caption, n_captions)
    anchors = np.arange(len(part), dtype=np.int64)
    kinds = slot_kinds(n_caption, n_any)
    return _sample(anchors, group, part, caption, n_captions, by_group, group_keys, by_part, part_keys, kinds, rng)


def check_enough(part: np.ndarray, caption: np.ndarray, *, n_caption: int, n_any: int, names: dict) -> None:
    """Raise when a part is too small, or too uniform in captions, for the negatives asked for.

    ``names`` maps ``"parts"`` and ``"captions"`` to the labels of the codes, for the message.
    """
    counts = np.zeros((int(part.max(initial=0)) + 1, int(caption.max(initial=0)) + 1), dtype=np.int64)
    np.add.at(counts, (part, caption), 1)
    sizes = counts.sum(axis=1)
    for p, size in enumerate(sizes):
        if size and size - 1 < n_caption + n_any:
            raise ValueError(
                f"Split {names['parts'][p]!r} has {size} cells: too few for {n_caption + n_any} distinct negatives "
                "per cell. Lower negatives_per_sample."
            )
        if n_caption:
            c = int(np.argmax(counts[p]))
            if size - counts[p, c] < n_caption:
                raise ValueError(
                    f"In split {names['parts'][p]!r}, only {size - counts[p, c]} cells have a caption other than "
                    f"{names['captions'][c]!r}, but each cell needs {n_caption} caption negatives. Lower "
                    "negatives_per_sample or use a caption_key with more values."
                )
