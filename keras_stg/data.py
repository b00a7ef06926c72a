"""Datasets as NumPy arrays and `tf.data` pipelines.

Sources, in order:
1. raw original files in a local directory: `data_dir=`, else the
   `KERAS_STG_DATA` environment variable (gzip IDX files for MNIST and
   Fashion-MNIST, in `<dir>/<name>/` or `<dir>/` itself). Every file is checked
   against its publisher's size and MD5 before use.
2. tensorflow-datasets (downloads on first use; needs internet and the
   `tensorflow-datasets` package), for users without local copies.

Example:

```python
train = keras_stg.data.dataset("mnist", "train", batch_size=128, data_dir="../shared/data")
(x, y) = keras_stg.data.load("fashion_mnist", "test", data_dir="../shared/data")
```
"""

import gzip
import hashlib
import os
import struct

import numpy as np

ENV_VAR = "KERAS_STG_DATA"

# Publisher's sizes and MD5 sums of the original gzip files.
_IDX_FILES = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train-labels-idx1-ubyte.gz": (28881, "d53e105ee54ea40749a09fcbcd1e9432"),
        "t10k-images-idx3-ubyte.gz": (1648877, "9fb629c4189551a2d022fa330f9573f3"),
        "t10k-labels-idx1-ubyte.gz": (4542, "ec29112dd5afa0611ce80d1b7f02629c"),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": (26421880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train-labels-idx1-ubyte.gz": (29515, "25c81989df183df01b3e8a0aad5dffbe"),
        "t10k-images-idx3-ubyte.gz": (4422102, "bef4ecab320f06d8554ea6380940ec79"),
        "t10k-labels-idx1-ubyte.gz": (5148, "bb300cfdad3c16e7a12a480ee83cd310"),
    },
}

# name -> (image shape, classes, per-channel mean, per-channel std) after /255.
DATASETS = {
    "mnist": ((28, 28, 1), 10, (0.1307,), (0.3081,)),
    "fashion_mnist": ((28, 28, 1), 10, (0.2860,), (0.3530,)),
    "cifar10": ((32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((32, 32, 3), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

SPLITS = ("train", "test")


class DataError(RuntimeError):
    """A dataset file is missing, corrupt, or no source could provide the data."""


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_name_split(name, split):
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Use one of {sorted(DATASETS)}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}. Use 'train' or 'test'.")


def _find_dir(name, data_dir):
    """Directory holding `name`'s raw files, or None if there is none."""
    base = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    if not base:
        return None
    if not os.path.isdir(base):
        raise DataError(
            f"Data directory {base!r} (from "
            f"{'data_dir' if data_dir is not None else ENV_VAR}) does not exist."
        )
    for candidate in (os.path.join(base, name), base):
        if os.path.isdir(candidate) and any(
            os.path.exists(os.path.join(candidate, f)) for f in _IDX_FILES.get(name, {})
        ):
            return candidate
    return None


def verify_file(path, expected_size, expected_md5):
    """Raises `DataError` naming the file if its size or MD5 is wrong."""
    if not os.path.isfile(path):
        raise DataError(f"Missing data file {path}.")
    size = os.path.getsize(path)
    if size != expected_size:
        raise DataError(
            f"Corrupt data file {path}: {size} bytes, expected {expected_size}. "
            "Replace it with the original download."
        )
    md5 = _md5(path)
    if md5 != expected_md5:
        raise DataError(
            f"Corrupt data file {path}: MD5 {md5}, expected {expected_md5}. "
            "Replace it with the original download."
        )


def _read_idx(path, magic, dims):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = struct.unpack(f">{1 + dims}I", raw[: 4 * (1 + dims)])
    if header[0] != magic:
        raise DataError(f"{path}: IDX magic {header[0]}, expected {magic}.")
    shape = header[1:]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + dims))
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: {data.size} values, header says {shape}.")
    return data.reshape(shape)


def _load_idx(name, split, directory, verify=True):
    prefix = "train" if split == "train" else "t10k"
    files = _IDX_FILES[name]
    images_file = f"{prefix}-images-idx3-ubyte.gz"
    labels_file = f"{prefix}-labels-idx1-ubyte.gz"
    paths = []
    for fname in (images_file, labels_file):
        path = os.path.join(directory, fname)
        if not os.path.isfile(path):
            raise DataError(
                f"Missing {name} file {fname}: looked for {path}. Put the original "
                "gzip IDX files there, or unset the data directory to use "
                "tensorflow-datasets."
            )
        if verify:
            verify_file(path, *files[fname])
        paths.append(path)
    images = _read_idx(paths[0], 2051, 3)[..., None]
    labels = _read_idx(paths[1], 2049, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{directory}: {len(images)} images but {len(labels)} labels.")
    return images, labels


def _load_tfds(name, split):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"No local copy of {name!r} was found and tensorflow-datasets is not "
            f"installed. Pass data_dir= (or set {ENV_VAR}) to a folder with the "
            "original files, or `pip install tensorflow-datasets`."
        ) from e
    images, labels = tfds.as_numpy(
        tfds.load(name, split=split, batch_size=-1, as_supervised=True)
    )
    return images.astype(np.uint8), labels.astype(np.int64)


def load(name, split="train", data_dir=None, verify=True):
    """Loads a dataset split as `(images uint8 NHWC, labels int64)`.

    Args:
        name: `"mnist"`, `"fashion_mnist"`, `"cifar10"` or `"cifar100"`.
        split: `"train"` or `"test"`.
        data_dir: folder with the raw files (default: `$KERAS_STG_DATA`);
            without one, tensorflow-datasets is used.
        verify: check sizes and MD5 sums of raw files.
    """
    _check_name_split(name, split)
    directory = _find_dir(name, data_dir)
    if directory is not None and name in _IDX_FILES:
        return _load_idx(name, split, directory, verify)
    if data_dir is not None:
        expected = ", ".join(_IDX_FILES.get(name, {})) or "its tensorflow-datasets copy"
        raise DataError(
            f"No {name} files found in {data_dir!r} or {os.path.join(data_dir, name)!r}; "
            f"expected {expected}."
        )
    return _load_tfds(name, split)


def normalize(images, name):
    """uint8 images to float32, scaled to [0, 1] then standardised per channel."""
    _, _, mean, std = DATASETS[name]
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def dataset(
    name,
    split="train",
    batch_size=128,
    data_dir=None,
    shuffle=None,
    seed=0,
    flatten=False,
    image_size=None,
    channels=None,
    limit=None,
    drop_remainder=False,
):
    """A batched, normalised `tf.data.Dataset` of `(image, label)`.

    Args:
        name, split, data_dir: as in `load`.
        batch_size: batch size.
        shuffle: shuffle every epoch (default: only the train split).
        seed: shuffle seed.
        flatten: flatten images to vectors (for MLPs).
        image_size: resize to `(h, w)` (ImageNet-style backbones).
        channels: repeat grayscale channels up to this count (e.g. 3).
        limit: keep only the first `limit` examples (quick runs and tests).
        drop_remainder: drop the last partial batch (static batch shapes).
    """
    import tensorflow as tf

    images, labels = load(name, split, data_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = normalize(images, name)
    ds = tf.data.Dataset.from_tensor_slices((x, labels))
    if shuffle if shuffle is not None else split == "train":
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    def transform(img, lab):
        if channels is not None and img.shape[-1] != channels:
            img = tf.repeat(img, channels // img.shape[-1], axis=-1)
        if image_size is not None:
            img = tf.image.resize(img, image_size)
        if flatten:
            img = tf.reshape(img, (tf.shape(img)[0], -1))
        return img, lab

    if flatten or image_size is not None or channels is not None:
        ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
