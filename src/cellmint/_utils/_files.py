"""Crash-safe files, sealed manifests and atomically replaced folders, shared by stores and model folders.

- :func:`replace_atomically` writes a file so that readers and crashes see the old one or the new
  one, never half of one (temporary file, ``fsync``, rename, ``fsync`` of the folder).
- A *sealed* manifest carries ``manifest_sha256``, the sha256 of its own canonical JSON without that
  key (:func:`seal`); :func:`read_manifest_file` refuses one whose seal does not match, so an edited,
  damaged or partly restored manifest is never used.
- :func:`replace_folder` writes a new folder beside the old one and swaps it in by two renames;
  :func:`recover_folder` finishes a swap that a crash interrupted, so that a crash at any moment
  leaves the old folder or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _logging as logg

SEAL = "manifest_sha256"


def fsync_folder(path: str | Path) -> None:
    """Flush a folder's entries (created, renamed or removed files) to disk."""
    try:
        directory = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms whose folders cannot be opened (Windows)
        return
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_file(path: Path, payload: bytes, *, durable: bool) -> None:
    """Write ``payload`` to ``path`` in place (``durable``: and flush it to disk before returning)."""
    with open(path, "wb") as fh:
        fh.write(payload)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())


def replace_atomically(path: Path, payload: bytes, *, durable: bool = True, sync_folder: bool | None = None) -> None:
    """Write ``payload`` to ``path`` so that readers and crashes see the old file or the new one, never half.

    The bytes go to a temporary file beside ``path``, which is then renamed over it. With ``durable``
    the file is flushed to disk before the rename and the rename after it (``fsync`` of the folder),
    so they survive a power loss too; ``sync_folder=False`` leaves the folder's flush to the caller
    (who renames many files in one folder and flushes it once).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write_file(tmp, payload, durable=durable)
    os.replace(tmp, path)
    if durable if sync_folder is None else sync_folder:
        fsync_folder(path.parent)


# -- sealed manifests ----------------------------------------------------------------------------
def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its ``manifest_sha256`` set (the sha256 of the rest, canonical JSON)."""
    manifest[SEAL] = hashlib.sha256(_canonical(manifest)).hexdigest()
    return manifest


def seal_problem(manifest: dict[str, Any]) -> str | None:
    """Why the manifest's seal does not hold (``None``: it holds, or the manifest carries none)."""
    if SEAL not in manifest:
        return None
    if manifest[SEAL] != hashlib.sha256(_canonical(manifest)).hexdigest():
        return "its content does not match its checksum (manifest_sha256): it was edited or damaged"
    return None


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The sealed manifest as written to disk (indented JSON)."""
    return json.dumps(seal(manifest), indent=1).encode()


def read_manifest_file(folder: str | Path, name: str, *, what: str, noun: str) -> dict[str, Any]:
    """The JSON manifest ``folder/name``; a clear error when it is missing (``what``), damaged or edited (``noun``)."""
    folder = Path(folder)
    file = folder / name
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a cellmint {what} (a folder holding {name}).")
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not a cellmint {what}: {name} is missing.")
    return parse_manifest(file.read_bytes(), f"the {noun} at {folder}")


def parse_manifest(payload: bytes, where: str, *, check_seal: bool = True) -> dict[str, Any]:
    """A manifest from its bytes; ``where`` names it in errors (``"the store at …"``).

    Its seal is checked unless ``check_seal=False`` (the caller checks it after the format version).
    """
    try:
        manifest = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"The manifest of {where} is corrupted (not JSON: {err}); restore it from a copy.") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"The manifest of {where} is corrupted (a JSON {type(manifest).__name__}, not an object).")
    if check_seal:
        check_sealed(manifest, where)
    return manifest


def check_sealed(manifest: dict[str, Any], where: str) -> None:
    """Refuse a manifest whose seal does not hold (see :func:`seal_problem`)."""
    if problem := seal_problem(manifest):
        raise ValueError(f"The manifest of {where} is refused: {problem}. Restore it from a copy.")


# -- folders replaced as a whole -----------------------------------------------------------------
def _siblings(folder: Path) -> tuple[Path, Path, Path]:
    """The new, old and lock paths kept beside ``folder`` while it is replaced."""
    return (folder.with_name(f".{folder.name}.cellmint-new"), folder.with_name(f".{folder.name}.cellmint-old"),
            folder.with_name(f".{folder.name}.cellmint-lock"))  # fmt: skip


def lock_path(folder: str | Path) -> Path:
    """The lock file of a folder that is replaced as a whole (beside it, so that it outlives each swap)."""
    return _siblings(Path(folder).absolute())[2]


def recover_folder(folder: str | Path) -> bool:
    """Finish a swap of ``folder`` that a crash interrupted; call it holding the folder's lock.

    The new folder is complete before the old one is renamed away, so with the old one aside and
    ``folder`` missing the swap rolls forward; a new folder left beside an intact ``folder`` is an
    unfinished write and is removed. Returns whether ``folder`` exists afterwards.
    """
    folder = Path(folder).absolute()
    new, old, _ = _siblings(folder)
    if not folder.exists():
        if old.exists() and new.exists():
            os.replace(new, folder)  # crashed between the two renames: the new folder is complete
        elif old.exists():
            os.replace(old, folder)
        if folder.exists():
            fsync_folder(folder.parent)
            logg.warning(f"finished replacing {folder}, which an earlier writer left half-swapped")
    if folder.exists():
        for leftover in (new, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    return folder.exists()


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def replace_folder(folder: str | Path, fill: Callable[[Path], None], *, keep: Callable[[str], bool]) -> None:
    """Replace ``folder`` by a new one that ``fill(path)`` writes, atomically for readers and crashes.

    Call it holding the folder's lock (:func:`lock_path`). ``fill`` writes into a new folder beside
    ``folder`` (every file flushed to disk); entries of the old folder for which ``keep(name)`` is
    true (files that are not part of the model) are carried over by hard link or copy; then the old
    folder is renamed aside, the new one renamed into place, and the old one deleted.
    """
    folder = Path(folder).absolute()
    new, old, _ = _siblings(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; a model is saved to a folder. Choose another path.")
    recover_folder(folder)
    if new.exists():
        shutil.rmtree(new)
    new.mkdir()
    fill(new)
    if folder.exists():
        with os.scandir(folder) as entries:
            for entry in entries:
                if keep(entry.name) and not (new / entry.name).exists():
                    if entry.is_dir(follow_symlinks=False):
                        shutil.copytree(entry.path, new / entry.name, symlinks=True, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(entry.path, str(new / entry.name))
    fsync_folder(new)
    if folder.exists():
        os.replace(folder, old)
        os.replace(new, folder)
        fsync_folder(folder.parent)
        shutil.rmtree(old)
    else:
        os.replace(new, folder)
        fsync_folder(folder.parent)


def read_folder_files(folder: str | Path, names: Callable[[dict], list[str]], manifest_name: str, *, where: str,
                      attempts: int = 5) -> tuple[dict[str, Any], dict[str, bytes | None]]:  # fmt: skip
    """The manifest and the files ``names(manifest)`` (``None``: missing) of one version of a folder.

    The manifest's seal is not checked here (the caller checks it after the format version).

    Every file is read through one open handle of the folder, so a concurrent :func:`replace_folder`
    cannot mix two versions: a read whose folder was replaced mid-way starts again (up to
    ``attempts``). A folder missing because a crash interrupted its replacement is recovered first.
    """
    folder = Path(folder)
    for attempt in range(attempts):
        source = folder if folder.exists() else _recover_for_reading(folder)
        try:
            directory = os.open(source, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            if attempt + 1 == attempts:
                raise FileNotFoundError(f"{folder} is not a cellmint {where}: no such folder.") from None
            time.sleep(0.05 * (attempt + 1))
            continue
        except NotADirectoryError:
            raise NotADirectoryError(f"{folder} is a file, not a cellmint {where} (a folder).") from None
        error: Exception | None = None
        try:
            manifest, files = _read_snapshot(directory, names, manifest_name, folder, where)
        except (FileNotFoundError, ValueError) as err:
            error = err
        finally:
            try:
                same = os.stat(source).st_ino == os.fstat(directory).st_ino
            except FileNotFoundError:
                same = False
            os.close(directory)
        if same or attempt + 1 == attempts:
            if error is not None:
                raise error
            return manifest, files
        time.sleep(0.01)
    raise AssertionError("unreachable")  # pragma: no cover


def _read_snapshot(directory: int, names: Callable[[dict], list[str]], manifest_name: str, folder: Path,
                   what: str) -> tuple[dict[str, Any], dict[str, bytes | None]]:  # fmt: skip
    def opener(path: str, flags: int) -> int:
        return os.open(path, flags, dir_fd=directory)

    try:
        with open(manifest_name, "rb", opener=opener) as fh:
            manifest = parse_manifest(fh.read(), f"the {what} at {folder}", check_seal=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a cellmint {what}: {manifest_name} is missing.") from None
    files: dict[str, bytes | None] = {}
    for name in names(manifest):
        try:
            with open(name, "rb", opener=opener) as fh:
                files[name] = fh.read()
        except FileNotFoundError:
            files[name] = None
    return manifest, files


def _recover_for_reading(folder: Path) -> Path:
    """A reader found ``folder`` missing: finish an interrupted swap if no writer holds the lock.

    Returns the folder to read: ``folder``, or — where the reader may not write (a read-only location)
    and a crash left the swap half done — the complete new folder beside it.
    """
    from ._lock import LockBusyError, writer_lock

    new, old, lock = _siblings(folder.absolute())
    if not (new.exists() or old.exists()):
        return folder
    try:
        with writer_lock(lock, what=f"the folder {folder}"):
            recover_folder(folder)
    except LockBusyError:
        time.sleep(0.05)  # a writer is swapping it right now
    except PermissionError:  # a read-only location: read the complete new folder where it is
        if old.exists() and new.exists():
            return new
        return old if old.exists() else folder
    return folder
