"""The dataset card (README) of an exported dataset, rendered from a template, and the push to the Hub."""

from __future__ import annotations

import os
from string import Template

from .._utils import _logging as logg
from .._version import __version__

FORMAT_TEXT = {
    "multiplets": "Each row is an anchor cell (`sample_idx`, its cell sentences), its caption (`positive`) and "
    "`negative_<j>_idx`: names of negative cells of the same split. Odd `j` are caption negatives (a cell with "
    "another caption), even `j` sentence negatives (any other cell).",
    "pairs": "Each cell gives one row with its own caption (`label` 1.0) and one row per caption negative with the "
    "caption of another cell of the same split (`label` 0.0); `caption_idx` names the cell the caption describes.",
    "single": "Each row is one cell: its name (`sample_idx`) and its cell sentences, without captions or negatives.",
}
CARD_TEMPLATE = Template("""\
---
tags:
- single-cell
- transcriptomics
- contrastive-learning
- cellmint
size_categories:
- $size_category
---

# $title

Single cells as text for contrastive training, exported by
[cellmint](https://github.com/cellmint/cellmint) $version with `cellmint.io.to_hf_dataset`
in the **$format** format.

$format_text

## Splits

| split | rows |
|---|---|
$split_rows

## Fields

$fields

## How it was made

$provenance

## Usage

```python
from datasets import load_dataset

dataset = load_dataset("$repo_id")
```
""")


def _size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]  # fmt: skip
    return next((label for bound, label in bounds if n < bound), "100M<n<1B")


def dataset_card(dataset, params: dict, repo_id: str) -> str:
    """The README (dataset card) of an exported :class:`datasets.DatasetDict`, rendered from :data:`CARD_TEMPLATE`."""
    sentences = ", ".join(f"`cell_sentence_{i + 1}` = obs `{key}`" for i, key in enumerate(params["sentence_keys"]))
    fields = "\n".join(
        f"- `{name}`: {feature.dtype}" for name, feature in next(iter(dataset.values())).features.items()
    )
    provenance = [f"- cell sentences: {sentences}"]
    if params["format"] != "single":
        provenance += [f"- captions: obs `{params['caption_key']}`",
                       f"- negatives per cell: {params['negatives_per_sample']}, drawn with seed "
                       f"{params['random_state']} within the cell's split, from its own batch "
                       f"(`{params['batch_key']}`) when it has enough cells"]  # fmt: skip
    return CARD_TEMPLATE.substitute(
        size_category=_size_category(sum(d.num_rows for d in dataset.values())),
        title=repo_id.split("/")[-1], version=__version__, format=params["format"],
        format_text=FORMAT_TEXT[params["format"]], repo_id=repo_id, fields=fields,
        split_rows="\n".join(f"| {name} | {d.num_rows:,} |" for name, d in dataset.items()),
        provenance="\n".join(provenance),
    )  # fmt: skip


def push(dataset, repo_id: str, params: dict, *, private: bool) -> None:
    """Upload ``dataset`` and its card to the Hub repository ``repo_id`` (token: ``HF_TOKEN``, else stored login)."""
    from huggingface_hub import DatasetCard

    token = os.environ.get("HF_TOKEN")  # None: huggingface_hub falls back to the stored login
    dataset.push_to_hub(repo_id, private=private, token=token)
    DatasetCard(dataset_card(dataset, params, repo_id)).push_to_hub(repo_id, token=token)
    logg.info(f"    pushed to https://huggingface.co/datasets/{repo_id}")
