"""Find, download and verify dataset files; every file is checked against its sha256 before use.

Lookup order for a dataset that is not bundled: ``data_dir`` (argument), the folders in
``CELLMINT_DATA_DIR`` (``os.pathsep``-separated), the cache (``CELLMINT_CACHE_DIR``, else
``$XDG_CACHE_HOME/cellmint``, else ``~/.cache/cellmint``), then a download from the dataset's
``url`` into the cache. Downloads go to a ``.part`` file that is renamed only once the checksum
matches, so an interrupted download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from importlib.resources import files
from pathlib import Path

from .._utils import _logging as logg
from .._utils._progress import progress_bar
from ._registry import DatasetInfo

_BUFFER = 2**20


def cache_dir() -> Path:
    """Folder where downloaded datasets are kept."""
    if env := os.environ.get("CELLMINT_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cellmint"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BUFFER):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, info: DatasetInfo) -> Path:
    found = sha256_of(path)
    if found != info.sha256:
        raise ValueError(
            f"{path} does not match the {info.name!r} dataset: sha256 {found}, expected {info.sha256}. "
            "The file is corrupted or a different version; delete it (or point `data_dir` elsewhere) and try again."
        )
    return path


def bundled_path(info: DatasetInfo) -> Path:
    """Path of a dataset shipped inside the package."""
    return Path(str(files("cellmint.datasets") / "_data" / info.filename))


def _search_dirs(data_dir: str | Path | None) -> list[Path]:
    dirs = [Path(data_dir).expanduser()] if data_dir is not None else []
    dirs += [Path(p).expanduser() for p in os.environ.get("CELLMINT_DATA_DIR", "").split(os.pathsep) if p]
    return [*dirs, cache_dir()]


def download(url: str, dest: Path, *, sha256: str, progress: bool | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its sha256 on the way."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    start = logg.info(f"downloading {url}")
    try:
        with urllib.request.urlopen(url) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, desc=dest.name, unit="B", unit_scale=True, progress=progress) as bar:
                while block := response.read(_BUFFER):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise ValueError(f"Download from {url} has sha256 {digest.hexdigest()}, expected {sha256}; not kept.")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    logg.info("    finished", time=start)
    return dest


def dataset_path(info: DatasetInfo, *, data_dir: str | Path | None = None, progress: bool | None = None) -> Path:
    """Local, verified path of a dataset file (bundled, found locally, cached, or downloaded)."""
    if info.bundled:
        return _verified(bundled_path(info), info)
    searched = _search_dirs(data_dir)
    for folder in searched:
        candidate = folder / info.filename
        if candidate.is_file():
            return _verified(candidate, info)
    if info.url is not None:
        return download(info.url, cache_dir() / info.filename, sha256=info.sha256, progress=progress)
    raise FileNotFoundError(
        f"Dataset {info.name!r} ({info.filename}) is not bundled and has no public direct download. Place the file "
        f"(sha256 {info.sha256}; source: {info.source}) in one of: {', '.join(map(str, searched))} — or pass "
        "`data_dir=` / set CELLMINT_DATA_DIR to the folder that holds it."
    )
