"""Persistent train/validation/test splits of a store that keep groups (e.g. donors) whole.

Without groups, cells are split within each label class (exact stratification). With groups, whole
groups are assigned greedily, largest first, each to the split whose label deficit it fills best
among those still below their target size; the achieved fractions and label proportions are
recorded with the split. :func:`make` is ``Store.make_split``; its codes are committed by the writer
(``_writer.commit_split``) like any other write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._writer import commit_split

if TYPE_CHECKING:
    from ._reader import StoreReader

SPLIT_NAMES = ("train", "val", "test")
#: the split ``build_store`` makes and ``Store.loader``/training use unless told otherwise
DEFAULT_SPLIT = "default"
#: the split a build makes, and train_annotator makes from an AnnData without one: 80/10/10
DEFAULT_FRACTIONS = {"test_fraction": 0.1, "val_fraction": 0.1}
TRAIN, VAL, TEST = 0, 1, 2


def check_fractions(test_fraction: float, val_fraction: float) -> None:
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), not {value!r}.")
    if test_fraction + val_fraction >= 1:
        raise ValueError("test_fraction + val_fraction must leave cells for training.")


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"A split's name must be a non-empty string without '/', not {name!r}.")


def make(store: StoreReader, name: str, *, test_fraction: float, val_fraction: float, group_key: str | bool | None,
         stratify_labels: bool, label_key: str | None, random_state: int, overwrite: bool) -> pd.DataFrame:  # fmt: skip
    """See :meth:`cellmint.Store.make_split` (called under ``_writer.writing``, with a current manifest)."""
    if not store.complete:
        raise ValueError(f"The store at {store.path} is unfinished ({store.n_obs:,} cells committed): a split "
                         "now would leave out the cells still to come. Resume the build (cm.pp.build_store "
                         "with the same arguments) or the append (Store.append again, or Store.rollback()) "
                         "first.")  # fmt: skip
    if name in store.splits and not overwrite:
        raise ValueError(f"A split named {name!r} exists; pass overwrite=True to replace it.")
    obs = store.obs()
    group_key = None if group_key is False else (group_key or store.manifest["group_key"])
    if group_key is not None and group_key not in obs.columns:
        raise KeyError(f"group_key {group_key!r} is neither the store's group nor one of its obs_keys "
                       f"({[store.manifest['group_key'], *store.manifest['obs_keys']]}).")  # fmt: skip
    if label_key is not None and label_key not in store.label_keys:
        raise KeyError(f"label_key {label_key!r} is not a label key of the store ({store.label_keys}).")
    label_key = label_key or (store.label_keys[0] if store.label_keys else None)
    labels = obs[label_key].cat.codes.to_numpy() if (stratify_labels and label_key) else None
    groups = obs[group_key].astype(str).to_numpy() if group_key is not None else None
    codes = assign(labels, groups, n_obs=store.n_obs, test_fraction=test_fraction, val_fraction=val_fraction,
                   random_state=random_state).astype(np.int8)  # fmt: skip
    if groups is not None and (leaks := leakage(groups, codes)):
        raise AssertionError(f"groups in several parts: {leaks[:5]}")  # pragma: no cover - by construction
    record = {
        "test_fraction": test_fraction, "val_fraction": val_fraction, "group_key": group_key,
        "label_key": label_key if stratify_labels else None, "random_state": random_state, "n_obs": store.n_obs,
        "cells": {part: int((codes == i).sum()) for i, part in enumerate(SPLIT_NAMES)},
    }  # fmt: skip
    parts = pd.Categorical.from_codes(codes, categories=list(SPLIT_NAMES))
    classes = obs[label_key] if label_key else pd.Series(["all"] * store.n_obs, index=obs.index)
    table = pd.crosstab(pd.Series(classes.to_numpy(), name=label_key or "cells"), pd.Series(parts, name="split"))
    commit_split(store.path, store.manifest, name, codes, record)
    store._arrays.pop(store.manifest["splits"][name]["array"], None)  # a new array under that name
    return table.reindex(columns=list(SPLIT_NAMES), fill_value=0)


def assign(
    labels: np.ndarray | None,
    groups: np.ndarray | None,
    *,
    n_obs: int,
    test_fraction: float,
    val_fraction: float,
    random_state: int,
) -> np.ndarray:
    """Split code (0 train, 1 val, 2 test) of every cell; ``labels``/``groups`` are integer codes or None."""
    check_fractions(test_fraction, val_fraction)
    rng = np.random.default_rng(random_state)
    n = n_obs
    fractions = np.array([1 - test_fraction - val_fraction, val_fraction, test_fraction])
    codes = np.zeros(n, dtype=np.int8)
    if groups is None:
        strata = labels if labels is not None else np.zeros(n, dtype=np.int64)
        for stratum in np.unique(strata):
            cells = rng.permutation(np.flatnonzero(strata == stratum))
            n_test = round(test_fraction * len(cells))
            n_val = round(val_fraction * len(cells))
            codes[cells[:n_test]] = TEST
            codes[cells[n_test : n_test + n_val]] = VAL
        return codes
    labels = labels if labels is not None else np.zeros(n, dtype=np.int64)
    table = pd.crosstab(groups, labels)  # groups × classes
    sizes = table.sum(axis=1).to_numpy()
    targets = np.outer(fractions, table.sum(axis=0).to_numpy())  # splits × classes
    filled = np.zeros_like(targets)
    # roughly largest first (packs well), randomised by the seed so that seeds give different splits
    order = np.argsort(-sizes * rng.uniform(0.5, 1.5, len(sizes)), kind="stable")
    group_split = np.zeros(len(table), dtype=np.int8)
    for g in order:
        composition = table.iloc[g].to_numpy()
        room = targets.sum(axis=1) - filled.sum(axis=1)
        candidates = [s for s in (TEST, VAL) if fractions[s] > 0 and room[s] > 0]
        best, best_fit = TRAIN, -np.inf
        for s in candidates:
            deficit = np.clip(targets[s] - filled[s], 0, None)
            fit = np.minimum(composition, deficit).sum() - max(0.0, composition.sum() - room[s])
            if fit > best_fit and fit > 0:
                best, best_fit = s, fit
        group_split[g] = best
        filled[best] += composition
    for part, fraction in ((VAL, val_fraction), (TEST, test_fraction)):
        if fraction > 0 and not (group_split == part).any():
            import warnings

            warnings.warn(
                f"No group fits the {SPLIT_NAMES[part]} part (target {fraction:.0%} of {n} cells, smallest group "
                f"{int(sizes.min())} cells): it is empty. Use smaller groups or a larger fraction.",
                UserWarning,
                stacklevel=3,
            )
    position = pd.Index(table.index).get_indexer(groups)
    return group_split[position]


def leakage(groups: np.ndarray, codes: np.ndarray) -> list:
    """Groups found in more than one split (empty when the split is clean)."""
    frame = pd.DataFrame({"group": groups, "split": codes})
    counts = frame.groupby("group", observed=True)["split"].nunique()
    return list(counts.index[counts > 1])
