"""Structured pruning that makes a model faster: channel gates + shrink against two baselines.

Usage:
    python -m benchmarks.structured [--quick] [--only PART [PART ...]]
        [--nets resnet20 mobilenet_v2 mobilenet_v3_small]
        [--methods dense ours ours-latency ours-tile ours-latency-tile l1 slimming uniform]
        [--targets 0.5 0.75] [--limit N] [--test-limit N] [--epochs E]
        [--init-mu M] [--sigma S] [--finetune F] [--gate-lr G] [--channel-multiple N]
        [--seed S] [--validation] [--data-dir D] [--out DIR] [--results PATH]

Networks (`benchmarks.structured_methods.NETS`): ResNet-20 on Fashion-MNIST at
28x28, and keras.applications' MobileNetV2 (alpha 0.35) and MobileNetV3Small
(alpha 0.75) on Fashion-MNIST padded to 32x32. Methods
(`benchmarks.structured_methods`, same epochs, data, initial weights and cosine
learning-rate schedule for all): `dense`, `ours`
(channel gates, joint, `cost="flops"`), `ours-latency` (the same with
`cost="latency"`), `ours-tile` and `ours-latency-tile` (the same two with
`channel_multiple="auto"`: channels kept in multiples of LiteRT's output-channel
tile measured on this machine, `keras_stg.latency.channel_tile`, instead of
`--channel-multiple`), `l1` (L1-norm filter pruning), `slimming` (Network
Slimming) and `uniform` (every group cut by the same share, the smaller network
trained from scratch: the control of Liu et al. 2019), at each target share of
multiply-adds removed (of LiteRT latency for `ours-latency`).

Parts, each resumable (a finished model is not trained again):

- `train`: trains and saves every (net, method, target) model under
  `OUT/structured/NET/` (`KEY.keras`, `KEY.json`: accuracy, params, MACs, time).
- `latency`: converts every saved model to float and int8 TFLite and ONNX and
  measures the batch-1 latency in the LiteRT interpreter (XNNPACK, one thread)
  and onnxruntime (one thread), all models interleaved in rounds; int8 TFLite
  test accuracy; the Edge TPU readiness check of the int8 file.
- `unstructured`: LiteRT latency of the unstructured tickets (`weight`,
  `block4`, `block16` at 90%, sparse TFLite) against dense, with and without
  XNNPACK, on ResNet-20 and LeNet-300-100.
- `report`: the tables and a plot into `--results` (between
  `<!-- benchmarks.structured:begin -->` and `<!-- benchmarks.structured:end -->`).
- `seeds`: every (net, method, target) trained with more than one seed: the
  test accuracy per seed, mean and standard deviation, and the paired
  difference to the dense model of the same seed, as tables and a plot with
  error bars into `--results` (between the `benchmarks.structured-seeds`
  markers). `--only train --seed S` with S other than 0 writes its rows
  (without the models: the latency part times seed 0's) under
  `OUT/structured/NET/seed_S/`; rows of another setting than seed 0's dense
  model (training images, epochs, test images) are left out.

`--validation --out DIR` measures accuracy on the last `--test-limit` training
images instead of the test set, to choose our recipe (or any setting) without
looking at the test set.

`--quick` (128 training and 64 test images, 2 epochs, target 0.5, few latency
runs) is a smoke test of every part; its numbers mean nothing.
"""

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks import structured_methods as sm  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN = "<!-- benchmarks.structured:begin -->"
END = "<!-- benchmarks.structured:end -->"
PARTS = ("train", "latency", "unstructured", "report", "seeds")
SEEDS_BEGIN = "<!-- benchmarks.structured-seeds:begin -->"
SEEDS_END = "<!-- benchmarks.structured-seeds:end -->"
METHODS = ("dense", "ours", "ours-latency", "ours-tile", "ours-latency-tile", "l1", "slimming",
           "uniform")
#: Our methods: method -> (cost, keeps channels in multiples of the runtime's tile).
OURS = {"ours": ("flops", False), "ours-latency": ("latency", False),
        "ours-tile": ("flops", True), "ours-latency-tile": ("latency", True)}
LABELS = {"dense": "dense", "ours": "ours (channel, flops)",
          "ours-latency": "ours (channel, latency)",
          "ours-tile": "ours (channel, flops, runtime tile)",
          "ours-latency-tile": "ours (channel, latency, runtime tile)", "l1": "L1 filter",
          "slimming": "network slimming", "uniform": "uniform width, from scratch"}
RUNTIMES = ("litert_f32", "litert_int8", "ort_f32", "ort_int8")
RUNTIME_TITLES = {"litert_f32": "LiteRT f32", "litert_int8": "LiteRT int8",
                  "ort_f32": "ORT f32", "ort_int8": "ORT int8"}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _key(method, target):
    return method if method == "dense" else f"{method}_{target:.2f}"


def _net_dir(args, net, seed=0):
    """The folder of `net`'s rows: seed 0 at the top, seed S in its `seed_S` folder."""
    path = os.path.join(args.out, "structured", net)
    if seed:
        path = os.path.join(path, f"seed_{seed}")
    os.makedirs(path, exist_ok=True)
    return path


def _write_json(path, value):
    from keras_stg import _files

    _files.atomic_write_text(path, json.dumps(value, indent=2))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _machine():
    from keras_stg import latency

    return f"{latency.cpu()}, {os.cpu_count()} cores"


def _stamp(args):
    return {"command": args.command, "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": _machine(), "load": round(os.getloadavg()[0], 1)}


# ------------------------------------------------------------------- train


def part_train(args):
    import keras_stg

    for net in args.nets:
        x, y, xt, yt = sm.data(net, args.data_dir, args.limit, args.test_limit,
                               validation=args.validation)
        budget = sm.Budget(args.epochs, args.batch_size, -(-len(x) // args.batch_size),
                           args.verbose, args.seed, args.channel_multiple)
        finetune = sm.NETS[net].finetune if args.finetune is None else args.finetune
        recipe = sm.Recipe(args.init_mu, args.sigma, finetune, args.gate_lr, args.score)
        folder = _net_dir(args, net, args.seed)
        jobs = [("dense", None)] if "dense" in args.methods else []
        jobs += [(m, t) for t in args.targets for m in args.methods if m != "dense"]
        dense_macs = sm.macs(sm.fresh(net, args.seed))[1]
        setting = {"limit": len(x), "test_limit": len(xt), "epochs": args.epochs,
                   "evaluated_on": "validation" if args.validation else "test",
                   "channel_multiple": args.channel_multiple, "seed": args.seed}
        for method, target in jobs:
            key = _key(method, target)
            path = os.path.join(folder, key)
            if os.path.exists(path + ".json") and (
                    args.seed or os.path.exists(path + ".keras")
                    or "unreachable" in _read_json(path + ".json")):
                log(f"{net} {key}: done before, kept")
                continue
            log(f"{net} {key}: training ({len(x)} images, {args.epochs} epochs) ...")
            start = time.time()
            extra = {}
            if method == "dense":
                model = sm.train_dense(net, x, y, budget)
            elif method in OURS:
                cost, tile = OURS[method]
                mine = budget
                if tile:
                    from keras_stg import latency

                    mine = dataclasses.replace(budget, channel_multiple="auto")
                    extra["channel_multiple"] = latency.channel_tile()
                try:
                    model, sparsity = sm.train_ours(net, target, x, y, mine, cost=cost,
                                                    recipe=recipe)
                except keras_stg.UnreachableTargetError as e:
                    _write_json(path + ".json", {"net": net, "method": method, "target": target,
                                                 "unreachable": str(e),
                                                 "reachable": e.reachable, **setting,
                                                 **extra, **_stamp(args)})
                    log(f"{net} {key}: {e}")
                    continue
                extra["gated_sparsity"] = sparsity
                extra["recipe"] = dataclasses.asdict(recipe)
            elif method == "l1":
                model = sm.train_l1(net, target, x, y, budget, steps=args.bisection)
            elif method == "uniform":
                model = sm.train_uniform(net, target, x, y, budget, steps=args.bisection)
            else:
                model = sm.train_slimming(net, target, x, y, budget, steps=args.bisection)
            wall = time.time() - start
            params, macs = sm.macs(model)
            row = {"net": net, "method": method, "target": target, "params": params,
                   "macs": macs, "macs_removed": 1 - macs / dense_macs,
                   "accuracy": sm.accuracy(model, xt, yt), "train_s": round(wall, 1),
                   **setting, **extra, **_stamp(args)}
            if not args.seed:  # the latency part times seed 0's models; other seeds keep rows
                model.save(path + ".keras")
            _write_json(path + ".json", row)
            log(f"{net} {key}: {row['accuracy']:.2%} at {row['macs_removed']:.1%} of the "
                f"MACs removed, {wall:.0f} s")


def _saved(args, net):
    """`(rows, paths)` of the saved models of `net`, dense first, in table order."""
    folder = os.path.join(args.out, "structured", net)
    rows, paths = [], []
    keys = ["dense"] + [_key(m, t) for t in args.targets for m in METHODS if m != "dense"]
    for key in keys:
        path = os.path.join(folder, key)
        if os.path.exists(path + ".json"):
            rows.append(_read_json(path + ".json"))
            paths.append(path + ".keras")
    return rows, paths


# ----------------------------------------------------------------- latency


def runtime_files(model, representative):
    """`{runtime: file bytes}` of `model` for each of `RUNTIMES` (float and int8 TFLite,
    float and static-QDQ int8 ONNX; `representative` calibrates the int8 ones)."""
    from export import onnx, tflite

    onnx_f32 = onnx.convert(model)
    return {"litert_f32": tflite.convert(model),
            "litert_int8": tflite.convert(model, int8=True, representative=representative),
            "ort_f32": onnx_f32, "ort_int8": onnx.quantize_int8(onnx_f32, representative)}


def _converted(model, representative):
    from export import edgetpu

    files = runtime_files(model, representative)
    return files, [str(p) for p in edgetpu.check(files["litert_int8"])]


def _runners(files, shape):
    from export import onnx, tflite

    out = {}
    for name, data in files.items():
        if name.startswith("litert"):
            runner = tflite.Runner(data)
            out[name] = runner.latency_ms
        else:
            runner = onnx.Runner(data)
            out[name] = (lambda r: lambda runs: r.latency_ms(shape, runs))(runner)
    return out


def _interleaved(timers, rounds, runs, reduce=statistics.median):
    """Latency of every timer (`reduce` over `rounds`, the median by default), the timers
    interleaved in rounds."""
    times = [[] for _ in timers]
    for _ in range(rounds):
        for t, timer in zip(times, timers):
            t.append(timer(runs))
    return [reduce(t) for t in times]


def part_latency(args):
    import keras

    from export import tflite

    for net in args.nets:
        rows, paths = _saved(args, net)
        if not rows or rows[0]["method"] != "dense":
            log(f"{net}: no trained dense model under {args.out}; run --only train first")
            continue
        x, _, xt, yt = sm.data(net, args.data_dir, args.calibration, args.int8_test_limit)
        timers, names = [], []
        for row, path in zip(rows, paths):
            key = _key(row["method"], row["target"])
            if "unreachable" in row:
                continue
            log(f"{net} {key}: converting (TFLite f32/int8, ONNX f32/int8) ...")
            model = keras.models.load_model(path, compile=False)
            files, problems = _converted(model, x)
            runners = _runners(files, model.input_shape[1:])
            int8 = tflite.Runner(files["litert_int8"])
            row["int8_accuracy"] = float(np.mean(int8(xt).argmax(-1) == yt))
            row["tflite_bytes"] = len(files["litert_f32"])
            row["tflite_int8_bytes"] = len(files["litert_int8"])
            row["edgetpu_problems"] = problems
            for name in RUNTIMES:
                timers.append(runners[name])
                names.append((row, name))
        log(f"{net}: timing {len(timers)} model/runtime pairs, {args.rounds} rounds of "
            f"{args.runs} runs ...")
        medians = _interleaved(timers, args.rounds, args.runs)
        for (row, name), ms in zip(names, medians):
            row[f"{name}_ms"] = ms
        for row in rows:
            for name in RUNTIMES:
                if f"{name}_ms" in row:
                    row[f"{name}_ratio"] = row[f"{name}_ms"] / rows[0][f"{name}_ms"]
        _write_json(os.path.join(args.out, "structured", net, "latency.json"),
                    {"rows": rows, "rounds": args.rounds, "runs": args.runs, **_stamp(args)})


# ------------------------------------------------------------ unstructured


GRANULARITIES = ("weight", "block4", "block16")


def _random_ticket(model, granularity, sparsity, seed):
    """`model` stripped with a random binary mask of `granularity` at `sparsity` (the
    runtime's speed depends on the mask's pattern, not on which weights it keeps)."""
    import keras_stg

    gated = keras_stg.wrap(model, mode="post_training", granularity=granularity,
                           init_mu=0.5, seed=seed)
    rng = np.random.default_rng(seed)
    for gate in gated.gates:
        gate.mu.assign(np.where(rng.random(gate.mu.shape) < 1 - sparsity, 0.5, -0.5)
                       .astype("float32"))
    return gated.sparsity(), gated.strip()


def part_unstructured(args):
    import keras

    from export import tflite
    from keras_stg.experiments import models

    nets = {"lenet_300_100": ("LeNet-300-100", lambda: models.lenet_300_100((28, 28, 1)))}
    if "resnet20" in args.nets:
        nets["resnet20"] = ("ResNet-20", lambda: sm.fresh("resnet20", args.seed))
    out = []
    for net, (title, build) in nets.items():
        keras.utils.set_random_seed(args.seed)
        dense = build()
        models_ = [("dense", 0.0, tflite.convert(dense))]
        for g in GRANULARITIES:
            sparsity, stripped = _random_ticket(build(), g, 0.9, args.seed)
            models_.append((g, sparsity, tflite.convert(stripped, sparse=True)))
        timers, names = [], []
        for name, sparsity, data in models_:
            for xnnpack in (True, False):
                runner = tflite.Runner(data, xnnpack=xnnpack)
                timers.append(runner.latency_ms)
                names.append((name, sparsity, len(data), runner.resolver))
        log(f"{net}: timing {len(timers)} unstructured tickets/runtimes ...")
        medians = _interleaved(timers, args.rounds, args.runs)
        base = {}
        for (name, sparsity, size, resolver), ms in zip(names, medians):
            base.setdefault(resolver, ms)
            out.append({"net": title, "granularity": name, "sparsity": sparsity,
                        "tflite_bytes": size, "runtime": resolver, "ms": ms,
                        "ratio": ms / base[resolver]})
    os.makedirs(os.path.join(args.out, "structured"), exist_ok=True)
    _write_json(os.path.join(args.out, "structured", "unstructured.json"),
                {"rows": out, **_stamp(args)})


# ------------------------------------------------------------------ report


def _ms(row, name):
    ms = row.get(f"{name}_ms")
    return "" if ms is None else f"{ms:.3f} ({row[f'{name}_ratio']:.2f}x)"


def _label(row):
    """The table's name of a row's method (a runtime-tile row names its tile)."""
    label = LABELS.get(row["method"], row["method"])
    if OURS.get(row["method"], (None, False))[1]:
        label = label.replace("runtime tile", f"runtime tile {row['channel_multiple']}")
    return label


def net_table(rows):
    """The markdown table of one network's models."""
    header = ("method", "target", "params", "MACs", "MACs removed", "TFLite KB",
              "test acc", "int8 acc") + tuple(f"{RUNTIME_TITLES[r]} ms" for r in RUNTIMES) + (
              "Edge TPU",)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        target = "" if r["target"] is None else f"{r['target']:.2f}"
        if "unreachable" in r:
            why = (f"target unreachable: at most {r['reachable']:.1%} removable with every "
                   "group kept")
            cells = [_label(r), target, why]
            lines.append("| " + " | ".join(cells + [""] * (len(header) - 3)) + " |")
            continue
        size = f"{r['tflite_bytes'] / 1024:.0f}" if "tflite_bytes" in r else ""
        int8 = f"{r['int8_accuracy']:.2%}" if "int8_accuracy" in r else ""
        edgetpu = ("" if "edgetpu_problems" not in r else
                   "ready" if not r["edgetpu_problems"] else
                   f"{len(r['edgetpu_problems'])} problems")
        cells = [_label(r), target, f"{r['params']:,}",
                 f"{r['macs']:,}", f"{r['macs_removed']:.1%}", size, f"{r['accuracy']:.2%}",
                 int8] + [_ms(r, name) for name in RUNTIMES] + [edgetpu]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unstructured_table(rows):
    lines = ["| network | ticket | sparsity | TFLite KB | runtime | latency ms | x dense |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['net']} | {r['granularity']} | {r['sparsity']:.1%} | "
                     f"{r['tflite_bytes'] / 1024:.0f} | {r['runtime']} | {r['ms']:.3f} | "
                     f"{r['ratio']:.2f} |")
    return "\n".join(lines)


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for i, (net, rows) in enumerate(results.items()):
        acc, lat = axes[i]
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method and "unreachable" not in r]
            if not mine:
                continue
            xs = [100 * r["macs_removed"] for r in mine]
            marker = "*" if method == "dense" else "o"
            acc.plot(xs, [100 * r["accuracy"] for r in mine], marker, ls="-",
                     label=LABELS[method], ms=10 if method == "dense" else 6)
            if "litert_f32_ratio" in mine[0]:
                lat.plot(xs, [r["litert_f32_ratio"] for r in mine], marker, ls="-",
                         label=LABELS[method], ms=10 if method == "dense" else 6)
        acc.set(title=f"{sm.NETS[net].title}: accuracy", xlabel="MACs removed (%)",
                ylabel="test accuracy (%)")
        lat.set(title=f"{sm.NETS[net].title}: LiteRT f32 latency", xlabel="MACs removed (%)",
                ylabel="latency / dense")
        for ax in (acc, lat):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    _save_png(fig, path)


def _save_png(fig, path):
    """Write the matplotlib figure `fig` to `path` as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    from keras_stg import _files

    fig.tight_layout()
    _files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def _publish(args, sections, data, plot, png_name, alt, markers):
    """Print the markdown `sections` with `plot(data, png)`'s figure under `--out`, and
    put them between the `markers` of `--results`."""
    if data:
        png = os.path.join(args.out, png_name)
        plot(data, png)
        rel = os.path.relpath(png, os.path.dirname(os.path.abspath(args.results or png)))
        sections.append(f"![{alt}]({rel})")
    text = "\n\n".join(sections)
    print(text)
    if args.results and text:
        _write_block(args.results, *markers, text)


def _recipe(rows):
    recipes = {json.dumps(r["recipe"], sort_keys=True) for r in rows if "recipe" in r}
    return "; ".join(", ".join(f"{k}={v}" for k, v in json.loads(r).items())
                     for r in sorted(recipes)) or "none trained"


def _commands(rows):
    """One line per command that made `rows`: its first and last date, its load range."""
    out = []
    for command in sorted({r["command"] for r in rows}):
        mine = [r for r in rows if r["command"] == command]
        dates = sorted({r["date"] for r in mine})
        loads = sorted(r["load"] for r in mine)
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        load = f"{loads[0]}" if loads[0] == loads[-1] else f"{loads[0]}-{loads[-1]}"
        out.append(f"`{command}` ({when}, {len(mine)} models, load average {load})")
    return out


def part_report(args):
    sections, results = [], {}
    for net in args.nets:
        latency = os.path.join(args.out, "structured", net, "latency.json")
        rows, _ = _saved(args, net)
        timing = []
        if os.path.exists(latency):
            data = _read_json(latency)
            timed = {_key(r["method"], r["target"]): r for r in data["rows"]}
            rows = [timed.get(_key(r["method"], r["target"]), r) for r in rows]
            timing = [f"latency: `{data['command']}` ({data['date']}, {data['rounds']} "
                      f"rounds of {data['runs']} runs, load average {data['load']})"]
        if not rows:
            continue
        results[net] = rows
        commands = _commands(rows) + timing
        first = rows[0]
        sections.append(
            f"### {sm.NETS[net].title} on Fashion-MNIST\n\n"
            f"{first['limit']} training / {first['test_limit']} "
            + ("validation images (the last training images; the accuracy columns are "
               "validation accuracy), " if first.get("evaluated_on") == "validation"
               else "test images, ")
            + f"{first['epochs']} epochs per method, channels kept in multiples of "
            f"{first.get('channel_multiple', 1)}, {first['machine']}. Ours: "
            f"{_recipe(rows)}. Latency: batch 1, one thread, median of interleaved rounds; "
            "ratios to the dense model in brackets.\n\n"
            + net_table(rows) + "\n\nMade by:\n" + "\n".join(f"- {c}" for c in commands))
    path = os.path.join(args.out, "structured", "unstructured.json")
    if os.path.exists(path):
        data = _read_json(path)
        sections.append(
            "### Unstructured tickets at 90% (random masks of each pattern, sparse TFLite)\n\n"
            + unstructured_table(data["rows"])
            + f"\n\nMade by `{data['command']}` ({data['date']}, {data['machine']}).")
    _publish(args, sections, results, _plot, "structured.png", "structured pruning",
             (BEGIN, END))
    return results


def _write_block(path, begin, end, text):
    """Put `text` between the markers `begin` and `end` of the file `path` (appended with
    them if the file has none), atomically."""
    from keras_stg import _files

    body = f"{begin}\n{text}\n{end}"
    old = open(path).read() if os.path.exists(path) else ""
    if begin in old and end in old:
        new = old[:old.index(begin)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + body + "\n"
    _files.atomic_write_text(path, new)


# ------------------------------------------------------------------- seeds


_SETTING = ("limit", "test_limit", "epochs", "evaluated_on")


def seed_rows(args, net):
    """`{seed: {key: row}}` of every trained row of `net`: seed 0's in the network's
    folder, seed S's in its `seed_S` folder (`--only train --seed S` writes there)."""
    top = os.path.join(args.out, "structured", net)
    out = {}
    if not os.path.isdir(top):
        return out
    folders = [(0, top)] + sorted(
        (int(name[5:]), os.path.join(top, name)) for name in os.listdir(top)
        if name.startswith("seed_") and name[5:].isdigit())
    for seed, folder in folders:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json") and name != "latency.json":
                row = _read_json(os.path.join(folder, name))
                if "method" in row:
                    out.setdefault(seed, {})[_key(row["method"], row["target"])] = row
    return out


def _mean_std(values):
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def seeds_summary(by_seed):
    """Per (method, target) trained with the seed-0 dense model's setting: the seeds,
    their accuracies, mean and sample std, mean MACs removed, and the paired difference
    to the dense model of the same seed (mean and std over the seeds that have both).
    Rows of another setting (training images, epochs, test images) are left out."""
    base = by_seed.get(0, {}).get("dense")
    if base is None:
        return []
    setting = tuple(base.get(k) for k in _SETTING)
    keys = ["dense"] + sorted({k for rows in by_seed.values() for k in rows if k != "dense"},
                              key=lambda k: (k.rsplit("_", 1)[-1], _method_order(k)))
    out = []
    for key in keys:
        runs = {s: rows[key] for s, rows in sorted(by_seed.items()) if key in rows
                and "unreachable" not in rows[key]
                and tuple(rows[key].get(k) for k in _SETTING) == setting}
        if not runs:
            continue
        accs = [100 * r["accuracy"] for r in runs.values()]
        first = next(iter(runs.values()))
        entry = {"key": key, "method": first["method"], "target": first["target"],
                 "label": _label(first), "seeds": list(runs),
                 "accuracies": accs, "accuracy": _mean_std(accs),
                 "macs_removed": statistics.fmean(100 * r["macs_removed"] for r in runs.values())}
        dense = {s: by_seed[s]["dense"] for s in runs if "dense" in by_seed[s]}
        if key != "dense" and dense:
            entry["paired"] = _mean_std([100 * (runs[s]["accuracy"] - dense[s]["accuracy"])
                                         for s in dense])
            entry["paired_seeds"] = len(dense)
        out.append(entry)
    return out


def _method_order(key):
    method = key.rsplit("_", 1)[0] if key != "dense" else key
    return METHODS.index(method) if method in METHODS else len(METHODS)


def seeds_table(summary):
    """The markdown table of `seeds_summary`."""
    lines = ["| method | target | MACs removed | test acc per seed | mean ± std | "
             "- dense, paired (seeds) |", "|---|---|---|---|---|---|"]
    for e in summary:
        per_seed = " / ".join(f"{a:.2f}" for a in e["accuracies"])
        seeds = ", ".join(str(s) for s in e["seeds"])
        mean, std = e["accuracy"]
        paired = ""
        if "paired" in e:
            paired = f"{e['paired'][0]:+.2f} ± {e['paired'][1]:.2f} ({e['paired_seeds']})"
        target = "" if e["target"] is None else f"{e['target']:.2f}"
        lines.append(f"| {e['label']} | {target} | {e['macs_removed']:.1f}% | "
                     f"{per_seed} (seeds {seeds}) | {mean:.2f} ± {std:.2f} | {paired} |")
    return "\n".join(lines)


def _seeds_plot(summaries, path):
    """Per network, one point per (method, target): its accuracy minus the dense model's
    of the same seed, mean and std over the seeds, labelled with its MACs removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4.5),
                             squeeze=False)
    for ax, (net, summary) in zip(axes[0], summaries.items()):
        ax.axhline(0.0, color="k", lw=1, label="dense, same seed")
        ax.axhline(-0.5, color="k", lw=1, ls=":", label="0.5 point below dense")
        paired = [e for e in summary if "paired" in e]
        for i, e in enumerate(paired):
            mean, std = e["paired"]
            ax.errorbar([i], [mean], yerr=[std], marker="o", capsize=4, ls="none")
        ax.set_xticks(range(len(paired)))
        ax.set_xticklabels([f"{e['label']}\n{e['macs_removed']:.1f}% removed, "
                            f"n={e['paired_seeds']}" for e in paired], fontsize=7,
                           rotation=20, ha="right")
        ax.set(title=f"{sm.NETS[net].title}",
               ylabel="test accuracy - dense (points), mean ± std")
        ax.set_xlim(-0.5, len(paired) - 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save_png(fig, path)


def part_seeds(args):
    """Every (net, method, target) trained with more than one seed: tables, a plot with
    error bars, and the block between the seeds markers of `--results`."""
    sections, summaries = [], {}
    for net in args.nets:
        by_seed = seed_rows(args, net)
        summary = [e for e in seeds_summary(by_seed) if len(e["seeds"]) > 1]
        if not summary:
            continue
        summaries[net] = summary
        base = by_seed[0]["dense"]
        commands = _commands([by_seed[s][e["key"]] for e in summary for s in e["seeds"]])
        sections.append(
            f"#### {sm.NETS[net].title}: seeds\n\n{base['limit']} training / "
            f"{base['test_limit']} test images, {base['epochs']} epochs; a seed sets the "
            "initial weights, the data order and the gates' noise. Paired: each seed's "
            "accuracy minus the dense model's of the same seed.\n\n"
            + seeds_table(summary) + "\n\nMade by:\n" + "\n".join(f"- {c}" for c in commands))
    _publish(args, sections, summaries, _seeds_plot, "structured_seeds.png",
             "structured pruning over seeds", (SEEDS_BEGIN, SEEDS_END))
    return summaries


# -------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.structured",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--nets", nargs="+", choices=sorted(sm.NETS), default=list(sm.NETS))
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   default=[m for m in METHODS if m != "ours-latency-tile"],
                   help="default: all but ours-latency-tile")
    p.add_argument("--data-dir", default=os.environ.get("KERAS_STG_DATA") or os.path.join(
        REPO, "..", "shared", "data"))
    p.add_argument("--limit", type=int, default=None, help="training images (default all)")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--validation", action="store_true",
                   help="measure accuracy on the last --test-limit training images instead "
                        "of the test set (to choose a recipe without looking at the test "
                        "set; needs --out, writes no RESULTS.md)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--targets", type=float, nargs="+", default=None,
                   help="shares of multiply-adds (latency for ours-latency) to remove")
    p.add_argument("--seed", type=int, default=0)
    recipe = sm.Recipe()
    p.add_argument("--init-mu", default=str(recipe.init_mu),
                   help="our gates' start: random (a random mask at the target), auto, or a "
                        "number (0.5: all open; default %(default)s)")
    p.add_argument("--sigma", type=float, default=recipe.sigma,
                   help="our gates' noise scale (default %(default)s)")
    p.add_argument("--finetune", type=float, default=None,
                   help="share of the training steps our mask is frozen at the end (default: "
                        "the net's, chosen on validation images: " + ", ".join(
                            f"{k} {v.finetune}" for k, v in sm.NETS.items()) + ")")
    p.add_argument("--gate-lr", type=float, default=recipe.gate_lr,
                   help="our gates' learning rate as a multiple of the weights' "
                        "(default %(default)s)")
    p.add_argument("--score", choices=("mu", "taylor", "taylor_cost", "random"),
                   default=recipe.score,
                   help="what ranks our channels when the mask freezes: the gates' mu, "
                        "the summed squared gradient of the loss to each open gate over the "
                        "gate phase (taylor), that over the channel's cost (taylor_cost), or "
                        "a random draw after a dense gate phase (the control; default "
                        "%(default)s)")
    p.add_argument("--channel-multiple", type=int, default=8,
                   help="every method keeps channels in multiples of this (default 8)")
    p.add_argument("--out", default=None)
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    quick = {"limit": 128, "test_limit": 64, "epochs": 2, "targets": [0.5]}
    full = {"limit": 60000, "test_limit": 10000, "epochs": 10, "targets": [0.5, 0.75]}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.validation and args.out is None:
        p.error("--validation needs its own --out folder (its accuracies are not test "
                "accuracies, so they must not mix with the benchmark's models)")
    if args.out is None:
        args.out = os.path.join(REPO, "benchmarks", "results")
    if args.results is None and not args.quick and not args.validation:
        args.results = os.path.join(REPO, "benchmarks", "RESULTS.md")
    for t in args.targets:
        if not 0 < t < 1:
            p.error(f"--targets are shares to remove, in (0, 1); got {t}")
    if args.init_mu not in ("auto", "random"):
        try:
            args.init_mu = float(args.init_mu)
        except ValueError:
            p.error(f"--init-mu takes random, auto or a number, got {args.init_mu!r}")
    args.verbose = 0 if args.quick else 2
    args.bisection = 4 if args.quick else 8
    args.rounds, args.runs = (2, 5) if args.quick else (7, 100)
    args.calibration = 32 if args.quick else 256
    args.int8_test_limit = 64 if args.quick else 2000
    words = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python -m benchmarks.structured"] + [shlex.quote(w) for w in words])
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    log(f"structured: {', '.join(args.nets)}; {args.limit} training images, {args.epochs} "
        f"epochs, targets {args.targets}; parts {', '.join(args.only)}")
    results = None
    for part in PARTS:
        if part in args.only:
            results = globals()[f"part_{part}"](args)
    log(f"done in {time.time() - start:.0f} s")
    return results

if __name__ == "__main__":
    main()
