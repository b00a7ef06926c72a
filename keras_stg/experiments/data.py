"""Datasets as NumPy arrays and `tf.data` pipelines.

Sources, in order:
1. raw original files in a local directory: `data_dir=`, else the
   `KERAS_STG_DATA` environment variable, in `<dir>/<name>/` or `<dir>/`
   itself: the gzip IDX files for MNIST and Fashion-MNIST; for CIFAR-10 the
   original `cifar-10-python.tar.gz` or `cifar-10-binary.tar.gz` archive or
   its extracted folder (`cifar-10-batches-py/`, `cifar-10-batches-bin/`), for
   CIFAR-100 `cifar-100-python.tar.gz` or `cifar-100-python/`. Every file is
   checked against its publisher's size and/or MD5 before use (the binary
   batches, which have no published MD5, by their exact record layout).
2. tensorflow-datasets (downloads on first use; needs internet and the
   `tensorflow-datasets` package), for users without local copies.

Example:

```python
train = keras_stg.experiments.data.dataset("mnist", "train", batch_size=128, data_dir="../shared/data")
(x, y) = keras_stg.experiments.data.load("fashion_mnist", "test", data_dir="../shared/data")
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

# CIFAR sources in the order they are tried: (format, archive, archive MD5,
# folder inside the archive, train files, test files, MD5 per extracted file).
# MD5s as published on https://www.cs.toronto.edu/~kriz/cifar.html (and used by
# torchvision); the binary batches are checked by their fixed record size.
_CIFAR_SOURCES = {
    "cifar10": [
        ("python", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
         "cifar-10-batches-py",
         ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
         ["test_batch"],
         {"data_batch_1": "c99cafc152244af753f735de768cd75f",
          "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
          "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
          "data_batch_4": "634d18415352ddfa80567beed471001a",
          "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
          "test_batch": "40351d587109b95175f43aff81a1287e"}),
        ("binary", "cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
         "cifar-10-batches-bin",
         [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"], {}),
    ],
    "cifar100": [
        ("python", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
         "cifar-100-python", ["train"], ["test"],
         {"train": "16019d7e3df5f24257cddd939b257f8d",
          "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}),
    ],
}
# Examples per file of the original releases (checked when verify=True).
_CIFAR_COUNTS = {"data_batch_1": 10000, "data_batch_2": 10000, "data_batch_3": 10000,
                 "data_batch_4": 10000, "data_batch_5": 10000, "test_batch": 10000,
                 "train": 50000, "test": 10000}
_CIFAR_PIXELS = 32 * 32 * 3

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


def _raw_names(name):
    """File and folder names whose presence marks a folder as holding `name`."""
    if name in _IDX_FILES:
        return list(_IDX_FILES[name])
    names = []
    for _, archive, _, folder, *_ in _CIFAR_SOURCES.get(name, []):
        names += [folder, archive]
    return names


def _base_dir(data_dir):
    base = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    if not base:
        return None
    if not os.path.isdir(base):
        raise DataError(
            f"Data directory {base!r} (from "
            f"{'data_dir' if data_dir is not None else ENV_VAR}) does not exist."
        )
    return base


def _find_dir(name, data_dir):
    """Directory holding `name`'s raw files, or None if there is none."""
    base = _base_dir(data_dir)
    if base is None:
        return None
    for candidate in (os.path.join(base, name), base):
        if os.path.isdir(candidate) and any(
            os.path.exists(os.path.join(candidate, f)) for f in _raw_names(name)
        ):
            return candidate
    return None


def verify_file(path, expected_size, expected_md5):
    """Raises `DataError` naming the file if its size or MD5 is wrong (None: unchecked)."""
    if not os.path.isfile(path):
        raise DataError(f"Missing data file {path}.")
    size = os.path.getsize(path)
    if expected_size is not None and size != expected_size:
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


def _cifar_error(path, problem):
    return DataError(
        f"Corrupt data file {path}: {problem}. Replace it with the original download "
        "from https://www.cs.toronto.edu/~kriz/cifar.html."
    )


def _parse_cifar_python(raw, path, classes, label_key, verify, fname):
    import pickle

    try:
        batch = pickle.loads(raw, encoding="bytes")
        images = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as e:  # unpickling garbage raises many kinds of errors
        raise _cifar_error(path, f"{fname} is not a CIFAR python batch ({e})") from e
    if images.ndim != 2 or images.shape[1] != _CIFAR_PIXELS or len(images) != len(labels):
        raise _cifar_error(
            path, f"{fname} holds data {images.shape} and {labels.shape} labels, "
            f"expected (N, {_CIFAR_PIXELS}) and N")
    return images, labels


def _parse_cifar_binary(raw, path, classes, fname):
    record = 1 + _CIFAR_PIXELS
    if not raw or len(raw) % record:
        raise _cifar_error(
            path, f"{fname} has {len(raw)} bytes, not a multiple of the {record}-byte record")
    table = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    return table[:, 1:].copy(), table[:, 0].astype(np.int64)


def _load_cifar(name, split, directory, verify=True):
    """Reads CIFAR from an extracted folder or an original archive in `directory`."""
    import tarfile

    classes = DATASETS[name][1]
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    looked = []
    for fmt, archive, archive_md5, folder, train_files, test_files, md5s in _CIFAR_SOURCES[name]:
        files = train_files if split == "train" else test_files
        folder_path = os.path.join(directory, folder)
        archive_path = os.path.join(directory, archive)
        looked += [folder_path + os.sep, archive_path]
        parts = []
        if os.path.isdir(folder_path):
            for fname in files:
                path = os.path.join(folder_path, fname)
                if not os.path.isfile(path):
                    raise DataError(
                        f"Missing {name} file {fname}: looked for {path}. The folder "
                        f"{folder_path} is incomplete; extract {archive} again.")
                if verify and fname in md5s:
                    verify_file(path, None, md5s[fname])
                with open(path, "rb") as f:
                    parts.append((path, fname, f.read()))
        elif os.path.isfile(archive_path):
            if verify:
                verify_file(archive_path, None, archive_md5)
            try:
                with tarfile.open(archive_path, "r:gz") as tar:
                    for fname in files:
                        member = f"{folder}/{fname}"
                        try:
                            handle = tar.extractfile(member)
                        except KeyError:
                            handle = None
                        if handle is None:
                            raise _cifar_error(archive_path, f"it has no member {member}")
                        parts.append((archive_path, fname, handle.read()))
            except (tarfile.TarError, EOFError, OSError) as e:
                raise _cifar_error(archive_path, f"cannot read the archive ({e})") from e
        else:
            continue
        images, labels = [], []
        for path, fname, raw in parts:
            if fmt == "python":
                x, y = _parse_cifar_python(raw, path, classes, label_key, verify, fname)
            else:
                x, y = _parse_cifar_binary(raw, path, classes, fname)
            if verify and len(x) != _CIFAR_COUNTS[fname.replace(".bin", "")]:
                raise _cifar_error(
                    path, f"{fname} has {len(x)} examples, expected "
                    f"{_CIFAR_COUNTS[fname.replace('.bin', '')]}")
            if len(y) and (y.min() < 0 or y.max() >= classes):
                raise _cifar_error(
                    path, f"{fname} has labels in [{y.min()}, {y.max()}], expected 0..{classes - 1}")
            images.append(x)
            labels.append(y)
        x = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x), np.concatenate(labels)
    raise DataError(
        f"No {name} files found: looked for {', '.join(looked)}. Put the original "
        "archive (or its extracted folder) there, or unset the data directory to use "
        "tensorflow-datasets."
    )


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
        verify: check sizes and MD5 sums of raw files (structure, label range
            and shapes are always checked; turn this off only for files that
            are not the publishers' originals, e.g. test fixtures).
    """
    _check_name_split(name, split)
    directory = _find_dir(name, data_dir)
    if directory is not None:
        if name in _IDX_FILES:
            return _load_idx(name, split, directory, verify)
        return _load_cifar(name, split, directory, verify)
    if data_dir is not None:
        base = data_dir
        raise DataError(
            f"No {name} files found in {base!r} or {os.path.join(base, name)!r}; "
            f"expected one of {', '.join(_raw_names(name))}. Put the original files "
            f"there, or unset the data directory (and {ENV_VAR}) to use "
            "tensorflow-datasets."
        )
    return _load_tfds(name, split)


def normalize(images, name):
    """uint8 images to float32, scaled to [0, 1] then standardised per channel."""
    _, _, mean, std = DATASETS[name]
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _transform(name, flatten=False, image_size=None, channels=None):
    """Batch transform: uint8 NHWC -> normalised float32 (resized, expanded, flat)."""
    import tensorflow as tf

    _, _, mean, std = DATASETS[name]
    if channels is not None and (channels < 1 or channels % len(mean)):
        raise ValueError(
            f"channels={channels!r} must be a multiple of {name}'s {len(mean)} channel(s).")
    if image_size is not None:
        image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)

    def transform(img, lab):
        img = (tf.cast(img, tf.float32) / 255.0 - tf.constant(mean, tf.float32)) / tf.constant(
            std, tf.float32)
        if channels is not None and channels != len(mean):
            img = tf.repeat(img, channels // len(mean), axis=-1)
        if image_size is not None:
            img = tf.image.resize(img, image_size)
        if flatten:
            img = tf.reshape(img, (tf.shape(img)[0], -1))
        return img, lab

    return transform


def input_shape(name, image_size=None, channels=None):
    """Shape of one example after `dataset`'s resize and channel expansion."""
    shape, _, _, _ = DATASETS[name]
    h, w, c = shape
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return (h, w, channels or c)


def epoch_order(n, seed, epoch):
    """The example order of `epoch`: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def epochs_dataset(
    images,
    labels,
    name,
    batch_size,
    epochs,
    initial_epoch=0,
    seed=0,
    flatten=False,
    image_size=None,
    channels=None,
    drop_remainder=False,
):
    """Training batches of epochs `initial_epoch .. epochs-1`, back to back.

    Each epoch's order is `epoch_order(len(images), seed, epoch)`, built
    explicitly, so it does not depend on a `tf.data` iterator's reshuffle state:
    a run resumed at epoch k sees exactly the batches an uninterrupted run sees
    from epoch k on. Pass `steps_per_epoch` (the second return value) to `fit`.

    Returns:
        `(dataset, steps_per_epoch)`.
    """
    import tensorflow as tf

    n = len(images)
    if n == 0:
        raise ValueError(f"No {name} training examples to train on.")
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    if steps == 0:
        raise ValueError(
            f"{n} training examples make no full batch of {batch_size}; lower batch_size.")
    orders = np.stack([epoch_order(n, seed, e) for e in range(initial_epoch, epochs)]) \
        if epochs > initial_epoch else np.zeros((0, n), np.int64)
    x = tf.constant(images)
    y = tf.constant(labels)

    def one_epoch(order):
        idx = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder)
        return idx

    ds = tf.data.Dataset.from_tensor_slices(orders).flat_map(one_epoch)
    ds = ds.map(lambda i: (tf.gather(x, i), tf.gather(y, i)))
    ds = ds.map(_transform(name, flatten, image_size, channels),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE), steps


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
        seed: shuffle seed. `tf.data` combines it with TensorFlow's global seed
            (`keras.utils.set_random_seed`) as the dataset is made, so the order
            repeats when both do; `epochs_dataset` gives orders of `seed` alone.
        flatten: flatten images to vectors (for MLPs).
        image_size: resize to `(h, w)` or `s` x `s` (ImageNet-style backbones).
        channels: repeat grayscale channels up to this count (e.g. 3).
        limit: keep only the first `limit` examples (quick runs and tests).
        drop_remainder: drop the last partial batch (static batch shapes).
    """
    import tensorflow as tf

    images, labels = load(name, split, data_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    transform = _transform(name, flatten, image_size, channels)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle if shuffle is not None else split == "train":
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
