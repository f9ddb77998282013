"""background(): items in order, bounded look-ahead, errors forwarded, early stop honoured."""

from __future__ import annotations

import threading
import time

import pytest

from cellmint._utils._threads import background


def test_items_arrive_in_order():
    assert list(background(iter(range(100)), depth=3)) == list(range(100))
    assert list(background([], depth=1)) == []


def test_look_ahead_is_bounded():
    produced = []

    def items():
        for i in range(50):
            produced.append(i)
            yield i

    consumer = background(items(), depth=2)
    assert next(consumer) == 0
    time.sleep(0.2)
    assert len(produced) <= 4  # the one consumed, two queued, one being produced
    consumer.close()


def test_errors_are_raised_in_the_consumer():
    def items():
        yield 1
        raise KeyError("bad chunk")

    consumer = background(items(), depth=1)
    assert next(consumer) == 1
    with pytest.raises(KeyError, match="bad chunk"):
        next(consumer)


def test_stopping_early_stops_the_producer():
    closed = threading.Event()

    def items():
        try:
            yield from range(10**9)
        finally:
            closed.set()

    consumer = background(items(), depth=1)
    assert next(consumer) == 0
    consumer.close()
    assert closed.wait(2)
    with pytest.raises(ValueError, match="depth must be at least 1"):
        next(background([], depth=0))


def test_default_threads_follow_scanpy_n_jobs():
    """sc.settings.n_jobs chooses cellmint's threads when set (-1: every core); scanpy's default 1 leaves cellmint's."""
    import os

    import scanpy as sc

    from cellmint._utils._threads import default_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    before = sc.settings.n_jobs
    try:
        sc.settings.n_jobs = 1
        assert default_threads() == max(1, min(4, cores))
        assert default_threads(cap=1) == 1
        sc.settings.n_jobs = 7
        assert default_threads() == 7
        sc.settings.n_jobs = -1
        assert default_threads() == cores
    finally:
        sc.settings.n_jobs = before
