"""Augmentation on the batch's device: the same choices and the same statistics as the host version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellmint.models._augment import Augmentation, augment_batch, augment_batch_on_device


def _counts(n_cells=200, n_genes=150, seed=0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).poisson(3.0, (n_cells, n_genes)), dtype=torch.float32)


SETTINGS = Augmentation(thinning=(0.3, 0.9), gene_dropout=(0.0, 0.4), masking=0.1, poisson=0.5, gene_scale=0.3)


def test_same_choices_as_the_host_version():
    """Same generator state: the same library sizes (thinning, gene factors) and the same genes dropped."""
    X = _counts()
    library = X.sum(1).double() + 50.0
    settings = Augmentation(thinning=(0.3, 0.9), gene_dropout=(0.2, 0.4), masking=0.1, poisson=0.5)
    host, host_library = augment_batch(X, library, settings, counts=True, generator=torch.Generator().manual_seed(4))
    device, device_library = augment_batch_on_device(X, library, settings, counts=True,
                                                     generator=torch.Generator().manual_seed(4))  # fmt: skip
    torch.testing.assert_close(device_library, host_library)
    expressed = X.sum(0) > 0
    np.testing.assert_array_equal((host.sum(0) == 0) & expressed, (device.sum(0) == 0) & expressed)
    assert not torch.equal(host, device)  # the per-value draws are the device's own
    assert torch.equal(X, _counts())  # the input is not modified
    assert torch.all(device == device.round())


@pytest.mark.parametrize("settings", [SETTINGS, Augmentation(thinning=(0.5, 0.5), gene_dropout=None)])
def test_same_statistics_as_the_host_version(settings):
    """Per-cell totals and per-gene means over 150 draws agree within sampling error; so do their spreads."""
    X = _counts()
    library = X.sum(1).double()
    totals, gene_means = {}, {}
    for name, function in (("host", augment_batch), ("device", augment_batch_on_device)):
        generator = torch.Generator().manual_seed(11)
        draws = [function(X, library, settings, counts=True, generator=generator)[0] for _ in range(150)]
        stacked = torch.stack(draws).double()
        totals[name] = stacked.sum(2)  # draws × cells
        gene_means[name] = stacked.mean((0, 1))  # per gene
    for a, b in ((totals["host"].mean(0), totals["device"].mean(0)), (gene_means["host"], gene_means["device"])):
        relative = ((a - b).abs() / a.clamp_min(1e-9)).mean().item()
        assert relative < 0.05, relative
    spread = totals["device"].std(0).mean() / totals["host"].std(0).mean()
    assert 0.9 < spread.item() < 1.1
    # the check can fail: other settings on one side are told apart
    other = torch.stack([augment_batch_on_device(X, library, Augmentation(thinning=(0.9, 1.0), gene_dropout=None),
                                                 counts=True, generator=torch.Generator().manual_seed(i))[0]
                         for i in range(30)]).double().sum(2)  # fmt: skip
    assert ((totals["host"].mean(0) - other.mean(0)).abs() / totals["host"].mean(0)).mean().item() > 0.05


def test_log_values_only_dropout_and_masking():
    X = torch.log1p(_counts())
    settings = Augmentation(thinning=(0.2, 0.5), gene_dropout=None, masking=0.0, poisson=0.5)
    out, library = augment_batch_on_device(X, X.sum(1), settings, counts=False, generator=torch.Generator())
    assert torch.equal(out, X)
    torch.testing.assert_close(library, X.sum(1))
