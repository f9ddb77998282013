"""Run an iterator ahead of its consumer in a background thread (bounded, exceptions forwarded)."""

from __future__ import annotations

import queue
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
