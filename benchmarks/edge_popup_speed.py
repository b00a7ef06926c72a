"""How fast edge-popup's mask can be: full sort, `top_k` + scatter, and `topk_mask`.

Usage:
    python -m benchmarks.edge_popup_speed [--repeats 50] [--threads N]

Prints, for the kernels of LeNet-300-100 and Conv-4 (half width, 28x28 input),
the time of one mask computation at several densities `k` with each method,
and the training-step time (batch 64, LeNet-300-100) of edge-popup with each
mask and of ours (`keras_stg.wrap`, slt), all measured in this process one
after the other (compare the ratios; absolute times depend on the CPU and its
load). Every mask is checked to keep the same weights as the full sort.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

METHODS = ("sort_mask", "topk_scatter_mask", "topk_mask")
DENSITIES = (0.5, 0.1, 0.02, 0.005)
SHAPES = {"LeNet fc1 784x300": (784, 300), "LeNet fc2 300x100": (300, 100), "256x256": (256, 256),
          "Conv-4/2 conv4 3x3x32x64": (3, 3, 32, 64), "Conv-4/2 fc1 3136x256": (3136, 256)}


def _time(fn, repeats):
    fn()  # trace
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats)
    return float(np.median(times))


def mask_times(repeats):
    import tensorflow as tf

    from benchmarks import edge_popup

    rows = []
    rng = np.random.default_rng(0)
    for name, shape in SHAPES.items():
        scores = tf.Variable(rng.standard_normal(shape).astype("float32"))
        for k in DENSITIES:
            row = {"kernel": name, "k": k}
            reference = None
            for method in METHODS:
                f = tf.function(lambda fn=getattr(edge_popup, method): fn(scores.value(), k))
                m = f().numpy()
                if reference is None:
                    reference = m
                elif not np.array_equal(m, reference):
                    raise AssertionError(f"{method} keeps other weights than the sort "
                                         f"({name}, k={k})")
                row[method] = 1e3 * _time(f, repeats)
            rows.append(row)
            print(f"{name:26s} k={k:<6g}" + "".join(
                f" {m} {row[m]:7.3f} ms" for m in METHODS)
                + f"   sort/topk_mask {row['sort_mask'] / row['topk_mask']:.1f}x,"
                  f" top_k/topk_mask {row['topk_scatter_mask'] / row['topk_mask']:.1f}x",
                flush=True)
    return rows


def step_times(steps=100, batch=64):
    import keras

    import keras_stg
    from benchmarks import edge_popup
    from benchmarks.suite.part_cost import _step_time
    from keras_stg.experiments import models

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, batch)
    out = {}
    keras.backend.clear_session()
    gated = keras_stg.wrap(models.lenet_300_100((28, 28, 1)), mode="slt",
                           target_sparsity=0.9, seed=0)
    out["ours"] = 1e3 * _step_time(gated, keras.optimizers.Adam(0.01), x, y, steps, 5)
    print(f"LeNet-300-100 step, batch {batch}: ours {out['ours']:.2f} ms", flush=True)
    for k in (0.5, 0.1):
        for method in METHODS:
            keras.backend.clear_session()
            model = edge_popup.init_like_ours(models.lenet_300_100((28, 28, 1)), 1 - k)
            ep = edge_popup.EdgePopupModel(model, density=k)
            ep.mask_fn = getattr(edge_popup, method)
            t = 1e3 * _step_time(ep, edge_popup.sgd_cosine(0.1, 1000), x, y, steps, 5)
            out[f"{method} k={k}"] = t
            print(f"LeNet-300-100 step, batch {batch}: edge-popup k={k} with {method} "
                  f"{t:.2f} ms ({t / out['ours']:.2f}x ours)", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.edge_popup_speed",
                                description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from keras_stg import latency

    print(f"CPU: {latency.cpu()}, TensorFlow {tf.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    masks = mask_times(args.repeats)
    steps = step_times()
    return masks, steps


if __name__ == "__main__":
    main()
