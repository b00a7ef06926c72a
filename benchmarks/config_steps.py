"""Time the training step of each experiment config: a smoke run and a per-epoch estimate.

Usage:
    python -m benchmarks.config_steps [CONFIG ...] [--data-dir D] [--steps 3]
        [--batch-size B] [--synthetic] [--json FILE]

For each config in `configs/` (default: all), builds the model and the gated
model exactly as `python -m keras_stg.train` does (`keras_stg.experiments.train.make_gated`),
then runs `fit` for one traced step plus `--steps` timed steps on the config's
dataset and prints: the first step (tracing and graph building included), the
median of the timed steps, and the estimated time of one full training epoch
(`median * ceil(train examples / batch)`). `post_training` configs are timed on
the gate phase only (the dense pre-training is plain Keras training).

With `--synthetic`, a dataset whose files are absent (CIFAR-10 is not on the
project machine) is replaced by random images of the right shape and label
range: the step time does not depend on the pixels, but the rows say so.
`--batch-size` overrides every config's batch (say so when you quote it: the
ViT-B/16 and Swin-T configs' batch of 128 at 224 px needs more memory than a
small machine has).
"""

import argparse
import glob
import json
import math
import os
import statistics
import time

from benchmarks import run

# Examples in the training split of each dataset, for the per-epoch estimate.
TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000}


def _data(cfg, n, data_dir, synthetic):
    """`(images, labels, source)`: the first `n` training examples, or random ones."""
    import numpy as np

    from keras_stg.experiments import data

    try:
        images, labels = data.load(cfg.dataset, "train", data_dir)
        return images[:n], labels[:n], "real"
    except data.DataError as e:
        if not synthetic:
            raise SystemExit(
                f"{cfg.name}: {str(e).splitlines()[0]}\n"
                "Pass --data-dir with the dataset's files, or --synthetic to time the "
                "step on random images of the same shape.") from None
    shape, classes, _, _ = data.DATASETS[cfg.dataset]
    rng = np.random.default_rng(cfg.seed)
    images = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    labels = rng.integers(0, classes, n).astype(np.int64)
    return images, labels, "synthetic"


def time_config(path, data_dir=None, steps=3, batch_size=None, synthetic=False):
    """Trains one config for `1 + steps` steps; returns its timing row (a dict)."""
    import keras

    from keras_stg.experiments import config, data, train

    overrides = [f"batch_size={batch_size}"] if batch_size else []
    cfg = config.load(path, overrides)
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    n = cfg.batch_size * (steps + 1)
    images, labels, source = _data(cfg, n, data_dir, synthetic)
    ds, _ = data.epochs_dataset(images, labels, cfg.dataset, cfg.batch_size, 1,
                                seed=cfg.seed, image_size=cfg.image_size,
                                channels=cfg.channels)
    build_start = time.perf_counter()
    gated = train.make_gated(cfg, train.build_model(cfg))
    build = time.perf_counter() - build_start
    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    gated.fit(ds, epochs=1, steps_per_epoch=steps + 1, callbacks=[Timer()], verbose=0)
    step = statistics.median(times[1:])
    epoch_steps = math.ceil(TRAIN_SIZES[cfg.dataset] / cfg.batch_size)
    params = sum(math.prod(t.variable.shape) for t in gated.targets)
    return {
        "config": os.path.splitext(os.path.basename(path))[0],
        "model": cfg.model, "dataset": cfg.dataset, "data": source,
        "image_size": cfg.image_size or data.DATASETS[cfg.dataset][0][0],
        "batch_size": cfg.batch_size, "gated_weights": params,
        "build_s": build, "first_step_s": times[0], "step_s": step,
        "timed_steps": len(times) - 1, "epoch_steps": epoch_steps,
        "epoch_estimate_s": step * epoch_steps, "epochs": cfg.epochs,
        "run_estimate_h": step * epoch_steps * cfg.epochs / 3600,
    }


def _fmt_time(s):
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.config_steps",
                                description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="*",
                   help="YAML files (default: every file in configs/)")
    p.add_argument("--data-dir", default=run._default_data_dir(),
                   help="raw dataset files (default $KERAS_STG_DATA or ../shared/data)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    p.add_argument("--batch-size", type=int, default=None, help="override every batch size")
    p.add_argument("--synthetic", action="store_true",
                   help="random images for a dataset whose files are absent")
    p.add_argument("--json", default=None, help="append one JSON line per config here")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    paths = args.configs or sorted(glob.glob(os.path.join(run.REPO, "configs", "*.yaml")))
    for path in paths:
        if not os.path.isfile(path):
            p.error(f"no config file {path!r}")
    rows = []
    for path in paths:
        print(f"timing {path} ...", flush=True)
        row = time_config(path, args.data_dir, args.steps, args.batch_size, args.synthetic)
        rows.append(row)
        print(f"  {row['config']}: first step {row['first_step_s']:.1f} s, step "
              f"{row['step_s'] * 1000:.0f} ms (batch {row['batch_size']}, {row['data']} data), "
              f"epoch ~{_fmt_time(row['epoch_estimate_s'])}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    print()
    print("| config | data | batch | gated weights | first step | step | epoch (est.) "
          "| config's epochs (est.) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['config']}` | {r['data']} | {r['batch_size']} | {r['gated_weights']:,} "
              f"| {r['first_step_s']:.1f} s | {r['step_s'] * 1000:.0f} ms "
              f"| {_fmt_time(r['epoch_estimate_s'])} "
              f"| {r['epochs']}: {_fmt_time(r['run_estimate_h'] * 3600)} |")
    return rows


if __name__ == "__main__":
    main()
