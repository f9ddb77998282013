"""The release path of cellmint: build, check, install the wheel in a clean venv, fill the conda recipe.

Run by ``nox -s release`` (which installs ``build`` and ``twine``), or directly::

    python tools/release.py build            # sdist + wheel into dist/, `twine check --strict`
    python tools/release.py smoke            # the wheel of dist/ in a new venv: imports, CLI, bundled data
    python tools/release.py recipe           # version + sha256 of dist/'s sdist into recipe/recipe.yaml
    python tools/release.py all [--recipe]   # build and smoke (and recipe)

The version lives in one place, ``[project].version`` of pyproject.toml; the package reads it from
its installed metadata (``cellmint.__version__``), and ``recipe`` copies it into the conda recipe.
A release: bump the version, ``nox -s release -- --recipe``, commit, tag ``v<version>``, upload
``dist/*`` with ``twine upload``, then copy recipe/recipe.yaml to the conda-forge feedstock.

The smoke test installs PyTorch from ``TORCH_SPEC`` (default ``torch==2.13.0``, the CPU build) first,
so that pip never resolves cellmint's ``torch`` requirement to a multi-GB CUDA build.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
RECIPE = ROOT / "recipe" / "recipe.yaml"
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")

#: what the installed wheel must do, run by the clean venv's Python (no file of the checkout is imported)
SMOKE = """
import time
t0 = time.perf_counter()
import cellmint as cm
assert cm.__version__ == {version!r}, cm.__version__
adata = cm.datasets.cellbench()  # bundled in the wheel, sha256-checked
assert adata.n_obs == 510, adata.n_obs
model = cm.tl.train_annotator(adata, "cell_line", max_epochs=2, progress=False)
cm.tl.annotate(adata, model, progress=False)
assert "cellmint_cell_line" in adata.obs
print(f"smoke test passed in {{time.perf_counter() - t0:.0f}} s: cellmint {{cm.__version__}} from {{cm.__file__}}")
"""


def project_version() -> str:
    """``[project].version`` of pyproject.toml: the one place of cellmint's version."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["version"]


def _run(*command: str | Path, **kwargs) -> None:
    shown = ("<the smoke test, SMOKE>" if "\n" in str(c) else str(c) for c in command)
    print("$", " ".join(shown), flush=True)
    subprocess.run([str(c) for c in command], check=True, **kwargs)


def _artifacts(version: str) -> tuple[Path, Path]:
    sdist, wheel = DIST / f"cellmint-{version}.tar.gz", DIST / f"cellmint-{version}-py3-none-any.whl"
    for path in (sdist, wheel):
        if not path.is_file():
            raise SystemExit(f"release: {path} is missing; run `python tools/release.py build` first.")
    return sdist, wheel


def build() -> None:
    """sdist and wheel of this checkout into a fresh dist/, checked by twine (metadata, README rendering)."""
    shutil.rmtree(DIST, ignore_errors=True)
    _run(sys.executable, "-m", "build", "--outdir", DIST, ROOT)
    sdist, wheel = _artifacts(project_version())
    _run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)


def smoke() -> None:
    """Install the wheel (and its dependencies) into a new venv outside the checkout and use it."""
    version = project_version()
    _, wheel = _artifacts(version)
    with tempfile.TemporaryDirectory(prefix="cellmint-release-") as tmp:
        venv.create(Path(tmp) / "venv", with_pip=True)
        bin_dir = Path(tmp) / "venv" / ("Scripts" if os.name == "nt" else "bin")
        python = bin_dir / "python"
        _run(python, "-m", "pip", "install", "--quiet", TORCH_SPEC)
        _run(python, "-m", "pip", "install", "--quiet", wheel)
        _run(python, "-m", "pip", "check")
        _run(bin_dir / "cellmint", "--version", cwd=tmp)
        _run(bin_dir / "cellmint", "--help", cwd=tmp, stdout=subprocess.DEVNULL)
        _run(python, "-c", SMOKE.format(version=version), cwd=tmp)  # cwd: never the checkout's src/


def fill_recipe(recipe: Path = RECIPE) -> str:
    """Write the version and the sdist's sha256 into the recipe's ``context``; returns the sha256."""
    version = project_version()
    sdist, _ = _artifacts(version)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    text = recipe.read_text(encoding="utf-8")
    for key, value in (("version", version), ("sha256", digest)):
        text, n = re.subn(rf'^(  {key}: )"[^"]*"', rf'\g<1>"{value}"', text, count=1, flags=re.MULTILINE)
        if n != 1:
            raise SystemExit(f'release: no `  {key}: "..."` line in the context of {recipe}.')
    recipe.write_text(text, encoding="utf-8")
    print(f"{recipe}: version {version}, sha256 {digest} (of {sdist.name})")
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("build", "smoke", "recipe", "all"))
    parser.add_argument("--recipe", action="store_true", help="with `all`: also fill the conda recipe")
    args = parser.parse_args(argv)
    if args.step in ("build", "all"):
        build()
    if args.step in ("smoke", "all"):
        smoke()
    if args.step == "recipe" or (args.step == "all" and args.recipe):
        fill_recipe()
    return 0


if __name__ == "__main__":
    sys.exit(main())
