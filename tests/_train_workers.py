"""Training runs in child processes, for the distributed and kill-and-resume tests.

The children come from a forkserver that has imported cellmint and torch once (a fresh interpreter
takes seconds to import them on a busy machine), so that a test can start, kill and restart many.
Each run writes what the test compares to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np

#: the network and schedule of these tests: small and quick, one thread per process
SMALL = {"hidden": (64,), "lr": 1e-3, "progress": False}


def context():
    """A forkserver context whose server has imported torch and cellmint."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "cellmint", "_train_workers"])
    return ctx


def cellbench():
    """CellBench: CEL-seq2 cells to train (10% of them for validation), Drop-seq cells to test."""
    import cellmint as cm

    adata = cm.datasets.cellbench()
    adata.obs["part"] = np.where(adata.obs["technology"] == "CEL-seq2", "train", "test")
    return adata[:, adata.var["in_all"].to_numpy()].copy()  # genes measured in every source: a smaller net


def digest(state_dict) -> str:
    """sha256 of every tensor of a state dict, in order."""
    h = hashlib.sha256()
    for key, value in state_dict.items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(rank: int, world: int, rendezvous: str | None, kwargs: dict, out: str, visits: bool = False) -> None:
    """One rank of a training run (``world == 1``: no process group); writes ``out/rank<rank>.json``."""
    os.environ["CELLMINT_PROGRESS"] = "0"
    import torch

    import cellmint as cm

    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    adata = cellbench()
    model = cm.tl.train_annotator(adata, "cell_line", split="part", **{**SMALL, **kwargs})
    report = model.metrics["cell_line"]
    result = {
        "weights": digest(model.net.state_dict()),
        "macro_f1": report["macro_f1"],
        "evaluated_on": report["evaluated_on"],
        "n_cells": report["n_cells"],
        "temperature": model.temperature["cell_line"],
        "threshold": model.manifest["open_set"].get("floor"),
        "history": model.manifest["history"],
        "training": model.manifest["training"],
        "staged": model.manifest["params"]["staged"],
        "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
    }
    if visits:
        result["visits"] = _visits(adata, kwargs.get("batch_size", 256), staged=bool(kwargs.get("stage")))
    if world > 1:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _visits(adata, batch_size: int, staged: bool = False) -> list[list[int]]:
    """The cells this rank trains on in epochs 0 and 1, read through the loader training uses."""
    import torch

    from cellmint.tl._annotation_data import from_anndata

    source = from_anndata(adata, ["cell_line"], split="part", layer=None, genes=None, group_key=None,
                          input_kind="auto", random_state=0, embedding_keys=[])  # fmt: skip
    rows = np.flatnonzero(source.parts == 0)
    if staged:
        loader = source.staged_loader(rows, device=torch.device("cpu"), batch_size=batch_size, balance=None,
                                      random_state=0, distributed="global")  # fmt: skip
    else:
        loader = source.loader(rows, batch_size=batch_size, shuffle=True, balance=None, random_state=0,
                               distributed="global")  # fmt: skip
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([int(i) for batch in loader for i in batch["index"]])
    return epochs


def start(ctx, world: int, kwargs: dict, out: Path, *, visits: bool = False) -> list:
    """Start the ranks of one run; ``out`` receives their results (and the rendezvous file)."""
    out.mkdir(parents=True, exist_ok=True)
    rendezvous = out / f"rendezvous-{os.urandom(4).hex()}"
    ranks = [
        ctx.Process(target=train, args=(r, world, str(rendezvous), kwargs, str(out), visits)) for r in range(world)
    ]
    for process in ranks:
        process.start()
    return ranks


def results(out: Path, world: int) -> list[dict]:
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
