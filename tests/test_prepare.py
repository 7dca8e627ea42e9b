"""Prepared shards (colax.rows format, colax.prepare): the records, the manifest, and the pipeline reading them."""

import json

import numpy as np
import pytest

from colax import rows
from colax.errors import DataError


def test_records_round_trip_as_int32_little_endian():
    record = np.array([5, 1, 70000, 0], np.int32)
    raw = rows.encode(record)
    assert raw == b"\x05\x00\x00\x00\x01\x00\x00\x00\x70\x11\x01\x00\x00\x00\x00\x00"
    np.testing.assert_array_equal(rows.decode(raw), record)
    assert rows.decode(raw).dtype == np.int32


def test_a_folder_without_a_finished_manifest_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"data.path .*nowhere is not a folder: run python -m colax.data prepare"):
        rows.read_manifest(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"has no manifest.json \(a prepare that did not finish\?\)"):
        rows.read_manifest(str(tmp_path))
    (tmp_path / rows.MANIFEST).write_bytes(rows.manifest_bytes({"format": rows.FORMAT, "version": 0}))
    with pytest.raises(DataError, match=r"version 0, this colax reads 'colax.prepared' version 1: prepare again"):
        rows.read_manifest(str(tmp_path))
    manifest = {"format": rows.FORMAT, "version": rows.FORMAT_VERSION, "splits": {}}
    (tmp_path / rows.MANIFEST).write_bytes(rows.manifest_bytes(manifest))
    assert rows.read_manifest(str(tmp_path)) == manifest == json.loads((tmp_path / rows.MANIFEST).read_text())
