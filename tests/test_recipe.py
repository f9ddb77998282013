"""The conda-forge recipe (recipe/recipe.yaml) stays in sync with pyproject.toml.

The recipe is rattler-build's v1 format: plain YAML in which ``${{ ... }}`` fragments are strings,
so it is read with PyYAML and compared as text, without rendering.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

#: PyPI name -> conda-forge name, where they differ (documented at the top of recipe.yaml).
CONDA_NAMES = {
    "torch": "pytorch",
    "matplotlib": "matplotlib-base",  # matplotlib without a GUI backend, conda-forge's habit
    "dask": "dask-core",  # `dask[array]` needs nothing beyond numpy, which cellmint requires anyway
}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


@pytest.fixture(scope="module")
def recipe() -> dict:
    return yaml.safe_load((ROOT / "recipe" / "recipe.yaml").read_text(encoding="utf-8"))


def _conda_specs(requirements: list[str]) -> dict[str, frozenset[str]]:
    """``{conda name: {specifier, ...}}`` of pip requirement strings, after the name mapping."""
    specs = {}
    for line in requirements:
        req = Requirement(line)
        name = CONDA_NAMES.get(canonicalize_name(req.name), canonicalize_name(req.name))
        specs[name] = frozenset(str(s) for s in req.specifier)
    return specs


def _recipe_specs(entries: list[str]) -> dict[str, frozenset[str]]:
    """``{name: {specifier, ...}}`` of conda match specs such as ``"numpy >=1.26"`` or ``"numpy >=1.26,<3"``."""
    specs = {}
    for entry in entries:
        name, _, version = entry.partition(" ")
        specs[name] = frozenset(v.replace(" ", "") for v in version.split(",") if v.strip())
    return specs


def _lower_bound(specifiers: frozenset[str]) -> str | None:
    return next((s[2:] for s in specifiers if s.startswith(">=")), None)


def test_run_requirements_match_pyproject_dependencies(pyproject, recipe):
    expected = _conda_specs(pyproject["project"]["dependencies"])
    run = _recipe_specs([r for r in recipe["requirements"]["run"] if not r.startswith("python ")])
    assert sorted(run) == sorted(expected), "names differ between recipe run requirements and pyproject"
    for name, specifiers in expected.items():
        assert _lower_bound(specifiers) is not None, f"{name}: pyproject gives no lower bound"
        assert run[name] == specifiers, f"{name}: recipe has {sorted(run[name])}, pyproject {sorted(specifiers)}"


def test_python_bounds_match_requires_python(pyproject, recipe):
    requires_python = pyproject["project"]["requires-python"]
    assert requires_python == f">={recipe['context']['python_min']}"
    assert "python >=${{ python_min }}" in recipe["requirements"]["run"]
    assert "python ${{ python_min }}.*" in recipe["requirements"]["host"]


def test_host_has_build_backend(pyproject, recipe):
    host = _recipe_specs(recipe["requirements"]["host"])
    assert "pip" in host
    for line in pyproject["build-system"]["requires"]:
        req = Requirement(line)
        assert host.get(req.name) == frozenset(str(s) for s in req.specifier), f"host lacks {line}"


def test_extras_are_run_constraints(pyproject, recipe):
    extras = pyproject["project"]["optional-dependencies"].values()
    expected = _conda_specs([spec for extra in extras for spec in extra])
    assert _recipe_specs(recipe["requirements"]["run_constraints"]) == expected


def test_noarch_python_build(recipe):
    build = recipe["build"]
    assert build["noarch"] == "python"
    assert build["script"] == "${{ PYTHON }} -m pip install . -vv --no-deps --no-build-isolation"


def test_feedstock_source_is_the_pypi_sdist(recipe):
    """The feedstock form: the sdist on PyPI, its sha256 written by tools/release.py (a placeholder before)."""
    assert recipe["source"] == {
        "url": "https://pypi.org/packages/source/${{ name[0] }}/${{ name }}/${{ name }}-${{ version }}.tar.gz",
        "sha256": "${{ sha256 }}",
    }
    assert re.fullmatch(r"[0-9a-f]{64}", recipe["context"]["sha256"])


def test_entry_points_match_project_scripts(pyproject, recipe):
    scripts = [f"{name} = {target}" for name, target in pyproject["project"]["scripts"].items()]
    assert recipe["build"]["python"]["entry_points"] == scripts


def test_version_matches_package(pyproject, recipe):
    """One place for the version: pyproject.toml; the package reads its metadata, the recipe a copy."""
    import cellmint

    version = pyproject["project"]["version"]
    assert "version" not in pyproject["project"].get("dynamic", [])
    assert recipe["context"]["version"] == version
    assert cellmint.__version__ == version  # stale only if the editable install was not refreshed
    init = (ROOT / "src" / "cellmint" / "__init__.py").read_text(encoding="utf-8")
    assert not re.search(r"^__version__ = \"", init, flags=re.MULTILINE)  # no second copy
    assert recipe["package"] == {"name": "${{ name }}", "version": "${{ version }}"}
    assert recipe["context"]["name"] == "cellmint"


def test_package_tests(recipe):
    python_tests = [t["python"] for t in recipe["tests"] if "python" in t]
    scripts = [line for t in recipe["tests"] if "script" in t for line in t["script"]]
    assert len(python_tests) == 1
    assert {"cellmint", "cellmint.datasets"} <= set(python_tests[0]["imports"])
    assert python_tests[0]["pip_check"] is True
    assert {"cellmint --help", "cellmint --version"} <= set(scripts)


def test_release_script_fills_the_recipe(tmp_path, monkeypatch):
    """tools/release.py writes the version and the sdist's sha256 into a copy of the recipe."""
    import hashlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("release", ROOT / "tools" / "release.py")
    release = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(release)
    version = release.project_version()
    monkeypatch.setattr(release, "DIST", tmp_path)
    sdist = tmp_path / f"cellmint-{version}.tar.gz"
    sdist.write_bytes(b"not really an sdist")
    (tmp_path / f"cellmint-{version}-py3-none-any.whl").write_bytes(b"")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((ROOT / "recipe" / "recipe.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    digest = release.fill_recipe(recipe)
    assert digest == hashlib.sha256(b"not really an sdist").hexdigest()
    filled = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    assert filled["context"]["sha256"] == digest
    assert filled["context"]["version"] == version


def test_about(pyproject, recipe):
    about = recipe["about"]
    assert about["license"] == pyproject["project"]["license"]
    assert set(pyproject["project"]["license-files"]) <= set(about["license_file"])
    assert about["summary"] == pyproject["project"]["description"]
    assert about["homepage"] == pyproject["project"]["urls"]["Source"]
    assert about["documentation"] == pyproject["project"]["urls"]["Documentation"]
