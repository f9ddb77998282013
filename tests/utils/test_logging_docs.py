from __future__ import annotations

import io
import re

import pytest
import scanpy as sc

from cellmint._utils import _logging as logg
from cellmint._utils._docs import doc_params


@pytest.fixture
def scanpy_log():
    """Route scanpy's log to a buffer (its handler is bound to the stream set in settings.logfile)."""
    old_verbosity, old_file = sc.settings.verbosity, sc.settings.logfile
    buffer = io.StringIO()
    sc.settings.logfile = buffer
    yield buffer
    sc.settings.verbosity = old_verbosity
    sc.settings.logfile = old_file


def test_logging_respects_scanpy_verbosity_and_reports_elapsed_time(scanpy_log):
    sc.settings.verbosity = "info"
    start = logg.info("computing something")
    logg.info("    finished", time=start)
    text = scanpy_log.getvalue()
    assert "computing something" in text
    assert re.search(r"finished \(\d:\d\d:\d\d\)", text)
    sc.settings.verbosity = "warning"
    logg.info("hidden message")
    logg.debug("hidden debug")
    assert "hidden" not in scanpy_log.getvalue()


def test_doc_params_fills_shared_fragments():
    @doc_params(doc_extra="extra\n    An extra parameter.")
    def f(adata, *, layer=None, extra=1):
        """Do something.

        Parameters
        ----------
        {doc_adata}
        {doc_layer}
        {doc_extra}
        """

    assert "\nadata\n    Annotated data matrix" in f.__doc__
    assert "\nlayer\n    Use ``adata.layers[layer]``" in f.__doc__
    assert "\nextra\n    An extra parameter." in f.__doc__
    assert "{" not in f.__doc__


def test_doc_params_unknown_fragment_fails_loudly():
    with pytest.raises(KeyError, match="doc_missing"):

        @doc_params()
        def g():
            """{doc_missing}"""
