"""Shrinking through channel splits: a keras-hub CSPNet with channel gates, against the same
masks with every group a split cuts left whole.

Usage:
    python -m benchmarks.channel_split [--quick] [--size 128] [--keep 0.5] [--seed 0]
        [--rounds 7] [--runs 30]

A cross-stage-partial network splits a convolution's output channels with
`keras.ops.split`: one part runs through the stage's blocks, the other goes
around them, and the two are concatenated. The network is keras-hub's
`CSPNetBackbone` (CSPDarkNet blocks: stem 32, four stages of 64 / 128 / 256 / 512
channels with 1 / 2 / 2 / 1 blocks, all at stride 2) at `--size` x `--size` x 3,
pooled into a 10-class Dense head, with random BatchNormalization statistics as a
trained model has. It is wrapped with channel gates (`keras_stg.wrap(...,
granularity="channel")`: each part of a split channel space is a group of its own)
and every gate is set to keep a random `--keep` of its channels; then:

- "split-aware": `strip` and `shrink` as the library does them;
- "splits whole": the same masks, with the gates of every group that a split cuts
  opened (what `shrink` could do before it followed splits: those groups stayed whole).

It prints parameters, kernel multiply-adds per image, the largest difference between
each shrunk model and the masked model it was shrunk from, and the LiteRT float32 batch-1 latency (XNNPACK,
one thread; the fastest of `--rounds` interleaved rounds, each the median of `--runs`
invocations) of the dense model and both shrunk ones, with ratios to dense. Nothing is trained: the masks
are random, so the figures say what the shrunk structure costs, not what a trained
ticket scores. `--quick` (32x32, 2 rounds of 3 runs) is a smoke test; its times mean
nothing.
"""

import argparse
import sys
import time


def cspnet(size, seed):
    """The CSPNet classifier (logits) with random BatchNormalization statistics."""
    import keras
    import keras_hub
    import numpy as np

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.CSPNetBackbone(
        stem_filters=32, stem_kernel_size=3, stem_strides=1, stackwise_depth=[1, 2, 2, 1],
        stackwise_strides=[2, 2, 2, 2], stackwise_num_filters=[64, 128, 256, 512],
        block_type="dark_block", stage_type="csp", bottle_ratio=[0.5], block_ratio=[1.0],
        expand_ratio=[2.0], image_shape=(size, size, 3))
    inputs = keras.Input((size, size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(pooled))
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            c = int(layer.gamma.shape[0])
            layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            layer.beta.assign(rng.normal(0, 0.2, c))
            layer.moving_mean.assign(rng.normal(0, 0.2, c))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, c))
    return model


def shrunk_models(model, keep, seed):
    """`{name: (shrunk, the masked model it was shrunk from)}` for "split-aware" and
    "splits whole", the number of gated groups and of those a split cuts, for random
    channel masks keeping `keep` of every group."""
    import numpy as np

    import keras_stg

    gated = keras_stg.wrap(model, mode="post_training", granularity="channel", seed=seed)
    rng = np.random.default_rng(seed)
    for gate in gated.gates:
        mu = np.where(rng.random(tuple(gate.mu.shape)) < keep, 1.0, -1.0).astype("float32")
        mu[0] = 1.0  # every group keeps a channel
        gate.mu.assign(mu)
    masked = gated.strip()
    aware = keras_stg.shrink(masked)
    cut = 0
    for gate, group in zip(gated.gates, gated.groups):
        if any(m.role == "split" for m in group.members):
            gate.mu.assign(np.ones(tuple(gate.mu.shape), "float32"))
            cut += 1
    masked_whole = gated.strip()
    shrunk = {"split-aware": (aware, masked),
              "splits whole": (keras_stg.shrink(masked_whole), masked_whole)}
    return shrunk, len(gated.gates), cut


def _max_diff(a, b, x):
    import numpy as np

    return float(np.abs(a.predict(x, verbose=0) - b.predict(x, verbose=0)).max())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.channel_split",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 32x32, few runs")
    p.add_argument("--size", type=int, default=128, help="input height and width")
    p.add_argument("--keep", type=float, default=0.5, help="share of each group's channels kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--runs", type=int, default=30)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.runs = 32, 2, 3
    if not 0 < args.keep <= 1:
        p.error(f"--keep must be a share in (0, 1], got {args.keep}")
    import numpy as np

    from benchmarks.structured import _interleaved
    from benchmarks.structured_methods import macs
    from export import tflite

    start = time.time()
    model = cspnet(args.size, args.seed)
    shrunk, gates, cut = shrunk_models(model, args.keep, args.seed)
    x = np.random.default_rng(args.seed + 1).normal(
        size=(4, args.size, args.size, 3)).astype("float32")
    models = {"dense": model} | {name: small for name, (small, _) in shrunk.items()}
    timers = {name: tflite.Runner(tflite.convert(m)).latency_ms for name, m in models.items()}
    print(f"CSPNet {args.size}x{args.size}: {gates} channel groups gated, {cut} of them cut by "
          f"a split; {args.keep:g} of each kept at random (seed {args.seed})", flush=True)
    times = _interleaved(list(timers.values()), args.rounds, args.runs, reduce=min)
    print("| model | parameters | MACs (M) | max abs diff to masked | LiteRT f32 ms | ratio |")
    print("|---|---|---|---|---|---|")
    for (name, m), ms in zip(models.items(), times):
        diff = "" if name == "dense" else f"{_max_diff(m, shrunk[name][1], x):.1e}"
        print(f"| {name} | {m.count_params():,} | {macs(m)[1] / 1e6:.1f} | {diff} | {ms:.2f} | "
              f"{ms / times[0]:.2f}x |")
    print(f"({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
