"""Find a strong lottery ticket from a YAML config.

Usage:
    python -m keras_stg.train CONFIG.yaml [--set key=value ...] [--data-dir D] [--out DIR]

Writes to --out: `gated.keras` (the gated model), `stripped.keras` (the plain
pruned model), `metrics.json` (accuracy, sparsity overall and per layer,
fractional gates, lambda per epoch, wall time, config, versions) and
`history.png` (accuracy and sparsity per epoch). Every file is written
atomically.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _atomic_write(path, write):
    """Writes through `write(tmp_path)` then renames: no half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_model(cfg):
    from keras_stg import data, models

    shape, classes, _, _ = data.DATASETS[cfg.dataset]
    if cfg.model == "lenet_300_100":
        return models.lenet_300_100(input_shape=shape, classes=classes)
    if cfg.model in ("conv4", "conv6"):
        return getattr(models, cfg.model)(input_shape=shape, classes=classes)
    raise ValueError(f"Unknown model {cfg.model!r}. Use lenet_300_100, conv4 or conv6.")


def _plot(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(history["loss"]) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, history["accuracy"], label="train accuracy")
    if "val_accuracy" in history:
        ax.plot(epochs, history["val_accuracy"], label="test accuracy")
    ax.plot(epochs, history["sparsity"], label="sparsity", linestyle="--")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def run(cfg, data_dir=None, out=None):
    """Trains the gated model of `cfg`; returns the metrics dict."""
    import keras
    import tensorflow as tf

    import keras_stg
    from keras_stg import data

    keras.utils.set_random_seed(cfg.seed)
    # Models take images (LeNet flattens them itself).
    train = data.dataset(cfg.dataset, "train", cfg.batch_size, data_dir,
                         seed=cfg.seed, limit=cfg.limit)
    test = data.dataset(cfg.dataset, "test", 1000, data_dir)
    model = build_model(cfg)
    gated = keras_stg.wrap(
        model, mode=cfg.mode, granularity=cfg.granularity, lam=cfg.lam,
        target_sparsity=cfg.target_sparsity, sigma=cfg.sigma,
        init=cfg.init if cfg.mode == "slt" else None, seed=cfg.seed,
    )
    gated.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.time()
    history = gated.fit(train, validation_data=test, epochs=cfg.epochs, verbose=2)
    wall = time.time() - start
    result = gated.evaluate(test, verbose=0, return_dict=True)
    print(keras_stg.summary(gated))
    metrics = {
        "test_accuracy": float(result["accuracy"]),
        "sparsity": gated.sparsity(),
        "layers": keras_stg.layer_stats(gated),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "wall_time_s": wall,
        "config": dataclasses.asdict(cfg),
        "versions": {"keras_stg": keras_stg.__version__, "keras": keras.__version__,
                     "tensorflow": tf.__version__, "python": sys.version.split()[0]},
    }
    if out:
        os.makedirs(out, exist_ok=True)
        _atomic_write(os.path.join(out, "gated.keras"), gated.save)
        _atomic_write(os.path.join(out, "stripped.keras"), gated.strip().save)
        _atomic_write(os.path.join(out, "metrics.json"),
                      lambda tmp: open(tmp, "w").write(json.dumps(metrics, indent=2)))
        _plot(metrics["history"], os.path.join(out, "history.png"))
        print(f"Wrote gated.keras, stripped.keras, metrics.json, history.png to {out}")
    print(f"test accuracy {metrics['test_accuracy']:.4f} at sparsity "
          f"{metrics['sparsity']:.4f} ({wall:.0f} s)")
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_stg.train", description="Find a strong lottery ticket."
    )
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the raw dataset files (default $KERAS_STG_DATA, "
                             "else tensorflow-datasets)")
    parser.add_argument("--out", default=None, help="output folder")
    args = parser.parse_args(argv)
    from keras_stg import config as config_lib
    from keras_stg.data import DataError

    try:
        if not os.path.isfile(args.config):
            raise ValueError(f"Config file {args.config!r} does not exist; see configs/.")
        cfg = config_lib.load(args.config, args.set)
        run(cfg, args.data_dir, args.out)
    except (ValueError, DataError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
