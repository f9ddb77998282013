"""Sphinx configuration of the cellmint documentation (built by ``nox -s docs``).

The build works offline: tutorials and code cells execute locally on the bundled datasets, and
intersphinx links to other projects are only resolved when ``CELLMINT_DOCS_INTERSPHINX=1`` is set
(fetching their inventories needs the network, and a failed fetch is a warning, i.e. an error
under ``-W``).
"""

from __future__ import annotations

import os
import re
import warnings
from datetime import date

import cellmint

# -- project -----------------------------------------------------------------------------------------
project = "cellmint"
author = "cellmint developers"
copyright = f"{date.today().year}, {author}"
version = cellmint.__version__
release = cellmint.__version__

# -- general -----------------------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "**/.jupyter_cache"]
templates_path: list[str] = []

# -- API reference -----------------------------------------------------------------------------------
autosummary_generate = True
autodoc_default_options = {"members": True, "undoc-members": False}
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True  # docstrings give no types; the return annotation is the type
napoleon_use_param = True
typehints_document_rtype = True
typehints_use_rtype = False  # "Returns: AnnData – the dataset ...", one field instead of two
always_document_param_types = False

# -- cross-links to other projects (offline unless asked for) ----------------------------------------
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
if os.environ.get("CELLMINT_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "scipy": ("https://docs.scipy.org/doc/scipy", None),
        "pandas": ("https://pandas.pydata.org/docs", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable", None),
    }

# -- notebooks (myst-nb) -----------------------------------------------------------------------------
nb_execution_mode = "force"  # tutorials run at every build: the docs fail when the code does
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True  # print the traceback of a failing cell in the build log
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Progress bars are for people watching a notebook; in rendered pages they are noise. The kernels
# that execute the tutorials inherit this environment.
os.environ.setdefault("CELLMINT_PROGRESS", "0")

# -- HTML --------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"cellmint {version}"
html_static_path = ["_static"]

# sphinx-autodoc-typehints 3.x calls a Sphinx API that Sphinx 9 deprecates, once per docstring;
# the notice is for its maintainers, not for us.
warnings.filterwarnings("ignore", message=r".*set_application.* is deprecated", module="sphinx_autodoc_typehints")


# -- free-text Returns sections ------------------------------------------------------------------------
# cellmint writes types only in signatures, so a numpydoc "Returns" section is prose ("The dataset;
# uns["dataset"] holds ..."), as in scanpy. Napoleon would read the prose's first line as a type. Before
# napoleon runs, the prose becomes the description of an entry without name and type (a lone ":"),
# which napoleon renders as ":returns: <prose>"; sphinx-autodoc-typehints then adds the return type
# from the annotation.
_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")
_NAMED_ENTRY = re.compile(r"^\S+\s+:(\s|$)")  # numpydoc "name : type" entries are left as they are


def _is_header(lines: list[str], i: int) -> bool:
    return i + 1 < len(lines) and bool(lines[i].strip()) and bool(_UNDERLINE.match(lines[i + 1]))


def _free_text_returns(app, what, name, obj, options, lines: list[str]) -> None:
    i = 0
    while i < len(lines):
        if not (lines[i].strip() in {"Returns", "Yields"} and _is_header(lines, i)):
            i += 1
            continue
        start = end = i + 2
        while end < len(lines) and not _is_header(lines, end):
            end += 1
        body = lines[start:end]
        first = next((line for line in body if line.strip()), "")
        if first and not first.startswith(" ") and not _NAMED_ENTRY.match(first):
            lines[start:end] = [":", *(f"    {line}" if line.strip() else "" for line in body)]
        i = end


def setup(app):
    app.connect("autodoc-process-docstring", _free_text_returns, priority=400)  # before napoleon (500)
