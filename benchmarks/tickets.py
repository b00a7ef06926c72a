"""Compact tickets against the entropy bound and the other ways to ship a ticket (issue 19).

Usage:
    python -m benchmarks.tickets [--quick] [--data-dir ../shared/data] [--work DIR]
        [--epochs 20] [--conv-epochs 4] [--conv-limit 10000] [--repeats 5]

Trains (or, with `--work` holding finished runs of the same settings, reuses)
LeNet-300-100 `slt` tickets on MNIST at 90%, 95% and 98% sparsity
(`configs/lenet_300_100_mnist_slt.yaml`: weight gates, scale-fan) and a Conv-4
`slt` ticket on the first `--conv-limit` Fashion-MNIST training images
(`configs/conv4_fashion_mnist_slt.yaml`, 90%). For each ticket it prints a
row of a markdown table: the `.ticket` bytes, the entropy bound of its masks
(sum over kernels of `n * H(keep rate)`, in bytes), the header bytes, the
coded masks' bytes and their ratio to the bound, the ratio of the whole ticket
to the bound, the sparse TFLite file, the same gzip'd,
the dense float TFLite file, the sparse TFLite file over the ticket, the
median `save_ticket` and `load_ticket` times over `--repeats`, and the test
accuracy of the loaded ticket (and whether it equals the stripped model's).
`--quick` trains each ticket for one short epoch (a smoke run).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "configs")


def settings(args):
    """`(name, config file, overrides)` of every ticket the benchmark measures."""
    lenet = os.path.join(CONFIGS, "lenet_300_100_mnist_slt.yaml")
    conv = os.path.join(CONFIGS, "conv4_fashion_mnist_slt.yaml")
    lenet_extra = ["epochs=1", "limit=4096"] if args.quick else [f"epochs={args.epochs}"]
    conv_extra = (["epochs=1", "limit=1024", "test_limit=1024"] if args.quick
                  else [f"epochs={args.conv_epochs}", f"limit={args.conv_limit}"])
    rows = [(f"LeNet-300-100, {round(100 * t)}%", lenet, [f"target_sparsity={t}", *lenet_extra])
            for t in (0.9, 0.95, 0.98)]
    rows.append(("Conv-4, 90%", conv, ["target_sparsity=0.9", *conv_extra]))
    return rows


def _run(name, config_file, overrides, args):
    """The folder of a finished training run of these settings (trained if needed)."""
    import dataclasses
    import json

    from keras_stg.experiments import config, train

    cfg = config.load(config_file, overrides)
    slug = name.lower().replace(", ", "_").replace("%", "").replace("-", "_")
    out = os.path.join(args.work, slug)
    metrics = os.path.join(out, "metrics.json")
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as f:
            if json.load(f).get("config") == dataclasses.asdict(cfg):
                return out
    train.run(cfg, args.data_dir, out, verbose=0)
    return out


def _median_time(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _accuracy(model, dataset, data_dir, limit):
    import numpy as np

    from keras_stg.experiments import data

    correct = total = 0
    for x, y in data.dataset(dataset, "test", 500, data_dir, limit=limit):
        logits = np.asarray(model(x, training=False))
        correct += int(np.sum(logits.argmax(-1) == y.numpy().reshape(-1)))
        total += len(logits)
    return correct / total


def measure(name, run_dir, args, workdir):
    """One row of the table for the ticket of the training run in `run_dir`."""
    import json

    import keras
    import numpy as np

    import keras_stg
    from export import _common, tflite
    from keras_stg.ticket import ticket_info

    gated = keras.models.load_model(os.path.join(run_dir, "gated.keras"))
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    stripped = gated.strip()
    path = os.path.join(workdir, "t.ticket")
    save_s = _median_time(lambda: keras_stg.save_ticket(gated, path), args.repeats)
    load_s = _median_time(lambda: keras_stg.load_ticket(path), args.repeats)
    loaded = keras_stg.load_ticket(path)
    info = ticket_info(path)
    exact = all(np.asarray(a.numpy()).tobytes() == np.asarray(b.numpy()).tobytes()
                for a, b in zip(loaded.weights, stripped.weights))
    sparse = tflite.convert(stripped, sparse=True)
    dense = tflite.convert(stripped)
    dataset = metrics["config"]["dataset"]
    limit = metrics["config"].get("test_limit")
    accuracy = _accuracy(loaded, dataset, args.data_dir, limit)
    return {
        "ticket": name, "sparsity": info["sparsity"], "bytes": info["bytes"],
        "bound": info["entropy_bound_bytes"], "header": info["header_bytes"],
        "masks": info["mask_bytes"],
        "sparse_tflite": len(sparse), "gzip_sparse_tflite": _common.gzip_size(sparse),
        "dense_tflite": len(dense), "save_s": save_s, "load_s": load_s,
        "accuracy": accuracy,
        "same_as_stripped": exact and accuracy == _accuracy(stripped, dataset, args.data_dir,
                                                            limit),
        "run_accuracy": metrics["test_accuracy"],
    }


def table(rows):
    """The markdown table of `measure`'s rows."""
    lines = [
        "| ticket | sparsity | ticket B | entropy bound B | header B | masks B | masks / bound "
        "| ticket / bound | sparse TFLite B | gzip sparse TFLite B | dense float TFLite B "
        "| sparse TFLite / ticket | save s | load s | test acc (loaded) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "" if r["same_as_stripped"] else " (differs from the stripped model!)"
        lines.append(
            f"| {r['ticket']} | {100 * r['sparsity']:.2f}% | {r['bytes']:,} | {r['bound']:,.0f} "
            f"| {r['header']:,} | {r['masks']:,} | {r['masks'] / r['bound']:.4f} "
            f"| {r['bytes'] / r['bound']:.4f} | {r['sparse_tflite']:,} "
            f"| {r['gzip_sparse_tflite']:,} | {r['dense_tflite']:,} "
            f"| {r['sparse_tflite'] / r['bytes']:.1f}x | {r['save_s']:.3f} | {r['load_s']:.3f} "
            f"| {100 * r['accuracy']:.2f}%{same} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tickets",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short epoch per ticket")
    parser.add_argument("--data-dir", default=os.environ.get("KERAS_STG_DATA", "../shared/data"))
    parser.add_argument("--work", default=None,
                        help="folder of the training runs (reused when finished with the same "
                             "settings); default a temporary folder")
    parser.add_argument("--epochs", type=int, default=20, help="LeNet epochs (default 20)")
    parser.add_argument("--conv-epochs", type=int, default=4, help="Conv-4 epochs (default 4)")
    parser.add_argument("--conv-limit", type=int, default=10000,
                        help="Fashion-MNIST training images of Conv-4 (default 10000)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed save and load runs, median reported (default 5)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.work is None:
            args.work = os.path.join(tmp, "runs")
        rows = []
        for name, config_file, overrides in settings(args):
            run_dir = _run(name, config_file, overrides, args)
            rows.append(measure(name, run_dir, args, tmp))
            print(f"{name}: done ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
