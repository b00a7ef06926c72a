"""Latency against a layer's output channels in each runtime: the tiles vector kernels compute in.

Usage:
    python -m benchmarks.channel_tiles [--widths 8 16 ... 128] [--rounds R] [--runs N]

Times one layer alone (a 3x3 and a 1x1 convolution on a 16x16x32 input, batch 1,
one thread) at each output width in LiteRT (XNNPACK) and onnxruntime, float and
int8, interleaved in rounds (the fastest round kept), and prints one markdown
table per layer: microseconds per width, and the tile
`keras_stg.latency.tile_from_times` reads from each column. A width inside a
tile runs as slowly as the tile's end, so a pruned layer saves time only where
it drops a whole tile: what `channel_multiple="auto"` keeps to.
"""

import argparse
import os
import time

import numpy as np

WIDTHS = tuple(range(8, 129, 8))
SHAPE = (16, 16, 32)


def _models(kernel, widths):
    import keras

    out = []
    for width in widths:
        inputs = keras.Input(SHAPE, batch_size=1)
        out.append(keras.Model(inputs, keras.layers.Conv2D(width, kernel, padding="same")(inputs)))
    return out


def measure(kernel, widths=WIDTHS, rounds=5, runs=40):
    """`{runtime title: [ms per width]}` of a `kernel`x`kernel` convolution, the fastest
    of `rounds` interleaved rounds (another process only slows a round down)."""
    from benchmarks import structured

    calibration = np.random.default_rng(0).standard_normal((16,) + SHAPE).astype("float32")
    timers = {name: [] for name in structured.RUNTIMES}
    for model in _models(kernel, widths):
        runners = structured._runners(structured.runtime_files(model, calibration), SHAPE)
        for name in structured.RUNTIMES:
            timers[name].append(runners[name])
    flat = [t for name in structured.RUNTIMES for t in timers[name]]
    times = structured._interleaved(flat, rounds, runs, reduce=min)
    n = len(widths)
    return {structured.RUNTIME_TITLES[name]: times[i * n:(i + 1) * n]
            for i, name in enumerate(structured.RUNTIMES)}


def table(kernel, widths, times):
    from keras_stg import latency

    names = list(times)
    lines = [f"| {kernel}x{kernel} conv, output channels | " + " | ".join(
        f"{n} (us)" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, w in enumerate(widths):
        lines.append(f"| {w} | " + " | ".join(f"{1000 * times[n][i]:.1f}" for n in names)
                     + " |")
    tiles = [latency.tile_from_times(dict(zip(widths, times[n])),
                                     tiles=[t for t in latency.TILES if t >= widths[0]])
             for n in names]
    lines.append("| tile read | " + " | ".join(str(t) for t in tiles) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=40)
    args = p.parse_args(argv)
    from keras_stg import latency

    start = time.time()
    print(f"# {latency.machine()}; onnxruntime 1 thread; load average "
          f"{os.getloadavg()[0]:.1f}; batch 1, input {SHAPE}, fastest of {args.rounds} "
          f"rounds of the median of {args.runs} runs\n")
    out = {}
    for kernel in (3, 1):
        out[kernel] = measure(kernel, args.widths, args.rounds, args.runs)
        print(table(kernel, args.widths, out[kernel]) + "\n", flush=True)
    print(f"# done in {time.time() - start:.0f} s")
    return out


if __name__ == "__main__":
    main()
