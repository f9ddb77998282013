"""``cm.tl.train_annotator``: one torch model for several label levels, trained from a store or an AnnData."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._metrics._classification import fit_temperature
from .._utils import _logging as logg
from .._utils._device import resolve_device
from .._utils._docs import doc_params
from .._utils._resources import ResourceMonitor
from ..models._annotator import UNKNOWN as UNKNOWN_DEFAULT
from ..models._annotator import Annotator, choose_unknown_label, learn_hierarchy
from ..models._artifact import check_writable
from ..models._augment import Augmentation, augment_batch, augment_batch_on_device
from ..models._network import AnnotatorNet
from ..models._normalize import InputRecipe, normalize
from ..models._optim import AdamW
from ..store._sampling import check_balance
from ..store._staged import fits_device
from ..store._store import Store
from . import _annotation_evaluation as evaluation
from . import _training as training
from ._annotation_data import TrainingData, from_anndata, from_store
from ._checkpoint import Checkpoints, RandomStreams, checkpoint_folder, fingerprint
from ._distributed import Ranks, join, leave


def _validation_rows(data: TrainingData, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """Train and validation rows; without validation cells, 10% of the training cells of each class."""
    train, val = np.flatnonzero(data.parts == 0), np.flatnonzero(data.parts == 1)
    if len(train) < 2 or (len(train) < 3 and not len(val)):
        raise ValueError(f"The split has {len(train)} training cell(s) and {len(val)} validation cell(s): training "
                         "needs at least 2 cells to learn from and 1 to validate on. Check the split (its train "
                         "part) or give more cells.")  # fmt: skip
    if len(val):
        return train, val, "split"
    finest = data.codes[list(data.codes)[-1]][train]
    picked = [rng.permutation(train[finest == c])[: round(0.1 * (finest == c).sum())] for c in np.unique(finest)]
    val = np.sort(np.concatenate(picked))
    if not len(val):  # classes too small for 10%: one cell still validates early stopping and calibration
        val = rng.choice(train, 1)
    return np.setdiff1d(train, val), val, "10% of the training cells (the split has no validation part)"


#: ``max_epochs=None``: this many epochs up to FULL_EPOCHS_CELLS training cells; above, as many as make the
#: same number of cell presentations (3 million: 167,000 cells 18 epochs, 1 million 3), at least MIN_EPOCHS.
#: Larger references give more optimiser steps per epoch and need fewer epochs; the rule bounds a CPU run
#: (scvi-tools bounds its default the same way, ``get_max_epochs_heuristic``)
MAX_EPOCHS, FULL_EPOCHS_CELLS, MIN_EPOCHS = 60, 50_000, 3
#: ``batch_size=None``: cells per batch on a CPU (always) and the smallest an accelerator's rule picks;
#: ``lr=None``: the learning rate at this batch size
BASE_BATCH, BASE_LR = 256, 1e-3
#: an accelerator's batch is the largest power of two (≤ MAX_BATCH) that leaves at least MIN_STEPS steps per epoch
MIN_STEPS, MAX_BATCH = 64, 8192
#: a run estimated to take longer than this on a CPU is announced with a warning (and how to shorten it)
LONG_RUN_S = 600


def default_max_epochs(n_train: int) -> int:
    """The epochs of ``max_epochs=None`` for ``n_train`` training cells (see :data:`MAX_EPOCHS`)."""
    if n_train <= FULL_EPOCHS_CELLS:
        return MAX_EPOCHS
    return max(MIN_EPOCHS, round(MAX_EPOCHS * FULL_EPOCHS_CELLS / n_train))


def device_batch(device: torch.device, n_train: int) -> int:
    """The batch size of ``batch_size=None`` for ``n_train`` training cells on ``device``.

    On a CPU, :data:`BASE_BATCH` (every reference). On a GPU (or MPS), the largest power of two up to
    :data:`MAX_BATCH` that keeps :data:`MIN_STEPS` optimiser steps per epoch, and at least
    :data:`BASE_BATCH`: a reference under 32,768 cells trains as on a CPU, 1 million cells with
    batches of 8,192. A GPU's step costs nearly the same for 256 cells as for 8,192 (the annotator's
    network is small), so large batches are what make it fast; keeping 64 steps per epoch keeps small
    references learning as they do on a CPU (``docs/speed.md``: on forced larger batches, with the
    learning rate of :func:`batch_lr`, real references of a few thousand cells kept their macro-F1).
    """
    if device.type == "cpu":
        return BASE_BATCH
    batch = BASE_BATCH
    while batch * 2 <= min(MAX_BATCH, n_train // MIN_STEPS):
        batch *= 2
    return batch


def batch_lr(batch_size: int) -> float:
    """The learning rate of ``lr=None``: :data:`BASE_LR` × √(batch_size / :data:`BASE_BATCH`).

    The square-root rule for Adam-type optimisers (Malladi et al., NeurIPS 2022): a batch κ times
    larger averages away κ times the gradient noise, and a step √κ times longer keeps the same
    noise per epoch (linear scaling, right for SGD, overshoots with Adam).
    """
    return BASE_LR * (batch_size / BASE_BATCH) ** 0.5


def _stages(source: TrainingData, train_rows: np.ndarray, device: torch.device, stage: bool | None,
            ranks: Ranks) -> bool:  # fmt: skip
    """Whether the training cells' counts are staged on the device (``stage=None``: on a GPU, when they fit).

    Every rank takes rank 0's answer: their free memory may differ, their plans may not.
    """
    if stage is not None:
        return bool(stage)
    fits = fits_device(source.stored_values(train_rows), len(train_rows), device)
    return bool(ranks.from_main(fits))


def _step_loss(logits: dict, embedded: dict, batch: dict, weights: dict, cell_weight: dict, targets: dict,
               device) -> torch.Tensor:  # fmt: skip
    """The share of this rank in the loss of the global batch: mean weighted cross-entropy over levels plus MSE.

    Sums over this rank's cells divided by the *global* batch's total weight (cells × dimensions for
    the embedding heads), so that the ranks' shares add up to the loss of the whole batch, however its
    cells were divided; in one process it is the batch's mean, as ``cross_entropy(weight=...)`` gives.
    """
    whole = batch["global_index"].numpy()
    loss = 0.0
    for level, values in logits.items():
        truth = batch["labels"][level].to(device)
        total = torch.nn.functional.cross_entropy(values, truth, weight=weights[level], reduction="sum")
        loss = loss + total / float(cell_weight[level][whole].sum())
    loss = loss / len(logits)
    for key, predicted in embedded.items():
        truth = targets[key][batch["index"]].to(device)
        loss = loss + ((predicted - truth) ** 2).sum() / (len(whole) * predicted.shape[1] * len(embedded))
    return loss


def _check_arguments(data, label_keys, *, batch_size, max_epochs, num_workers, early_stopping, lr, weight_decay,
                     dropout, balance, input) -> list[str]:  # fmt: skip
    """The label levels as a list, once every argument is checked (before any data is read)."""
    if not isinstance(label_keys, str) and not (isinstance(label_keys, Sequence)
                                                and all(isinstance(k, str) for k in label_keys)):  # fmt: skip
        raise TypeError(f"label_keys must be a label column name or a list of them, not {label_keys!r}.")
    label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
    if not label_keys:
        raise ValueError("label_keys is empty: give at least one obs/label column.")
    for name, value, minimum in (("batch_size", 1 if batch_size is None else batch_size, 1),
                                  ("max_epochs", 1 if max_epochs is None else max_epochs,
                                  1), ("num_workers", num_workers, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise ValueError(f"{name} must be an integer ≥ {minimum}, not {value!r}.")
    if early_stopping is not None and (isinstance(early_stopping, bool) or not isinstance(early_stopping, int)
                                       or early_stopping < 1):  # fmt: skip
        raise ValueError(f"early_stopping must be None (train all epochs) or an integer ≥ 1, not {early_stopping!r}.")
    good_lr = lr is None or (isinstance(lr, int | float) and lr > 0)
    if not (good_lr and isinstance(weight_decay, int | float) and weight_decay >= 0):
        raise ValueError(f"lr must be > 0 and weight_decay ≥ 0, not lr={lr!r}, weight_decay={weight_decay!r}.")
    if not (isinstance(dropout, int | float) and 0 <= dropout < 1):
        raise ValueError(f"dropout must be in [0, 1), not {dropout!r}.")
    n_cells = getattr(data, "n_obs", None)
    if n_cells is not None and n_cells < 2:
        raise ValueError(f"The data has {n_cells} cell(s); training needs at least 2 cells to learn from and 1 to "
                         "validate on.")  # fmt: skip
    check_balance(balance)
    if input not in ("auto", "counts", "lognorm"):
        raise ValueError(f"input must be 'auto', 'counts' or 'lognorm', not {input!r}.")
    return label_keys


def _training_data(data, label_keys: list[str], *, split, layer, genes, group_key, input, random_state,
                   embedding_keys: list[str], key_added: str) -> TrainingData:  # fmt: skip
    """The training cells of a store or an AnnData (a split made here is written to the AnnData's ``obs``)."""
    if isinstance(data, Store):
        if input == "lognorm":
            raise ValueError("A store holds raw counts: input='lognorm' does not apply.")
        if embedding_keys:
            raise ValueError("embedding_keys needs an AnnData with those obsm entries; a store holds none.")
        return from_store(data, label_keys, split)
    source = from_anndata(data, label_keys, split=split, layer=layer, genes=genes, group_key=group_key,
                          input_kind=input, random_state=random_state, embedding_keys=embedding_keys)  # fmt: skip
    if source.summary["split"].startswith("random"):
        import pandas as pd

        data.obs[f"{key_added}_split"] = pd.Categorical.from_codes(source.parts, ["train", "val", "test"])
    return source


def _warn_absent_classes(source: TrainingData, train_rows: np.ndarray) -> None:
    for level, classes in source.classes.items():
        absent = sorted(set(range(len(classes))) - set(np.unique(source.codes[level][train_rows])))
        if absent:
            logg.warning(f"{level}: {len(absent)} classes have no training cells ({[classes[c] for c in absent[:5]]}).")


def _same_call(params: dict, source: TrainingData, rows: list[np.ndarray], label_keys: list, embedding_keys: list):
    """The fingerprint a checkpoint must match to be resumed: the parameters (but the device) and the data."""
    return fingerprint({k: v for k, v in params.items() if k != "device"}, {
        "genes": list(source.genes), "classes": [source.classes[k] for k in label_keys],
        "codes": [source.codes[k] for k in label_keys], "rows": rows,
        "embeddings": [source.embeddings[k] for k in embedding_keys], "input": repr(source.summary),
    })  # fmt: skip


def augments_on_device(device: torch.device) -> bool:
    """Whether a batch is augmented on the device it trains on.

    On a GPU, yes: torch's draws, no host round trip. On the CPU the compiled host pass is faster, and gives
    the weights of earlier versions for a seed.
    """
    return device.type != "cpu"


class _AnnotatorPlan(training.TrainingPlan):
    """The annotator's network, its training step and its validation metrics, for :func:`~cellmint.tl._training.fit`.

    The step: weighted cross-entropy over levels plus the embedding heads' squared error
    (:func:`_step_loss`); the metrics: macro-F1 over levels and the validation loss.
    """

    def __init__(self, source: TrainingData, train_rows: np.ndarray, val_rows: np.ndarray, recipe: InputRecipe,
                 settings: Augmentation, params: dict, generator: torch.Generator, device: torch.device,
                 ranks: Ranks, num_workers: int):  # fmt: skip
        # built in this order inside training.seeded: the initial weights follow the seed
        self.source, self.val_rows, self.recipe, self.settings = source, val_rows, recipe, settings
        self.generator, self.device, self.ranks = generator, device, ranks
        label_keys, random_state = params["label_keys"], params["random_state"]
        n_classes = {level: len(c) for level, c in source.classes.items()}
        self.scale = {key: (v[train_rows].mean(0), v[train_rows].std(0) + 1e-6) for key, v in source.embeddings.items()}
        self.targets = {key: torch.as_tensor((v - self.scale[key][0]) / self.scale[key][1])
                        for key, v in source.embeddings.items()}  # fmt: skip
        self.dims = {key: int(v.shape[1]) for key, v in source.embeddings.items()}
        self.net = AnnotatorNet(len(source.genes), n_classes, hidden=tuple(params["hidden"]), dropout=params["dropout"],
                                embeddings=self.dims, linear=params["linear"])  # fmt: skip
        self.lr, self.weight_decay = params["lr"], params["weight_decay"]
        self.weights = {}
        for level in label_keys:
            counts = np.bincount(source.codes[level][train_rows], minlength=n_classes[level]).astype(np.float64)
            w = (np.where(counts > 0, np.maximum(counts, 1) ** -0.5, 0.0) if params["class_weight"]
                 else np.ones(len(counts)))  # fmt: skip
            self.weights[level] = torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32, device=device)
        # each cell's loss weight, indexed by row: the denominator of every global batch's mean, on any rank
        self.cell_weight = {level: self.weights[level].cpu().numpy()[source.codes[level]] for level in label_keys}
        self.streams = RandomStreams(generator, device, random_state, ranks.rank)  # after the weights: equal on all
        # on the CPU, reading threads would compete with torch's for the same cores (measured: 5x slower)
        self.prefetch = device.type != "cpu"
        if params["staged"]:  # the counts copied to the device once, batches gathered there
            self.train_loader = source.staged_loader(train_rows, device=device, batch_size=params["batch_size"],
                                                     balance=params["balance"], random_state=random_state,
                                                     distributed="global")  # fmt: skip
        else:
            self.train_loader = source.loader(train_rows, batch_size=params["batch_size"], shuffle=True,
                                              balance=params["balance"], random_state=random_state,
                                              num_workers=num_workers, prefetch=self.prefetch,
                                              distributed="global")  # fmt: skip
        self.steps_per_epoch = len(self.train_loader)

    def configure_optimizer(self) -> AdamW:
        return AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def evaluate(self, rows: np.ndarray, latents: list | None = None) -> tuple[dict, dict, np.ndarray, dict]:
        return evaluation.evaluate(
            self.net, self.source, rows, self.recipe, self.device, self.ranks, self.prefetch, latents
        )

    def batches(self, epoch: int, start: int):
        self.train_loader.set_epoch(epoch, start_batch=start)
        return self.train_loader

    def training_step(self, batch: dict) -> torch.Tensor:
        counts = self.recipe.kind == "counts"
        if augments_on_device(self.device):  # no host round trip: the per-value draws by torch on the device
            X, library = (batch[k].to(self.device, non_blocking=True) for k in ("X", "library_size"))
            X, library = augment_batch_on_device(X, library, self.settings, counts=counts, generator=self.generator)
        else:
            X, library = augment_batch(batch["X"], batch["library_size"], self.settings, counts=counts,
                                       generator=self.generator)  # fmt: skip
        x = normalize(X.to(self.device), library.to(self.device), self.recipe)
        _, logits, embedded = self.net(x)
        return _step_loss(logits, embedded, batch, self.weights, self.cell_weight, self.targets, self.device)

    def batch_cells(self, batch: dict) -> int:
        return len(batch["global_index"])

    def validation_metrics(self) -> dict[str, float]:
        val_logits, val_labels, val_index, val_embedded = self.evaluate(self.val_rows)
        score = evaluation.macro_f1(val_logits, val_labels, self.source.classes)
        val_loss = evaluation.validation_loss(val_logits, val_labels, val_embedded, self.targets, val_index)
        return {"val_macro_f1": score, "val_loss": val_loss}

    def postfix(self, entry: dict) -> dict[str, str]:
        return {"val_f1": f"{entry['val_macro_f1']:.3f}"}


def _stopping(early_stopping: int | None, embedding_keys: list) -> training.EarlyStopping:
    """The annotator's early stopping: on the validation macro-F1 (mean over levels), ties broken by the loss.

    The best epoch: highest validation macro-F1; among equal ones (often all 1.0 on easy data), the
    lowest validation loss, which also covers the embedding heads. Patience counts epochs without a
    better macro-F1: the loss of a model that is already right keeps falling as it grows more
    confident, and would never let training stop (CellBench, 1,021 cells: 60 epochs → 12, same
    labels). With embedding heads, whose error only the loss measures, a lower loss counts too.
    """
    return training.EarlyStopping("val_macro_f1", "max", patience=early_stopping, tolerance=1e-9, tie_break="val_loss",
                                  tie_break_resets=bool(embedding_keys))  # fmt: skip


def _calibrate(plan: _AnnotatorPlan, train_rows: np.ndarray, test_rows: np.ndarray, rng: np.random.Generator,
               random_state: int) -> dict:  # fmt: skip
    """With the best weights: temperatures, metrics, conformal and open-set calibration, reference cells.

    Every rank computes them from the same gathered cells; rank 0's are kept, so the models are equal.
    """
    source, label_keys = plan.source, list(plan.source.classes)
    val_latents: list = []  # the best weights' validation pass also gives the latents for the open-set threshold
    val_logits, val_labels, _, _ = plan.evaluate(plan.val_rows, val_latents)
    temperature = {level: fit_temperature(val_logits[level], val_labels[level]) for level in label_keys}
    metrics = {"validation": evaluation.report(val_logits, val_labels, source.classes, temperature)}
    test = None
    if len(test_rows):
        test_logits, test_labels, test_index, test_embedded = plan.evaluate(test_rows)
        metrics["test"] = evaluation.report(test_logits, test_labels, source.classes, temperature)
        test = (test_logits, test_labels)
        metrics["embedding_r2"] = {key: evaluation.r2(values, plan.targets[key][test_index].numpy())
                                   for key, values in test_embedded.items()}  # fmt: skip
    calibration, coverage = evaluation.conformal_calibration(
        val_logits, val_labels, test, temperature, source.classes, np.random.default_rng([random_state, 1])
    )
    reference, open_set = evaluation.reference_cells(plan.net, source, train_rows, torch.cat(val_latents), plan.recipe,
                                                     plan.device, rng, plan.prefetch, plan.ranks)  # fmt: skip
    return plan.ranks.from_main({"temperature": temperature, "metrics": metrics, "calibration": calibration,
                                 "coverage": coverage, "reference": reference, "open_set": open_set})  # fmt: skip


def _manifest(plan: _AnnotatorPlan, run: training.Fit, calibrated: dict, params: dict, rows: list[np.ndarray],
              report, ranks: Ranks) -> dict:  # fmt: skip
    """What the model folder records of its training (rank 0's, timings too: one manifest for every rank's model)."""
    source, (train_rows, val_rows, test_rows) = plan.source, rows
    metrics, history = calibrated["metrics"], run.history
    evaluated = metrics.get("test", metrics["validation"])
    manifest = {
        "unknown_label": params["unknown_label"],
        "params": params,
        "architecture": {
            "hidden": params["hidden"],
            "dropout": params["dropout"],
            "embeddings": plan.dims,
            "linear": params["linear"],
        },
        "embedding_scale": {key: {"mean": m.tolist(), "std": s.tolist()} for key, (m, s) in plan.scale.items()},
        "augmentation": plan.settings.to_dict(),
        "data": {
            **source.summary,
            "n_train": len(train_rows),
            "n_val": len(val_rows),
            "n_test": len(test_rows),
            "train_classes": {
                level: np.bincount(source.codes[level][train_rows], minlength=len(c)).tolist()
                for level, c in source.classes.items()
            },
        },
        "metrics": {
            level: {**r, "evaluated_on": "test" if "test" in metrics else "validation"}
            for level, r in evaluated.items()
        },
        "validation_metrics": metrics["validation"],
        "embedding_r2": metrics.get("embedding_r2", {}),
        "open_set": calibrated["open_set"],
        "conformal": calibrated["coverage"],
        "history": history,
        "best_epoch": next(h["epoch"] for h in history if (h["val_macro_f1"], h["val_loss"]) == run.state.best),
        "resources": {**report.to_dict(), "epochs": len(history)},
        "training": {
            "world_size": ranks.world,
            "resumed": run.state.resumed,
            "seconds": run.seconds,
            "cells_per_s": run.cells / run.seconds if run.cells else None,
        },
    }
    return ranks.from_main(manifest)


@doc_params()
def train_annotator(
    data: Store | Any,
    label_keys: str | Sequence[str],
    *,
    split: str = "default",
    model_dir: str | Path | None = None,
    layer: str | None = None,
    genes: Sequence[str] | str | None = None,
    group_key: str | None = None,
    input: str = "auto",
    input_transform: str = "log1p",
    hidden: Sequence[int] = (512, 256),
    dropout: float = 0.2,
    linear: bool = False,
    augment: bool | dict | Augmentation = True,
    balance: str | None = "sqrt",
    class_weight: bool = False,
    embedding_keys: Sequence[str] = (),
    max_epochs: int | None = None,
    early_stopping: int | None = 10,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    device: str = "auto",
    stage: bool | None = None,
    num_workers: int = 0,
    unknown_label: str | None = None,
    overwrite: bool = False,
    random_state: int = 0,
    key_added: str = "cellmint",
    progress: bool | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: str = "10 min",
) -> Annotator:
    """Train a multi-level cell-type annotator: a shared encoder and one classifier head per label level.

    Parameters
    ----------
    data
        A :class:`cellmint.Store` (streamed from disk) or an AnnData (in memory or backed; its gene
        panel is held in memory as a sparse matrix, never densified whole).
    label_keys
        Label levels, coarse to fine (e.g. ``["cell_class", "cell_type"]``). One model predicts all;
        which fine classes occur under which coarse class is learned from the data.
    split
        Store: name of a split of the store (``"default"`` is made by ``build_store``). AnnData: an
        ``obs`` column with values train / val / test; when there is none, cells are split 80/10/10
        (by ``group_key`` when given) and the split is written to ``obs[f"{{key_added}}_split"]``.
        Without validation cells, 10% of the training cells of each class are set aside for early
        stopping and calibration. The test part is only evaluated.
    model_dir
        Folder to save the model to (``manifest.json`` + ``weights.pt``); ``None`` keeps it in memory
        (save it later with :meth:`Annotator.save`). An existing folder is an error (checked before
        training) unless ``overwrite=True``.
    {doc_layer} AnnData only.
    genes
        AnnData only: the gene panel — ``None`` (all genes), a list, or a boolean ``var`` column
        (e.g. ``"highly_variable"``). A store's panel is the store's.
    group_key
        AnnData only: ``obs`` column kept whole when cells are split (e.g. donor).
    input
        ``"counts"``, ``"lognorm"`` (log1p-normalised values) or ``"auto"`` (detected; values that fit
        neither are an error). Stores hold counts.
    input_transform
        ``"log1p"``: counts become ``log1p(1e4 · x / library_size)``, the library size over all genes
        of the cell; log-normalised input is used as it is. ``"binary"``: detected or not.
    hidden
        Sizes of the encoder's hidden layers; the last is the latent used by annotation.
    dropout
        Dropout after each hidden layer.
    linear
        Add a linear model of the inputs to each level's logits (a "wide" path next to the deep one).
    augment
        Count-space augmentation (:mod:`cellmint.models._augment`): ``True`` for the defaults,
        ``False`` for none, or a dict overriding ``thinning``, ``gene_dropout``, ``masking``, ``poisson``.
    balance
        Label balancing by sampling weights ``n_c^-0.5`` (``"sqrt"``) or ``n_c^-1`` (``"inverse"``) of
        the finest level's classes; ``None`` samples cells uniformly. No cell is discarded.
    class_weight
        Also weight each class's loss by ``n_c^-0.5`` (normalised to mean 1).
    embedding_keys
        AnnData only: ``obsm`` embeddings of the reference (e.g. ``"X_umap"``, ``"X_pca"``) that extra
        regression heads learn to predict from the latent (mean squared error on standardised
        coordinates), so that queries can be projected into the reference's embedding.
    max_epochs
        Passes over the training cells. ``None``: 60 up to 50,000 training cells, and above as many
        as make 3 million cell presentations (100,000 cells: 30; 1 million: 3). Before a run estimated
        at more than 10 minutes on a CPU, a warning says how long and how to shorten it; with
        ``sc.settings.verbosity = "info"`` each epoch logs its loss, validation score and the time left.
    early_stopping
        Stop after this many epochs without a better validation macro-F1 (mean over levels; with
        ``embedding_keys``, or a lower validation loss) and keep the best weights (highest macro-F1,
        then lowest loss); ``None`` trains all epochs.
    lr
        AdamW learning rate. ``None``: 1e-3 at batches of 256 (atlasmtl's too: on a 1,000-cell, 48-class
        reference, 3e-4 ended early stopping at a macro-F1 of 0.40, below logistic regression's 0.45;
        1e-3 reached 0.48), scaled by √(batch_size / 256) for other batch sizes (the square-root rule for
        Adam: 4,096 cells, 4e-3). Recorded in ``manifest["params"]``.
    weight_decay
        AdamW weight decay.
    batch_size
        Cells per mini-batch. ``None``: chosen for the device — 256 on a CPU; on a GPU the largest
        power of two up to 8,192 that keeps 64 steps per epoch (256 below 32,768 training cells,
        8,192 from 524,288), so that the GPU is kept busy on large references and small ones learn as on
        a CPU. Under ``torch.distributed`` it is the global batch. Recorded in ``manifest["params"]``.
    {doc_device}
    stage
        Copy the training cells' counts to the device once and cut every batch there (row gather,
        densify, augmentation, normalisation, step: no host work per batch but the plan; the epoch
        shuffled as a whole). ``None``: on a GPU when the counts take at most half its free memory
        (8 bytes per stored value: 10 million cells × 1,000 values ≈ 80 GB), else streamed as on a CPU.
        ``True`` stages on any device (on a CPU: in host memory); ``False`` streams. Recorded in
        ``manifest["params"]["staged"]``.
    num_workers
        torch DataLoader workers reading batches (not used when staged).
    unknown_label
        The label ``cm.tl.annotate`` gives untrusted cells with this model, recorded in it. ``None``:
        ``"Unknown"``, or ``"Unassigned"`` when the reference has a class called ``"Unknown"`` (such
        cells are then a class like any other).
    overwrite
        Replace an existing model folder at ``model_dir`` (as a whole: a crash leaves the old model or
        the new one).
    {doc_random_state}
    key_added
        AnnData: key of ``uns`` for the model's metadata.
    {doc_progress}
    checkpoint_dir
        Folder for the training checkpoint (``training.pt``): rerunning the same call after a crash or a
        pre-emption resumes from it (:mod:`cellmint.tl._checkpoint`), also with another number of
        ranks; it is removed once the model is returned. Default: ``<model_dir>.checkpoint`` beside the
        model folder when ``model_dir`` is given, else no checkpoints.
    checkpoint_every
        How often a checkpoint is written: ``"10 min"``, ``"2 epochs"`` or ``"500 steps"``; one is also
        written when training ends, before calibration.

    Returns
    -------
    The :class:`~cellmint.Annotator`, with ``metrics`` (per level on the test cells, or on the
    validation cells when there are no test cells: accuracy, macro-F1, per-class recall, confusion,
    ECE before and after temperature scaling) and a resource report in ``manifest["resources"]``.
    When ``data`` is an AnnData, also writes ``adata.uns[key_added]`` (model folder path, label keys,
    classes, gene panel, input recipe, temperatures, parameters, metrics, file checksums; all
    h5ad-writable) and, when the split was made here, ``adata.obs[f"{{key_added}}_split"]``.
    ``manifest["training"]`` records the number of ranks, the resumes from checkpoints and the
    training throughput (cells of global batches per second of this process's epoch loop).

    Notes
    -----
    Under ``torch.distributed`` (a process group set up by the caller, or ``torchrun``'s environment),
    every rank runs this same call: each trains on its share of every global batch of ``batch_size``
    cells with gradients summed across ranks, validation and test cells are divided among ranks and
    gathered, and every rank returns the same model; only rank 0 writes ``model_dir``
    (:mod:`cellmint.tl._distributed`, docs page "Scaling out").
    """
    label_keys = _check_arguments(data, label_keys, batch_size=batch_size, max_epochs=max_epochs,
                                  num_workers=num_workers, early_stopping=early_stopping, lr=lr,
                                  weight_decay=weight_decay, dropout=dropout, balance=balance, input=input)  # fmt: skip
    if model_dir is not None:
        check_writable(model_dir, overwrite=overwrite)
    ranks, torch_device = join(resolve_device(device))
    settings = Augmentation.from_arg(augment)
    start = logg.info(f"training an annotator for {label_keys} on {torch_device}")
    embedding_keys = list(embedding_keys)
    source = _training_data(data, label_keys, split=split, layer=layer, genes=genes, group_key=group_key, input=input,
                            random_state=random_state, embedding_keys=embedding_keys, key_added=key_added)  # fmt: skip
    recipe = InputRecipe(kind=source.kind, transform=input_transform)
    unknown_label = choose_unknown_label(source.classes, unknown_label)
    if unknown_label != UNKNOWN_DEFAULT:
        logg.info(f"    untrusted cells will be labelled {unknown_label!r} (the reference has a class 'Unknown')")
    rng = np.random.default_rng(random_state)
    train_rows, val_rows, val_source = _validation_rows(source, rng)
    max_epochs = default_max_epochs(len(train_rows)) if max_epochs is None else max_epochs
    batch_size = device_batch(torch_device, len(train_rows)) if batch_size is None else batch_size
    staged = _stages(source, train_rows, torch_device, stage, ranks)
    lr = batch_lr(batch_size) if lr is None else lr
    logg.info(f"    batches of {batch_size} cells, learning rate {lr:.2g}")
    test_rows = np.flatnonzero(source.parts == 2)
    _warn_absent_classes(source, train_rows)
    params = {
        "label_keys": label_keys, "split": split, "input": recipe.kind, "input_transform": input_transform,
        "hidden": list(hidden), "dropout": dropout, "linear": linear, "augment": settings.to_dict(), "balance": balance,
        "class_weight": class_weight, "max_epochs": max_epochs, "early_stopping": early_stopping, "lr": lr,
        "weight_decay": weight_decay, "batch_size": batch_size, "random_state": random_state, "staged": staged,
        "device": str(torch_device), "validation": val_source, "unknown_label": unknown_label,
    }  # fmt: skip
    rows = [train_rows, val_rows, test_rows]
    same_call = _same_call(params, source, rows, label_keys, embedding_keys)
    checkpoints = Checkpoints(checkpoint_folder(checkpoint_dir, model_dir), same_call, checkpoint_every, ranks)
    with (
        training.seeded(random_state, torch_device) as generator,  # weights and dropout follow the seed
        ResourceMonitor(device=torch_device) as monitor,
        checkpoints,
    ):
        plan = _AnnotatorPlan(source, train_rows, val_rows, recipe, settings, params, generator, torch_device, ranks,
                              num_workers)  # fmt: skip
        # without a bar (a log, a pipeline) one line per epoch at info level
        shown = training.Progress(progress, score_label="validation macro-F1", cells=len(train_rows),
                                  long_run_s=LONG_RUN_S)  # fmt: skip
        run = training.fit(plan, device=torch_device, max_epochs=max_epochs,
                           stopping=_stopping(early_stopping, embedding_keys),
                           progress=shown, ranks=ranks, checkpoints=checkpoints, streams=plan.streams,
                           random_state=random_state, monitor=monitor)  # fmt: skip
        calibrated = _calibrate(plan, train_rows, test_rows, rng, random_state)
    report = monitor.report
    manifest = _manifest(plan, run, calibrated, params, rows, report, ranks)
    hierarchy = learn_hierarchy({k: v[train_rows] for k, v in source.codes.items()}, source.classes)
    model = Annotator(plan.net.cpu(), genes=list(source.genes), classes=source.classes, hierarchy=hierarchy,
                      recipe=recipe, temperature=calibrated["temperature"], manifest=manifest,
                      reference=calibrated["reference"], calibration=calibrated["calibration"])  # fmt: skip
    if model_dir is not None:
        if ranks.main:
            model.save(model_dir, overwrite=overwrite)
        model.manifest, model.path = ranks.from_main(model.manifest), Path(model_dir)
    checkpoints.clear()
    ranks.barrier()  # every rank returns once the model folder is written
    leave(ranks)
    if not isinstance(data, Store):
        data.uns[key_added] = model.uns_summary()
    summary = ", ".join(f"{k} macro-F1 {r['macro_f1']:.3f}" for k, r in model.metrics.items())
    logg.info(f"    finished: {summary}; {report}", time=start)
    return model
