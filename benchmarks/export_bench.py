"""Acceptance figures of the edge export (issue 4).

Usage:
    python -m benchmarks.export_bench [--data-dir ../shared/data] [--run DIR] [--epochs 15]
        [--runs 300] [--out DIR]

(a) Size: a LeNet-300-100 ticket (slt, weight gates, 90% target) exported
    `--sparse` against its dense float TFLite file (target <= 0.15x). The
    ticket is trained briefly on MNIST with keras_stg, or read from `--run`
    (a `keras_stg.train --out` folder).
(b) Latency: a unit-gated Conv-4 (28x28x1) with half of every hidden layer's
    units removed, `--shrink` against the dense model: median batch-1 latency
    in the LiteRT interpreter, 1 thread, measured interleaved (target <= 0.55x).
(c) int8: the LeNet ticket quantized with MNIST calibration; top-1 agreement
    with the Keras model and accuracy drop on the 10,000 MNIST test images
    (targets >= 99% and <= 0.5 points).
(d) `--edgetpu` readiness for LeNet, Conv-4 and MobileNetV2 (alpha 0.35,
    32x32x3, MNIST calibration resized).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _ticket(args, workdir):
    from keras_stg.experiments import config, train

    if args.run:
        return args.run
    here = os.path.dirname(os.path.abspath(__file__))
    base = os.path.join(here, "..", "configs", "lenet_300_100_mnist_slt.yaml")
    cfg = config.load(base, [f"epochs={args.epochs}", "target_sparsity=0.9"])
    out = os.path.join(workdir, "lenet_ticket")
    train.run(cfg, args.data_dir, out)
    return out


def _interleaved_latency(runners, rounds, runs_per_round=20):
    """Median latency of each runner, measured in alternating blocks (fair under load)."""
    import numpy as np

    samples = [[] for _ in runners]
    inputs = [np.zeros(r.input["shape"], r.input["dtype"]) for r in runners]
    for r, x in zip(runners, inputs):
        for _ in range(10):
            r.interpreter.set_tensor(r.input["index"], x)
            r.interpreter.invoke()
    for _ in range(rounds):
        for k, (r, x) in enumerate(zip(runners, inputs)):
            interp, index = r.interpreter, r.input["index"]
            for _ in range(runs_per_round):
                start = time.perf_counter()
                interp.set_tensor(index, x)
                interp.invoke()
                samples[k].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(s) for s in samples]


def size_figure(run_dir, data_dir, workdir):
    from export import tflite

    report = tflite.export(run_dir, os.path.join(workdir, "lenet_sparse.tflite"), sparse=True,
                           samples="mnist", data_dir=data_dir, latency_runs=0, verbose=False)
    s = report["size"]
    print(f"(a) LeNet-300-100 ticket, sparsity {report['weights']['sparsity']:.4f}: --sparse "
          f"{s['bytes']:,} B vs dense float {s['dense_float_bytes']:,} B -> ratio "
          f"{s['ratio_vs_dense_float']:.4f} (target <= 0.15); gzip {s['gzip_bytes']:,} B vs "
          f"{s['dense_float_gzip_bytes']:,} B; parity max abs diff "
          f"{report['parity']['max_abs_diff']:.2e}")
    return s["ratio_vs_dense_float"]


def latency_figure(rounds):
    import keras
    import numpy as np

    import keras_stg
    from export import tflite
    from keras_stg.shrinking import shrink
    from keras_stg.experiments import models

    keras.utils.set_random_seed(0)
    gated = keras_stg.wrap(models.conv4(input_shape=(28, 28, 1)), granularity="unit", seed=0)
    rng = np.random.default_rng(0)
    for gate, target in zip(gated.gates, gated.targets):
        mu = np.full(gate.mu.shape, 0.5, np.float32).reshape(-1)
        if target.path.split("/")[-1] != "fc3":  # the output layer keeps its 10 units
            mu[rng.permutation(mu.size)[: mu.size // 2]] = -0.5
        gate.mu.assign(mu.reshape(gate.mu.shape))
    stripped = gated.strip()
    small, info = shrink(stripped, return_info=True)
    dense_runner = tflite.Runner(tflite.convert(stripped))
    small_runner = tflite.Runner(tflite.convert(small))
    x = rng.standard_normal((16, 28, 28, 1)).astype("float32")
    diff = float(np.max(np.abs(small_runner(x) - np.asarray(stripped(x)))))
    dense_ms, small_ms = _interleaved_latency([dense_runner, small_runner], rounds)
    units = ", ".join(f"{k} {a}->{b}" for k, (a, b) in info["units"].items())
    print(f"(b) Conv-4 unit-gated, half the units removed ({units}); parameters "
          f"{info['parameters_before']:,} -> {info['parameters_after']:,}; median latency "
          f"dense {dense_ms:.3f} ms, --shrink {small_ms:.3f} ms -> ratio "
          f"{small_ms / dense_ms:.3f} (target <= 0.55); shrunk TFLite vs masked Keras max "
          f"abs diff {diff:.2e}")
    return small_ms / dense_ms


def int8_figure(run_dir, data_dir, workdir):
    import numpy as np

    from export import _common, tflite

    report = tflite.export(run_dir, os.path.join(workdir, "lenet_int8.tflite"), int8=True,
                           calibration="mnist", data_dir=data_dir, latency_runs=0,
                           baseline=False, verbose=False)
    model, _, _ = _common.load_model(run_dir)
    x, y = _common.load_samples("mnist", model, "test", None, data_dir)
    runner = tflite.Runner(open(os.path.join(workdir, "lenet_int8.tflite"), "rb").read())
    ref = np.asarray(model.predict(x, batch_size=1000, verbose=0))
    out = runner(x)
    agree = float(np.mean(ref.argmax(-1) == out.argmax(-1)))
    acc_keras = float(np.mean(ref.argmax(-1) == y))
    acc_int8 = float(np.mean(out.argmax(-1) == y))
    drop = 100 * (acc_keras - acc_int8)
    print(f"(c) LeNet ticket int8 on {len(x):,} MNIST test images: top-1 agreement "
          f"{agree:.4f} (target >= 0.99); accuracy Keras {acc_keras:.4f}, int8 {acc_int8:.4f}, "
          f"drop {drop:.2f} points (target <= 0.5); file {report['size']['bytes']:,} B")
    return agree, drop


def edgetpu_figure(run_dir, data_dir, workdir):
    import keras

    from export import _common, tflite
    from keras_stg.experiments import models

    candidates = [
        ("LeNet-300-100 ticket", run_dir),
        ("Conv-4", models.conv4(input_shape=(28, 28, 1))),
        ("MobileNetV2", keras.applications.MobileNetV2(
            weights=None, input_shape=(32, 32, 3), classes=10, alpha=0.35)),
    ]
    results = []
    for name, model in candidates:
        path = os.path.join(workdir, f"edgetpu_{len(results)}.tflite")
        try:
            report = tflite.export(model, path, edgetpu=True, calibration="mnist",
                                   data_dir=data_dir, num_calibration=64, num_samples=16,
                                   latency_runs=0, baseline=False, verbose=False)
            check = report["edgetpu"]
        except _common.ReadinessError as e:
            check = e.report["edgetpu"]
        ops = sorted(_ops(path)) if os.path.exists(path) else []
        print(f"(d) --edgetpu {name}: {'READY' if check['ready'] else 'NOT READY'} "
              f"({len(check['problems'])} problems; ops {', '.join(ops)})")
        for problem in check["problems"]:
            print(f"      {problem}")
        results.append(check["ready"])
    print(f"    compile with: {check['command']}")
    return results


def _ops(path):
    from export import edgetpu

    schema = edgetpu._schema()
    fb = schema.ModelT.InitFromPackedBuf(open(path, "rb").read(), 0)
    names = edgetpu._names(schema.BuiltinOperator)
    return {names[max(fb.operatorCodes[o.opcodeIndex].builtinCode,
                      fb.operatorCodes[o.opcodeIndex].deprecatedBuiltinCode)]
            for o in fb.subgraphs[0].operators}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("KERAS_STG_DATA", "../shared/data"))
    parser.add_argument("--run", default=None, help="reuse a LeNet ticket run folder")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the ticket")
    parser.add_argument("--rounds", type=int, default=15,
                        help="interleaved latency rounds of 20 runs each")
    parser.add_argument("--out", default=None, help="keep the exported files here")
    args = parser.parse_args(argv)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        workdir = args.out or tmp
        os.makedirs(workdir, exist_ok=True)
        run_dir = _ticket(args, workdir)
        print()
        ratio = size_figure(run_dir, args.data_dir, workdir)
        lat = latency_figure(args.rounds)
        agree, drop = int8_figure(run_dir, args.data_dir, workdir)
        ready = edgetpu_figure(run_dir, args.data_dir, workdir)
    ok = ratio <= 0.15 and lat <= 0.55 and agree >= 0.99 and drop <= 0.5 and all(ready)
    print(f"\nall targets met: {ok} ({time.time() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
