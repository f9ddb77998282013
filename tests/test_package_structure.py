"""Every public function follows scanpy's conventions (STYLE.md); the checker is tested on bad examples too."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import cellmint as cm

SRC = Path(cm.__file__).parent
# DESIGN.md: these take one or many AnnData/paths/Store as `data`, not a single `adata`.
FIRST_PARAMETER_EXCEPTIONS = {
    "build_store": "data",
    "train_annotator": "data",
    "evaluate_perturbation": "pred",
    "perturbation_baselines": "train",
    "perturbation_summary": "tables",
    "perturbation": "data",
}


def public_functions(module) -> list[tuple[str, Callable]]:
    names = getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")])
    return [(f"{module.__name__}.{n}", getattr(module, n)) for n in names if inspect.isfunction(getattr(module, n))]


def documented_parameters(doc: str, section: str = "Parameters") -> list[str]:
    match = re.search(rf"^{section}\n-+\n(.*?)(?=^\w[\w ]*\n-+\n|\Z)", doc, flags=re.S | re.M)
    if match is None:
        return []
    return [line.split(":")[0].strip() for line in match.group(1).splitlines() if line and not line[0].isspace()]


def convention_problems(func: Callable, *, scanpy_style: bool = True) -> list[str]:
    problems = []
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    doc = inspect.getdoc(func) or ""
    if scanpy_style:
        expected_first = FIRST_PARAMETER_EXCEPTIONS.get(func.__name__, "adata")
        if not params or params[0].name != expected_first:
            problems.append(f"first parameter must be `{expected_first}`")
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) > 3:
            problems.append(f"{len(positional)} positional parameters (at most 3; make the rest keyword-only)")
        if "copy" in sig.parameters and sig.parameters["copy"].default is not False:
            problems.append("`copy` must default to False")
        if "inplace" in sig.parameters and sig.parameters["inplace"].default is not True:
            problems.append("`inplace` must default to True")
        if "copy" in sig.parameters and "inplace" in sig.parameters:
            problems.append("use either `copy` (tl) or `inplace` (pp), not both")
    for section in ("Parameters", "Returns") if params else ("Returns",):
        if not re.search(rf"^{section}\n-+$", doc, flags=re.M):
            problems.append(f"docstring lacks a numpydoc {section} section")
    documented = set(documented_parameters(doc))
    missing = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in documented]
    if missing:
        problems.append(f"parameters not documented: {missing}")
    return problems


@pytest.mark.parametrize("namespace", [cm.pp, cm.tl, cm.pl])
def test_public_functions_follow_scanpy_conventions(namespace):
    bad = {name: problems for name, f in public_functions(namespace) if (problems := convention_problems(f))}
    assert not bad, bad


def test_dataset_loaders_are_documented():
    functions = public_functions(cm.datasets)
    assert len(functions) >= 14
    bad = {name: p for name, f in functions if (p := convention_problems(f, scanpy_style=False))}
    assert not bad, bad


def test_namespaces_exist_and_nothing_public_is_a_stub():
    for name in ("pp", "tl", "pl", "io", "datasets"):
        assert inspect.ismodule(getattr(cm, name))
    stubs = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "raise NotImplementedError" in p.read_text()]
    assert stubs == []


def _good(adata, key: str = "x", *, copy: bool = False):
    """Do a thing.

    Parameters
    ----------
    adata
        Data.
    key
        Key.
    copy
        Copy.

    Returns
    -------
    Nothing.
    """


def _bad(data, a, b, c, *, copy=True, inplace=False):
    """No sections."""


def test_checker_catches_each_violation():
    assert convention_problems(_good) == []
    problems = " | ".join(convention_problems(_bad))
    for expected in (
        "first parameter must be `adata`",
        "4 positional parameters",
        "`copy` must default to False",
        "`inplace` must default to True",
        "not both",
        "lacks a numpydoc Parameters section",
        "lacks a numpydoc Returns section",
        "parameters not documented",
    ):
        assert expected in problems
