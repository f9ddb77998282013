"""Every public function follows scanpy's conventions (STYLE.md); the checker is tested on bad examples too."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
from anndata import AnnData

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


def annotation_names(annotation) -> set[str]:
    """The type names a union annotation joins, written or evaluated: ``"ad.AnnData | None"`` -> {AnnData, None}."""
    if annotation is inspect.Parameter.empty:
        return set()
    if not isinstance(annotation, str):
        if annotation is None or annotation is type(None):
            return {"None"}
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            return set().union(*(annotation_names(a) for a in typing.get_args(annotation)))
        return {getattr(annotation, "__name__", str(annotation))}
    parts, depth, start = [], 0, 0
    for i, char in enumerate(annotation + "|"):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "|" and depth == 0:
            parts.append(annotation[start:i].strip())
            start = i + 1
    names = set()
    for part in parts:
        outer, _, inner = part.partition("[")
        outer = outer.rsplit(".", 1)[-1]
        if outer in ("Optional", "Union"):
            names |= annotation_names(inner.removesuffix("]").replace(",", "|"))
            names |= {"None"} if outer == "Optional" else set()
        else:
            names.add(outer)
    return names


def annotation_problems(func: Callable) -> list[str]:
    """scanpy's test_sig_conventions: `adata` is an AnnData, `copy` returns `AnnData | None`, a return annotation."""
    problems = []
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    returns = annotation_names(sig.return_annotation)
    if not returns:
        problems.append("no return annotation")
    if params and params[0].name == "adata" and "AnnData" not in annotation_names(params[0].annotation):
        problems.append(f"`adata` is annotated {params[0].annotation!r}, not as an AnnData (or a union with it)")
    if "copy" in sig.parameters and not {"AnnData", "None"} <= returns:
        problems.append(f"a `copy` parameter returns `AnnData | None`, not {sig.return_annotation!r}")
    return problems


def public_methods(cls) -> list[tuple[str, Callable]]:
    return [(f"{cls.__name__}.{n}", m) for n, m in inspect.getmembers(cls) if not n.startswith("_")
            and (inspect.isfunction(m) or inspect.ismethod(m))]  # fmt: skip


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


def test_annotations_follow_scanpy_conventions():
    found = [(f"cm.{ns}.{name.rsplit('.', 1)[-1]}", f) for ns in ("pp", "tl", "pl", "io", "datasets")
             for name, f in public_functions(getattr(cm, ns))]  # fmt: skip
    for cls in (cm.Annotator, cm.PerturbationModel, cm.Store):
        found += [(f"cm.{name}", method) for name, method in public_methods(cls)]
    problems = {name: p for name, f in found if (p := annotation_problems(f))}
    assert problems == {}


#: STYLE.md: a public function reads as the data flow, its steps named in private functions
MAX_BODY_LINES = 120


def body_lines(func: Callable) -> int:
    """Lines of a function's body after its docstring."""
    body = ast.parse(textwrap.dedent(inspect.getsource(func))).body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def test_public_functions_are_short_and_no_closure_changes_outer_state():
    found = [(name, f) for ns in ("pp", "tl", "pl", "io", "datasets") for name, f in public_functions(getattr(cm, ns))]
    for cls in (cm.Annotator, cm.PerturbationModel, cm.Store):
        found += [(name, m) for name, m in public_methods(cls) if inspect.isfunction(m)]
    long = {name: n for name, f in found if (n := body_lines(f)) > MAX_BODY_LINES}
    assert long == {}
    rebinding = [
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if any(isinstance(node, ast.Nonlocal | ast.Global) for node in ast.walk(ast.parse(p.read_text())))
    ]
    assert rebinding == []
    mutating = {
        str(p.relative_to(SRC)): found for p in SRC.rglob("*.py") if (found := closures_mutating(p.read_text()))
    }
    assert mutating == {}


MUTATORS = {"append", "extend", "update", "add", "pop", "insert", "setdefault", "clear"}


def closures_mutating(source: str) -> list[str]:
    """Nested functions that change a container of the enclosing function (``out.append``, ``out[k] = v``)."""
    found = []
    for outer in ast.walk(ast.parse(source)):
        if not isinstance(outer, ast.FunctionDef):
            continue
        for inner in ast.walk(outer):
            if inner is outer or not isinstance(inner, ast.FunctionDef | ast.Lambda):
                continue
            args = inner.args
            own = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
            own |= {n.id for n in ast.walk(inner) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            for node in ast.walk(inner):
                target = None
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                    target = node.func.value
                elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
                    target = node.value
                if isinstance(target, ast.Name) and target.id not in own:
                    found.append(f"{outer.name} -> {getattr(inner, 'name', 'lambda')}: {target.id}")
    return found


def test_the_closure_checker_sees_outer_containers_changed():
    source = textwrap.dedent("""
        def f():
            out, seen = [], {}
            def g(x):
                out.append(x)
            def h(k):
                seen[k] = 1
        """)
    assert closures_mutating(source) == ["f -> g: out", "f -> h: seen"]
    assert closures_mutating("def f():\n    def g(x):\n        out = []\n        out.append(x)\n") == []


def test_version_is_read_once_and_py_typed_ships():
    from cellmint._version import __version__

    assert cm.__version__ is __version__
    assert (SRC / "py.typed").is_file()  # hatch ships every file under src/cellmint in the wheel
    for module in SRC.rglob("*.py"):  # not from the package root: only _version.py reads it
        assert re.search(r"from \.+ import __version__", module.read_text()) is None, module


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


def _good(adata: AnnData, key: str = "x", *, copy: bool = False) -> AnnData | None:
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


def _bad_annotations(adata: int, *, copy: bool = False) -> int:
    """No sections."""


def test_annotation_names_read_unions():
    assert annotation_names("ad.AnnData | str | None") == {"AnnData", "str", "None"}
    assert annotation_names("dict[str, int | None] | None") == {"dict", "None"}
    assert annotation_names("Optional[anndata.AnnData]") == {"AnnData", "None"}
    assert annotation_names(AnnData | None) == {"AnnData", "None"}
    assert annotation_names(inspect.Parameter.empty) == set()


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
    assert annotation_problems(_good) == []
    assert annotation_problems(_bad) == ["no return annotation", "a `copy` parameter returns `AnnData | None`, not "
                                         "<class 'inspect._empty'>"]  # fmt: skip
    problems = " | ".join(annotation_problems(_bad_annotations))
    assert "`adata` is annotated 'int', not as an AnnData" in problems
    assert "a `copy` parameter returns `AnnData | None`, not 'int'" in problems


# The two wings (docs/design.md): each imports only its own modules and the shared floors below them.
WINGS = {
    "annotation": re.compile(
        r"cellmint\.(tl\._(annotate|train_annotator|annotation_\w+)|models\._(annotator|knn|conformal|open_set|augment"
        r"|network)|_metrics\._classification|pl\._confidence)"
    ),
    "perturbation": re.compile(r"cellmint\.(tl|models|pl|_metrics)\._\w*perturbation\w*"),
}
# Above both wings: the namespaces that export both, the command line, and the resolver of model folders.
ENTRIES = {"cellmint", "cellmint.tl", "cellmint.pl", "cellmint.models", "cellmint.io", "cellmint.io._models",
           "cellmint.cli"}  # fmt: skip


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = ("cellmint", *path.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The cellmint modules ``name`` imports (at any depth of its code, relative or absolute)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out |= {base} & known
            out |= {f"{base}.{alias.name}" for alias in node.names} & known
    return out


def wing(name: str) -> str | None:
    return next((w for w, pattern in WINGS.items() if pattern.fullmatch(name)), None)


def test_the_two_wings_do_not_cross():
    found = modules()
    crossings = []
    for name, path in found.items():
        if name in ENTRIES:
            continue
        here = wing(name)
        for other in imported(name, path, set(found)):
            there = wing(other)
            if there is not None and there != here:
                crossings.append(f"{name} ({here or 'floor'}) imports {other} ({there})")
    assert crossings == []
    assert {wing(n) for n in found} == {"annotation", "perturbation", None}  # the patterns still name modules


def test_the_wing_checker_sees_relative_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from ..models import _perturbation as p\nfrom ._annotate import annotate\n")
    known = {"cellmint.models._perturbation", "cellmint.tl._annotate", "cellmint.models"}
    assert imported("cellmint.tl._x", path, known) == known
