"""``cm.io.to_hf_dataset``: cells as a HuggingFace dataset for contrastive text–omics training.

Rows are produced a block of cells at a time as Arrow record batches and streamed into one Arrow
file per split, which the returned :class:`datasets.Dataset` memory-maps: memory holds the ``obs``
table, the negatives (a few integers per cell) and one block of rows, whatever the number of cells.
Batches rather than one dict per row keep ``datasets``' per-row encoding out of the loop (about
30× faster than ``Dataset.from_generator`` on 100k rows).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._utils import _logging as logg
from .._utils._docs import doc_params
from .._utils._progress import progress_bar
from .._version import __version__
from ..store._store import Store
from ._dataset_card import FORMAT_TEXT, push
from ._negatives import check_enough, sample_negatives, slot_kinds

if TYPE_CHECKING:
    from datasets import DatasetDict

Format = Literal["multiplets", "pairs", "single"]
#: sentence key standing for the cell names (the cell-id sentence), unless obs has a column of that name
OBS_NAMES = "obs_names"
_ROWS_PER_BATCH = 8192
_SPLIT_NAME = r"\w+(\.\w+)*"  # what datasets accepts as a split name


def _obs_table(data) -> pd.DataFrame:
    if not isinstance(data, AnnData | Store):
        raise TypeError(f"`data` must be an AnnData or a cellmint Store, not {type(data).__name__}.")
    obs = data.obs() if isinstance(data, Store) else data.obs
    if not obs.index.is_unique:
        raise ValueError(
            "Cell names are not unique, so negatives cannot name cells: call adata.obs_names_make_unique()."
        )
    return obs


def _text(obs: pd.DataFrame, key: str, role: str) -> np.ndarray:
    if key == OBS_NAMES and key not in obs.columns:
        return np.asarray(obs.index.astype(str), dtype=object)
    if key not in obs.columns:
        hint = " Write gene sentences with cm.pp.cell_sentences first." if role == "sentence_keys" else ""
        raise KeyError(f"{role} {key!r} is not a column of obs; columns: {list(obs.columns)}.{hint}")
    values = obs[key]
    if values.isna().any():
        raise ValueError(f"obs[{key!r}] ({role}) is missing for {int(values.isna().sum())} cells; fill or drop them.")
    return np.asarray(values.astype(str), dtype=object)


def _parts(data, obs: pd.DataFrame, split_key: str | None) -> tuple[np.ndarray, list[str]]:
    """Split code of every cell (-1: in no split) and the split names, in order."""
    if split_key is None:
        return np.zeros(len(obs), dtype=np.int64), ["train"]
    if isinstance(data, Store) and split_key in data.splits and split_key not in obs.columns:
        return data.split_codes(split_key).astype(np.int64), ["train", "val", "test"]
    _text(obs, split_key, "split_key")  # the column exists and has no gaps
    values = obs[split_key]
    categorical = pd.Categorical(values) if not isinstance(values.dtype, pd.CategoricalDtype) else values.array
    categorical = categorical.remove_unused_categories()
    names = [str(c) for c in categorical.categories]
    if bad := [name for name in names if not re.fullmatch(_SPLIT_NAME, name)]:
        raise ValueError(f"obs[{split_key!r}] has split names datasets refuses (letters, digits, _ and . only): {bad}.")
    return categorical.codes.astype(np.int64), names


def _features(datasets, params: dict, n_sentences: int):
    string = datasets.Value("string")
    names = ["sample_idx"] + [f"cell_sentence_{i + 1}" for i in range(n_sentences)]
    columns = dict.fromkeys(names, string)
    if params["format"] == "multiplets":
        columns["positive"] = string
        for j in range(1, params["negatives_per_sample"] + 1):
            columns[f"negative_{j}_idx"] = string
            if params["resolve_negatives"]:
                columns[f"negative_{j}"] = string
    elif params["format"] == "pairs":
        columns.update(caption=string, caption_idx=string, label=datasets.Value("float32"))
    if params["data_link"] is not None:
        columns["adata_link"] = string
    return datasets.Features(columns)


def _batches(rows, *, params, names, sentences, captions, negatives, kinds):
    """Record-batch columns (name → values) for blocks of anchor cells ``rows``."""
    for first in range(0, len(rows), _ROWS_PER_BATCH):
        block = rows[first : first + _ROWS_PER_BATCH]
        if params["format"] == "pairs":  # the anchor with its own caption, then with each negative's
            partners = np.column_stack([block, negatives[block]]).ravel()
            block = np.repeat(block, 1 + negatives.shape[1])
        columns = {"sample_idx": names[block]}
        columns.update({f"cell_sentence_{i + 1}": s[block] for i, s in enumerate(sentences)})
        if params["format"] == "multiplets":
            columns["positive"] = captions[block]
            for j, is_caption in enumerate(kinds):
                cells = negatives[block, j]
                columns[f"negative_{j + 1}_idx"] = names[cells]
                if params["resolve_negatives"]:
                    columns[f"negative_{j + 1}"] = (captions if is_caption else sentences[0])[cells]
        elif params["format"] == "pairs":
            columns.update(caption=captions[partners], caption_idx=names[partners],
                           label=(partners == block).astype(np.float32))  # fmt: skip
        if params["data_link"] is not None:
            columns["adata_link"] = np.full(len(block), params["data_link"], dtype=object)
        yield columns


def _check_arguments(format, sentence_keys, caption_key, negatives_per_sample, resolve_negatives) -> list[str]:
    if format not in FORMAT_TEXT:
        raise ValueError(f"format must be one of {list(FORMAT_TEXT)}, not {format!r}.")
    keys = [sentence_keys] if isinstance(sentence_keys, str) else list(sentence_keys)
    if not keys:
        raise ValueError("sentence_keys is empty: name at least one obs column of cell sentences.")
    if format == "single":
        if resolve_negatives:
            raise ValueError("resolve_negatives applies to format='multiplets'; 'single' has no negatives.")
        return keys
    if caption_key is None:
        raise ValueError(f"format={format!r} needs caption_key, the obs column of captions.")
    low = 1 if format == "pairs" else 0
    if (
        isinstance(negatives_per_sample, bool)
        or not isinstance(negatives_per_sample, int)
        or negatives_per_sample < low
    ):
        raise ValueError(
            f"negatives_per_sample must be an integer >= {low} for {format!r}, not {negatives_per_sample!r}."
        )
    if resolve_negatives and (format != "multiplets" or len(keys) != 1):
        raise ValueError("resolve_negatives needs format='multiplets' and exactly one sentence key (sentence "
                         "negatives resolve to it); pairs always carry the negatives' captions.")  # fmt: skip
    return keys


def _write_split(datasets, path: Path, features, batches, n_rows: int, description: str, progress) -> object:
    import pyarrow as pa

    schema = features.arrow_schema  # carries the features as metadata, which Dataset.from_file reads back
    bar = progress_bar(total=n_rows, desc=f"writing {path.stem}", unit="rows", progress=progress)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, bar:
        for columns in batches:
            arrays = [pa.array(columns[field.name], type=field.type) for field in schema]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            bar.update(len(arrays[0]))
    info = datasets.DatasetInfo(description=description, features=features)
    return datasets.Dataset.from_file(str(path), info=info, split=datasets.NamedSplit(path.stem))


@doc_params()
def to_hf_dataset(
    data: AnnData | Store,
    *,
    format: Format = "multiplets",
    sentence_keys: str | list[str],
    caption_key: str | None = None,
    negatives_per_sample: int = 2,
    batch_key: str | None = None,
    resolve_negatives: bool = False,
    split_key: str | None = None,
    random_state: int = 0,
    data_link: str | None = None,
    push_to_hub: str | None = None,
    private: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> DatasetDict:
    """Export cells as a HuggingFace :class:`~datasets.DatasetDict` of cell sentences, captions and negatives.

    Needs the optional ``datasets`` package (``pip install 'cellmint[hf]'``). Every row names its cell
    (``sample_idx``: the cell's name) and carries its sentences as ``cell_sentence_1``,
    ``cell_sentence_2``, … in the order of ``sentence_keys``. The formats:

    ``"multiplets"``
        Adds the cell's caption (``positive``) and ``negatives_per_sample`` negatives
        ``negative_<j>_idx`` (names of other cells; with ``resolve_negatives``, also their content
        ``negative_<j>``). Odd ``j`` are *caption negatives*, cells whose caption differs from the
        anchor's (resolved to that caption); even ``j`` *sentence negatives*, any other cell
        (resolved to its sentence).
    ``"pairs"``
        One row with the cell's own ``caption`` and ``label`` 1.0, then one row per caption negative with
        that cell's caption and ``label`` 0.0; ``caption_idx`` names the cell a caption describes.
    ``"single"``
        The cells and their sentences only.

    Negatives are drawn at random with a local generator seeded by ``random_state``: the same call gives
    the same dataset, another seed other negatives. Within a row they are distinct, never the anchor,
    and always from the anchor's split (so an index resolves within its split). Each kind comes from the
    anchor's batch (``batch_key``) first; when that batch holds fewer eligible cells than needed, all of
    them are used and the rest is drawn from the other batches of the split. A split with too few cells,
    or too few cells of other captions, is an error.

    Parameters
    ----------
    data
        An AnnData (in memory or backed; only ``obs`` is read), or a :class:`cellmint.Store`, whose
        :meth:`~cellmint.Store.obs` table plays the role of ``obs``: its labels, group and ``obs_keys``.
    format
        ``"multiplets"``, ``"pairs"`` or ``"single"`` (see above).
    sentence_keys
        ``obs`` columns of cell sentences, e.g. ``["cell_sentence_id", "cell_sentence"]`` written by
        :func:`cellmint.pp.cell_sentences`. ``"obs_names"`` (unless a column has that name) stands for the
        cell names, the cell-id sentence, which is what a Store holds without extra columns.
    caption_key
        ``obs`` column of captions (a label or a sentence describing the cell); needed except for ``"single"``.
    negatives_per_sample
        Negatives per cell (``"multiplets"``: 0 or more; ``"pairs"``: 1 or more; ignored by ``"single"``).
    batch_key
        ``obs`` column of batches (e.g. dataset or donor) in which negatives are drawn first.
    resolve_negatives
        ``"multiplets"`` with one sentence key: also store each negative's caption or sentence.
    split_key
        ``obs`` column naming each cell's split (e.g. ``"train"``/``"test"``); each value becomes a key of the
        result (categories in order, else sorted). For a Store, also the name of a split made with
        :meth:`~cellmint.Store.make_split` (``"train"``, ``"val"``, ``"test"``; cells appended after it
        are left out). ``None``: one ``"train"`` split. Rows follow the order of the cells.
    {doc_random_state}
    data_link
        Where the source data live (a URL or path), stored in an ``adata_link`` column of every row.
    push_to_hub
        A Hub repository id (``"user/name"``): push the dataset and a dataset card there. Only then is
        the network used; the token comes from the ``HF_TOKEN`` environment variable (else the login
        stored by ``huggingface-cli login``).
    private
        Create the Hub repository as private.
    cache_dir
        Folder of the Arrow files the datasets memory-map (one per split, in a new sub-folder per call);
        default: ``datasets``' cache. ``save_to_disk`` copies them; delete the folder when done.
    {doc_progress}

    Returns
    -------
    A :class:`datasets.DatasetDict`, one :class:`~datasets.Dataset` per split (empty splits are left out).
    Each dataset's ``info.description`` holds the export parameters as JSON. Nothing is written to
    ``data``.

    Examples
    --------
    >>> adata = cm.datasets.cellbench()
    >>> cm.pp.cell_sentences(adata, n_genes=20)
    >>> ds = cm.io.to_hf_dataset(adata, sentence_keys="cell_sentence", caption_key="cell_line", batch_key="technology")
    >>> ds["train"].column_names[:4]
    ['sample_idx', 'cell_sentence_1', 'positive', 'negative_1_idx']
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError("to_hf_dataset needs the `datasets` package: pip install 'cellmint[hf]'") from err
    keys = _check_arguments(format, sentence_keys, caption_key, negatives_per_sample, resolve_negatives)
    k = 0 if format == "single" else int(negatives_per_sample)
    params = {"format": format, "sentence_keys": keys, "caption_key": caption_key, "negatives_per_sample": k,
              "batch_key": batch_key, "resolve_negatives": bool(resolve_negatives), "split_key": split_key,
              "random_state": random_state, "data_link": data_link, "cellmint": __version__}  # fmt: skip
    start = logg.info(f"exporting cells as a {format} dataset")
    obs = _obs_table(data)
    part, part_names = _parts(data, obs, split_key)
    keep = np.flatnonzero(part >= 0)  # Store cells appended after the split belong to none
    if len(keep) < len(obs):
        logg.info(f"    {len(obs) - len(keep):,} cells in no part of split {split_key!r} are left out")
        obs, part = obs.iloc[keep], part[keep]
    names = np.asarray(obs.index.astype(str), dtype=object)
    sentences = [_text(obs, key, "sentence_keys") for key in keys]
    captions = negatives = kinds = None
    if format != "single":
        captions = _text(obs, caption_key, "caption_key")
        caption_codes, caption_names = pd.factorize(captions, sort=True)
        batch = (
            pd.factorize(_text(obs, batch_key, "batch_key"))[0]
            if batch_key is not None
            else np.zeros(len(obs), dtype=np.int64)
        )
        n_caption = k if format == "pairs" else (k + 1) // 2
        check_enough(part, caption_codes, n_caption=n_caption, n_any=k - n_caption,
                     names={"parts": part_names, "captions": list(caption_names)})  # fmt: skip
        rng = np.random.default_rng(random_state)
        negatives = sample_negatives(part, batch, caption_codes, n_caption=n_caption, n_any=k - n_caption, rng=rng)
        kinds = slot_kinds(n_caption, k - n_caption)

    features = _features(datasets, params, len(keys))
    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "cellmint" / f"export-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    splits = {}
    for p, name in enumerate(part_names):
        rows = np.flatnonzero(part == p)
        if len(rows) == 0:
            continue
        batches = _batches(rows, params=params, names=names, sentences=sentences, captions=captions,
                           negatives=negatives, kinds=kinds)  # fmt: skip
        n_rows = len(rows) * (1 + k if format == "pairs" else 1)
        path = folder / f"{name}.arrow"
        splits[name] = _write_split(datasets, path, features, batches, n_rows, json.dumps(params), progress)
    dataset = datasets.DatasetDict(splits)
    logg.info(f"    finished: {sum(d.num_rows for d in splits.values()):,} rows in {list(splits)}", time=start)
    if push_to_hub is not None:
        push(dataset, push_to_hub, params, private=private)
    return dataset
