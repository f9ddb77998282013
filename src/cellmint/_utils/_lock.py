"""One writer at a time: an advisory, exclusive lock per store or model folder.

The lock is ``flock`` on a lock file (``fcntl``; ``msvcrt`` on Windows), taken without waiting: a
second writer gets :class:`LockBusyError` naming the holder (process id, host, start time, command)
instead of waiting or damaging the first one's work. The operating system releases the lock when its
process ends, however it ends, so a crash never leaves a stale lock behind. Readers take no lock.

Within one process the lock is re-entrant for the thread that holds it (``build_store`` makes the
default split under the lock it already holds); another thread of the same process is refused like
another process.

Network file systems: on Linux, ``flock`` on NFS is carried by the server's lock manager (NFSv4, or
NLM for NFSv3), so writers on different machines exclude each other as long as the file system is
not mounted with ``nolock`` or ``local_lock``, which make locks visible on one machine only.
File systems that refuse locks (some Lustre or FUSE mounts) get a warning and no lock; the
compare-and-swap on the store's manifest still refuses a writer whose view is stale.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_held: dict[str, tuple[int, int]] = {}  # lock file → (thread id, depth)
_guard = threading.Lock()
_UNSUPPORTED = {errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)}


class LockBusyError(RuntimeError):
    """Another process (or thread) is writing the same store or model folder."""


def _try_lock(fd: int) -> bool:
    """Take the lock without waiting; ``False`` when another holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    import msvcrt  # pragma: no cover - Windows

    try:  # pragma: no cover
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # pragma: no cover
        return False
    return True  # pragma: no cover


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:  # pragma: no cover - Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "a process that has not written its name yet"


@contextmanager
def writer_lock(path: str | Path, *, what: str) -> Iterator[None]:
    """Hold the exclusive writer lock of ``what`` (e.g. ``"the store at s.zarr"``) through the ``with`` block.

    Parameters
    ----------
    path
        The lock file (created when missing; left in place afterwards).
    what
        What the lock protects, for the error message.

    Raises
    ------
    LockBusyError
        When another process, or another thread of this process, holds it.
    """
    path = Path(path).absolute()
    key, me = str(path), threading.get_ident()
    with _guard:
        owner = _held.get(key)
        if owner is not None and owner[0] == me:
            _held[key] = (me, owner[1] + 1)
            reentered = True
        elif owner is not None:
            raise LockBusyError(f"{what} is being written by another thread of this process; only one writer at "
                                "a time is allowed. Wait for it to finish.")  # fmt: skip
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                _held[key] = (me, _held[key][1] - 1)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    locked = False
    try:
        try:
            locked = _try_lock(fd)
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
            warnings.warn(f"The file system of {path.parent} does not support file locks ({err.strerror}): "
                          f"cellmint cannot stop a second process from writing {what} at the same time.",
                          UserWarning, stacklevel=3)  # fmt: skip
            locked = None
        if locked is False:
            raise LockBusyError(
                f"{what} is being written by another process ({_holder(path)}); only one writer at a time is "
                "allowed. Wait for it to finish, or write elsewhere."
            )
        with _guard:
            _held[key] = (me, 1)
        try:
            os.ftruncate(fd, 0)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            command = " ".join(sys.argv)[:200] or "python"
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}: {command}\n".encode())
        except OSError:  # the note is a courtesy; the lock is what counts
            pass
        try:
            yield
        finally:
            with _guard:
                _held.pop(key, None)
            if locked:
                try:
                    os.ftruncate(fd, 0)
                finally:
                    _unlock(fd)
    finally:
        os.close(fd)
