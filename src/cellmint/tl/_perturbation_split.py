"""``cm.tl.perturbation_split``: the two generalisation questions as a persisted train/test split.

- ``holdout="context"``: whole contexts are held out (State's *zeroshot*). Their perturbed cells are
  the test set; their control cells are marked ``"test_control"``: never trained on, but the input
  the prediction is made from.
- ``holdout="perturbation"``: chosen perturbations are held out within chosen contexts (State's
  *fewshot*); the context's control cells stay in training.

The split is written to ``obs[key_added]`` (categorical) and described in ``uns[key_added]``, so it
travels with the h5ad; :func:`write_state_toml` writes the same split as a State / cell-load TOML.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._utils import _logging as logg
from .._utils._docs import doc_params
from . import _perturbation_data as data

if TYPE_CHECKING:
    from anndata import AnnData

PARTS = ["train", "test", "test_control"]


@doc_params()
def perturbation_split(
    adata: AnnData,
    perturbation_key: str,
    control: str,
    *,
    context_key: str,
    holdout: str = "context",
    contexts: Sequence[str] | None = None,
    perturbations: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    fraction: float = 0.2,
    random_state: int = 0,
    key_added: str = "perturbation_split",
    toml: str | Path | None = None,
    dataset_name: str = "cellmint",
    dataset_path: str | Path | None = None,
    overwrite: bool = False,
) -> pd.Series:
    """Split cells to ask how a model generalises: to unseen contexts, or to unseen perturbations in a context.

    Parameters
    ----------
    adata
        AnnData with control and perturbed cells of several contexts.
    perturbation_key
        ``obs`` column of the perturbation.
    control
        The control label in ``perturbation_key``.
    context_key
        ``obs`` column of the context (patient, cell line, replicate).
    holdout
        ``"context"``: hold out whole contexts (their control cells become ``"test_control"``).
        ``"perturbation"``: hold out perturbations within contexts (controls stay ``"train"``).
    contexts
        The contexts to hold out (``"context"``) or in which perturbations are held out
        (``"perturbation"``). ``None``: ``fraction`` of the contexts, at least one, drawn at random.
    perturbations
        ``"perturbation"`` only: the perturbations to hold out — a list (held out in every chosen
        context) or ``{{context: [perturbations]}}``. ``None``: ``fraction`` of each chosen context's
        perturbations, at least one, drawn at random.
    fraction
        Share of contexts or perturbations drawn when they are not given.
    {doc_random_state}
    key_added
        ``obs`` column for the split and ``uns`` key for its description.
    toml
        Also write the split as a State / cell-load TOML file at this path (see
        :func:`write_state_toml`).
    dataset_name
        The dataset's name in the TOML.
    dataset_path
        The dataset's data folder in the TOML (default ``"."``).
    overwrite
        Replace an existing ``toml`` file; without it an existing file is an error (checked first).

    Returns
    -------
    The split (also in ``adata.obs[key_added]``): ``"train"``, ``"test"`` (held-out perturbed cells)
    and ``"test_control"`` (control cells of held-out contexts). ``adata.uns[key_added]`` records
    ``holdout``, the held-out contexts and ``{{context: perturbations}}``.
    """
    if holdout not in ("context", "perturbation"):
        raise ValueError(f"holdout must be 'context' or 'perturbation', not {holdout!r}.")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1, not {fraction}.")
    if toml is not None:  # before any work
        _check_new_file(Path(toml), overwrite)
    perturbation = data.labels(adata, perturbation_key, what="Perturbation").to_numpy()
    context = data.labels(adata, context_key, what="Context").to_numpy()
    control = str(control)
    if not (perturbation == control).any():
        raise ValueError(f"No cell has the control label {control!r} in adata.obs[{perturbation_key!r}].")
    rng = np.random.default_rng(random_state)
    all_contexts = sorted(set(context))
    if contexts is None:
        n = max(1, round(fraction * len(all_contexts)))
        if holdout == "context" and n >= len(all_contexts):
            raise ValueError("Holding out contexts needs at least two contexts.")
        chosen = sorted(rng.choice(all_contexts, n, replace=False).tolist())
    else:
        chosen = [str(c) for c in contexts]
        unknown = sorted(set(chosen) - set(all_contexts))
        if unknown:
            raise ValueError(f"Unknown context(s) {unknown[:5]} in adata.obs[{context_key!r}].")
    split = np.full(len(perturbation), "train", dtype=object)
    held: dict[str, list[str]] = {}
    for c in chosen:
        in_context = context == c
        present = sorted(set(perturbation[in_context]) - {control})
        if holdout == "context":
            held[c] = present
            split[in_context] = "test"
            split[in_context & (perturbation == control)] = "test_control"
            continue
        if perturbations is None:
            picked = sorted(rng.choice(present, max(1, round(fraction * len(present))), replace=False).tolist())
        else:
            listed = perturbations.get(c, []) if isinstance(perturbations, Mapping) else perturbations
            picked = [str(p) for p in listed]
            missing = sorted(set(picked) - set(present))
            if missing:
                raise ValueError(f"Perturbation(s) {missing[:5]} have no cells in context {c!r}.")
        held[c] = picked
        split[in_context & np.isin(perturbation, picked)] = "test"
    result = pd.Series(pd.Categorical(split, categories=PARTS), index=adata.obs_names, name=key_added)
    adata.obs[key_added] = result
    adata.uns[key_added] = {
        "holdout": holdout,
        "contexts": np.asarray(chosen, dtype=object),
        "perturbations": {c: np.asarray(p, dtype=object) for c, p in held.items()},
        "perturbation_key": perturbation_key,
        "context_key": context_key,
        "control": control,
        "random_state": random_state,
    }
    counts = result.value_counts().to_dict()
    logg.info(f"perturbation split ({holdout}): {counts}")
    if toml is not None:
        write_state_toml(toml, holdout=holdout, held=held, dataset_name=dataset_name,
                         dataset_path=dataset_path or ".", overwrite=overwrite)  # fmt: skip
    return result


def _quote(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_state_toml(path: str | Path, *, holdout: str, held: Mapping[str, Sequence[str]], dataset_name: str,
                     dataset_path: str | Path, overwrite: bool = False) -> Path:  # fmt: skip
    """Write a split as a State / cell-load TOML file (an existing file only with ``overwrite=True``).

    Held-out contexts go to ``[zeroshot]`` as ``"test"``; perturbations held out within a context go
    to ``[fewshot."dataset.context"]`` as ``test = [...]``; everything else trains.
    """
    lines = ["[datasets]", f"{_quote(dataset_name)} = {_quote(dataset_path)}", "", "[training]",
             f"{_quote(dataset_name)} = \"train\"", "", "[zeroshot]"]  # fmt: skip
    if holdout == "context":
        lines += [f'{_quote(f"{dataset_name}.{c}")} = "test"' for c in held]
    lines += ["", "[fewshot]"]
    if holdout == "perturbation":
        for c, perts in held.items():
            items = ", ".join(_quote(p) for p in perts)
            lines += [f"[fewshot.{_quote(f'{dataset_name}.{c}')}]", "val = []", f"test = [{items}]"]
    path = Path(path)
    _check_new_file(path, overwrite)
    path.write_text("\n".join(lines) + "\n")
    return path


def _check_new_file(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path.")
