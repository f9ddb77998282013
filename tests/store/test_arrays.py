"""The store's direct chunk reader/writer: byte-compatible with zarr, atomic where committed data lives."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cellmint.store import _arrays
from cellmint.store._arrays import ChunkedArray, read_spans
from cellmint.store._format import numeric_codec, string_codec


def make(tmp_path, dtype, chunk=10) -> ChunkedArray:
    group = zarr.open_group(tmp_path / "a.zarr", mode="a", zarr_format=3)
    name = f"x_{np.dtype(dtype).name}"
    if dtype is str:
        group.create_array(name, shape=(0,), dtype=str, chunks=(chunk,), compressors=string_codec())
    else:
        group.create_array(name, shape=(0,), dtype=dtype, chunks=(chunk,), compressors=numeric_codec())
    return ChunkedArray(tmp_path / "a.zarr" / name)


@pytest.mark.parametrize("dtype", ["float32", "int32", "int64", "float64", "int8"])
def test_appends_read_back_through_zarr(tmp_path, dtype):
    array = make(tmp_path, dtype)
    values = (np.random.default_rng(0).integers(0, 1000, 57)).astype(dtype)
    position = 0
    for size in (3, 7, 10, 1, 25, 11):  # unaligned appends: the last chunk is rewritten each time
        array.write(position, values[position : position + size])
        position += size
        array.set_length(position)
    assert position == 57
    np.testing.assert_array_equal(zarr.open_array(array.path, mode="r")[:], values)
    np.testing.assert_array_equal(array.read(0, 57), values)
    np.testing.assert_array_equal(array.read(13, 41), values[13:41])
    assert array.read(5, 5).size == 0


def test_strings_read_back_through_zarr(tmp_path):
    array = make(tmp_path, str, chunk=4)
    names = np.array([f"cell-{i}-{'x' * (i % 5)}" for i in range(11)], dtype=object)
    array.write(0, names[:6])
    array.write(6, names[6:])
    array.set_length(11)
    assert list(zarr.open_array(array.path, mode="r")[:]) == list(names)
    assert list(array.read(2, 9)) == list(names[2:9])


def test_read_spans_gathers_several_arrays_and_spans(tmp_path):
    data, indices = make(tmp_path, "float32"), make(tmp_path, "int32")
    values = np.arange(95, dtype=np.float32)
    data.write(0, values)
    indices.write(0, values.astype(np.int32) * 2)
    spans = [(3, 8), (12, 12), (15, 47), (44, 46), (90, 95)]  # overlapping, empty and same-chunk spans
    total = sum(b - a for a, b in spans)
    out_data, out_indices = np.empty(total, np.float32), np.empty(total, np.int32)
    read_spans([(data, spans, out_data), (indices, spans, out_indices)])
    expected = np.concatenate([values[a:b] for a, b in spans])
    np.testing.assert_array_equal(out_data, expected)
    np.testing.assert_array_equal(out_indices, expected.astype(np.int32) * 2)


def test_missing_or_damaged_chunks_are_errors_never_the_fill_value(tmp_path):
    array = make(tmp_path, "int32")
    array.write(20, np.arange(5, dtype=np.int32))  # chunks 0 and 1 never written
    with pytest.raises(ValueError, match=r"chunk file c/0 of the store array .* \(values 0:10\) is missing"):
        array.read(0, 25)
    np.testing.assert_array_equal(array.read(20, 25), np.arange(5))
    payload = bytearray((array.path / "c" / "2").read_bytes())
    payload[len(payload) // 2] ^= 1  # one bit
    (array.path / "c" / "2").write_bytes(bytes(payload))
    with pytest.raises(ValueError, match=r"chunk file c/2 .* \(values 20:30\) fails its checksum"):
        array.read(20, 25)
    (array.path / "c" / "2").write_bytes(b"not blosc at all")
    with pytest.raises(ValueError, match=r"chunk file c/2 .* fails its checksum"):
        array.read(20, 25)


def test_unknown_layouts_are_refused(tmp_path):
    zarr.open_group(tmp_path / "z.zarr", mode="w").create_array("two_d", shape=(4, 4), dtype="int32", chunks=(2, 2))
    with pytest.raises(ValueError, match="has a layout this cellmint does not write"):
        ChunkedArray(tmp_path / "z.zarr" / "two_d")
    with pytest.raises(ValueError, match="is missing or damaged"):
        ChunkedArray(tmp_path / "z.zarr" / "absent")


def test_a_failed_rewrite_leaves_committed_values_intact(tmp_path, monkeypatch):
    array = make(tmp_path, "float32")
    array.write(0, np.arange(15, dtype=np.float32))  # chunk 1 holds committed values 10..14
    array.set_length(15)

    def torn(path, payload):  # the process dies while replacing the shared chunk
        raise OSError("killed")

    monkeypatch.setattr(_arrays, "replace_file", torn)
    with pytest.raises(OSError, match="killed"):
        array.write(15, np.full(30, -1, dtype=np.float32))
    monkeypatch.undo()
    np.testing.assert_array_equal(array.read(0, 15), np.arange(15, dtype=np.float32))
