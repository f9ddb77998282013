"""Building blocks of the annotator: normalisation, input detection, augmentation, metrics, calibration."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scanpy as sc
import torch
from sklearn.metrics import f1_score

import cellmint as cm
from cellmint._metrics._classification import classification_report, expected_calibration_error, fit_temperature
from cellmint.models._augment import Augmentation, augment_batch
from cellmint.models._normalize import InputRecipe, normalize
from cellmint.models._scale import detect_kind


def test_normalize_equals_scanpy_when_the_library_is_the_row_sum():
    adata = cm.datasets.cellbench()[:50].copy()
    X = torch.as_tensor(adata.X.toarray(), dtype=torch.float32)
    ours = normalize(X, X.sum(1), InputRecipe()).numpy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    np.testing.assert_allclose(ours, adata.X.toarray(), rtol=1e-5, atol=1e-5)
    assert set(np.unique(normalize(X, X.sum(1), InputRecipe(transform="binary")).numpy())) == {0.0, 1.0}
    lognorm = torch.rand(3, 4)
    assert torch.equal(normalize(lognorm, torch.ones(3), InputRecipe(kind="lognorm")), lognorm)


def test_input_kind_detection_and_its_errors():
    assert detect_kind(np.array([1.0, 3.0, 7.0]), where="X") == "counts"
    assert detect_kind(np.log1p(np.array([1.5, 3.0, 70.0])), where="X") == "lognorm"
    with pytest.raises(ValueError, match="negative values"):
        detect_kind(np.array([1.0, -2.0]), where="X")
    with pytest.raises(ValueError, match="non-integer values up to 200.5"):
        detect_kind(np.array([1.0, 200.5]), where="X")
    with pytest.raises(ValueError, match="NaN"):
        detect_kind(np.array([1.0, np.nan]), where="X")
    with pytest.raises(ValueError, match="input_transform must be one of"):
        InputRecipe(transform="sqrt")


def _counts(n_cells=400, n_genes=300, seed=0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).poisson(2.0, (n_cells, n_genes)), dtype=torch.float32)


def test_thinning_scales_depth_and_library_together():
    X = _counts()
    library = X.sum(1)
    settings = Augmentation(thinning=(0.5, 0.5), gene_dropout=None, masking=0.0)
    thinned, new_library = augment_batch(X, library, settings, counts=True, generator=torch.Generator().manual_seed(0))
    assert torch.all(thinned <= X)
    assert torch.all(thinned == thinned.round())
    assert thinned.sum() / X.sum() == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(new_library, library * 0.5)
    assert torch.equal(X, _counts())  # the input batch is not modified


def test_gene_dropout_range_from_zero_and_masking():
    X = _counts()
    settings = Augmentation(thinning=None, gene_dropout=(0.0, 0.6), masking=0.0)
    generator = torch.Generator().manual_seed(1)
    fractions = []
    for _ in range(200):
        out, _ = augment_batch(X, X.sum(1), settings, counts=True, generator=generator)
        dropped = (out.sum(0) == 0) & (X.sum(0) > 0)
        assert torch.equal(out[:, ~dropped], X[:, ~dropped])  # whole genes only
        fractions.append(dropped.float().mean().item())
    assert min(fractions) < 0.03
    assert 0.25 < np.mean(fractions) < 0.35
    masked, _ = augment_batch(X, X.sum(1), Augmentation(thinning=None, gene_dropout=None, masking=0.2), counts=True,
                              generator=generator)  # fmt: skip
    assert (masked[X > 0] == 0).float().mean().item() == pytest.approx(0.2, abs=0.02)


def test_gene_scale_multiplies_each_gene_by_one_factor_and_the_library_follows():
    X = _counts(n_cells=50, n_genes=2000)
    library = X.sum(1) + 100.0  # genes outside the panel count in the library size too
    settings = Augmentation(thinning=None, gene_dropout=None, masking=0.0, gene_scale=0.5)
    out, new_library = augment_batch(X, library, settings, counts=True, generator=torch.Generator().manual_seed(3))
    expressed = X.sum(0) > 0
    ratio = out[:, expressed] / X[:, expressed].clamp_min(1e-9)
    factor = ratio.max(0).values
    torch.testing.assert_close(ratio[X[:, expressed] > 0], factor.expand_as(ratio)[X[:, expressed] > 0])  # per gene
    assert np.log(factor.numpy()).std() == pytest.approx(0.5, abs=0.03)
    torch.testing.assert_close(new_library, library + (out.sum(1) - X.sum(1)).double().to(library.dtype), rtol=1e-5,
                               atol=1e-3)  # fmt: skip
    with pytest.raises(ValueError, match="gene_scale must be in"):
        Augmentation(gene_scale=-1.0)


def test_log_values_skip_count_transforms_and_seeds_repeat():
    X = torch.log1p(_counts())
    settings = Augmentation(thinning=(0.2, 0.5), gene_dropout=None, masking=0.0, poisson=0.5)
    out, _ = augment_batch(X, X.sum(1), settings, counts=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, X)
    default = Augmentation()
    a, _ = augment_batch(_counts(), _counts().sum(1), default, counts=True, generator=torch.Generator().manual_seed(5))
    b, _ = augment_batch(_counts(), _counts().sum(1), default, counts=True, generator=torch.Generator().manual_seed(5))
    c, _ = augment_batch(_counts(), _counts().sum(1), default, counts=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="Unknown augment settings"):
        Augmentation.from_arg({"blur": 1})
    with pytest.raises(ValueError, match="low end must be above 0"):
        Augmentation(thinning=(0.0, 1.0))
    assert Augmentation.from_arg(False).thinning is None


def test_classification_report_matches_scikit_learn():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 5, 500), rng.integers(0, 6, 500)
    classes = list("abcdef")
    report = classification_report(truth, predicted, classes)
    present = sorted(set(truth) | set(predicted))
    assert report["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", labels=present))
    assert report["accuracy"] == pytest.approx((truth == predicted).mean())
    assert report["recall"]["a"] == pytest.approx(((predicted == 0) & (truth == 0)).sum() / (truth == 0).sum())
    assert "f" not in report["recall"]  # no true cells of class f
    assert np.asarray(report["confusion"]).sum() == 500


def test_ece_and_temperature():
    confidence = np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0, 1, 0])
    # bins: 0.95 (accuracy 0.75, gap 0.2, 4 cells), 0.55 (accuracy 0.5, gap 0.05, 2 cells)
    assert expected_calibration_error(confidence, correct) == pytest.approx((4 * 0.2 + 2 * 0.05) / 6)
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 6, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).ravel()
    assert fit_temperature(true_logits * 3, labels) == pytest.approx(3.0, rel=0.1)  # overconfident by 3x


def test_temperature_is_not_sharpened_without_errors():
    logits = torch.tensor([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]])
    assert fit_temperature(logits, torch.tensor([0, 1, 0])) == 1.0
    assert fit_temperature(logits, torch.tensor([0, 1, 1])) > 1.0  # an error: confidence is softened


def test_adamw_updates_exactly_as_torch_optim_does():
    """Our AdamW avoids torch.optim's import of torch._dynamo; the arithmetic must stay torch's."""
    from cellmint.models._optim import AdamW

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    theirs = copy.deepcopy(ours)
    optimizers = (AdamW(ours.parameters(), lr=3e-3, weight_decay=1e-2),
                  torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=1e-2, foreach=True))  # fmt: skip
    for _ in range(30):
        x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
        for net, optimizer in zip((ours, theirs), optimizers, strict=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    state = optimizers[0].state_dict()
    assert state["step"] == 30
    restored = AdamW(ours.parameters(), lr=3e-3, weight_decay=1e-2)
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(restored.exp_avg, optimizers[0].exp_avg, strict=True))
