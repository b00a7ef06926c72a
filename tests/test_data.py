import os
import shutil

import numpy as np
import pytest

from keras_stg.experiments import data


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


# ------------------------------------------------------------------ CIFAR
# CIFAR is not in ../shared/data: these tests build small archives in the
# original formats (python pickles and binary records) and load them with
# verify=False (the official MD5s cannot match synthetic files); the checksum
# path is tested by loading the same synthetic archive with verify=True.


def _cifar_python_archive(directory, name, n=20, seed=0):
    import io
    import pickle
    import tarfile

    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder, archive, files, key = {
        "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                    [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"),
        "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train", "test"],
                     b"fine_labels"),
    }[name]
    expected = {}
    path = os.path.join(directory, archive)
    with tarfile.open(path, "w:gz") as tar:
        for fname in files:
            images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = rng.integers(0, classes, n).tolist()
            expected[fname] = (images, labels)
            raw = pickle.dumps({b"data": images, key: labels, b"batch_label": b"synthetic"})
            info = tarfile.TarInfo(f"{folder}/{fname}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path, expected


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_python_archive(name, tmp_path):
    path, expected = _cifar_python_archive(str(tmp_path), name)
    x, y = data.load(name, "train", data_dir=str(tmp_path), verify=False)
    n_train = 100 if name == "cifar10" else 20
    assert x.shape == (n_train, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (n_train,)
    first = expected["data_batch_1" if name == "cifar10" else "train"]
    # Channel-first rows of 3072 bytes become HWC images.
    np.testing.assert_array_equal(x[0], first[0][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert y[: len(first[1])].tolist() == first[1]
    xt, yt = data.load(name, "test", data_dir=str(tmp_path), verify=False)
    assert xt.shape == (20, 32, 32, 3) and 0 <= yt.min() and yt.max() < (10 if name == "cifar10" else 100)
    # The official archive's MD5 is checked by default: the synthetic one fails.
    archive = os.path.basename(path)
    with pytest.raises(data.DataError, match=f"Corrupt data file .*{archive}: MD5 .*expected"):
        data.load(name, "train", data_dir=str(tmp_path))


def test_cifar10_binary_folder_and_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for fname in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, (8, 3073), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, 8)
        (folder / fname).write_bytes(records.tobytes())
    x, y = data.load("cifar10", "train", data_dir=str(tmp_path), verify=False)
    assert x.shape == (40, 32, 32, 3) and y.max() < 10
    ds, steps = data.epochs_dataset(x, y, "cifar10", batch_size=16, epochs=2, seed=0,
                                    image_size=64)
    batches = list(ds)
    assert steps == 3 and len(batches) == 6 and batches[0][0].shape == (16, 64, 64, 3)
    # A truncated record is a clear error naming the file, even without MD5s.
    (folder / "test_batch.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(data.DataError, match="Corrupt data file .*test_batch.bin: .*3073-byte record"):
        data.load("cifar10", "test", data_dir=str(tmp_path), verify=False)


def test_cifar_corrupt_archive_and_missing(tmp_path):
    path, _ = _cifar_python_archive(str(tmp_path), "cifar10")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])  # truncated download
    with pytest.raises(data.DataError, match="Corrupt data file .*cifar-10-python.tar.gz"):
        data.load("cifar10", "train", data_dir=str(tmp_path), verify=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match="No cifar100 files found in .*cifar-100-python.tar.gz"):
        data.load("cifar100", "train", data_dir=str(empty))


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = data.epoch_order(100, 0, 3)
    assert sorted(a.tolist()) == list(range(100))
    np.testing.assert_array_equal(a, data.epoch_order(100, 0, 3))
    assert not np.array_equal(a, data.epoch_order(100, 0, 4))
    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(28, 1).repeat(28, 2)
    y = np.arange(10)
    full, _ = data.epochs_dataset(x, y, "mnist", 4, epochs=3, seed=1)
    resumed, _ = data.epochs_dataset(x, y, "mnist", 4, epochs=3, initial_epoch=1, seed=1)
    labels = [b[1].numpy().tolist() for b in full]
    assert labels[3:] == [b[1].numpy().tolist() for b in resumed]  # 3 batches/epoch
