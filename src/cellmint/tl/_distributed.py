"""Data-parallel training on ``torch.distributed``: which rank this is, and the few collectives training needs.

cellmint writes no distributed engine: the process group is the caller's (``init_process_group``)
or ``torchrun``'s (its ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` environment, then joined here with
``nccl`` on CUDA and ``gloo`` on the CPU). Training uses four collectives:

- **gradients**: after each backward pass, one ``all_reduce`` (sum) of all gradients flattened into
  one buffer (with the step's loss appended). Each rank's loss is its cells' share of the *global*
  batch's mean (divided by the global batch's weight, not its own), so the sum is exactly the
  gradient of the global batch, however its cells were divided among ranks. This is what
  ``DistributedDataParallel`` does, minus its overlap of communication with the backward pass — for
  an annotator-sized network one buffer per step costs less than DDP's bucketing — and it keeps
  the network unwrapped, its ``state_dict`` the same in one process or many;
- **gather**: validation, test and reference cells are divided among ranks for the forward pass and
  the outputs gathered, in order, on every rank: metrics, temperature, conformal and open-set
  calibration see every cell, exactly as in one process;
- **broadcast**: rank 0's early-stopping numbers and calibration are sent to all, so every rank
  takes the same decisions and returns the same model even where floating-point results could
  differ between machines;
- **barrier**: the other ranks return only once rank 0 has written the model folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .._utils import _logging as logg

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Ranks:
    """The place of this process in the process group (``world == 1``: no group, every collective is a no-op)."""

    rank: int = 0
    world: int = 1
    #: where collectives run: CUDA for ``nccl``, the CPU for ``gloo``
    device: torch.device = CPU
    #: whether cellmint joined the group (from torchrun's environment) and so leaves it at the end
    owned: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, rows: np.ndarray) -> np.ndarray:
        """The contiguous share of this rank in ``rows`` (the shares, in rank order, are ``rows``)."""
        return np.array_split(rows, self.world)[self.rank] if self.world > 1 else rows

    # -- collectives ---------------------------------------------------------------------------
    def sum_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor,
                      flag: bool) -> tuple[torch.Tensor | float, bool]:  # fmt: skip
        """Sum every parameter's gradient over ranks, in place; the summed ``loss``, and whether any rank flagged.

        The loss and the flag travel in the same buffer as the gradients: no extra round trip.
        """
        if self.world == 1:  # the loss stays where it is: no host sync per step
            return loss.detach(), flag
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        extra = torch.stack([loss.detach().reshape(()), torch.tensor(float(flag), device=loss.device)])
        flat = torch.cat([g.reshape(-1) for g in grads] + [extra.to(grads[0].dtype)])
        moved = flat.to(self.device)
        torch.distributed.all_reduce(moved)
        flat = moved.to(flat.device)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return float(flat[offset]), bool(flat[offset + 1] > 0)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Rows of every rank's ``values``, concatenated in rank order (same trailing shape and dtype on all)."""
        if self.world == 1:
            return values
        local = values.to(self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        torch.distributed.all_gather(sizes, torch.tensor([len(local)], dtype=torch.int64, device=self.device))
        sizes = [int(s) for s in sizes]
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)]).to(values.device)

    def from_main(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object, sent over the process group)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(**({"device_ids": [self.device.index]} if self.device.type == "cuda" else {}))


def join(torch_device: torch.device) -> tuple[Ranks, torch.device]:
    """The process group this training runs in, joined from torchrun's environment if not yet; and the device.

    Under torchrun with CUDA, ``device="auto"``/``"cuda"`` becomes ``cuda:LOCAL_RANK``: one GPU per process.
    """
    dist = torch.distributed
    owned = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if "MASTER_ADDR" not in os.environ:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but MASTER_ADDR is not: launch with "
                             "torchrun (or srun with torchrun's variables), or call "
                             "torch.distributed.init_process_group yourself before training.")  # fmt: skip
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
        owned = True
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Ranks(owned=owned), torch_device
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch_device.type == "cuda" and torch_device.index is None:
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(torch_device)
    comm = torch_device if dist.get_backend() == "nccl" else torch.device("cpu")
    logg.info(f"    rank {rank} of {world} ({dist.get_backend()}), training on {torch_device}")
    return Ranks(rank, world, comm, owned), torch_device


def leave(ranks: Ranks) -> None:
    """Leave the process group if cellmint joined it (``join``); a caller's group is left as it was."""
    if ranks.owned and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
