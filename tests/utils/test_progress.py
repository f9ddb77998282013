from __future__ import annotations

import io

import pytest
import scanpy as sc

from cellmint._utils._progress import progress_bar, show_progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("CELLMINT_PROGRESS", raising=False)
    return monkeypatch


def test_explicit_argument_wins(clean_env):
    clean_env.setenv("CI", "true")
    assert show_progress(True) is True
    clean_env.setattr("sys.stderr", _Tty())
    clean_env.delenv("CI")
    assert show_progress(False) is False


def test_terminal_shows_redirected_output_does_not(clean_env):
    clean_env.setattr("sys.stderr", _Tty())
    assert show_progress(None) is True
    clean_env.setattr("sys.stderr", io.StringIO())  # a log file or pipe
    assert show_progress(None) is False


def test_quiet_in_ci_and_when_verbosity_is_low(clean_env):
    clean_env.setattr("sys.stderr", _Tty())
    clean_env.setenv("CI", "true")
    assert show_progress(None) is False
    clean_env.delenv("CI")
    old = sc.settings.verbosity
    sc.settings.verbosity = "error"
    try:
        assert show_progress(None) is False
    finally:
        sc.settings.verbosity = old


def test_environment_override(clean_env):
    clean_env.setenv("CI", "true")
    clean_env.setenv("CELLMINT_PROGRESS", "1")
    assert show_progress(None) is True
    clean_env.setattr("sys.stderr", _Tty())
    clean_env.setenv("CELLMINT_PROGRESS", "off")
    assert show_progress(None) is False


def test_bar_draws_only_when_enabled(clean_env):
    out = io.StringIO()
    with progress_bar(total=10, desc="cells", unit="cells", progress=True, file=out) as bar:
        bar.update(10)
    assert "100%" in out.getvalue()
    quiet = io.StringIO()
    with progress_bar(total=10, desc="cells", progress=False, file=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
    assert list(progress_bar(range(3), progress=False)) == [0, 1, 2]
