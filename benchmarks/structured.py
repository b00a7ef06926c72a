"""Structured pruning that makes a model faster: channel gates + shrink against L1 filter pruning.

Usage:
    python -m benchmarks.structured [--quick] [--data-dir D] [--limit N] [--test-limit N]
        [--epochs E] [--targets 0.5 0.75] [--out DIR] [--results PATH]

ResNet-20 (`keras_stg.experiments.models.resnet20`) on Fashion-MNIST (28x28),
every method with the same total epochs, batch, optimiser (Adam 1e-3) and data:

- `dense`: the model trained for `E` epochs.
- `ours`: `keras_stg.wrap(model, mode="joint", granularity="channel",
  cost="flops", target_sparsity=t, finetune=0.3)` trained for `E` epochs
  from the same initial weights, then `strip` and `shrink`: `t` is the share of
  multiply-adds removed (`--init-mu random`: the gates start as a random
  mask at the target instead of open).
- `l1 filter`: Li et al. 2017, "Pruning Filters for Efficient ConvNets": the
  dense model trained for `E - F` epochs (`F = E // 2`, at least 1), then in
  every channel group (`keras_stg.channel_groups`, so residual branches are
  pruned together) the channels with the smallest L1 norm of their producers'
  kernels are removed, one share for all groups, the share set by bisection so
  that the shrunk model's multiply-adds are `1 - t` of the dense ones; then
  `shrink` and `F` epochs of fine-tuning.

For every model: test accuracy, kernel weights, multiply-adds per example, float
TFLite size and median batch-1 latency in the LiteRT interpreter (XNNPACK, one
thread), the latency runs of all models interleaved in rounds so that a slow
spell of the machine lands on each. Prints one table; writes `structured.json`
to `--out` and the table between `<!-- benchmarks.structured:begin -->` and
`<!-- benchmarks.structured:end -->` in `--results`. `--quick` (512 training
and 256 test images, 1 epoch, target 0.5) is a smoke test; its numbers mean
nothing.
"""

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN = "<!-- benchmarks.structured:begin -->"
END = "<!-- benchmarks.structured:end -->"
HEADER = ("method", "target", "params", "MACs", "MACs removed", "TFLite bytes",
          "latency ms", "latency / dense", "test acc")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def macs(model):
    """Kernel weights and multiply-adds per example of a plain Keras model."""
    from keras_stg import _compat
    from keras_stg import layer_table

    params = total = 0
    for layer in _compat.all_layers(model):
        found = layer_table.kernels(layer)
        if not found:
            continue
        for kernel in found:
            n = math.prod(getattr(layer, kernel.role).shape)
            params += n
            total += n * layer_table.positions(layer)
    return params, total


def _data(args):
    from keras_stg.experiments import data

    x, y = data.load("fashion_mnist", "train", args.data_dir)
    xt, yt = data.load("fashion_mnist", "test", args.data_dir)
    x = data.normalize(x[:args.limit], "fashion_mnist")[..., None]
    xt = data.normalize(xt[:args.test_limit], "fashion_mnist")[..., None]
    return x, y[:args.limit], xt, yt[:args.test_limit]


def _compile(model, lr=1e-3):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _fresh(seed):
    import keras

    from keras_stg.experiments import models

    keras.utils.set_random_seed(seed)
    return models.resnet20((28, 28, 1))


def _accuracy(model, xt, yt):
    return float(_compile(model).evaluate(xt, yt, batch_size=256, verbose=0, return_dict=True)
                 ["accuracy"])


def train_dense(args, x, y):
    model = _compile(_fresh(args.seed))
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=args.verbose,
              shuffle=True)
    return model


def train_ours(args, target, x, y):
    import keras_stg

    init_mu = args.init_mu if args.init_mu in ("auto", "random") else float(args.init_mu)
    gated = keras_stg.wrap(_fresh(args.seed), mode="joint", granularity="channel",
                           cost="flops", target_sparsity=target, finetune=0.3, seed=args.seed,
                           init_mu=init_mu)
    _compile(gated)
    gated.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=args.verbose,
              shuffle=True)
    return keras_stg.shrink(gated.strip())


def _l1_prune(model, share):
    """Zeroes, in every prunable channel group, the `share` of channels with the smallest
    L1 norm of their producers' kernels (`ChannelGroup.zero`: kernels, biases, BN gamma
    and beta)."""
    import numpy as np

    import keras_stg

    for group in keras_stg.channel_groups(model):
        if not group.prunable:
            continue
        norms = sum(np.abs(layer.kernel.numpy()).reshape(-1, group.size).sum(0)
                    for layer in group.producers)
        group.zero(np.argsort(norms, kind="stable")[:int(share * group.size)])
    return model


def train_l1(args, target, x, y):
    import keras_stg

    finetune = max(1, args.epochs // 2)
    model = _compile(_fresh(args.seed))
    if args.epochs - finetune > 0:
        model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs - finetune,
                  verbose=args.verbose, shuffle=True)
    _, dense_macs = macs(model)
    weights = [v.numpy() for v in model.weights]
    low, high = 0.0, 1.0
    for _ in range(4 if args.quick else 8):  # the share of every group that removes `target` MACs
        share = (low + high) / 2
        for v, w in zip(model.weights, weights):
            v.assign(w)
        small = keras_stg.shrink(_l1_prune(model, share), check=False)
        if 1 - macs(small)[1] / dense_macs < target:
            low = share
        else:
            high = share
    for v, w in zip(model.weights, weights):
        v.assign(w)
    small = _compile(keras_stg.shrink(_l1_prune(model, high)))
    small.fit(x, y, batch_size=args.batch_size, epochs=finetune, verbose=args.verbose,
              shuffle=True)
    return small


def _latencies(models, rounds, runs):
    from export import tflite

    files = [tflite.convert(m) for m in models]
    runners = [tflite.Runner(f) for f in files]
    sizes = [len(f) for f in files]
    times = [[] for _ in models]
    for _ in range(rounds):
        for r, t in zip(runners, times):
            t.append(r.latency_ms(runs))
    return [statistics.median(t) for t in times], sizes


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.structured",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", default=os.environ.get("KERAS_STG_DATA") or os.path.join(
        REPO, "..", "shared", "data"))
    p.add_argument("--limit", type=int, default=None, help="training examples (default all)")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--targets", type=float, nargs="+", default=None,
                   help="shares of multiply-adds to remove (default 0.5 0.75)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-mu", default="auto",
                   help="our gates' start: auto (all open), random (a random mask at the "
                        "target) or a number")
    p.add_argument("--out", default=None)
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    quick = {"limit": 512, "test_limit": 256, "epochs": 1, "targets": [0.5]}
    full = {"limit": 60000, "test_limit": 10000, "epochs": 10, "targets": [0.5, 0.75]}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.join(REPO, "benchmarks", "results")
    if args.results is None and not args.quick:
        args.results = os.path.join(REPO, "benchmarks", "RESULTS.md")
    for t in args.targets:
        if not 0 < t < 1:
            p.error(f"--targets are shares of multiply-adds to remove, in (0, 1); got {t}")
    args.verbose = 0 if args.quick else 2
    return args


def table(rows):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        target = "" if r["target"] is None else f"{r['target']:.2f}"
        lines.append(
            f"| {r['method']} | {target} | {r['params']:,} | {r['macs']:,} | {r['macs_removed']:.1%} | {r['tflite_bytes']:,} "
            f"| {r['latency_ms']:.3f} | {r['latency_ratio']:.2f} | {r['accuracy']:.2%} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    import platform

    import tensorflow as tf

    log(f"structured: ResNet-20 / Fashion-MNIST, {args.limit} training examples, "
        f"{args.epochs} epochs, targets {args.targets}")
    x, y, xt, yt = _data(args)
    models, rows = [], []
    log("dense ...")
    dense = train_dense(args, x, y)
    models.append(dense)
    rows.append({"method": "dense", "target": None})
    for target in args.targets:
        log(f"ours (channel gates, cost=flops) target {target} ...")
        models.append(train_ours(args, target, x, y))
        rows.append({"method": "ours (channel, joint)", "target": target})
        log(f"l1 filter pruning target {target} ...")
        models.append(train_l1(args, target, x, y))
        rows.append({"method": "l1 filter", "target": target})
    log("latency (LiteRT, float, batch 1) ...")
    latency, sizes = _latencies(models, rounds=3 if args.quick else 7,
                                runs=10 if args.quick else 100)
    _, dense_macs = macs(dense)
    for row, model, ms, size in zip(rows, models, latency, sizes):
        params, m = macs(model)
        row.update(params=params, macs=m, macs_removed=1 - m / dense_macs, tflite_bytes=size,
                   latency_ms=ms, latency_ratio=ms / latency[0],
                   accuracy=_accuracy(model, xt, yt))
    text = table(rows)
    print()
    print(text)
    import shlex
    import sys

    words = sys.argv[1:] if argv is None else argv
    meta = {"command": " ".join(["python -m benchmarks.structured"] + [shlex.quote(w) for w in words]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "limit": args.limit,
            "test_limit": args.test_limit, "epochs": args.epochs, "batch": args.batch_size,
            "machine": f"{platform.machine()} x{os.cpu_count()}", "tf": tf.__version__,
            "wall_s": round(time.time() - start)}
    from keras_stg import _files

    os.makedirs(args.out, exist_ok=True)
    _files.atomic_write_text(os.path.join(args.out, "structured.json"),
                             json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.results:
        body = (f"{BEGIN}\n`{meta['command']}` ({meta['date']}, {meta['machine']}, "
                f"{args.limit} training / {args.test_limit} test images, {args.epochs} epochs, "
                f"{meta['wall_s']} s):\n\n{text}\n{END}")
        old = open(args.results).read() if os.path.exists(args.results) else ""
        if BEGIN in old and END in old:
            new = old[:old.index(BEGIN)] + body + old[old.index(END) + len(END):]
        else:
            new = old.rstrip() + "\n\n" + body + "\n"
        _files.atomic_write_text(args.results, new)
    log(f"done in {time.time() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
