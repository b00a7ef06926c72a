"""LeNet-300-100 on MNIST, strong lottery ticket (slt mode), at target sparsities.

Usage:
    python -m benchmarks.lenet_mnist [--data-dir ../shared/data] [--targets 0.9 0.95] [--epochs 20] [--set key=value]

For each target the gated LeNet-300-100 (signed Kaiming constant weights
scaled for the target, frozen; weight-level gates; Adam lr 1e-2 on the gates; batch 64) trains with
the adaptive lambda and is evaluated on the 10,000 test images with its binary
mask. Prints test accuracy, final sparsity, share of fractional gates and
wall time. Issue 2's bar: >= 97.5% at >= 90% sparsity and >= 96% at >= 95%.
"""

import argparse
import os

from keras_stg.experiments import config, train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("KERAS_STG_DATA", "../shared/data"))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of configs/lenet_300_100_mnist_slt.yaml")
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    base = os.path.join(here, "..", "configs", "lenet_300_100_mnist_slt.yaml")
    rows = []
    for target in args.targets:
        cfg = config.load(base, [f"target_sparsity={target}", f"epochs={args.epochs}", *args.set])
        m = train.run(cfg, args.data_dir)
        frac = sum(r["fractional"] * r["gates"] for r in m["layers"]) / sum(r["gates"] for r in m["layers"])
        rows.append((target, m["test_accuracy"], m["sparsity"], frac, m["wall_time_s"]))
    print("\ntarget  test_acc  sparsity  fractional  time_s")
    for target, acc, sp, frac, wall in rows:
        print(f"{target:6.2f}  {acc:8.4f}  {sp:8.4f}  {frac:10.4f}  {wall:6.0f}")
    return rows


if __name__ == "__main__":
    main()
