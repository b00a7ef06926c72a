"""`keras_stg._files`: every output appears whole or not at all."""

import os
import stat

import pytest

from keras_stg import _files


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = str(tmp_path / "model.tflite")
    _files.atomic_write_bytes(path, b"old")

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt  # interrupted mid-write

    with pytest.raises(KeyboardInterrupt):
        _files.atomic_write(path, broken)
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["model.tflite"]


def test_text_writes_replace_whole_files_with_normal_permissions(tmp_path):
    path = tmp_path / "notes.md"
    _files.atomic_write_text(path, "first\n")
    _files.atomic_write_text(path, "second, longer\n")
    assert path.read_text() == "second, longer\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert os.listdir(tmp_path) == ["notes.md"]
