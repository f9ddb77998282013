"""The calls of ``cm.tl.annotate`` per label level: label, confidence, margin, Unknown and its reason.

The network's calibrated probabilities give each level a label, a confidence (the label's
probability) and a margin (its lead over the second); cells whose confidence or margin is low can
take the distance-weighted vote of their reference neighbours instead. A fine level only considers
the children of the coarse call. The open-set distance is applied to the whole query at the end
(:func:`final_calls`), because its threshold depends on the query (:mod:`cellmint.models._open_set`).
:class:`Calls` gathers the calls of every batch of the query; :func:`level_results` turns them into the
``obs`` columns annotate writes (named by :class:`cellmint._keys.Key`) and the counts it records.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .._keys import Key
from ..models import _conformal as conformal
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


class Calls:
    """The calls of every searched batch, gathered per level (prediction sets packed 8 classes a byte)."""

    def __init__(self, annotator: Annotator, *, keep_proba: bool, calibration: dict | None):
        self.levels = {level: [] for level in annotator.classes}
        self.n_classes = {level: len(c) for level, c in annotator.classes.items()}
        self.keep_proba, self.calibration = keep_proba, calibration
        self.parts: list[np.ndarray] = []
        self.nearest: list[np.ndarray] = []

    def add(self, calls: dict, proba: dict, distance: np.ndarray, nearest_class: np.ndarray) -> None:
        for level, result in calls.items():
            if not self.keep_proba:
                del result["proba"]
            if self.calibration is not None:
                members = conformal.prediction_sets(proba[level], self.calibration["thresholds"][level])
                result["members"] = np.packbits(members, axis=1)
            self.levels[level].append(result)
        self.parts.append(distance)
        self.nearest.append(nearest_class)

    def distances(self) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's own relative distance to the reference and its nearest reference cell's class.

        (:mod:`~cellmint.models._open_set`; both zero without a reference search.)
        """
        if not self.parts:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int32)
        return np.concatenate(self.parts), np.concatenate(self.nearest)

    def level(self, level: str) -> dict[str, np.ndarray]:
        """The level's columns over all cells, in order (the parts are released)."""
        parts, self.levels[level] = self.levels[level], []
        n = self.n_classes[level]
        empty = {"label": np.zeros(0, np.int32), "confidence": np.zeros(0, np.float32),
                 "margin": np.zeros(0, np.float32), "unknown": np.zeros(0, bool), "refined": np.zeros(0, bool),
                 "proba": np.zeros((0, n), np.float32), "members": np.zeros((0, (n + 7) // 8), np.uint8)}  # fmt: skip
        names = parts[0].keys() if parts else empty.keys()
        return {name: np.concatenate([part[name] for part in parts]) if parts else empty[name] for name in names}

    def members(self, column: dict[str, np.ndarray], level: str) -> np.ndarray:
        return np.unpackbits(column["members"], axis=1, count=self.n_classes[level]).astype(bool)


@dataclass(frozen=True)
class Rules:
    """When a call is Unknown, and the label it then takes."""

    unknown: bool
    min_confidence: float
    min_margin: float
    label: str


def level_results(found: Calls, annotator: Annotator, obs: pd.DataFrame, far: np.ndarray, rules: Rules, *,
                   key_added: str, calibration: dict | None, keep_proba: bool, cluster_key: str | None
                   ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict[str, dict]]:  # fmt: skip
    """Per level, the ``obs`` columns, the probabilities (``obsm``) and the counts recorded in ``uns``."""
    table = pd.DataFrame(index=obs.index)
    counts = {"unknown": {}, "unknown_reasons": {}, "refined": {}, "prediction_sets": {}}
    probabilities = {}
    for level, classes in annotator.classes.items():
        column = found.level(level)
        codes, flags, reason = final_calls(column, far, n_classes=len(classes), unknown=rules.unknown,
                                           min_confidence=rules.min_confidence,
                                           min_margin=rules.min_margin)  # fmt: skip
        table[Key.obs.label(key_added, level)] = pd.Categorical.from_codes(codes, categories=[*classes, rules.label])
        table[Key.obs.confidence(key_added, level)] = column["confidence"]
        table[Key.obs.margin(key_added, level)] = column["margin"]
        table[Key.obs.unknown(key_added, level)] = flags
        table[Key.obs.unknown_reason(key_added, level)] = pd.Categorical.from_codes(reason, categories=["", *REASONS])
        counts["unknown"][level] = int(flags.sum())
        counts["unknown_reasons"][level] = {name: int((reason == i).sum()) for i, name in enumerate(REASONS, start=1)}
        counts["refined"][level] = int(column["refined"].sum())
        if calibration is not None:
            members = found.members(column, level)
            table[Key.obs.prediction_set(key_added, level)] = conformal.set_labels(members, classes)
            table[Key.obs.set_size(key_added, level)] = members.sum(axis=1).astype(np.int16)
            counts["prediction_sets"][level] = {**calibration["summary"][level],
                                                "mean_size": float(members.sum(axis=1).mean()) if len(members) else 0.0,
                                                "n_empty": int((members.sum(axis=1) == 0).sum())}  # fmt: skip
        if keep_proba:
            probabilities[level] = pd.DataFrame(column["proba"], index=obs.index, columns=classes)
        if cluster_key is not None:  # soft majority vote: summed probabilities per cluster
            clusters = obs[cluster_key].astype(str)
            votes_per_cluster = probabilities[level].groupby(clusters.to_numpy()).sum()
            winner = votes_per_cluster.idxmax(axis=1)
            table[Key.obs.majority(key_added, level)] = pd.Categorical(clusters.map(winner).to_numpy(),
                                                                       categories=classes)  # fmt: skip
    return table, probabilities, counts
