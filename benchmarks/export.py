"""Export for contrastive training: rows/s and peak RSS of ``cm.io.to_hf_dataset`` next to the peer's approach.

A synthetic store (cell types as captions, batches, the store's default 80/10/10 split) is exported as
multiplets with 4 negatives per cell, each run in a fresh process (peak RSS = VmHWM):

- cellmint ``to_hf_dataset`` on the ``cm.Store`` (seeded negatives, Arrow record batches);
- the peer's approach, reimplemented in memory: per cell, the *first* cell of the same batch with another
  caption (caption negatives) and the first other cells (sentence negatives), rows yielded one dict at a
  time to ``datasets.Dataset.from_generator`` (seeds/anndata_to_hf_datasets.md);
- ``cm.pp.cell_sentences`` (top 100 genes) on the source ``.h5ad`` path, chunked.

Both exports are checked on the same two properties: negatives distinct within a row, and caption
negatives of another caption. Default: 50,000 cells (a smoke run); ``--full``: 1,000,000 cells.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _rss import peak_rss_bytes

RESULTS = Path(__file__).parent / "results"
NEGATIVES = 4
COLUMNS = [f"negative_{j}_idx" for j in range(1, NEGATIVES + 1)]


def _quality(dataset, obs, limit: int = 200_000) -> dict:
    """Share of rows with distinct negatives and of caption negatives with another caption (first rows)."""
    train = dataset["train"]
    n = min(limit, train.num_rows)
    table = train.data.slice(0, n)
    negatives = np.column_stack([np.asarray(table.column(c).to_pylist(), dtype=object) for c in COLUMNS])
    anchors = np.asarray(table.column("sample_idx").to_pylist(), dtype=object)
    distinct = np.ones(n, dtype=bool)
    for i in range(NEGATIVES):
        for j in range(i + 1, NEGATIVES):
            distinct &= negatives[:, i] != negatives[:, j]
    captions = obs["cell_type"].astype(str)
    differ = [(captions.loc[negatives[:, j]].to_numpy() != captions.loc[anchors].to_numpy()) for j in (0, 2)]
    return {"rows_with_distinct_negatives": float(distinct.mean()),
            "caption_negatives_with_other_caption": float(np.mean(differ)),
            "distinct_cells_as_negative_1": len(set(negatives[:, 0]))}  # fmt: skip


def cellmint_worker(store_path: str, cache: str) -> dict:
    import cellmint as cm
    import datasets  # noqa: F401  (imported before the clock starts, as in the peer's worker)
    from cellmint.io._export import to_hf_dataset  # cm.io.to_hf_dataset once exported

    store = cm.Store(store_path)
    t0 = time.perf_counter()
    dataset = to_hf_dataset(store, sentence_keys="obs_names", caption_key="cell_type", batch_key="batch",
                            split_key="default", negatives_per_sample=NEGATIVES, cache_dir=cache,
                            progress=False)  # fmt: skip
    wall = time.perf_counter() - t0
    rows = sum(d.num_rows for d in dataset.values())
    rss = peak_rss_bytes()
    return {"rows": rows, "wall_s": wall, "rows_per_s": rows / wall, "peak_rss_bytes": rss,
            **_quality(dataset, store.obs())}  # fmt: skip


def peer_worker(store_path: str, cache: str) -> dict:
    """The peer's logic on the same table: first matches in obs order, one dict per row to from_generator."""
    import cellmint as cm
    import datasets

    store = cm.Store(store_path)
    obs = store.obs()
    t0 = time.perf_counter()
    names = obs.index.astype(str).tolist()
    captions = obs["cell_type"].astype(str).tolist()
    batches = obs["batch"].astype(str).tolist()
    parts = store.split_codes("default").tolist()
    features = datasets.Features({k: datasets.Value("string") for k in
                                  ["sample_idx", "cell_sentence_1", "positive", *COLUMNS]})  # fmt: skip
    result = {}
    for code, split in enumerate(["train", "val", "test"]):
        cells = [i for i in range(len(names)) if parts[i] == code]
        by_batch: dict[str, list[int]] = {}
        for i in cells:
            by_batch.setdefault(batches[i], []).append(i)

        def rows(cells=cells, by_batch=by_batch):
            for i in cells:
                same = by_batch[batches[i]]
                chosen = []
                for slot in range(NEGATIVES):
                    if slot % 2 == 0:  # caption negative: the first cell of the batch with another caption
                        pick = next((j for j in same if captions[j] != captions[i]), None)
                        if pick is None:
                            pick = next(j for j in cells if captions[j] != captions[i])
                    else:  # sentence negative: the first other cell not chosen yet
                        pick = next((j for j in same if j != i and j not in chosen), None)
                        if pick is None:
                            pick = next(j for j in cells if j != i and j not in chosen)
                    chosen.append(pick)
                row = {"sample_idx": names[i], "cell_sentence_1": names[i], "positive": captions[i]}
                row.update({c: names[j] for c, j in zip(COLUMNS, chosen, strict=True)})
                yield row

        kwargs = {"fingerprint": f"peer-{split}-{time.time_ns()}"}  # skip hashing the closure where possible
        if "fingerprint" not in inspect.signature(datasets.Dataset.from_generator).parameters:
            kwargs = {}
        result[split] = datasets.Dataset.from_generator(rows, features=features, cache_dir=cache, **kwargs)
    dataset = datasets.DatasetDict(result)
    wall = time.perf_counter() - t0
    n = sum(d.num_rows for d in dataset.values())
    rss = peak_rss_bytes()
    return {"rows": n, "wall_s": wall, "rows_per_s": n / wall, "peak_rss_bytes": rss, **_quality(dataset, obs)}


def sentences_worker(h5ad: str) -> dict:
    from cellmint.pp._cell_sentences import cell_sentences  # cm.pp.cell_sentences once exported

    t0 = time.perf_counter()
    df = cell_sentences(h5ad, n_genes=100, progress=False)
    wall = time.perf_counter() - t0
    return {"cells": len(df), "wall_s": wall, "cells_per_s": len(df) / wall, "peak_rss_bytes": peak_rss_bytes(),
            "mean_words": float(df["cell_sentence"].str.count(" ").mean() + 1)}  # fmt: skip


WORKERS = {"cellmint": cellmint_worker, "peer": peer_worker, "sentences": sentences_worker}


def _run(name: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", name, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="1,000,000 cells (default: 50,000)")
    parser.add_argument("--workdir", type=Path, help="keep generated files here (reused when present)")
    parser.add_argument("--skip-peer", action="store_true", help="only cellmint")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](*args.worker[1:])))
        return

    import cellmint as cm

    tmp = tempfile.TemporaryDirectory()
    work = args.workdir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    n_obs, n_vars = (1_000_000, 2_000) if args.full else (50_000, 2_000)
    h5ad = work / f"export_{n_obs}x{n_vars}.h5ad"
    if not h5ad.exists():
        cm.datasets.synthetic(n_obs, n_vars, n_batches=4, n_donors=8, path=h5ad, progress=False).file.close()
    store_path = work / f"export_{n_obs}.zarr"
    if not store_path.exists():
        cm.pp.build_store(h5ad, store_path, label_keys=["cell_type"], group_key="donor", obs_keys=["batch"],
                          progress=False)  # fmt: skip
    cache = work / f"hf-cache-{time.time_ns()}"
    results = {
        "cells": n_obs,
        "negatives_per_sample": NEGATIVES,
        "cellmint": _run("cellmint", str(store_path), str(cache)),
    }
    if not args.skip_peer:
        results["peer_first_match"] = _run("peer", str(store_path), str(cache))
    results["cell_sentences"] = _run("sentences", str(h5ad))
    shutil.rmtree(cache, ignore_errors=True)  # the exported Arrow files

    print(f"multiplets with {NEGATIVES} negatives from a {n_obs:,}-cell store (fresh process each):")
    for name in ("cellmint", "peer_first_match"):
        if name in results:
            r = results[name]
            print(f"  {name:<18}{r['rows_per_s']:>12,.0f} rows/s  {r['wall_s']:7.1f} s  "
                  f"peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB  "
                  f"distinct negatives {r['rows_with_distinct_negatives']:6.1%}  "
                  f"caption negatives of another caption {r['caption_negatives_with_other_caption']:6.1%}  "
                  f"cells used as negative_1: {r['distinct_cells_as_negative_1']:,}")  # fmt: skip
    if "peer_first_match" in results:
        ratio = results["cellmint"]["rows_per_s"] / results["peer_first_match"]["rows_per_s"]
        print(f"  cellmint / peer: {ratio:.1f}x")
    s = results["cell_sentences"]
    print(f"cell_sentences (top 100 genes, {n_vars:,}-gene h5ad path): {s['cells_per_s']:,.0f} cells/s, "
          f"{s['wall_s']:.1f} s, peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
