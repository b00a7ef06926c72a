"""How the width a shrunk layer keeps decides its speed: ResNet-20 at every width from 16 down to 8.

Usage:
    python -m benchmarks.channel_alignment [--rounds R] [--runs N]

ResNet-20 (28x28x1, untrained: latency does not depend on the weights) is
shrunk by removing the same number of channels from every channel group
(stage widths 16/32/64 become k/2k/4k), for k = 16 down to 8, and each model
is timed at batch 1, one thread, in the LiteRT interpreter (XNNPACK) and in
onnxruntime, all models interleaved in rounds. Prints one table: channels,
multiply-adds, and each runtime's median latency and its ratio to the dense
model. This is why `channel_multiple` exists.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def models_by_width(widths):
    import numpy as np

    import keras_stg
    from benchmarks import structured_methods as sm

    out = []
    for k in widths:
        model = sm.fresh("resnet20", 0)
        if k < 16:
            for group in keras_stg.channel_groups(model):
                if group.prunable:  # the same share of every group: k of 16, 2k of 32, ...
                    group.zero(np.arange(group.size - group.size * k // 16))
            model = keras_stg.shrink(model)
        out.append((k, model))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.channel_alignment",
                                description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=list(range(16, 7, -1)))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--runs", type=int, default=100)
    args = p.parse_args(argv)
    from benchmarks import structured
    from benchmarks import structured_methods as sm
    from export import onnx, tflite

    start = time.time()
    rows = []
    timers = []
    for k, model in models_by_width(args.widths):
        lite = tflite.Runner(tflite.convert(model))
        ort = onnx.Runner(onnx.convert(model))
        timers += [lite.latency_ms, (lambda r: lambda n: r.latency_ms((28, 28, 1), n))(ort)]
        rows.append({"width": k, "macs": sm.macs(model)[1]})
    medians = structured._interleaved(timers, args.rounds, args.runs)
    lines = ["| stage widths | MACs | LiteRT ms | x dense | onnxruntime ms | x dense |",
             "|---|---|---|---|---|---|"]
    for i, row in enumerate(rows):
        lite, ort = medians[2 * i], medians[2 * i + 1]
        lines.append(f"| {row['width']}/{2 * row['width']}/{4 * row['width']} | "
                     f"{row['macs']:,} | {lite:.3f} | {lite / medians[0]:.2f} | {ort:.3f} | "
                     f"{ort / medians[1]:.2f} |")
    print("\n".join(lines))
    print(f"\n{structured._machine()}, {time.time() - start:.0f} s")
    return rows, medians


if __name__ == "__main__":
    main()
