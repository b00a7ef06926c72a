"""Find a strong lottery ticket from a YAML config.

Usage:
    python -m keras_stg.train CONFIG.yaml [--set key=value ...] [--data-dir D] [--out DIR]

Writes to --out: `gated.keras` (the gated model), `stripped.keras` (the plain
pruned model), `metrics.json` (accuracy, sparsity overall and per layer,
fractional gates, lambda trajectory, wall time, config, versions),
`history.png` (accuracy and sparsity per epoch), `layers.png` (sparsity per
layer), `tensorboard/` (TensorBoard logs), `checkpoint.npz` (the full training
state after the last completed epoch) and, in `post_training` mode with
`pretrain_epochs`, `pretrained.keras` (the dense model before gating). Every
file is written atomically.

Resuming: when `--out` holds a `checkpoint.npz` of the same config, training
continues after its last completed epoch (after Ctrl-C or a kill, start the
same command again). The checkpoint holds every variable of the gated model
(gate locations, weights, BatchNormalization statistics, `lam`, `total_steps`,
the gates' noise seed-generator states) and of the optimizer; every epoch's
example order depends only on (seed, epoch), so a resumed run ends with the
same masks as an uninterrupted one.

Distribution: `--strategy mirrored` (all local devices) or `multi_worker`
(`tf.distribute.MultiWorkerMirroredStrategy`, cluster from `TF_CONFIG`; every
worker runs the same command, only the chief writes to `--out`, and a resumed
multi-worker run reads the checkpoint from `--out`, so it must be on a shared
file system).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_stg import _compat  # noqa: E402
from keras_stg._files import atomic_write  # noqa: E402


_atomic_write = atomic_write


STRATEGIES = ("default", "mirrored", "multi_worker")
CHECKPOINT = "checkpoint.npz"


def build_model(cfg):
    """The dense model of `cfg`, built for the dataset's (resized) input."""
    from keras_stg.experiments import data, models

    shape = data.input_shape(cfg.dataset, cfg.image_size, cfg.channels)
    classes = data.DATASETS[cfg.dataset][1]
    return models.build(cfg.model, shape, classes, **cfg.model_args)


def make_gated(cfg, model):
    """`model` wrapped and compiled as `cfg` says (call it in the strategy's scope)."""
    import keras

    import keras_stg

    gated = keras_stg.wrap(model, cfg.gate_config())
    gated.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    gated.optimizer.build(gated.trainable_variables)
    return gated


def _plot(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(history.get("loss", [])) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, history.get("accuracy", []), label="train accuracy", marker=".")
    if "val_accuracy" in history:
        ax.plot(epochs, history["val_accuracy"], label="test accuracy", marker=".")
    ax.plot(epochs, history.get("sparsity", []), label="sparsity", linestyle="--", marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _plot_layers(layers, title, path):
    """The "sparsification per layer" figure: one bar per gated kernel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in layers]
    sparsity = [100 * r["sparsity"] for r in layers]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.35 * len(names) + 1.5), 4.0))
    bars = ax.bar(range(len(names)), sparsity, color="tab:blue")
    if len(names) <= 20:
        for bar, r in zip(bars, layers):
            ax.annotate(f"{r['params']:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, rotation=90 if len(names) > 6 else 0)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90 if len(names) > 6 else 0, fontsize=7)
    ax.set_ylabel("weights removed (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def make_strategy(name):
    """The `tf.distribute` strategy `name` (create it before any other TF op)."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError(
                "--strategy multi_worker needs the TF_CONFIG environment variable "
                '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                '"task": {"type": "worker", "index": 0}}).')
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy {name!r}. Use one of {', '.join(STRATEGIES)}.")


def is_chief(strategy):
    """True unless this process is a non-chief worker of a multi-worker cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def _state_variables(gated):
    """Every variable a resumed run needs, in a fixed order (no metric state)."""
    metric_ids = {id(v) for m in gated.metrics for v in m.variables}
    model_vars = [v for v in gated.variables if id(v) not in metric_ids]
    return model_vars + list(gated.optimizer.variables)


def _save_checkpoint(path, gated, meta):
    import numpy as np

    arrays = {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(_state_variables(gated))}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _atomic_write(path, write)


def _read_checkpoint(path):
    import numpy as np

    try:
        with np.load(path) as f:
            meta = json.loads(bytes(f["meta"]).decode())
            values = [f[f"v{i}"] for i in range(len(f.files) - 1)]
    except Exception as e:
        raise ValueError(
            f"Cannot read checkpoint {path} ({e}); delete it to start afresh.") from e
    return meta, values


def _restore(gated, values, path):
    variables = _state_variables(gated)
    if len(variables) != len(values) or any(
        tuple(v.shape) != tuple(x.shape) for v, x in zip(variables, values)
    ):
        raise ValueError(
            f"Checkpoint {path} does not fit this model ({len(values)} saved variables, "
            f"{len(variables)} now); delete it or use another --out.")
    for v, x in zip(variables, values):
        v.assign(x)


def _config_diff(saved, current):
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return f"{key!r}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
    return None


class _Recorder:
    """Epoch history, lambda trajectory and checkpoints (a Keras callback)."""

    def __new__(cls, *args, **kwargs):
        import keras

        class Recorder(keras.callbacks.Callback):
            def __init__(self, gated, meta, checkpoint, steps_per_epoch, every):
                super().__init__()
                self.gated = gated
                self.meta = meta
                self.checkpoint = checkpoint
                self.steps_per_epoch = steps_per_epoch
                self.every = every
                self.epoch = 0
                self.session_start = time.time()

            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if (batch + 1) % self.every == 0 and logs and "lam" in logs:
                    step = self.epoch * self.steps_per_epoch + batch + 1
                    self.meta["lam_steps"].append(step)
                    self.meta["lam_values"].append(float(logs["lam"]))

            def on_epoch_end(self, epoch, logs=None):
                for key, value in (logs or {}).items():
                    self.meta["history"].setdefault(key, []).append(float(value))
                self.meta["epochs_completed"] = epoch + 1
                now = time.time()
                self.meta["wall_time_s"] += now - self.session_start
                self.session_start = now
                if self.checkpoint:
                    _save_checkpoint(self.checkpoint, self.gated, self.meta)

        return Recorder(*args, **kwargs)


def _pretrain(model, cfg, train_images, train_labels, test, strategy, verbose):
    """Plain dense training of `model` before it is gated (post_training mode)."""
    import keras

    from keras_stg.experiments import data

    ds, steps = data.epochs_dataset(
        train_images, train_labels, cfg.dataset, cfg.batch_size, cfg.pretrain_epochs,
        seed=cfg.seed + 1_000_003, image_size=cfg.image_size, channels=cfg.channels,
        drop_remainder=strategy.num_replicas_in_sync > 1)
    with strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(cfg.pretrain_learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    print(f"Pre-training the dense model for {cfg.pretrain_epochs} epoch(s)", flush=True)
    start = time.time()
    history = model.fit(ds, epochs=cfg.pretrain_epochs, steps_per_epoch=steps,
                        verbose=verbose, shuffle=False)
    result = model.evaluate(test, verbose=0, return_dict=True)
    return {
        "epochs": cfg.pretrain_epochs,
        "test_accuracy": float(result["accuracy"]),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "wall_time_s": time.time() - start,
    }


def _prebuild(gated, dataset):
    """Builds metrics and losses from a local batch, for MultiWorkerMirroredStrategy.

    Keras 3.15's `fit`/`evaluate` under a distribution strategy first take one
    distributed batch and `strategy.reduce("MEAN", ...)` it to build the model
    symbolically; with MultiWorkerMirroredStrategy that reduce fails ("Attempt
    to convert a value (PerReplica...) to a Tensor"). Building once from a
    plain local batch and skipping that step avoids it (the step only builds
    what is unbuilt, so nothing else changes).
    """
    x, y = next(iter(dataset.take(1)))
    _compat.skip_symbolic_build(gated, (x[:1], y[:1], None))
    _compat.patch_multi_worker_reduce()


def run(cfg, data_dir=None, out=None, strategy="default", verbose=None):
    """Trains (or resumes) the gated model of `cfg`; returns the metrics dict.

    Args:
        cfg: a `keras_stg.experiments.config.Config`.
        data_dir: folder with the raw dataset files (see `keras_stg.experiments.data`).
        out: output folder; with a checkpoint of the same config in it, the
            run resumes after its last completed epoch.
        strategy: `"default"`, `"mirrored"`, `"multi_worker"` or a
            `tf.distribute.Strategy`.
        verbose: Keras progress mode (default: bar on a terminal, else one
            line per epoch).
    """
    strategy_name = strategy if isinstance(strategy, str) else type(strategy).__name__
    strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy
    import keras
    import tensorflow as tf

    import keras_stg
    from keras_stg.experiments import data

    chief = is_chief(strategy)
    if verbose is None:
        verbose = (1 if sys.stdout.isatty() else 2) if chief else 0
    replicas = strategy.num_replicas_in_sync
    config_dict = dataclasses.asdict(cfg)

    checkpoint = os.path.join(out, CHECKPOINT) if out else None
    meta, values = None, None
    if checkpoint and os.path.exists(checkpoint):
        meta, values = _read_checkpoint(checkpoint)
        diff = _config_diff(meta["config"], config_dict)
        if diff:
            raise ValueError(
                f"{out} holds a checkpoint of a different config ({diff}). Use another "
                f"--out, or delete {checkpoint} to start afresh.")
    if out and chief:
        os.makedirs(out, exist_ok=True)

    keras.utils.set_random_seed(cfg.seed)
    train_images, train_labels = data.load(cfg.dataset, "train", data_dir)
    if cfg.limit is not None:
        train_images, train_labels = train_images[: cfg.limit], train_labels[: cfg.limit]
    test = data.dataset(cfg.dataset, "test", cfg.eval_batch_size, data_dir,
                        image_size=cfg.image_size, channels=cfg.channels, limit=cfg.test_limit)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    test = test.with_options(options)

    pretrain = None if meta is None else meta.get("pretrain")
    with strategy.scope():
        if cfg.pretrained:
            if not os.path.isfile(cfg.pretrained):
                raise ValueError(f"Config key 'pretrained': no file {cfg.pretrained!r}.")
            model = keras.models.load_model(cfg.pretrained, compile=False)
            expected = data.input_shape(cfg.dataset, cfg.image_size, cfg.channels)
            if tuple(model.input_shape[1:]) != tuple(expected):
                raise ValueError(
                    f"Pretrained model {cfg.pretrained} takes inputs {model.input_shape[1:]}, "
                    f"but {cfg.dataset} gives {expected}.")
        else:
            model = build_model(cfg)
    if cfg.pretrain_epochs and meta is None:
        pretrain = _pretrain(model, cfg, train_images, train_labels, test, strategy, verbose)
        print(f"dense model: test accuracy {pretrain['test_accuracy']:.4f}", flush=True)
        if out and chief:
            _atomic_write(os.path.join(out, "pretrained.keras"), model.save)

    start_epoch = 0 if meta is None else int(meta["epochs_completed"])
    train, steps = data.epochs_dataset(
        train_images, train_labels, cfg.dataset, cfg.batch_size, cfg.epochs,
        initial_epoch=start_epoch, seed=cfg.seed, image_size=cfg.image_size,
        channels=cfg.channels, drop_remainder=replicas > 1)
    with strategy.scope():
        gated = make_gated(cfg, model)
    if meta is None:
        meta = {"config": config_dict, "epochs_completed": 0, "history": {},
                "lam_steps": [], "lam_values": [], "wall_time_s": 0.0, "resumed_at": [],
                "pretrain": pretrain}
    else:
        _restore(gated, values, checkpoint)
        meta["resumed_at"].append(start_epoch)
        print(f"Resuming from {checkpoint}: {start_epoch} of {cfg.epochs} epochs done.",
              flush=True)

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        _prebuild(gated, test)

    recorder = _Recorder(gated, meta, checkpoint if chief else None, steps,
                         every=max(1, steps // 20))
    callbacks = [recorder]
    if out and chief:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            print("note: TensorBoard is not installed, so no logs are written to "
                  f"{os.path.join(out, 'tensorboard')} (pip install tensorboard).", flush=True)
        else:
            callbacks.append(keras.callbacks.TensorBoard(
                os.path.join(out, "tensorboard"), write_graph=False, update_freq="epoch"))
    if start_epoch < cfg.epochs:
        if chief:
            print(f"Training {cfg.name}: {cfg.model} on {cfg.dataset}, mode={cfg.mode}, "
                  f"granularity={cfg.granularity}, {steps} steps/epoch, "
                  f"{replicas} replica(s)", flush=True)
        gated.fit(train, validation_data=test, epochs=cfg.epochs, initial_epoch=start_epoch,
                  steps_per_epoch=steps, callbacks=callbacks, verbose=verbose,
                  shuffle=False)
    result = gated.evaluate(test, verbose=0, return_dict=True)
    layers = keras_stg.layer_stats(gated)
    n_gates = sum(r["gates"] for r in layers)
    metrics = {
        "test_accuracy": float(result["accuracy"]),
        "test_loss": float(result["loss"]),
        "sparsity": gated.sparsity(),
        "fractional_gates": sum(r["fractional"] * r["gates"] for r in layers) / max(1, n_gates),
        "layers": layers,
        "lambda": {"final": float(gated.lam.numpy()),
                   "per_epoch": meta["history"].get("lam", []),
                   "steps": meta["lam_steps"], "values": meta["lam_values"]},
        "history": meta["history"],
        "epochs_completed": meta["epochs_completed"],
        "resumed_at": meta["resumed_at"],
        "wall_time_s": meta["wall_time_s"],
        "pretrain": meta.get("pretrain"),
        "strategy": strategy_name,
        "replicas": replicas,
        "config": config_dict,
        "versions": {"keras_stg": keras_stg.__version__, "keras": keras.__version__,
                     "tensorflow": tf.__version__, "python": sys.version.split()[0]},
    }
    if chief:
        print(keras_stg.summary(gated))
    if out and chief:
        _atomic_write(os.path.join(out, "gated.keras"), gated.save)
        _atomic_write(os.path.join(out, "stripped.keras"), gated.strip().save)
        _atomic_write(os.path.join(out, "metrics.json"),
                      lambda tmp: open(tmp, "w").write(json.dumps(metrics, indent=2)))
        _plot(metrics["history"], os.path.join(out, "history.png"))
        _plot_layers(layers, f"{cfg.name}\n{metrics['sparsity']:.1%} sparse, "
                             f"test accuracy {metrics['test_accuracy']:.2%}",
                     os.path.join(out, "layers.png"))
        print(f"Wrote gated.keras, stripped.keras, metrics.json, history.png, layers.png, "
              f"tensorboard/ and {CHECKPOINT} to {out}")
    if chief:
        print(f"test accuracy {metrics['test_accuracy']:.4f} at sparsity "
              f"{metrics['sparsity']:.4f} ({metrics['wall_time_s']:.0f} s)", flush=True)
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
    parser.add_argument("--out", default=None,
                        help="output folder; a checkpoint in it is resumed")
    parser.add_argument("--strategy", default="default", choices=STRATEGIES,
                        help="tf.distribute strategy (multi_worker reads TF_CONFIG)")
    args = parser.parse_args(argv)
    from keras_stg.experiments import config as config_lib
    from keras_stg.experiments.data import DataError

    try:
        if not os.path.isfile(args.config):
            raise ValueError(f"Config file {args.config!r} does not exist; see configs/.")
        cfg = config_lib.load(args.config, args.set)
        run(cfg, args.data_dir, args.out, strategy=args.strategy)
    except (ValueError, DataError) as e:
        parser.exit(2, f"error: {e}\n")
    except KeyboardInterrupt:
        where = f" with --out {args.out}" if args.out else " (no --out: nothing was saved)"
        parser.exit(130, f"\ninterrupted; run the same command again{where} to resume "
                         "from the last completed epoch.\n")


if __name__ == "__main__":
    main()
