"""Atomic writes: the target is replaced whole or not at all, with no temporary file left behind."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sca_caption.io_utils import atomic_write, atomic_write_json, atomic_write_text


def test_text_and_json_replace_the_target(tmp_path):
    path = tmp_path / "nested" / "out.json"
    atomic_write_json(path, {"caption": "un café", "id": 3})
    assert json.loads(path.read_text(encoding="utf-8")) == {"caption": "un café", "id": 3}
    assert path.read_text(encoding="utf-8").endswith("}\n")
    atomic_write_text(path, "second\n")
    assert path.read_text(encoding="utf-8") == "second\n"
    assert os.listdir(path.parent) == ["out.json"]


def test_failure_while_writing_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_write(path, "wb") as handle:
            handle.write(b"new, but only half")
            raise RuntimeError("midway")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["vocab.json"]


def test_new_file_gets_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "results.json"
        atomic_write_text(path, "[]")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_rejects_append_and_read_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_write(tmp_path / "x", "a"):
            pass
