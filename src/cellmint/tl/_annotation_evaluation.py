"""The annotator's evaluation and calibration on held-out cells, with the best weights.

Logits over rows (each rank its share), macro-F1 and the validation loss that pick the best epoch,
the classification and calibration report, the conformal calibration kept with the model, and the
reference cells with the open-set calibration (:mod:`cellmint.models._open_set`).
"""

from __future__ import annotations

import numpy as np
import torch

from .._metrics._classification import classification_report, expected_calibration_error
from ..models import _conformal as conformal
from ..models import _open_set as open_set_rule
from ..models._knn import NearestReference
from ..models._normalize import normalize
from ._annotation_data import TrainingData
from ._distributed import Ranks

#: reference cells kept with the model (latent + labels) for nearest-neighbour refinement and open-set distances
REFERENCE_CELLS = 50_000


@torch.no_grad()
def logits_over(net, loader, recipe, device, latents: list | None = None) -> tuple[dict, dict, np.ndarray, dict]:
    """Logits and labels per level, cell indices and (standardised) embeddings over a loader, in its order.

    With ``latents`` (a list), each batch's latent is appended to it too.
    """
    net.eval()
    # empty to start with, so that a rank without cells still gives every level (shapes for the gather)
    logits = {level: [torch.zeros(0, head.out_features)] for level, head in net.heads.items()}
    labels = {level: [torch.zeros(0, dtype=torch.int64)] for level in net.heads}
    embedded = {key: [torch.zeros(0, regressor.out_features)] for key, regressor in net.regressors.items()}
    index = [np.zeros(0, dtype=np.int64)]
    if latents is not None:
        latents.append(torch.zeros(0, next(iter(net.heads.values())).in_features))
    for batch in loader:
        x = normalize(batch["X"].to(device), batch["library_size"].to(device), recipe)
        latent, out, projected = net(x)
        if latents is not None:
            latents.append(latent.float().cpu())
        for level, values in out.items():
            logits[level].append(values.float().cpu())
            labels[level].append(batch["labels"][level])
        for key, values in projected.items():
            embedded[key].append(values.float().cpu())
        index.append(batch["index"].numpy())
    return ({k: torch.cat(v) for k, v in logits.items()}, {k: torch.cat(v) for k, v in labels.items()},
            np.concatenate(index), {k: torch.cat(v).numpy() for k, v in embedded.items()})  # fmt: skip


def evaluate(net, source: TrainingData, rows: np.ndarray, recipe, device, ranks: Ranks, prefetch: bool,
              latents: list | None = None) -> tuple[dict, dict, np.ndarray, dict]:  # fmt: skip
    """:func:`logits_over` over ``rows``, each rank computing its share: every rank gets every cell's, in order."""
    part = ranks.part(rows)
    mine: list | None = None if latents is None else []
    loader = () if not len(part) else source.loader(part, batch_size=1024, shuffle=False, balance=None,
                                                    random_state=0, prefetch=prefetch)  # fmt: skip
    logits, labels, index, embedded = logits_over(net, loader, recipe, device, mine)
    if latents is not None:
        latents.append(ranks.gather(torch.cat(mine)))
    return ({k: ranks.gather(v) for k, v in logits.items()}, {k: ranks.gather(v) for k, v in labels.items()},
            ranks.gather(torch.from_numpy(index)).numpy(),
            {k: ranks.gather(torch.from_numpy(v)).numpy() for k, v in embedded.items()})  # fmt: skip


def nearest(latent: torch.Tensor, reference: torch.Tensor, *, exclude: np.ndarray | None = None):
    """Exact distance to, and index of, each cell's nearest reference cell (``exclude``: the cells' own rows)."""
    search = NearestReference(reference, exact=True)  # the open-set rule is calibrated on exact distances
    if exclude is None:
        index, distance = search.query(latent, k=1)
        return distance[:, 0], index[:, 0]
    index, distance = search.query(latent, k=2)
    if index.shape[1] < 2:  # a single reference cell: no other cell
        return np.full(len(index), np.inf, np.float32), np.zeros(len(index), np.int64)
    other = (index[:, 0] == exclude).astype(np.int64)  # the first neighbour is the cell itself: take the second
    rows = np.arange(len(index))
    return distance[rows, other], index[rows, other]


def reference_cells(net, source: TrainingData, train_rows, val_latent: torch.Tensor, recipe, device, rng,
                    prefetch: bool, ranks: Ranks):  # fmt: skip
    """Latent and labels of up to REFERENCE_CELLS training cells, and the open-set calibration.

    The class scales and the floor of the rule come from the spacing of the reference cells (up to
    ``SCALE_CELLS`` per class: distance to the nearest other reference cell); the validation cells'
    distances to their nearest reference cell are recorded beside (:mod:`cellmint.models._open_set`).
    """
    rows = train_rows if len(train_rows) <= REFERENCE_CELLS else np.sort(rng.choice(train_rows, REFERENCE_CELLS,
                                                                                      replace=False))  # fmt: skip
    latents: list = []
    _, _, index, _ = evaluate(net, source, rows, recipe, device, ranks, prefetch, latents)
    reference = torch.cat(latents)
    codes = {level: values[index].astype(np.int32) for level, values in source.codes.items()}
    finest = list(codes)[-1]
    picked = np.sort(np.concatenate([rng.permutation(np.flatnonzero(codes[finest] == c))[:open_set_rule.SCALE_CELLS]
                                     for c in np.unique(codes[finest])]))  # fmt: skip
    spacing, _ = nearest(reference[picked], reference, exclude=picked)
    distance, closest = nearest(val_latent, reference)
    open_set = open_set_rule.calibration(spacing, codes[finest][picked], len(source.classes[finest]),
                                         distance=distance, nearest_class=codes[finest][closest])  # fmt: skip
    return {"latent": reference.numpy().astype(np.float16), "codes": codes}, {
        "metric": "euclidean", "level": finest, **open_set, "n_reference": len(rows),
    }  # fmt: skip


def conformal_calibration(val_logits: dict, val_labels: dict, test: tuple[dict, dict] | None, temperature: dict,
               classes: dict, rng: np.random.Generator) -> tuple[dict, dict]:  # fmt: skip
    """Per level: the conformal calibration kept with the model and its coverage at the default ``alpha``.

    The calibration is the scores of up to ``MAX_CALIBRATION_CELLS`` validation cells (a random
    subset) and their classes; coverage and set size are measured on the test part (or on two
    halves of the validation cells, each calibrated on the other).
    """
    stored, summary = {}, {}
    for level, names in classes.items():
        proba = torch.softmax(val_logits[level] / temperature[level], 1).numpy()
        truth = val_labels[level].numpy()
        keep = np.sort(rng.permutation(len(truth))[: conformal.MAX_CALIBRATION_CELLS])
        stored[level] = {"score": conformal.scores(proba, truth)[keep], "class": truth[keep].astype(np.int32)}
        test_proba = test_truth = None
        if test is not None:
            test_proba = torch.softmax(test[0][level] / temperature[level], 1).numpy()
            test_truth = test[1][level].numpy()
        summary[level] = {**conformal.evaluate(proba[keep], truth[keep], test_proba, test_truth, len(names), rng),
                          "n_calibration": len(keep)}  # fmt: skip
    return stored, summary


def validation_loss(logits: dict, labels: dict, embedded: dict, targets: dict, index: np.ndarray) -> float:
    """Mean cross-entropy over levels plus mean squared error of the embedding heads."""
    loss = np.mean([float(torch.nn.functional.cross_entropy(logits[k], labels[k])) for k in logits])
    for key, values in embedded.items():
        loss += float(((values - targets[key][index].numpy()) ** 2).mean()) / len(embedded)
    return float(loss)


def r2(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Coefficient of determination over all coordinates (standardised, so dimensions weigh alike)."""
    return float(1 - ((predicted - truth) ** 2).sum() / max(1e-12, ((truth - truth.mean(0)) ** 2).sum()))


def macro_f1(logits: dict, labels: dict, classes: dict) -> float:
    scores = [classification_report(labels[k].numpy(), logits[k].argmax(1).numpy(), classes[k])["macro_f1"]
              for k in classes]  # fmt: skip
    return float(np.mean(scores))


def report(logits: dict, labels: dict, classes: dict, temperature: dict) -> dict:
    out = {}
    for level in classes:
        truth = labels[level].numpy()
        raw = torch.softmax(logits[level], 1).numpy()
        calibrated = torch.softmax(logits[level] / temperature[level], 1).numpy()
        report = classification_report(truth, calibrated.argmax(1), classes[level])
        report["ece"] = expected_calibration_error(calibrated.max(1), calibrated.argmax(1) == truth)
        report["ece_uncalibrated"] = expected_calibration_error(raw.max(1), raw.argmax(1) == truth)
        out[level] = report
    return out
