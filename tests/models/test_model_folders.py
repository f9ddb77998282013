"""Model folders: old formats still load, every manifest field is covered, a replacement is atomic under
SIGKILL and concurrent readers, one writer at a time, and a foreign weights file is never unpickled."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import cellmint as cm
from cellmint._utils import _files
from cellmint._utils._lock import LockBusyError, writer_lock

DATA = Path(__file__).parent / "_data"
SMALL = {"hidden": (8,), "max_epochs": 2, "batch_size": 64, "progress": False}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two different annotators of the same data, saved."""
    adata = cm.datasets.synthetic(300, 30, n_cell_types=3, random_state=0, progress=False)
    root = tmp_path_factory.mktemp("models")
    first = cm.tl.train_annotator(adata, "cell_type", random_state=1, model_dir=root / "first", **SMALL)
    second = cm.tl.train_annotator(adata, "cell_type", random_state=2, model_dir=root / "second", **SMALL)
    return adata, root / "first", root / "second", first, second


def _weights_digest(model) -> str:
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.net.state_dict().values())).hexdigest()


def test_frozen_format_1_folders_still_load_and_predict_the_same(tmp_path):
    adata = cm.datasets.synthetic(300, 30, n_cell_types=3, random_state=0, progress=False)[:50]
    model = cm.io.read_model(DATA / "annotator_v1")
    assert model.manifest["format_version"] == 1
    assert "manifest_sha256" not in model.manifest
    probabilities = model.forward(adata.X, np.asarray(adata.X.sum(1)).ravel())[1]["cell_type"]
    np.testing.assert_array_equal(probabilities, np.load(DATA / "annotator_v1_proba.npy"))
    perturbation = cm.io.read_model(DATA / "perturbation_v1")
    assert isinstance(perturbation, cm.PerturbationModel)
    # saved again, a format-1 model gets the current format and a sealed manifest
    again = cm.io.write_model(model, tmp_path / "again")
    manifest = json.loads((again / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert _files.seal_problem(manifest) is None
    assert "manifest_sha256" in manifest


def _leaves(value, path=()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, i))
    else:
        yield path, value


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return "x" if value is None else ([*value, 1] if isinstance(value, list) else {**value, "x": 1})


@pytest.mark.parametrize("which", ["annotator", "perturbation"])
def test_every_field_of_a_model_manifest_changed_is_refused(two_models, tmp_path, which):
    if which == "annotator":
        folder = two_models[1]
    else:
        folder = cm.io.write_model(cm.io.read_model(DATA / "perturbation_v1"), tmp_path / "p")
    target = tmp_path / "edited"
    shutil.copytree(folder, target)
    original = json.loads((target / "manifest.json").read_text())
    leaves = list(_leaves(original))
    assert len(leaves) > 50
    for path, value in leaves:
        edited = copy.deepcopy(original)
        node = edited
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = _changed(value)
        (target / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match="refused: its content does not match its checksum|format version|is a"):
            cm.io.read_model(target)
    for key in original:  # every field removed
        (target / "manifest.json").write_text(json.dumps({k: v for k, v in original.items() if k != key}))
        with pytest.raises(
            (ValueError, KeyError), match="refused|lacks its checksum|format version|kind|no table of file checksums"
        ):
            cm.io.read_model(target)


def test_swapped_class_names_are_refused(two_models, tmp_path):
    """The issue's case: two class names swapped in manifest.json loaded and annotated at 0.38 accuracy."""
    target = tmp_path / "swapped"
    shutil.copytree(two_models[1], target)
    manifest = json.loads((target / "manifest.json").read_text())
    classes = manifest["classes"]["cell_type"]
    classes[0], classes[1] = classes[1], classes[0]
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with pytest.raises(ValueError, match=r"manifest of the model at .*swapped is refused: .* edited or damaged"):
        cm.io.read_model(target)
    with pytest.raises(ValueError, match="refused"):
        cm.tl.annotate(two_models[0].copy(), target)


class _Planted:
    """An object whose unpickling would leave a trace on disk."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_a_weights_file_that_is_not_a_state_dict_is_refused_without_unpickling(two_models, tmp_path):
    target = tmp_path / "planted"
    shutil.copytree(two_models[1], target)
    marker = tmp_path / "the pickle ran"
    manifest = json.loads((target / "manifest.json").read_text())
    for payload, problem in ((pickle.dumps({"net": _Planted(str(marker))}), "found no tensor state dict"),
                             (b"not a torch file at all", "found no tensor state dict"),
                             (_torch_bytes([torch.zeros(3)]), "holds a list, not a state dict")):  # fmt: skip
        (target / "weights.pt").write_bytes(payload)
        manifest["files"]["weights.pt"] = hashlib.sha256(payload).hexdigest()  # a forger updates the checksums
        (target / "manifest.json").write_bytes(_files.manifest_bytes(manifest))
        with pytest.raises(ValueError, match=problem) as info:
            cm.io.read_model(target)
        assert "weights_only=False" not in str(info.value)  # never the advice to run arbitrary code
    assert not marker.exists()


def _torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_damaged_or_incomplete_folders_are_refused(two_models, tmp_path):
    target = tmp_path / "damaged"
    shutil.copytree(two_models[1], target)
    (target / "reference.npz").unlink()
    with pytest.raises(FileNotFoundError, match="is incomplete: reference.npz is missing"):
        cm.io.read_model(target)
    shutil.rmtree(target)
    shutil.copytree(two_models[1], target)
    weights = bytearray((target / "weights.pt").read_bytes())
    weights[-30] ^= 1
    (target / "weights.pt").write_bytes(bytes(weights))
    with pytest.raises(ValueError, match="does not match the checksum in its manifest"):
        cm.io.read_model(target)
    (target / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest of the model folder at .* is corrupted"):
        cm.io.read_model(target)


def test_saving_over_a_model_keeps_files_that_are_not_part_of_it(two_models, tmp_path):
    _, first, _, _, model = two_models
    target = tmp_path / "m"
    shutil.copytree(first, target)
    (target / "README.txt").write_text("trained for the lab's atlas")
    model.save(target)
    assert (target / "README.txt").read_text() == "trained for the lab's atlas"
    assert _weights_digest(cm.io.read_model(target)) == _weights_digest(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.cellmint-lock", "m"]  # no half-swapped leftovers
    outcome = []
    with writer_lock(_files.lock_path(target), what="test"):  # another writer (thread) holds the folder
        thread = threading.Thread(target=lambda: outcome.append(_try_save(model, target)))
        thread.start()
        thread.join()
    assert isinstance(outcome[0], LockBusyError)
    assert "is being written by another thread" in str(outcome[0])


def _try_save(model, target):
    try:
        model.save(target)
    except LockBusyError as err:
        return err
    return None


def _fork_and_kill(kill_at: int, work) -> int:
    """Run ``work`` in a forked child killed by SIGKILL at its ``kill_at``-th file system step (0: never).

    Returns the number of steps the child reached. Steps: every os.replace, os.fsync, os.mkdir,
    os.unlink, os.rmdir and os.link (shutil.rmtree and Path.mkdir go through them).
    """
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+): the child only writes files
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        count = [0]

        def counted(function):
            def wrapper(*args, **kwargs):
                count[0] += 1
                os.write(write, b".")
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return function(*args, **kwargs)

            return wrapper

        for name in ("replace", "fsync", "mkdir", "unlink", "rmdir", "link"):
            setattr(os, name, counted(getattr(os, name)))
        try:
            work()
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        steps = len(fh.read())
    os.waitpid(pid, 0)
    return steps


def test_sigkill_at_every_step_of_replacing_a_model_leaves_a_loadable_model(two_models, tmp_path):
    """Retraining into an existing folder ends with ``model.save``: killed at each of its file system steps,
    the folder holds the old model or the new one, and the next save cleans up."""
    _, first, _, old, new = two_models
    old_digest, new_digest = _weights_digest(old), _weights_digest(new)
    target = tmp_path / "model"
    shutil.copytree(first, target)
    total = _fork_and_kill(0, lambda: new.save(target))
    assert total >= 10
    assert _weights_digest(cm.io.read_model(target)) == new_digest
    seen = set()
    for point in range(1, total + 1):
        shutil.rmtree(target)
        for leftover in tmp_path.glob(".model.cellmint-*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        shutil.copytree(first, target)
        _fork_and_kill(point, lambda: new.save(target))
        digest = _weights_digest(cm.io.read_model(target))  # always loadable, recovering a half-done swap
        assert digest in (old_digest, new_digest), point
        seen.add(digest)
        new.save(target)  # the next save works from whatever state the crash left
        assert _weights_digest(cm.io.read_model(target)) == new_digest
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model")) == [".model.cellmint-lock"]
    assert seen == {old_digest, new_digest}  # the kills fell before and after the switch


def test_retraining_killed_mid_training_leaves_the_old_model(two_models, tmp_path):
    """SIGKILL while the new model trains (before anything is written): the old folder is untouched."""
    adata, first, _, old, _ = two_models
    target = tmp_path / "model"
    shutil.copytree(first, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import time

    for delay in (0.05, 0.3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child trains on one thread, then would save
            try:
                torch.set_num_threads(1)
                cm.tl.train_annotator(adata, "cell_type", model_dir=target,
                                      **{**SMALL, "max_epochs": 5000, "early_stopping": None})  # minutes  # fmt: skip
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
        assert _weights_digest(cm.io.read_model(target)) == _weights_digest(old)


def test_readers_during_replacements_always_load_a_whole_model(two_models, tmp_path):
    _, first, _, old, new = two_models
    digests = {_weights_digest(old), _weights_digest(new)}
    target = tmp_path / "model"
    shutil.copytree(first, target)
    stop, errors, loads = threading.Event(), [], []

    def read():
        while not stop.is_set():
            try:
                loads.append(_weights_digest(cm.io.read_model(target)))
            except Exception as err:
                errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(12):
            (new if i % 2 == 0 else old).save(target)
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[:3]
    assert loads
    assert set(loads) <= digests


def test_a_half_swapped_folder_in_a_read_only_place_is_read_from_the_new_one(two_models, tmp_path, monkeypatch):
    _, first, second, _, new = two_models
    target = tmp_path / "model"
    shutil.copytree(first, tmp_path / ".model.cellmint-old")  # a crash between the two renames
    shutil.copytree(second, tmp_path / ".model.cellmint-new")
    from cellmint._utils import _lock

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(_lock, "writer_lock", read_only)
    assert _weights_digest(cm.io.read_model(target)) == _weights_digest(new)
    assert not target.exists()  # nothing was written
    monkeypatch.undo()
    assert _weights_digest(cm.io.read_model(target)) == _weights_digest(new)  # recovered in place
    assert target.is_dir()
    assert not (tmp_path / ".model.cellmint-old").exists()
