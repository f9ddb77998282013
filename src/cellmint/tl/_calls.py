"""The calls of ``cm.tl.annotate`` per label level: label, confidence, margin, Unknown and its reason.

The network's calibrated probabilities give each level a label, a confidence (the label's
probability) and a margin (its lead over the second); cells whose confidence or margin is low can
take the distance-weighted vote of their reference neighbours instead. A fine level only considers
the children of the coarse call. The open-set distance is applied to the whole query at the end
(:func:`final_calls`), because its threshold depends on the query (:mod:`cellmint.models._open_set`).
"""

from __future__ import annotations

import itertools

import numpy as np

from ..models._annotator import Annotator


def vote(neighbours: np.ndarray, distances: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Per cell, the share of its neighbours' (inverse-distance) weight per class."""
    weights = 1.0 / (distances + 1e-6)
    votes = np.zeros((len(neighbours), n_classes), dtype=np.float32)
    np.add.at(votes, (np.repeat(np.arange(len(neighbours)), neighbours.shape[1]), codes[neighbours].ravel()),
              weights.ravel())  # fmt: skip
    return votes / votes.sum(axis=1, keepdims=True)


def top_two(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the largest value's column, the largest value, and its lead over the second largest."""
    label = values.argmax(axis=1)
    first = np.take_along_axis(values, label[:, None], axis=1)[:, 0]
    if values.shape[1] < 2:
        return label, first, first.copy()
    second = np.partition(values, -2, axis=1)[:, -2]
    return label, first, first - second


class Decision:
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
        low = [self._low(*top_two(p)[1:]) for p in proba.values()]
        return np.logical_or.reduce(low)

    def _low(self, confidence: np.ndarray, margin: np.ndarray) -> np.ndarray:
        return (confidence < self.min_confidence) | (margin < self.min_margin)

    def __call__(self, proba: dict[str, np.ndarray], votes: dict[str, np.ndarray], voted: np.ndarray,
                 refine_all: bool) -> dict[str, dict[str, np.ndarray]]:  # fmt: skip
        """``{level: {"label", "confidence", "margin", "unknown", "refined", "proba"}}`` for the chunk.

        ``label`` is the best class (refined or not); ``unknown`` flags low confidence or margin, at
        this level or (``unknown=True``) the level before. The open-set distance is applied to the
        whole query at the end (:func:`final_calls`). ``votes[level]`` holds the neighbour votes of
        the cells ``voted`` (row positions); a voted cell is refined when its call is low-confidence
        (or always, ``refine_all``).
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
            label, confidence, margin = top_two(p)
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
                label[refine], confidence[refine], margin[refine] = top_two(vote)
                low[refine] = self._low(confidence[refine], margin[refine])
            is_unknown = low.copy()
            if parent is not None:
                is_unknown |= parent == n_parent  # no fine call under an unknown coarse one
            out[level] = {"label": label.astype(np.int32), "confidence": confidence.astype(np.float32),
                          "margin": margin.astype(np.float32), "unknown": is_unknown, "refined": refine,
                          "proba": p.astype(np.float32, copy=False)}  # fmt: skip
            parent, n_parent = (np.where(is_unknown, n_classes, label) if self.unknown else label), n_classes
        return out


#: why a cell is Unknown at a level, in the order a reason is given when several apply
REASONS = ("distance", "confidence", "margin", "coarse level")


def final_calls(column: dict[str, np.ndarray], far: np.ndarray, *, n_classes: int, unknown: bool,
                 min_confidence: float, min_margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """A level's codes (``n_classes`` = Unknown), Unknown flags and reasons (codes into ``["", *REASONS]``)."""
    flags = column["unknown"] | far
    reason = np.zeros(len(flags), dtype=np.int8)
    for code, applies in reversed(list(enumerate([far, column["confidence"] < min_confidence,
                                                  column["margin"] < min_margin, flags], start=1))):  # fmt: skip
        reason[applies & flags] = code
    codes = np.where(flags, n_classes, column["label"]) if unknown else column["label"]
    return codes.astype(np.int32), flags, reason
