import os
import shutil

import numpy as np
import pytest

from keras_stg import data


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_loads_real_files(name, shared_data):
    x, y = data.load(name, "test", data_dir=shared_data)
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.min() == 0 and y.max() == 9
    assert len(np.unique(y)) == 10


def test_env_var_and_dataset_pipeline(shared_data, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, shared_data)
    ds = data.dataset("mnist", "test", batch_size=32, flatten=True, limit=100)
    xb, yb = next(iter(ds))
    assert xb.shape == (32, 784) and yb.shape == (32,)
    assert abs(float(np.mean(xb))) < 1.0  # standardised
    ds3 = data.dataset("mnist", "test", batch_size=4, image_size=(32, 32), channels=3, limit=8)
    assert next(iter(ds3))[0].shape == (4, 32, 32, 3)


def test_corrupt_file_is_named(shared_data, tmp_path):
    target = tmp_path / "mnist"
    shutil.copytree(os.path.join(shared_data, "mnist"), target)
    path = target / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="Corrupt data file .*t10k-labels-idx1-ubyte.gz: MD5"):
        data.load("mnist", "test", data_dir=str(tmp_path))


def test_missing_file_is_named(shared_data, tmp_path):
    target = tmp_path / "mnist"
    target.mkdir()
    shutil.copy(os.path.join(shared_data, "mnist", "t10k-images-idx3-ubyte.gz"), target)
    with pytest.raises(data.DataError, match="Missing mnist file t10k-labels-idx1-ubyte.gz: looked for"):
        data.load("mnist", "test", data_dir=str(tmp_path))


def test_bad_names():
    with pytest.raises(ValueError, match="Unknown dataset 'svhn'"):
        data.load("svhn")
    with pytest.raises(ValueError, match="Unknown split 'val'"):
        data.load("mnist", "val")
