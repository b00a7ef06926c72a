"""Training-step cost of a gated model against the plain model.

Usage:
    python -m benchmarks.overhead [--steps 50] [--repeats 7] [--only lenet_300_100]

For each network (LeNet-300-100 at batch 128, MobileNetV2 alpha=1 at 32x32 at
batch 64) it times, in one process and on the same batch, a compiled `fit`
step of (a) the plain model with trainable weights, (b) the gated model in
`slt` mode as `wrap` builds it (fused CPU gate kernels, see `keras_stg.fused`)
and (c) the same gated model on the pure-TensorFlow gate path (`fused=False`),
alternating the three. Prints the median step time of each and the ratio to
the plain step: the median over rounds of (gated time / plain time) of the
same round, so that a slow spell of this shared machine lands on both sides
of a ratio. The target is a ratio <= 1.15 for (b).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_stg  # noqa: E402
from keras_stg.experiments import models  # noqa: E402


def _prepare(model, x, y, steps):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=len(x), epochs=2, verbose=0)  # trace and warm up
    return np.concatenate([x] * steps), np.concatenate([y] * steps)


def _time_epoch(model, xs, ys, batch, steps):
    start = time.perf_counter()
    model.fit(xs, ys, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    return (time.perf_counter() - start) / steps


def measure(name, build, batch, steps, repeats):
    """Median step times of the plain and the gated model, timed alternately.

    Alternating the two (plain, gated, plain, gated, ...) keeps slow drifts of
    the machine's load from landing on one side of the ratio.
    """
    rng = np.random.default_rng(0)
    plain = build()
    x = rng.standard_normal((batch,) + tuple(plain.input_shape[1:])).astype("float32")
    y = rng.integers(0, 10, batch)
    gated = keras_stg.wrap(build(), mode="slt", target_sparsity=0.9, seed=0)
    gated_tf = keras_stg.wrap(build(), mode="slt", target_sparsity=0.9, seed=0, fused=False)
    xs, ys = _prepare(plain, x, y, steps)
    _prepare(gated, x, y, steps)
    _prepare(gated_tf, x, y, steps)
    times = {"plain": [], "gated": [], "gated_tf": []}
    for _ in range(repeats):
        for key, model in (("plain", plain), ("gated", gated), ("gated_tf", gated_tf)):
            times[key].append(_time_epoch(model, xs, ys, batch, steps))
    t = {k: float(np.median(v)) for k, v in times.items()}
    plain_times = np.array(times["plain"])
    return {"model": name, "batch": batch, "plain_ms": 1e3 * t["plain"],
            "gated_ms": 1e3 * t["gated"],
            "ratio": float(np.median(np.array(times["gated"]) / plain_times)),
            "gated_tf_ms": 1e3 * t["gated_tf"],
            "ratio_tf": float(np.median(np.array(times["gated_tf"]) / plain_times)),
            "fused": gated._fused_lib() is not None}


NETWORKS = {
    "lenet_300_100": (lambda: models.lenet_300_100(), 128),
    "mobilenet_v2_32px": (
        lambda: keras.applications.MobileNetV2(
            weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None
        ),
        64,
    ),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=sorted(NETWORKS), action="append",
                        help="time only this network (repeatable)")
    args = parser.parse_args(argv)
    rows = []
    for name, (build, batch) in NETWORKS.items():
        if args.only and name not in args.only:
            continue
        keras.backend.clear_session()
        rows.append(measure(name, build, batch, args.steps, args.repeats))
        r = rows[-1]
        print(f"{r['model']:<20} batch {r['batch']:>3}  plain {r['plain_ms']:7.2f} ms  "
              f"gated {r['gated_ms']:7.2f} ms  ratio {r['ratio']:.3f}"
              f"{'' if r['fused'] else ' (fused kernels unavailable)'}  |  "
              f"TF-op gates {r['gated_tf_ms']:7.2f} ms  ratio {r['ratio_tf']:.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
