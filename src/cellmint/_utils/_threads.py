"""Run an iterator ahead of its consumer in a background thread (bounded, exceptions forwarded)."""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def background(items: Iterable[T], *, depth: int = 1, name: str = "cellmint-background") -> Iterator[T]:
    """Yield the items of ``items``, produced in a background thread up to ``depth`` items ahead.

    Pays off when producing an item releases the GIL (file reads, compression, numba kernels). At
    most ``depth`` items wait in the queue, plus the one being produced and the one being consumed.
    An exception in the producer is raised in the consumer; a consumer that stops early stops the
    producer after its current item.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, not {depth}.")
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as err:  # forwarded to the consumer, who raises it
            put((False, err))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            ok, item = handoff.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def default_threads(cap: int = 4) -> int:
    """Threads cellmint uses where it chooses their number itself (chunk codecs, synthetic data).

    ``sc.settings.n_jobs`` when it is set to something else than scanpy's default, 1: ``-1`` means every
    core this process may use, ``k > 1`` means ``k``. Otherwise up to ``cap``, as many as there are
    cores. (1 being scanpy's default, it cannot be told from "unset"; functions that take ``n_jobs``
    accept 1 for a single thread.)
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    scanpy = sys.modules.get("scanpy")  # never imported for this: a process without scanpy has no setting
    n_jobs = getattr(getattr(scanpy, "settings", None), "n_jobs", 1)
    if isinstance(n_jobs, int) and n_jobs == -1:
        return cores
    if isinstance(n_jobs, int) and n_jobs > 1:
        return n_jobs
    return max(1, min(cap, cores))
