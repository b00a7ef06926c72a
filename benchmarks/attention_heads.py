"""Channel gates on a vision transformer: attention heads and MLP units removed, against dense.

Usage:
    python -m benchmarks.attention_heads [--quick] [--net vit|keras_hub_vit]
        [--seeds 0 1 2] [--target 0.5] [--limit N] [--test-limit N] [--epochs E]
        [--data-dir D] [--out DIR]

The network (`--net vit`, default) is a Functional vision transformer as the
keras.io ViT example builds it: 4x4 patches of a 28x28 Fashion-MNIST image (49
tokens of 64 channels) with a learned position embedding, four pre-norm blocks of
`MultiHeadAttention` (4 heads of 16) and a GELU MLP (128 units), mean over the
tokens. `--net keras_hub_vit` is keras-hub's `ViTBackbone` of the same sizes (a
class token, 50 tokens; its blocks are custom layers that channel gates open,
`keras_stg.inline`), classified from the class token. Per seed it
trains the dense network and ours (`wrap(joint, channel, flops)` with the
structured benchmark's recipe, `strip`, `shrink`, one channel per block: a head is
one channel) with the same budget, data, initial weights and cosine schedule as
`benchmarks.structured` (`benchmarks.structured_methods`), and times both in the
LiteRT interpreter (XNNPACK, one thread, batch 1, interleaved rounds).

Each seed's row goes to `OUT/attention_heads/seed_S.json` (`--net vit`) or
`OUT/attention_heads/keras_hub_vit/seed_S.json` (a finished seed is not trained
again); the table printed at the end pairs every seed's ours with
its dense model: accuracy, kernel multiply-adds removed, heads and MLP units
kept per block, LiteRT float time as a ratio of dense. The multiply-adds are the
kernels' (the projections' and the MLP's), not the attention's own products.

`--quick` (128 training and 64 test images, one epoch, one seed) is a smoke test;
its numbers mean nothing.
"""

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import time

from benchmarks import structured_methods as sm

NET = "vit"


def vit():
    """The transformer (logits); its trunk stays whole (LayerNormalization), its heads
    and MLP units are channel groups."""
    import keras
    import keras_hub

    L = keras.layers
    inputs = keras.Input((28, 28, 1))
    x = L.Conv2D(64, 4, strides=4, name="patches")(inputs)
    x = L.Reshape((49, 64), name="tokens")(x)
    x = L.Add(name="position")([x, keras_hub.layers.PositionEmbedding(49, name="pe")(x)])
    for i in range(4):
        h = L.LayerNormalization(epsilon=1e-6, name=f"ln{i}a")(x)
        h = L.MultiHeadAttention(4, 16, name=f"mha{i}")(h, h)
        x = L.Add(name=f"res{i}a")([x, h])
        h = L.LayerNormalization(epsilon=1e-6, name=f"ln{i}b")(x)
        h = L.Dense(128, activation="gelu", name=f"mlp{i}a")(h)
        h = L.Dense(64, name=f"mlp{i}b")(h)
        x = L.Add(name=f"res{i}b")([x, h])
    x = L.LayerNormalization(epsilon=1e-6, name="ln")(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, L.Dense(10, name="head")(x), name="vit")


def keras_hub_vit():
    """keras-hub's ViTBackbone at the sizes of `vit` (logits from the class token)."""
    import keras
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(
        image_shape=(28, 28, 1), patch_size=4, num_layers=4, num_heads=4, hidden_dim=64,
        mlp_dim=128, name="vit_backbone")
    inputs = keras.Input((28, 28, 1))
    outputs = keras.layers.Dense(10, name="head")(backbone(inputs)[:, 0])
    return keras.Model(inputs, outputs, name="keras_hub_vit")


NETS = {
    "vit": (sm.Net("ViT (4 blocks of 4 heads, dim 64, MLP 128)", (28, 28, 1), 0, vit, 0.8),
            "a"),
    "keras_hub_vit": (sm.Net("keras-hub ViTBackbone (4 blocks of 4 heads, dim 64, MLP 128)",
                             (28, 28, 1), 0, keras_hub_vit, 0.8), "mlp_dense_1"),
}


@contextlib.contextmanager
def _registered(net):
    """The transformer in `structured_methods.NETS` while it trains (not at import: the
    structured benchmark's default networks stay its own)."""
    sm.NETS[NET] = NETS[net][0]
    try:
        yield
    finally:
        sm.NETS.pop(NET, None)


def _widths(model, mlp_suffix):
    """Heads of every attention and units of every MLP's first Dense (named `*suffix`)."""
    import keras

    return ([layer.num_heads for layer in model.layers
             if isinstance(layer, keras.layers.MultiHeadAttention)],
            [layer.units for layer in model.layers
             if isinstance(layer, keras.layers.Dense) and layer.name.endswith(mlp_suffix)])


def run_seed(args, seed):
    """Trains dense and ours for `seed`, times both; returns the row."""
    with _registered(args.net):
        return _run_seed(args, seed)


def _run_seed(args, seed):
    from export import tflite
    from keras_stg import latency

    x, y, xt, yt = sm.data(NET, args.data_dir, args.limit, args.test_limit)
    budget = sm.Budget(args.epochs, args.batch_size, -(-len(x) // args.batch_size),
                       args.verbose, seed, 1)
    row = {"net": args.net, "seed": seed, "target": args.target, "limit": len(x),
           "test_limit": len(xt), "epochs": args.epochs}
    start = time.time()
    dense = sm.train_dense(NET, x, y, budget)
    params, macs = sm.macs(dense)
    row["dense"] = {"accuracy": sm.accuracy(dense, xt, yt), "params": params, "macs": macs,
                    "train_s": round(time.time() - start, 1)}
    start = time.time()
    net, mlp_suffix = NETS[args.net]
    small, sparsity = sm.train_ours(NET, args.target, x, y, budget, cost="flops",
                                    recipe=sm.Recipe(finetune=net.finetune))
    params, macs = sm.macs(small)
    heads, units = _widths(small, mlp_suffix)
    row["ours"] = {"accuracy": sm.accuracy(small, xt, yt), "params": params, "macs": macs,
                   "gated_sparsity": sparsity, "heads": heads, "mlp_units": units,
                   "train_s": round(time.time() - start, 1)}
    row["litert_f32_ms"] = dict(zip(("dense", "ours"), latency._time(
        [tflite.convert(dense), tflite.convert(small)], rounds=args.rounds, runs=args.runs)))
    row.update(command=args.command, date=time.strftime("%Y-%m-%d %H:%M"),
               machine=f"{latency.cpu()}, {os.cpu_count()} cores")
    return row


def table(rows):
    """The per-seed table and the paired summary, as markdown."""
    lines = ["| seed | dense acc | ours acc | ours - dense | MACs removed | heads kept | "
             "MLP units kept | LiteRT f32 (ours / dense) |", "|---|---|---|---|---|---|---|---|"]
    diffs, ratios, removed = [], [], []
    for r in rows:
        d, o = r["dense"], r["ours"]
        diffs.append(100 * (o["accuracy"] - d["accuracy"]))
        removed.append(1 - o["macs"] / d["macs"])
        ratios.append(r["litert_f32_ms"]["ours"] / r["litert_f32_ms"]["dense"])
        lines.append(f"| {r['seed']} | {100 * d['accuracy']:.2f} | {100 * o['accuracy']:.2f} | "
                     f"{diffs[-1]:+.2f} | {removed[-1]:.1%} | "
                     f"{'/'.join(map(str, o['heads']))} | "
                     f"{'/'.join(map(str, o['mlp_units']))} | {ratios[-1]:.2f}x |")
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    lines.append("")
    lines.append(f"ours - dense, paired over {len(rows)} seed(s): {statistics.mean(diffs):+.2f} "
                 f"± {spread:.2f} points at {min(removed):.1%}-{max(removed):.1%} of the "
                 f"kernel multiply-adds removed, LiteRT f32 {min(ratios):.2f}-"
                 f"{max(ratios):.2f}x dense")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--net", choices=sorted(NETS), default="vit")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--target", type=float, default=0.5,
                   help="share of the kernel multiply-adds to remove")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    quick = {"seeds": [0], "limit": 128, "test_limit": 64, "epochs": 1}
    full = {"seeds": [0, 1, 2], "limit": 15000, "test_limit": None, "epochs": 5}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.rounds, args.runs = (2, 5) if args.quick else (7, 100)
    args.verbose = 0 if args.quick else 2
    args.command = "python -m benchmarks.attention_heads " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    return args


def main(argv=None):
    from keras_stg import _files

    args = parse_args(argv)
    folder = os.path.join(args.out, "attention_heads")
    if args.net != "vit":  # the first network's rows stay where they were
        folder = os.path.join(folder, args.net)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for seed in args.seeds:
        path = os.path.join(folder, f"seed_{seed}.json")
        if os.path.exists(path):
            with open(path) as f:
                row = json.load(f)
            if (row.get("net", "vit"), row["limit"], row["epochs"], row["target"]) == (
                    args.net, args.limit, args.epochs, args.target):
                print(f"[attention_heads] seed {seed}: done before, kept", flush=True)
                rows.append(row)
                continue
        print(f"[attention_heads] {args.net} seed {seed}: training dense and ours "
              f"({args.limit} images, "
              f"{args.epochs} epochs, target {args.target}) ...", flush=True)
        row = run_seed(args, seed)
        _files.atomic_write_text(path, json.dumps(row, indent=2))
        rows.append(row)
    text = table(rows)
    print(text, flush=True)
    return rows


if __name__ == "__main__":
    main()
