"""Magnitude pruning with tensorflow-model-optimization, in a process of its own.

Usage:
    python -m benchmarks.tfmot_job --json-out RESULT.json --model lenet_300_100 \
        --dataset mnist --sparsities 0.9 0.95 [--epochs 20] [--data-dir D] \
        [--limit N] [--test-limit N] [--init-weights KERNELS.npz]

tfmot only works with Keras 2 (`tf_keras`) and sets `TF_USE_LEGACY_KERAS=1` on
import, so `benchmarks.run` never imports it: it starts this module as a
subprocess and reads the JSON it writes. For each sparsity, the network (the
same architecture as `keras_stg.experiments.models`, rebuilt in tf_keras, no bias) is
wrapped with `prune_low_magnitude` and trained (weights and masks) from scratch
with Adam, the sparsity following a `PolynomialDecay` schedule from 0 to the
target over the first half of training (as our `target_ramp=0.5`), pruning
every `frequency` steps (small for short runs: tfmot's default 100 would do
nothing on a quick run). After `strip_pruning` it reports the test accuracy and
the measured share of zero kernel weights.

With `--init-weights` (an `.npz` of kernels keyed by layer name, written by
`benchmarks.run` from the Keras 3 model) both methods start from the very
same weights.

The JSON has `{"ok": true, "versions": {...}, "results": [{"sparsity_target",
"sparsity", "accuracy", "wall_time_s", "epochs"}, ...]}`, or `{"ok": false,
"reason": "..."}` when tfmot cannot run here.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _write_json(path, obj):
    from keras_stg import _files

    _files.atomic_write_text(path, json.dumps(obj, indent=2))


def build(tfk, model, input_shape, classes):
    """LeNet-300-100 / Conv-4 / Conv-6 in tf_keras, layer names as in `keras_stg.experiments.models`."""
    L = tfk.layers
    inputs = tfk.Input(input_shape)
    if model == "lenet_300_100":
        x = L.Flatten()(inputs)
        x = L.Dense(300, activation="relu", use_bias=False, name="fc1")(x)
        x = L.Dense(100, activation="relu", use_bias=False, name="fc2")(x)
        outputs = L.Dense(classes, use_bias=False, name="fc3")(x)
        return tfk.Model(inputs, outputs, name=model)
    widths = {"conv4": (64, 64, 128, 128), "conv6": (64, 64, 128, 128, 256, 256)}[model]
    x = inputs
    for i, width in enumerate(widths):
        x = L.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = L.ReLU()(x)
        if i % 2 == 1:
            x = L.MaxPooling2D(2)(x)
    x = L.Flatten()(x)
    x = L.Dense(256, activation="relu", use_bias=False, name="fc1")(x)
    x = L.Dense(256, activation="relu", use_bias=False, name="fc2")(x)
    outputs = L.Dense(classes, use_bias=False, name="fc3")(x)
    return tfk.Model(inputs, outputs, name=model)


def run_one(tfmot, tfk, args, sparsity, train, test, input_shape, classes, init):
    import numpy as np

    model = build(tfk, args.model, input_shape, classes)
    if init is not None:
        for layer in model.layers:
            if layer.name in init:
                layer.kernel.assign(init[layer.name])
    steps_per_epoch = int(np.ceil(train[0].shape[0] / args.batch_size))
    total = steps_per_epoch * args.epochs
    end_step = max(1, int(total * args.ramp))
    frequency = max(1, min(100, end_step // 20))
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=sparsity, begin_step=0,
        end_step=end_step, frequency=frequency,
    )
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile(
        optimizer=tfk.optimizers.Adam(args.learning_rate),
        loss=tfk.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.time()
    pruned.fit(
        train[0], train[1], batch_size=args.batch_size, epochs=args.epochs,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
        verbose=2 if args.verbose else 0, shuffle=True,
    )
    wall = time.time() - start
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    stripped.compile(
        loss=tfk.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    _, acc = stripped.evaluate(test[0], test[1], batch_size=1000, verbose=0)
    kernels = [layer.kernel.numpy() for layer in stripped.layers if hasattr(layer, "kernel")]
    zeros = sum(int((k == 0).sum()) for k in kernels)
    total_w = sum(k.size for k in kernels)
    return {
        "sparsity_target": sparsity,
        "sparsity": zeros / total_w,
        "accuracy": float(acc),
        "wall_time_s": wall,
        "epochs": args.epochs,
        "frequency": frequency,
        "end_step": end_step,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json-out", required=True)
    parser.add_argument("--model", default="lenet_300_100")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--ramp", type=float, default=0.5,
                        help="share of training over which sparsity rises to the target")
    parser.add_argument("--data-dir", default=os.environ.get("KERAS_STG_DATA"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--init-weights", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    try:
        import tensorflow_model_optimization as tfmot
        import tf_keras as tfk
    except Exception as e:  # ImportError, or a version mismatch raising at import
        _write_json(args.json_out, {
            "ok": False,
            "reason": f"tensorflow-model-optimization / tf_keras not importable "
                      f"({type(e).__name__}: {e}); install the 'bench' extras",
        })
        return 0

    import numpy as np
    import tensorflow as tf

    from keras_stg.experiments import data  # NumPy loaders (Keras 3 beside tf_keras is harmless)

    tfk.utils.set_random_seed(args.seed)
    shape, classes, _, _ = data.DATASETS[args.dataset]
    x, y = data.load(args.dataset, "train", args.data_dir)
    xt, yt = data.load(args.dataset, "test", args.data_dir)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    if args.test_limit:
        xt, yt = xt[: args.test_limit], yt[: args.test_limit]
    train = (data.normalize(x, args.dataset), y)
    test = (data.normalize(xt, args.dataset), yt)
    init = dict(np.load(args.init_weights)) if args.init_weights else None
    results = []
    for sparsity in args.sparsities:
        tfk.backend.clear_session()
        r = run_one(tfmot, tfk, args, sparsity, train, test, shape, classes, init)
        print(f"tfmot {args.model} target {sparsity:.2f}: accuracy {r['accuracy']:.4f} "
              f"sparsity {r['sparsity']:.4f} ({r['wall_time_s']:.0f} s)", flush=True)
        results.append(r)
    _write_json(args.json_out, {
        "ok": True,
        "versions": {"tensorflow_model_optimization": tfmot.__version__,
                     "tf_keras": tfk.__version__, "tensorflow": tf.__version__,
                     "python": sys.version.split()[0]},
        "model": args.model, "dataset": args.dataset,
        "optimizer": f"Adam({args.learning_rate})", "batch_size": args.batch_size,
        "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
