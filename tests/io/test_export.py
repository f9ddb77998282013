"""cm.io.to_hf_dataset: the three formats, seeded negatives, splits, Store input, save/load, the dataset card."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

import cellmint as cm
from cellmint.io._negatives import sample_negatives, slot_kinds
from cellmint.pp._cell_sentences import cell_sentences

datasets = pytest.importorskip("datasets")
from cellmint.io._dataset_card import dataset_card  # noqa: E402
from cellmint.io._export import to_hf_dataset  # noqa: E402


@pytest.fixture(scope="module")
def adata():
    """CellBench (real counts): five cell lines measured by three protocols, with a seeded train/test split."""
    adata = cm.datasets.cellbench()
    cell_sentences(adata, n_genes=8)
    adata.obs["caption"] = "A " + adata.obs["cell_line"].astype(str) + " cell"
    adata.obs["split"] = np.where(np.random.default_rng(0).random(adata.n_obs) < 0.75, "train", "test")
    return adata


def export(data, tmp_path, **kwargs):
    defaults = {"sentence_keys": ["cell_sentence_id", "cell_sentence"], "caption_key": "caption",
                "batch_key": "technology", "cache_dir": tmp_path, "progress": False}  # fmt: skip
    return to_hf_dataset(data, **{**defaults, **kwargs})


def frame(dataset) -> pd.DataFrame:
    return dataset.to_pandas()


def test_multiplets_schema_and_negatives(adata, tmp_path):
    ds = export(adata, tmp_path, negatives_per_sample=4, split_key="split", data_link="https://example.org/cb.h5ad")
    assert list(ds) == ["test", "train"]
    string = datasets.Value("string")
    names = ["sample_idx", "cell_sentence_1", "cell_sentence_2", "positive",
             "negative_1_idx", "negative_2_idx", "negative_3_idx", "negative_4_idx", "adata_link"]  # fmt: skip
    assert ds["train"].features == datasets.Features(dict.fromkeys(names, string))
    obs = adata.obs
    for split, d in ds.items():
        df = frame(d)
        cells = obs.index[obs["split"] == split]
        assert df["sample_idx"].tolist() == list(cells)  # every cell of the split, in order
        assert df["cell_sentence_1"].tolist() == list(cells)
        assert df["cell_sentence_2"].tolist() == obs.loc[cells, "cell_sentence"].tolist()
        assert df["positive"].tolist() == obs.loc[cells, "caption"].tolist()
        assert (df["adata_link"] == "https://example.org/cb.h5ad").all()
        negatives = df[[f"negative_{j}_idx" for j in range(1, 5)]].to_numpy()
        assert all(len(set(row)) == 4 for row in negatives)  # distinct
        assert not (negatives == df["sample_idx"].to_numpy()[:, None]).any()  # never the anchor
        assert set(negatives.ravel()) <= set(cells)  # from the anchor's own split
        anchor_caption = df["positive"].to_numpy()
        for j in (1, 3):  # caption negatives: another caption
            assert (obs.loc[df[f"negative_{j}_idx"], "caption"].to_numpy() != anchor_caption).all()
        same = np.mean([(obs.loc[df[f"negative_{j}_idx"], "caption"].to_numpy() == anchor_caption).mean()
                        for j in (2, 4)])  # fmt: skip
        assert 0.05 < same < 0.5  # sentence negatives are any other cell, sometimes of the same caption
        batches = obs.loc[df["sample_idx"], "technology"].to_numpy()
        for j in range(1, 5):  # each protocol has cells of several lines: all negatives from the same batch
            assert (obs.loc[df[f"negative_{j}_idx"], "technology"].to_numpy() == batches).all()


def test_negatives_are_seeded(adata, tmp_path):
    cols = [f"negative_{j}_idx" for j in (1, 2)]
    first = frame(export(adata, tmp_path)["train"])[cols]
    again = frame(export(adata, tmp_path, random_state=0)["train"])[cols]
    other = frame(export(adata, tmp_path, random_state=1)["train"])[cols]
    pd.testing.assert_frame_equal(first, again)
    assert (first.to_numpy() != other.to_numpy()).mean() > 0.9
    # random, not the first match: the negatives of one batch spread over many cells
    assert first["negative_1_idx"].nunique() > 100


def test_resolved_negatives_hold_the_content(adata, tmp_path):
    ds = export(adata, tmp_path, sentence_keys="cell_sentence", negatives_per_sample=3, resolve_negatives=True)
    df = frame(ds["train"])
    assert list(df.columns) == ["sample_idx", "cell_sentence_1", "positive", "negative_1_idx", "negative_1",
                                "negative_2_idx", "negative_2", "negative_3_idx", "negative_3"]  # fmt: skip
    obs = adata.obs
    assert df["negative_1"].tolist() == obs.loc[df["negative_1_idx"], "caption"].tolist()
    assert df["negative_2"].tolist() == obs.loc[df["negative_2_idx"], "cell_sentence"].tolist()
    assert df["negative_3"].tolist() == obs.loc[df["negative_3_idx"], "caption"].tolist()


def test_pairs_schema_and_labels(adata, tmp_path):
    ds = export(adata, tmp_path, format="pairs", negatives_per_sample=2, sentence_keys="cell_sentence")
    d = ds["train"]
    assert d.features == datasets.Features({"sample_idx": datasets.Value("string"),
        "cell_sentence_1": datasets.Value("string"), "caption": datasets.Value("string"),
        "caption_idx": datasets.Value("string"), "label": datasets.Value("float32")})  # fmt: skip
    df = frame(d)
    assert len(df) == 3 * adata.n_obs
    assert df["label"].tolist() == [1.0, 0.0, 0.0] * adata.n_obs
    anchors = adata.obs.loc[df["sample_idx"]]
    positive, negative = df["label"] == 1, df["label"] == 0
    assert (df.loc[positive, "caption_idx"] == df.loc[positive, "sample_idx"]).all()
    assert (df.loc[positive, "caption"].to_numpy() == anchors.loc[positive.to_numpy(), "caption"].to_numpy()).all()
    assert (df.loc[negative, "caption"].to_numpy() != anchors.loc[negative.to_numpy(), "caption"].to_numpy()).all()
    assert (adata.obs.loc[df["caption_idx"], "caption"].to_numpy() == df["caption"].to_numpy()).all()
    per_anchor = df[negative].groupby("sample_idx")["caption_idx"].nunique()
    assert (per_anchor == 2).all()


def test_single_schema(adata, tmp_path):
    ds = export(adata, tmp_path, format="single", caption_key=None, split_key="split")
    assert ds["test"].column_names == ["sample_idx", "cell_sentence_1", "cell_sentence_2"]
    assert ds["test"].num_rows + ds["train"].num_rows == adata.n_obs


def test_same_batch_first_then_the_other_batches():
    # batch 0: the anchor's caption "x" and a single "y" cell; batch 1: plenty of both
    caption = np.array([0, 0, 0, 1] + [0, 1] * 20)
    batch = np.array([0, 0, 0, 0] + [1] * 40)
    part = np.zeros_like(batch)
    out = sample_negatives(part, batch, caption, n_caption=2, n_any=2, rng=np.random.default_rng(0))
    kinds = slot_kinds(2, 2)
    for anchor in range(3):  # "x" cells of batch 0: one caption negative left there, the other from batch 1
        caption_neg = out[anchor, kinds]
        assert 3 in caption_neg
        assert batch[caption_neg[caption_neg != 3]].tolist() == [1]
        any_neg = out[anchor, ~kinds]  # 2 cells of batch 0 remain besides the anchor and cell 3: both taken
        assert sorted(any_neg) == sorted(set(range(3)) - {anchor})
    for anchor in range(4, 44):  # batch 1 has enough of everything: nothing leaves it
        assert (batch[out[anchor]] == 1).all()
        assert (caption[out[anchor, kinds]] != caption[anchor]).all()


def test_sampling_a_large_table_is_vectorised():
    rng = np.random.default_rng(0)
    n = 200_000
    part, batch, caption = rng.integers(0, 3, n), rng.integers(0, 40, n), rng.integers(0, 12, n)
    out = sample_negatives(part, batch, caption, n_caption=2, n_any=2, rng=np.random.default_rng(5))
    kinds = slot_kinds(2, 2)
    assert not (out == np.arange(n)[:, None]).any()
    srt = np.sort(out, axis=1)
    assert (np.diff(srt, axis=1) > 0).all()
    assert (caption[out[:, kinds]] != caption[:, None]).all()
    assert (part[out] == part[:, None]).all()
    assert (batch[out] == batch[:, None]).all()


def test_store_input_with_its_persisted_split(tmp_path):
    adata = cm.datasets.synthetic(600, 50, n_donors=4, random_state=1, progress=False)
    store = cm.pp.build_store(adata, tmp_path / "s.zarr", label_keys=["cell_type"], group_key="donor",
                              obs_keys=["batch"], progress=False)  # fmt: skip
    store.make_split("by_cell", test_fraction=0.2, val_fraction=0.1, group_key=False, random_state=0)
    ds = to_hf_dataset(store, sentence_keys="obs_names", caption_key="cell_type", batch_key="batch",
                       split_key="by_cell", negatives_per_sample=2, cache_dir=tmp_path, progress=False)  # fmt: skip
    assert list(ds) == ["train", "val", "test"]
    obs = store.obs()
    for part in ds:
        df = frame(ds[part])
        rows = store.split_rows("by_cell", part)
        assert df["sample_idx"].tolist() == list(obs.index[rows])
        assert df["positive"].tolist() == obs["cell_type"].astype(str).iloc[rows].tolist()
        assert set(df["negative_1_idx"]) | set(df["negative_2_idx"]) <= set(obs.index[rows])
        assert (obs.loc[df["negative_1_idx"], "cell_type"].to_numpy() != df["positive"].to_numpy()).all()


def test_save_to_disk_round_trip(adata, tmp_path):
    ds = export(adata, tmp_path / "cache", negatives_per_sample=2, split_key="split")
    ds.save_to_disk(tmp_path / "saved")
    back = datasets.load_from_disk(str(tmp_path / "saved"))
    assert list(back) == list(ds)
    for split in ds:
        assert back[split].features == ds[split].features
        pd.testing.assert_frame_equal(frame(back[split]), frame(ds[split]))
    params = json.loads(back["train"].info.description)
    assert params["random_state"] == 0
    assert params["negatives_per_sample"] == 2
    assert params["split_key"] == "split"


def test_dataset_card_renders_without_network(adata, tmp_path):
    from huggingface_hub import DatasetCard

    ds = export(adata, tmp_path, split_key="split")
    params = json.loads(ds["train"].info.description)
    text = dataset_card(ds, params, "someone/cellbench_multiplets")
    card = DatasetCard(text)
    assert card.data.to_dict()["size_categories"] == ["n<1K"]
    assert "# cellbench_multiplets" in text
    assert "multiplets" in text
    assert f"| train | {ds['train'].num_rows:,} |" in text
    assert "- `negative_2_idx`: string" in text
    assert 'load_dataset("someone/cellbench_multiplets")' in text
    assert "$" not in text


def test_push_only_when_asked_with_the_environment_token(adata, tmp_path, monkeypatch):
    from huggingface_hub import DatasetCard

    calls = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo, **kw: calls.append(("data", repo, kw)))
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, repo, **kw: calls.append(("card", repo, kw)))
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    export(adata, tmp_path)
    assert calls == []
    export(adata, tmp_path, push_to_hub="someone/cb")
    assert [c[:2] for c in calls] == [("data", "someone/cb"), ("card", "someone/cb")]
    assert calls[0][2] == {"private": True, "token": "hf_not_a_real_token"}
    assert calls[1][2] == {"token": "hf_not_a_real_token"}


def test_missing_datasets_package_names_the_extra(adata, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'cellmint\[hf\]'"):
        to_hf_dataset(adata, sentence_keys="cell_sentence", caption_key="caption")


def test_bad_input_is_refused_with_a_clear_message(adata, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export(adata, tmp_path, format="triplets")
    with pytest.raises(ValueError, match="needs caption_key"):
        export(adata, tmp_path, caption_key=None)
    with pytest.raises(KeyError, match="sentence_keys 'gene_list' is not a column of obs.*cm.pp.cell_sentences"):
        export(adata, tmp_path, sentence_keys=["gene_list"])
    with pytest.raises(KeyError, match="batch_key 'lane' is not a column"):
        export(adata, tmp_path, batch_key="lane")
    with pytest.raises(ValueError, match="resolve_negatives needs format='multiplets' and exactly one sentence key"):
        export(adata, tmp_path, resolve_negatives=True)
    with pytest.raises(ValueError, match="negatives_per_sample must be an integer >= 1 for 'pairs'"):
        export(adata, tmp_path, format="pairs", negatives_per_sample=0)
    small = adata[adata.obs["cell_line"] == "HCC827"][:6].copy()  # six cells of one cell line
    with pytest.raises(ValueError, match="only 0 cells have a caption other than 'A HCC827 cell'"):
        export(small, tmp_path)
    with pytest.raises(ValueError, match="has 6 cells: too few for 6 distinct negatives"):
        export(small, tmp_path, caption_key="cell_sentence", negatives_per_sample=6)
    gaps = adata.copy()
    gaps.obs.loc[gaps.obs_names[:3], "caption"] = None
    with pytest.raises(ValueError, match=r"obs\['caption'\] \(caption_key\) is missing for 3 cells"):
        export(gaps, tmp_path)
    spaced = adata.copy()
    spaced.obs["split"] = spaced.obs["split"].replace({"test": "held out"})
    with pytest.raises(ValueError, match=r"split names datasets refuses .*\['held out'\]"):
        export(spaced, tmp_path, split_key="split")
    with pytest.raises(TypeError, match="AnnData or a cellmint Store"):
        to_hf_dataset(adata.obs, sentence_keys="cell_sentence", caption_key="caption")
