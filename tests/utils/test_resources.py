from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cellmint._utils._resources import ResourceMonitor, ResourceReport

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="window peak RSS needs /proc (Linux)")


def _in_a_fresh_process(body: str) -> dict:
    """Run ``body`` in a new interpreter and return the dict it leaves in ``out``.

    Peak RSS depends on what the allocator already holds: in a process that has run hundreds of
    tests, a large block may be served from memory that is resident already, and no peak moves.
    A fresh interpreter makes the allocations below real page faults.
    """
    script = (
        "import json\nimport numpy as np\nfrom cellmint._utils import _resources\n"
        "from cellmint._utils._resources import ResourceMonitor, current_rss_bytes\nout = {}\n"
        + textwrap.dedent(body)
        + "\nprint(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _skip_where_the_kernel_keeps_its_peak(out: dict) -> None:
    if out["scope"] != "window":
        pytest.skip("this kernel keeps its peak RSS through /proc/self/clear_refs: only the process peak is reported")


@linux_only
def test_peak_rss_sees_a_temporary_allocation_and_forgets_earlier_ones():
    out = _in_a_fresh_process(
        """
        before = np.ones(200 * 2**20 // 8)  # 200 MiB allocated *before* the window
        del before
        with ResourceMonitor(n_cells=1_000) as quiet:
            pass
        with ResourceMonitor(n_cells=1_000) as busy:
            block = np.ones(300 * 2**20 // 8)  # 300 MiB touched inside the window
            del block
        out = {"scope": quiet.report.peak_rss_scope, "busy_scope": busy.report.peak_rss_scope,
               "quiet": quiet.report.peak_rss_bytes, "busy": busy.report.peak_rss_bytes, "rss": current_rss_bytes()}
        """
    )
    _skip_where_the_kernel_keeps_its_peak(out)
    assert out["busy_scope"] == "window"
    # the earlier 200 MiB peak is not charged to the quiet window
    assert out["quiet"] < out["rss"] + 100 * 2**20
    assert out["busy"] >= out["quiet"] + 250 * 2**20


@linux_only
def test_nested_monitors_keep_their_own_peaks():
    out = _in_a_fresh_process(
        """
        with ResourceMonitor() as outer:
            block = np.ones(250 * 2**20 // 8)
            del block
            with ResourceMonitor() as inner:  # resets the kernel's high-water mark
                pass
        out = {"scope": inner.report.peak_rss_scope, "outer": outer.report.peak_rss_bytes,
               "inner": inner.report.peak_rss_bytes}
        """
    )
    _skip_where_the_kernel_keeps_its_peak(out)
    assert out["outer"] >= out["inner"] + 200 * 2**20


@linux_only
def test_a_reset_the_kernel_ignores_reports_the_process_peak(tmp_path):
    """A write to clear_refs that is accepted but changes nothing must not pass for a window."""
    ignored = tmp_path / "clear_refs"  # takes the write, resets nothing
    out = _in_a_fresh_process(
        f"""
        from pathlib import Path
        early = np.ones(300 * 2**20 // 8)  # a peak before the window
        del early
        _resources._PROC_CLEAR_REFS = Path({str(ignored)!r})
        with ResourceMonitor() as monitor:
            pass
        out = {{"scope": monitor.report.peak_rss_scope, "peak": monitor.report.peak_rss_bytes,
               "rss": current_rss_bytes(), "written": Path({str(ignored)!r}).read_text()}}
        """
    )
    assert out["written"] == "5"
    assert out["scope"] == "process"
    assert out["peak"] >= out["rss"] + 250 * 2**20  # the lifetime peak, honestly labelled
    assert "process peak RSS" in str(ResourceReport(wall_time_s=1.0, peak_rss_scope="process", peak_rss_bytes=1))


@linux_only
def test_a_process_peak_survives_an_inner_reset():
    """An outer monitor whose reset was not seen to take still reports the process's peak after an inner reset.

    Linux resets getrusage's peak with VmHWM; the peak before the inner reset is folded into the outer one.
    """
    out = _in_a_fresh_process(
        """
        _resources._RESET_SLACK = -1  # no reset is seen to take: the outer monitor falls back to the process peak
        outer = ResourceMonitor().start()
        _resources._RESET_SLACK = 64 * 2**20
        block = np.ones(300 * 2**20 // 8)
        del block
        with ResourceMonitor() as inner:  # a real reset, of VmHWM and of getrusage's peak
            pass
        outer.stop()
        out = {"scope": outer.report.peak_rss_scope, "inner_scope": inner.report.peak_rss_scope,
               "outer": outer.report.peak_rss_bytes, "inner": inner.report.peak_rss_bytes}
        """
    )
    assert out["scope"] == "process"
    if out["inner_scope"] != "window":
        pytest.skip("this kernel keeps its peak RSS through /proc/self/clear_refs: no inner reset to survive")
    assert out["outer"] >= out["inner"] + 250 * 2**20


def test_report_fields_and_throughput():
    with ResourceMonitor(device="cpu") as monitor:
        monitor.add_cells(500)
        monitor.add_cells(250)
    report = monitor.report
    assert report.n_cells == 750
    assert report.wall_time_s > 0
    assert report.cells_per_s == pytest.approx(750 / report.wall_time_s)
    assert report.gpu_peak_bytes is None  # CPU job
    assert report.device == "cpu"
    text = str(report)
    assert "cells/s" in text
    assert "peak RSS" in text
    assert "device cpu" in text


def test_report_to_dict_is_h5ad_writable(tmp_path):
    import anndata as ad

    report = ResourceReport(wall_time_s=1.5, n_cells=None, peak_rss_bytes=2**30, extra={"epochs": 3, "skip": None})
    d = report.to_dict()
    assert d == {"wall_time_s": 1.5, "device": "cpu", "peak_rss_bytes": 2**30, "peak_rss_scope": "window", "epochs": 3}
    adata = ad.AnnData(np.zeros((2, 2), dtype=np.float32))
    adata.uns["resources"] = d
    adata.write_h5ad(tmp_path / "r.h5ad")
    assert ad.read_h5ad(tmp_path / "r.h5ad").uns["resources"]["peak_rss_bytes"] == 2**30


def test_gpu_peak_reported_on_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine (measured on the GPU machine, see benchmarks)")
    with ResourceMonitor(device="cuda:0") as monitor:
        x = torch.ones(64 * 2**20 // 4, device="cuda:0")
        del x
    assert monitor.report.gpu_peak_bytes >= 64 * 2**20


def test_an_abandoned_monitor_does_not_linger():
    """start() without stop() (an exception in between): once unreferenced, it leaves the active set."""
    import gc

    from cellmint._utils import _resources

    monitor = ResourceMonitor().start()
    assert monitor in _resources._ACTIVE
    del monitor
    gc.collect()
    assert len(_resources._ACTIVE) == 0
    with ResourceMonitor(n_cells=10) as monitor:
        pass
    assert monitor.report.n_cells == 10


def test_select_hvgs_and_build_store_report_their_resources(tmp_path):
    import cellmint as cm

    adata = cm.datasets.synthetic(400, 80, random_state=0, progress=False)
    cm.pp.select_hvgs(adata, n_top_genes=20, flavor="seurat_v3")
    report = adata.uns["cellmint_resources"]["select_hvgs"]
    assert report["n_cells"] == 400
    assert report["wall_time_s"] > 0
    assert report["cells_per_s"] > 0
    assert set(adata.uns["hvg"]) == {"flavor"}  # scanpy's entry stays as scanpy writes it
    store = cm.pp.build_store(adata, tmp_path / "s.zarr", label_keys=["cell_type"], progress=False)
    built = store.manifest["build_resources"]
    assert built["n_cells"] == 400
    assert built["peak_rss_bytes"] > 0
