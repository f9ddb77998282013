"""Developer sessions; dependency lists come from pyproject.toml's dependency groups.

``nox -s tests`` is the README's test command and what ``.ci/run`` runs. PyTorch is installed
first, from ``TORCH_SPEC`` (default ``torch==2.13.0``, the CPU build), so that resolving the
package's ``torch`` requirement never pulls a multi-GB CUDA build into a test environment.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml("pyproject.toml")
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")


def _install(session: nox.Session, *groups: str, extra: tuple[str, ...] = ()) -> None:
    session.install("--upgrade", "pip")
    session.install(TORCH_SPEC)
    packages = [pkg for group in groups for pkg in nox.project.dependency_groups(PYPROJECT, group)]
    session.install("-e", ".", *packages, *extra)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (extra arguments go to pytest)."""
    _install(session, "test")
    session.run("pytest", *session.posargs, env={"CELLMINT_PROGRESS": "0"})


@nox.session(python=["3.12", "3.13"])
def tests_latest(session: nox.Session) -> None:
    """Tests on Python 3.12+ with the newest scanpy and anndata.

    Needs a PyTorch build for that Python: set ``TORCH_SPEC`` (e.g. a CPU wheel file or index) —
    the session skips rather than download a CUDA build by accident.
    """
    if "TORCH_SPEC" not in os.environ:
        session.skip("set TORCH_SPEC to a PyTorch build for this Python (e.g. a local CPU wheel)")
    _install(session, "test")
    session.install("--upgrade", "scanpy", "anndata")
    session.run("pytest", *session.posargs, env={"CELLMINT_PROGRESS": "0"})


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff: lint and format check."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation with warnings as errors; executes the tutorials."""
    _install(session, "docs", extra=("dask[array]>=2024.4",))
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmark in benchmarks/ at its default (smoke) size; results go to benchmarks/results/.

    Pass ``-- --full`` for the sizes quoted in the docs (slow: minutes to hours).
    """
    _install(session, "test")
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if not script.name.startswith("_"):
            session.run("python", str(script), *session.posargs)


@nox.session
def release(session: nox.Session) -> None:
    """The release path: build sdist + wheel, ``twine check``, install the wheel in a clean venv and use it.

    Not part of CI (installing every dependency into a fresh venv takes minutes); run it before tagging a
    release. ``-- --recipe`` also writes the version and the sdist's sha256 into recipe/recipe.yaml
    (see tools/release.py).
    """
    session.install("build>=1.2", "twine>=6.1")
    session.run("python", "tools/release.py", "all", *session.posargs, env={"TORCH_SPEC": TORCH_SPEC})
