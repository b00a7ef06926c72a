"""The benchmark suite: stochastic gates against edge-popup and tfmot, one command.

Usage:
    python -m benchmarks.run [--quick] [--only frontier joint cost export]
        [--tasks lenet_mnist conv4_fashion conv4_cifar10] [--epochs N] [--limit N]
        [--sparsities 0.5 0.7 0.9 0.95 0.98] [--data-dir D] [--out DIR]
        [--results PATH] [--fresh] [--batch-size B] [--methods ours edge_popup]

Parts (`--only` selects some; default all):
- `frontier`: accuracy vs sparsity, ours (`slt` mode, library defaults:
  `keras_stg.wrap(model, target_sparsity=s)`, so the gates start as a random mask
  at `s`, with the batch size, learning rate, gate start and scale-fan of the task's config, `TASK_CONFIGS`) against edge-popup (`benchmarks.edge_popup`, paper settings: SGD momentum 0.9,
  lr 0.1, cosine decay, weight decay 1e-4 on the scores), on the very weights
  our run at that sparsity starts from (`edge_popup.init_like_ours`), same
  epochs, batch size and data. LeNet-300-100 on MNIST, Conv-4 on Fashion-MNIST, Conv-4 on
  CIFAR-10 when its files are in the data folder. Then ours once more at the
  sparsity where it would keep a quarter of the weights of edge-popup's most
  accurate k (the paper's claim), unless the frontier already has it.
  `--methods ours` (or `edge_popup`) runs one method and keeps the other's rows
  from the last frontier run of the same epochs, training-set limit, batch,
  scale-fan and edge-popup settings. `--limit N` trains every method on the
  first N training examples (a shorter, equal budget for slow tasks); the test
  split stays whole.
- `joint`: our `joint` mode against tfmot magnitude pruning (`prune_low_magnitude`,
  polynomial decay; run in a subprocess by `benchmarks.tfmot_job`) at 90% and
  95%, both starting from the same Glorot weights and both with Adam at
  `JOINT_LR` (the learning rate of `configs/lenet_300_100_mnist_joint.yaml`).
- `cost`: training-step time of the plain model, the gated model and
  edge-popup, measured in this process on one synthetic batch.
- `export`: TFLite sizes (dense, sparse, int8) of our stripped 90% LeNet ticket,
  when the export stage (`export.tflite`) is importable.

Prints one table and writes the PNG plots and `results.json` to `--out`
(default `benchmarks/results/`), and the generated section of `--results`
(default `benchmarks/RESULTS.md`): only the text between
`<!-- benchmarks.run:begin -->` and `<!-- benchmarks.run:end -->` is replaced.
Results of earlier runs in `--out/results.json` are kept for the parts and
tasks not re-run (unless `--fresh`), so the parts can be run one at a time.

`--quick` uses small subsets, 1 epoch and two sparsities: a smoke test of the
whole pipeline in under 3 minutes, never the repository's RESULTS.md (a
temporary folder unless `--results`/`--out` are given). Its numbers mean
nothing.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN = "<!-- benchmarks.run:begin -->"
END = "<!-- benchmarks.run:end -->"
PARTS = ("frontier", "joint", "cost", "export")
#: `--only report`: no training, only the table, plots and section from results.json.
REPORT = "report"

#: name -> (model, dataset, title, default epochs)
TASKS = {
    "lenet_mnist": ("lenet_300_100", "mnist", "LeNet-300-100 / MNIST", 20),
    "conv4_fashion": ("conv4", "fashion_mnist", "Conv-4 / Fashion-MNIST", 20),
    "conv4_cifar10": ("conv4", "cifar10", "Conv-4 / CIFAR-10", 20),
}
#: name -> (slt config, joint config or None) in configs/: ours runs with the
#: batch size, learning rate and scale-fan setting of the task's config (the
#: settings we recommend for it); the baselines get the same batch size, and
#: edge-popup the very same frozen weights.
TASK_CONFIGS = {
    "lenet_mnist": ("lenet_300_100_mnist_slt", "lenet_300_100_mnist_joint"),
    "conv4_fashion": ("conv4_fashion_mnist_slt", "conv4_fashion_mnist_joint"),
    "conv4_cifar10": ("conv4_cifar10_slt", None),
}
FRONTIER_SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.98)
JOINT_SPARSITIES = (0.9, 0.95)

# Edge-popup's paper settings (allenai/hidden-networks, configs/smallscale).
EP_LR = 0.1
# Adam learning rate of both joint-training methods (ours trains weights and
# gates with it, tfmot the weights): the usual rate for training weights.
JOINT_LR = 1e-3
EP_MOMENTUM = 0.9
EP_WEIGHT_DECAY = 1e-4

# --quick: train/test examples per task, epochs, sparsities.
QUICK = {"limit": {"lenet_300_100": 1024, "conv4": 256}, "test_limit": 500, "epochs": 1,
         "sparsities": (0.5, 0.9)}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _atomic_write_text(path, text):
    from keras_stg import _files

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _files.atomic_write_text(path, text)


def replace_section(path, body):
    """Replaces the text between the markers in `path` (appends them if absent), atomically."""
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end != -1 and end > start:
        text = text[:start] + block + text[end + len(END):]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    _atomic_write_text(path, text)


# --------------------------------------------------------------------- training


class Setup:
    """Everything a training run needs, derived once from the arguments."""

    def __init__(self, args):
        from keras_stg.experiments.config import Config

        defaults = Config()
        self.quick = args.quick
        self.data_dir = args.data_dir
        self.epochs = args.epochs
        self.limit = args.limit
        self.batch_override = args.batch_size
        self._configs = {}
        # The `cost` part times one batch of this size (the overhead benchmark's).
        self.batch_size = args.batch_size or defaults.batch_size
        self.learning_rate = defaults.learning_rate
        self.seed = args.seed
        self.verbose = 0 if args.quick else 2
        self.ep_lr = args.ep_lr
        self.ep_wd = args.ep_wd
        # Set by `main`: the command line and "started at, load, library state"
        # of this run, recorded in every task entry it creates.
        self.command = self.run_info = None

    def config(self, task, part="slt"):
        """The task's `Config` from configs/ (`part`: "slt" or "joint"; the slt
        one when the task has no joint config), read once."""
        from keras_stg.experiments import config

        slt, joint = TASK_CONFIGS[task]
        name = joint if part == "joint" and joint else slt
        if name not in self._configs:
            self._configs[name] = config.load(os.path.join(REPO, "configs", name + ".yaml"))
        return self._configs[name]

    def batch_for(self, task, part="slt"):
        return self.batch_override or self.config(task, part).batch_size

    def scale_fan(self, task):
        return bool(self.config(task).scale_fan)

    def epochs_for(self, task):
        if self.epochs is not None:
            return self.epochs
        return QUICK["epochs"] if self.quick else TASKS[task][3]

    def limits(self, task):
        """(training examples, test examples) of every run; None means all.

        `--limit` shortens training only: every method is still scored on the
        full test split."""
        if not self.quick:
            return self.limit, None
        return QUICK["limit"][TASKS[task][0]], QUICK["test_limit"]

    def title(self, task):
        """The task's name in the rows, with the training-set limit if any."""
        limit = self.limits(task)[0]
        return TASKS[task][2] + (f" (first {limit} training examples)"
                                 if limit and not self.quick else "")

    def datasets(self, task, part="slt"):
        from keras_stg.experiments import data

        _, dataset, _, _ = TASKS[task]
        limit, test_limit = self.limits(task)
        train = data.dataset(dataset, "train", self.batch_for(task, part), self.data_dir,
                             seed=self.seed, limit=limit)
        test = data.dataset(dataset, "test", 1000, self.data_dir, limit=test_limit)
        return train, test, int(train.cardinality())

    def build(self, task):
        from keras_stg.experiments import data, models

        model, dataset, _, _ = TASKS[task]
        shape, classes, _, _ = data.DATASETS[dataset]
        if model == "lenet_300_100":
            return models.lenet_300_100(input_shape=shape, classes=classes)
        return getattr(models, model)(input_shape=shape, classes=classes)


def _loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def train_ours(setup, task, sparsity, mode, train, test, prepare=None, learning_rate=None):
    """Our method with the library defaults; returns accuracy, sparsity, time, model.

    `prepare(model)`, if given, runs on the freshly built model before it is wrapped.
    The gates' start (`init_mu`) and the target ramp follow the task's config.
    Adam runs at `learning_rate` (default: the mode's task config's). In `slt` mode the
    weights get scale-fan when the task's config asks for it.
    """
    import keras

    import keras_stg

    keras.backend.clear_session()
    keras.utils.set_random_seed(setup.seed)
    model = setup.build(task)
    if prepare is not None:
        prepare(model)
    cfg = setup.config(task, "joint" if mode == "joint" else "slt")
    gated = keras_stg.wrap(model, mode=mode, target_sparsity=sparsity, seed=setup.seed,
                           init_density="auto" if mode == "slt" and cfg.scale_fan else None,
                           init_mu=cfg.init_mu, target_ramp=cfg.target_ramp,
                           finetune=cfg.finetune)
    gated.compile(optimizer=keras.optimizers.Adam(learning_rate or cfg.learning_rate),
                  loss=_loss(), metrics=["accuracy"])
    start = time.time()
    gated.fit(train, epochs=setup.epochs_for(task), verbose=setup.verbose)
    wall = time.time() - start
    acc = gated.evaluate(test, verbose=0, return_dict=True)["accuracy"]
    return {"accuracy": float(acc), "sparsity": gated.sparsity(), "wall_time_s": wall}, gated


def train_edge_popup(setup, task, sparsity, train, test, steps_per_epoch):
    import keras

    from benchmarks.edge_popup import EdgePopupModel, init_like_ours, sgd_cosine

    keras.backend.clear_session()
    keras.utils.set_random_seed(setup.seed)
    model = init_like_ours(setup.build(task), sparsity, seed=setup.seed,
                           scale_fan=setup.scale_fan(task))
    ep = EdgePopupModel(model, density=1.0 - sparsity, weight_decay=setup.ep_wd,
                        seed=setup.seed)
    epochs = setup.epochs_for(task)
    ep.compile(optimizer=sgd_cosine(setup.ep_lr, epochs * steps_per_epoch, EP_MOMENTUM),
               loss=_loss(), metrics=["accuracy"])
    start = time.time()
    ep.fit(train, epochs=epochs, verbose=setup.verbose)
    wall = time.time() - start
    acc = ep.evaluate(test, verbose=0, return_dict=True)["accuracy"]
    return {"accuracy": float(acc), "sparsity": ep.sparsity(), "wall_time_s": wall}


def task_available(setup, task):
    """None if the task's data can be loaded, else the reason it is skipped."""
    from keras_stg.experiments import data

    dataset = TASKS[task][1]
    try:
        data.load(dataset, "test", setup.data_dir)
    except Exception as e:  # DataError, or tensorflow-datasets failing offline
        return f"{dataset} not available ({str(e).splitlines()[0][:160]})"
    return None


# ------------------------------------------------------------------------ parts


def part_frontier(setup, tasks, sparsities, results, save, methods=("ours", "edge_popup")):
    runs = [(t, s) for t in tasks for s in sparsities]
    for task in tasks:
        reason = task_available(setup, task)
        entry = {"title": setup.title(task), "epochs": setup.epochs_for(task),
                 "limit": setup.limits(task)[0], "batch": setup.batch_for(task),
                 "scale_fan": setup.scale_fan(task),
                 "command": setup.command, "run": setup.run_info,
                 "ours": [], "edge_popup": [], "skipped": reason,
                 "ep_settings": f"SGD(lr={setup.ep_lr}, momentum={EP_MOMENTUM}, cosine), "
                                f"wd={setup.ep_wd}"}
        previous = results["frontier"].get(task) or {}
        same_setting = all(previous.get(k) == entry[k]
                           for k in ("epochs", "limit", "batch", "scale_fan", "ep_settings"))
        for method in ("ours", "edge_popup"):
            # A method this run leaves out keeps its rows from the last run of
            # the same setting, so `--methods ours` re-runs ours against them.
            if method not in methods and same_setting and not previous.get("skipped"):
                entry[method] = [r for r in previous.get(method, []) if not r.get("probe")]
        results["frontier"][task] = entry
        if reason:
            log(f"frontier {TASKS[task][2]}: skipped, {reason}")
            save()
            continue
        train, test, steps = setup.datasets(task)
        for sparsity in sparsities:
            i = runs.index((task, sparsity)) + 1
            if "ours" not in methods:
                r = _edge_popup_point(setup, task, sparsity, train, test, steps, i, len(runs))
                entry["edge_popup"].append(r)
                save()
                continue
            log(f"frontier {i}/{len(runs)} {TASKS[task][2]} ours (slt) target {sparsity:.2f} ...")
            r, gated = train_ours(setup, task, sparsity, "slt", train, test)
            r["target"] = sparsity
            entry["ours"].append(r)
            log(f"  ours: accuracy {r['accuracy']:.4f} sparsity {r['sparsity']:.4f} "
                f"({r['wall_time_s']:.0f} s)")
            if task == "lenet_mnist" and math.isclose(sparsity, 0.9):
                path = os.path.join(setup.out, "lenet_mnist_slt_0.90_stripped.keras")
                gated.strip().save(path)
            save()
            if "edge_popup" in methods:
                r = _edge_popup_point(setup, task, sparsity, train, test, steps, i, len(runs))
                entry["edge_popup"].append(r)
                save()
        if "ours" in methods and entry["edge_popup"]:
            _headline_probe(setup, task, entry, train, test, save)


def _headline_probe(setup, task, entry, train, test, save):
    """Runs ours at the sparsity of the paper's claim if the frontier lacks it.

    The claim: at edge-popup's best accuracy we keep at most a quarter of the
    weights it keeps. Its best k is known only after the frontier ran, so the
    point that tests the claim, sparsity `1 - (1 - s_best) / 4`, is run here.
    """
    best = max(entry["edge_popup"], key=lambda r: r["accuracy"])
    probe = round(1 - (1 - best["target"]) / 4, 4)
    if any(math.isclose(r["target"], probe) for r in entry["ours"]):
        return
    log(f"frontier {TASKS[task][2]} ours (slt) target {probe:.3f}: a quarter of the weights "
        f"of edge-popup's best k ({1 - best['target']:.2f}) ...")
    r, _ = train_ours(setup, task, probe, "slt", train, test)
    r.update(target=probe, probe=True)
    entry["ours"].append(r)
    log(f"  ours: accuracy {r['accuracy']:.4f} sparsity {r['sparsity']:.4f} "
        f"({r['wall_time_s']:.0f} s)")
    save()


def _edge_popup_point(setup, task, sparsity, train, test, steps, i, n):
    log(f"frontier {i}/{n} {TASKS[task][2]} edge-popup k={1 - sparsity:.2f} ...")
    r = train_edge_popup(setup, task, sparsity, train, test, steps)
    r["target"] = sparsity
    log(f"  edge-popup: accuracy {r['accuracy']:.4f} sparsity {r['sparsity']:.4f} "
        f"({r['wall_time_s']:.0f} s)")
    return r


def _start_tfmot(setup, task, sparsities, init_path, json_path, log_path):
    model, dataset, _, _ = TASKS[task]
    limit, test_limit = setup.limits(task)
    cmd = [sys.executable, "-m", "benchmarks.tfmot_job", "--json-out", json_path,
           "--model", model, "--dataset", dataset, "--epochs", str(setup.epochs_for(task)),
           "--batch-size", str(setup.batch_for(task, "joint")), "--init-weights", init_path,
           "--seed", str(setup.seed), "--learning-rate", str(JOINT_LR),
           "--sparsities", *[str(s) for s in sparsities]]
    if setup.data_dir:
        cmd += ["--data-dir", setup.data_dir]
    if limit:
        cmd += ["--limit", str(limit)]
    if test_limit:
        cmd += ["--test-limit", str(test_limit)]
    if not setup.quick:
        cmd.append("--verbose")
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TF_USE_LEGACY_KERAS", None)
    out = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, out, cmd


def _finish_tfmot(proc, out, json_path, log_path):
    proc.wait()
    out.close()
    if os.path.exists(json_path):
        with open(json_path) as f:
            return json.load(f)
    with open(log_path) as f:
        tail = [line for line in f.read().splitlines() if line.strip()][-3:]
    return {"ok": False, "reason": f"tfmot job exited with code {proc.returncode}: "
                                   + " | ".join(tail)[-300:]}


def part_joint(setup, tasks, sparsities, results, save):
    import keras
    import numpy as np

    for task in tasks:
        reason = task_available(setup, task)
        entry = {"title": setup.title(task), "epochs": setup.epochs_for(task),
                 "limit": setup.limits(task)[0], "batch": setup.batch_for(task, "joint"),
                 "finetune": setup.config(task, "joint").finetune,
                 "command": setup.command, "run": setup.run_info, "ours": [],
                 "tfmot": None, "skipped": reason}
        results["joint"][task] = entry
        if reason:
            log(f"joint {TASKS[task][2]}: skipped, {reason}")
            save()
            continue
        # Both methods start from the same Glorot weights.
        keras.backend.clear_session()
        keras.utils.set_random_seed(setup.seed)
        init_model = setup.build(task)
        init_path = os.path.join(setup.work, f"{task}_init.npz")
        np.savez(init_path, **{layer.name: np.asarray(layer.kernel)
                               for layer in init_model.layers if hasattr(layer, "kernel")})
        json_path = os.path.join(setup.work, f"{task}_tfmot.json")
        log_path = os.path.join(setup.work, f"{task}_tfmot.log")
        if os.path.exists(json_path):
            os.remove(json_path)
        log(f"joint {TASKS[task][2]}: tfmot subprocess started "
            f"({'in parallel' if setup.quick else 'first'})")
        proc, out, cmd = _start_tfmot(setup, task, sparsities, init_path, json_path, log_path)
        entry["tfmot_command"] = " ".join(shlex.quote(c) for c in cmd[1:])
        if not setup.quick:  # sequential in full runs, so wall times stay comparable
            entry["tfmot"] = _finish_tfmot(proc, out, json_path, log_path)
            _log_tfmot(entry["tfmot"])
        train, test, _ = setup.datasets(task, "joint")
        for sparsity in sparsities:
            log(f"joint {TASKS[task][2]} ours (joint) target {sparsity:.2f} ...")
            keras.backend.clear_session()
            keras.utils.set_random_seed(setup.seed)
            r = _train_joint(setup, task, sparsity, init_path, train, test)
            entry["ours"].append(r)
            log(f"  ours joint: accuracy {r['accuracy']:.4f} sparsity {r['sparsity']:.4f} "
                f"({r['wall_time_s']:.0f} s)")
            save()
        if entry["tfmot"] is None:
            entry["tfmot"] = _finish_tfmot(proc, out, json_path, log_path)
            _log_tfmot(entry["tfmot"])
        save()


def _log_tfmot(t):
    if not t.get("ok"):
        log(f"  tfmot skipped: {t.get('reason')}")
        return
    for r in t["results"]:
        log(f"  tfmot: accuracy {r['accuracy']:.4f} sparsity {r['sparsity']:.4f} "
            f"({r['wall_time_s']:.0f} s)")


def _train_joint(setup, task, sparsity, init_path, train, test):
    import numpy as np

    init = np.load(init_path)

    def load_init(model):
        for layer in model.layers:
            if layer.name in init:
                layer.kernel.assign(init[layer.name])

    r, _ = train_ours(setup, task, sparsity, "joint", train, test, prepare=load_init,
                      learning_rate=JOINT_LR)
    return {"target": sparsity, **r}


def _step_time(model, optimizer, x, y, steps, repeats):
    import numpy as np

    model.compile(optimizer=optimizer, loss=_loss())
    model.fit(x, y, batch_size=len(x), epochs=2, verbose=0)  # trace and warm up
    xs, ys = np.concatenate([x] * steps), np.concatenate([y] * steps)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(xs, ys, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
        times.append((time.perf_counter() - start) / steps)
    return float(np.median(times))


def part_cost(setup, tasks, results, save):
    import keras
    import numpy as np

    import keras_stg
    from benchmarks.edge_popup import EdgePopupModel, init_like_ours, sgd_cosine

    for task in tasks:
        if setup.quick and task != "lenet_mnist":
            continue
        steps, repeats = (5, 2) if setup.quick else ((50, 5) if task == "lenet_mnist" else (10, 3))
        rng = np.random.default_rng(0)
        keras.backend.clear_session()
        probe = setup.build(task)
        x = rng.standard_normal((setup.batch_size,) + tuple(probe.input_shape[1:])).astype("float32")
        y = rng.integers(0, 10, setup.batch_size)
        log(f"cost {TASKS[task][2]}: plain step ({steps} steps x {repeats}) ...")
        row = {"title": TASKS[task][2], "batch": setup.batch_size, "steps": steps,
               "repeats": repeats}
        row["plain_ms"] = 1e3 * _step_time(probe, keras.optimizers.Adam(1e-3), x, y, steps, repeats)
        log(f"cost {TASKS[task][2]}: gated (slt) step ...")
        keras.backend.clear_session()
        gated = keras_stg.wrap(setup.build(task), mode="slt", target_sparsity=0.9, seed=0)
        row["gated_ms"] = 1e3 * _step_time(gated, keras.optimizers.Adam(setup.learning_rate),
                                           x, y, steps, repeats)
        for density in (0.5, 0.1):
            log(f"cost {TASKS[task][2]}: edge-popup step, k={density} ...")
            keras.backend.clear_session()
            model = init_like_ours(setup.build(task), 1.0 - density, seed=0)
            ep = EdgePopupModel(model, density=density, weight_decay=setup.ep_wd)
            row[f"ep_k{int(round(density * 100))}_ms"] = 1e3 * _step_time(
                ep, sgd_cosine(setup.ep_lr, 1000, EP_MOMENTUM), x, y, steps, repeats)
        log(f"  plain {row['plain_ms']:.2f} ms, gated {row['gated_ms']:.2f} ms, edge-popup "
            f"{row['ep_k50_ms']:.2f} ms (k=0.5) / {row['ep_k10_ms']:.2f} ms (k=0.1)")
        results["cost"][task] = row
        save()


def part_export(setup, results, save):
    """TFLite sizes of our 90% LeNet ticket through the export stage, if it exists."""
    try:
        from export import tflite as export_tflite
    except Exception as e:
        results["export"] = {"ok": False, "reason": f"export stage not available "
                             f"(import export.tflite failed: {type(e).__name__}: {e})"}
        log(results["export"]["reason"])
        save()
        return
    path = os.path.join(setup.out, "lenet_mnist_slt_0.90_stripped.keras")
    if not os.path.exists(path):
        results["export"] = {"ok": False, "reason": "no 90% LeNet ticket to export: run the "
                             "frontier part with lenet_mnist and 0.9 first"}
        log(results["export"]["reason"])
        save()
        return
    import keras
    import numpy as np

    import keras_stg  # noqa: F401  (registers the library's classes)

    model = keras.models.load_model(path)
    try:
        sizes = _export_sizes(export_tflite, model, setup)
        kernels = [w for layer in model.layers if hasattr(layer, "kernel")
                   for w in [np.asarray(layer.kernel)]]
        sparsity = 1.0 - sum(int((k != 0).sum()) for k in kernels) / sum(k.size for k in kernels)
        results["export"] = {"ok": True, "model": "LeNet-300-100 / MNIST, slt",
                             "sizes": sizes, "sparsity": sparsity}
        log("export sizes: " + ", ".join(f"{k} {v['bytes']} B" for k, v in sizes.items()))
    except Exception as e:
        results["export"] = {"ok": False, "reason": f"export stage failed "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"}
        log(results["export"]["reason"])
    save()


def _export_sizes(module, model, setup):
    """Bytes (and gzip bytes) of the dense, sparse and int8 TFLite files of `model`.

    Uses the export stage's `convert(model, sparse=, int8=, representative=)`,
    calibrated on 256 MNIST training images.
    """
    import gzip

    from keras_stg.experiments import data

    images, _ = data.load("mnist", "train", setup.data_dir)
    representative = data.normalize(images[:256], "mnist")
    sizes = {}
    for variant, kwargs in (("dense", {}), ("sparse", {"sparse": True}),
                            ("int8", {"int8": True, "representative": representative})):
        blob = module.convert(model, **kwargs)
        sizes[variant] = {"bytes": len(blob),
                          "gzip_bytes": len(gzip.compress(blob, compresslevel=9, mtime=0))}
    return sizes


# ------------------------------------------------------------------- reporting


def _pct(x):
    return "" if x is None else f"{100 * x:.2f}%"


def table_rows(results):
    rows = []
    for task, e in results["frontier"].items():
        if e.get("skipped"):
            rows.append(("frontier", e["title"], "-", "", "", "", "", f"skipped: {e['skipped']}"))
            continue
        ep = {round(r["target"], 4): r for r in e["edge_popup"]}
        for r in sorted(e["ours"], key=lambda r: r["target"]):
            other = ep.get(round(r["target"], 4))
            note = _frontier_note(r, other)
            if r.get("probe"):
                note = "a quarter of the weights of edge-popup's best k"
            target = f"{r['target']:.3f}" if r.get("probe") else f"{r['target']:.2f}"
            rows.append(("frontier", e["title"], "ours (slt)", target,
                         _pct(r["sparsity"]), _pct(r["accuracy"]), f"{r['wall_time_s']:.0f} s",
                         note))
            if other:
                rows.append(("frontier", e["title"], "edge-popup", f"{r['target']:.2f}",
                             _pct(other["sparsity"]), _pct(other["accuracy"]),
                             f"{other['wall_time_s']:.0f} s", f"k = {1 - r['target']:.2f}"))
        claim = headline(e)
        if claim:
            rows.append(("frontier", e["title"], "summary", "", "", "", "", claim))
    for task, e in results["joint"].items():
        if e.get("skipped"):
            rows.append(("joint", e["title"], "-", "", "", "", "", f"skipped: {e['skipped']}"))
            continue
        t = e.get("tfmot") or {"ok": False, "reason": "not run"}
        tf_rows = {round(r["sparsity_target"], 4): r for r in t.get("results", [])} if t.get("ok") else {}
        for r in e["ours"]:
            other = tf_rows.get(round(r["target"], 4))
            note = ""
            if other:
                note = "joint >= tfmot" if r["accuracy"] >= other["accuracy"] else "joint < tfmot"
            rows.append(("joint", e["title"], "ours (joint)", f"{r['target']:.2f}",
                         _pct(r["sparsity"]), _pct(r["accuracy"]), f"{r['wall_time_s']:.0f} s",
                         note))
            if other:
                rows.append(("joint", e["title"], "tfmot magnitude", f"{r['target']:.2f}",
                             _pct(other["sparsity"]), _pct(other["accuracy"]),
                             f"{other['wall_time_s']:.0f} s", ""))
        if not t.get("ok"):
            rows.append(("joint", e["title"], "tfmot magnitude", "", "", "", "",
                         f"skipped: {t.get('reason')}"))
    for task, c in results["cost"].items():
        rows.append(("cost", c["title"], "plain step", "", "", "", f"{c['plain_ms']:.2f} ms",
                     f"batch {c['batch']}, median of {c['repeats']} x {c['steps']} steps"))
        rows.append(("cost", c["title"], "gated step (slt)", "", "", "", f"{c['gated_ms']:.2f} ms",
                     f"gated / plain = {c['gated_ms'] / c['plain_ms']:.2f}"))
        for k in (50, 10):
            ms = c[f"ep_k{k}_ms"]
            rows.append(("cost", c["title"], f"edge-popup step (k={k / 100:.1f})", "", "", "",
                         f"{ms:.2f} ms", f"edge-popup / ours = {ms / c['gated_ms']:.2f}"))
    ex = results.get("export")
    if ex is not None:
        if ex.get("ok"):
            dense = ex["sizes"].get("dense", {}).get("bytes")
            for k, v in ex["sizes"].items():
                ratio = f", {v['bytes'] / dense:.2f}x dense" if dense else ""
                rows.append(("export", ex["model"], f"tflite {k}", "0.90",
                             _pct(ex.get("sparsity")), "", "",
                             f"{v['bytes'] / 1024:.1f} KiB (gzip {v['gzip_bytes'] / 1024:.1f} "
                             f"KiB){ratio}"))
        else:
            rows.append(("export", "-", "-", "", "", "", "", ex["reason"]))
    return rows


def _frontier_verdict(ours, ep):
    """`met`, `lower accuracy` or `lower sparsity` (ours landed > 0.5 points below edge-popup's)."""
    if ours["sparsity"] < ep["sparsity"] - 0.005:
        return "lower sparsity"
    return "met" if ours["accuracy"] >= ep["accuracy"] else "lower accuracy"


def _frontier_note(ours, ep):
    if ep is None:
        return ""
    verdict = _frontier_verdict(ours, ep)
    if verdict == "met":
        return "ours >= edge-popup"
    if verdict == "lower accuracy":
        return "ours < edge-popup"
    return (f"ours missed the target sparsity ({_pct(ours['sparsity'])} vs "
            f"{_pct(ep['sparsity'])})" + (", accuracy >=" if ours["accuracy"] >= ep["accuracy"]
                                           else ", accuracy <"))


def headline(entry):
    """The paper's claim, checked: at edge-popup's best accuracy, do we keep <= 1/4 of its weights?"""
    if not entry["ours"] or not entry["edge_popup"]:
        return ""
    best = max(entry["edge_popup"], key=lambda r: r["accuracy"])
    as_good = [r for r in entry["ours"] if r["accuracy"] >= best["accuracy"]]
    if not as_good:
        return (f"edge-popup best {_pct(best['accuracy'])} at {_pct(best['sparsity'])} sparsity; "
                f"no run of ours reaches it")
    ours = max(as_good, key=lambda r: r["sparsity"])
    ratio = (1 - ours["sparsity"]) / max(1e-9, 1 - best["sparsity"])
    return (f"edge-popup best {_pct(best['accuracy'])} at {_pct(best['sparsity'])} sparsity; ours "
            f"{_pct(ours['accuracy'])} at {_pct(ours['sparsity'])}: keeps {ratio:.3f}x its weights "
            f"({'met' if ratio <= 0.25 else 'not met'}: target <= 0.25)")


def targets(results):
    """The issue's targets, each with its measured verdict (lines of markdown)."""
    lines = []
    for task, e in results["frontier"].items():
        if e.get("skipped") or not e["edge_popup"]:
            continue
        ep = {round(r["target"], 4): r for r in e["edge_popup"]}
        pairs = [(r, ep[round(r["target"], 4)]) for r in e["ours"] if round(r["target"], 4) in ep]
        verdicts = [(r["target"], _frontier_verdict(r, o)) for r, o in pairs]
        bad = [f"{t:.0%}: {v}" for t, v in verdicts if v != "met"]
        lines.append(f"- {e['title']}, ours >= edge-popup at every sparsity: "
                     + ("**met**" if not bad else f"**not met** ({'; '.join(bad)})")
                     + f" ({len(pairs)} sparsities, {e['epochs']} epochs)")
        lines.append(f"- {e['title']}, at edge-popup's best accuracy we keep <= 1/4 of its "
                     f"weights: {headline(e)}")
    for task, e in results["joint"].items():
        t = e.get("tfmot") or {}
        if e.get("skipped") or not t.get("ok"):
            continue
        by = {round(r["sparsity_target"], 4): r for r in t["results"]}
        pairs = [(r, by[round(r["target"], 4)]) for r in e["ours"] if round(r["target"], 4) in by]
        worse = [f"{r['target']:.0%}" for r, o in pairs if r["accuracy"] < o["accuracy"]]
        lines.append(f"- {e['title']}, joint >= tfmot: "
                     + ("**met**" if not worse else f"**not met** (below at {', '.join(worse)})"))
    for task, c in results["cost"].items():
        ok = c["gated_ms"] <= min(c["ep_k50_ms"], c["ep_k10_ms"])
        lines.append(f"- {c['title']}, our step time <= edge-popup's: "
                     f"{'**met**' if ok else '**not met**'} (ours {c['gated_ms']:.2f} ms, "
                     f"edge-popup {c['ep_k50_ms']:.2f} ms at k=0.5, {c['ep_k10_ms']:.2f} ms at "
                     f"k=0.1); gated / plain = {c['gated_ms'] / c['plain_ms']:.2f}")
    return lines


HEADER = ("part", "network", "method", "target", "sparsity", "test acc", "time", "note")


def markdown_table(rows):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    return "\n".join(lines)


def plot(results, out):
    """One PNG per frontier task and one for joint vs tfmot; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task, e in results["frontier"].items():
        if e.get("skipped") or not e["ours"]:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label, marker in (("ours", "stochastic gates (ours, slt)", "o"),
                                   ("edge_popup", "edge-popup", "s")):
            pts = sorted(e[key], key=lambda r: r["sparsity"])
            if pts:
                ax.plot([100 * r["sparsity"] for r in pts], [100 * r["accuracy"] for r in pts],
                        marker=marker, label=label)
        ax.set_xlabel("sparsity (% of weights removed)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{e['title']}:\nfrozen random weights, {e['epochs']} epochs", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
        fig.tight_layout()
        path = os.path.join(out, f"frontier_{task}.png")
        _save_fig(fig, path)
        plt.close(fig)
        paths.append(path)
    joint = {t: e for t, e in results["joint"].items() if not e.get("skipped") and e["ours"]}
    if joint:
        fig, axes = plt.subplots(1, len(joint), figsize=(5 * len(joint), 4), squeeze=False)
        for ax, (task, e) in zip(axes[0], joint.items()):
            labels = [f"{r['target']:.0%}" for r in e["ours"]]
            xs = range(len(labels))
            ax.bar([x - 0.2 for x in xs], [100 * r["accuracy"] for r in e["ours"]], 0.4,
                   label="ours (joint)")
            t = e.get("tfmot") or {}
            if t.get("ok"):
                by = {round(r["sparsity_target"], 4): r for r in t["results"]}
                ax.bar([x + 0.2 for x in xs],
                       [100 * by[round(r["target"], 4)]["accuracy"]
                        if round(r["target"], 4) in by else 0 for r in e["ours"]],
                       0.4, label="tfmot magnitude pruning")
            accs = [100 * r["accuracy"] for r in e["ours"]]
            if t.get("ok"):
                accs += [100 * r["accuracy"] for r in t["results"]]
            ax.set_ylim(max(0.0, min(accs) - 3.0), min(100.0, max(accs) + 1.5))
            ax.set_xticks(list(xs), labels)
            ax.set_xlabel("target sparsity")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(e["title"], fontsize=10)
            ax.legend(loc="lower left")
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        path = os.path.join(out, "joint_vs_tfmot.png")
        _save_fig(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _save_fig(fig, path):
    from keras_stg import _files

    _files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _task_settings(results):
    """'LeNet-300-100 / MNIST: frontier batch 64, scale-fan; joint batch 128' and so on."""
    parts = []
    for task in TASKS:
        f, j = results["frontier"].get(task), results["joint"].get(task)
        bits = []

        def budget(e):
            return (f", first {e['limit']} training examples, {e['epochs']} epochs"
                    if e.get("limit") else "")

        if f and not f.get("skipped") and "batch" in f:
            bits.append(f"frontier batch {f['batch']}" + (", scale-fan" if f.get("scale_fan")
                                                          else ", no scale-fan") + budget(f))
        if j and not j.get("skipped") and "batch" in j:
            bits.append(f"joint batch {j['batch']}"
                        + (f", finetune {j['finetune']}" if j.get("finetune") else "")
                        + budget(j))
        if bits:
            parts.append(f"{TASKS[task][2]}: {'; '.join(bits)}")
    return " / ".join(parts) or "batch 128"


def _commands(results):
    """One line per command that made the rows shown, oldest part first."""
    meta = results["meta"]
    lines = []
    for part in PARTS:
        fallback = (meta["commands"].get(part), meta.get("runs", {}).get(part, "?"))
        entries = results.get(part, {}).values() if part in ("frontier", "joint") else ()
        runs = [(e.get("command"), e.get("run")) if e.get("command") else fallback
                for e in entries] or [fallback]
        for cmd, run in runs:
            line = f"{cmd}    # {run}"
            if cmd and line not in lines:
                lines.append(line)
    return lines


def section(results, rows, plots, results_path):
    meta = results["meta"]
    ep_settings = "; ".join(sorted({e["ep_settings"] for e in results["frontier"].values()})) or (
        f"SGD(lr={EP_LR}, momentum={EP_MOMENTUM}, cosine), wd={EP_WEIGHT_DECAY}")
    lines = [
        "## Benchmark suite (generated by `python -m benchmarks.run`)",
        "",
        f"Generated {meta['date']} on {meta['machine']} (the CPU may be shared with other "
        f"jobs: see the load averages below); {meta['versions']}.",
        "",
        "Commands (the latest run of each part and task; started at, load average, library "
        "state):",
        "",
        "```",
        *_commands(results),
        "```",
        "",
        "Ours: `keras_stg.wrap(model, mode=..., target_sparsity=s, seed=0)` with the library "
        "defaults, plus the batch size, learning rate and scale-fan setting of the task's "
        "config in `configs/` (`benchmarks.run.TASK_CONFIGS`; " + _task_settings(results) +
        f"); Adam at the config's rate (`slt`) or at {JOINT_LR} (`joint`, as tfmot; with the "
        "joint config's `finetune`, the mask frozen at the target for that share of the "
        "epochs at the end while the weights fine-tune, as tfmot's after its schedule). "
        "Edge-popup: the same frozen weights "
        "as ours at each sparsity (bit-identical: `edge_popup.init_like_ours`, scale-fan "
        "included), scores per weight, per-layer top-k by |score|, "
        "straight-through gradient, SGD momentum 0.9 with cosine decay, paper settings "
        f"({ep_settings}), same "
        "epochs, batch and data. tfmot: `prune_low_magnitude`, PolynomialDecay 0 -> target over "
        f"the first half of training, Adam {JOINT_LR}, weights trained from the same Glorot init as "
        "our joint run. Test accuracy on the full test split with the binary mask.",
        "",
    ]
    if meta.get("quick"):
        lines += ["**Quick run (`--quick`): tiny subsets and 1 epoch; the numbers mean nothing.**",
                  ""]
    lines += [markdown_table(rows), ""]
    verdicts = targets(results)
    if verdicts:
        lines += ["Targets of issue 5:", "", *verdicts, ""]
    if plots:
        base = os.path.dirname(os.path.abspath(results_path))
        lines += ["Plots: " + ", ".join(
            f"[{os.path.basename(p)}]({os.path.relpath(p, base)})" for p in plots), ""]
        for p in plots:
            lines.append(f"![{os.path.basename(p)}]({os.path.relpath(p, base)})")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------ main


def _library_state():
    """`git` commit of the checkout, and whether keras_stg/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "keras_stg"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return (head or "unknown commit") + (" + uncommitted changes" if dirty else "")


def _default_data_dir():
    return os.environ.get("KERAS_STG_DATA") or os.path.normpath(
        os.path.join(REPO, "..", "shared", "data"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny subsets, 1 epoch, 2 sparsities (< 3 min)")
    p.add_argument("--only", nargs="+", choices=PARTS + (REPORT,), default=list(PARTS),
                   help="parts to run (default all); 'report' alone re-renders the "
                        "table, plots and section from --out/results.json")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS),
                   help="networks/datasets (CIFAR-10 is skipped when its files are absent)")
    p.add_argument("--sparsities", type=float, nargs="+", default=None,
                   help=f"frontier sparsities (default {' '.join(map(str, FRONTIER_SPARSITIES))})")
    p.add_argument("--methods", nargs="+", choices=("ours", "edge_popup"),
                   default=["ours", "edge_popup"], help="frontier methods (default both)")
    p.add_argument("--joint-sparsities", type=float, nargs="+", default=list(JOINT_SPARSITIES))
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every run (default 20; 1 with --quick)")
    p.add_argument("--limit", type=int, default=None,
                   help="train every method on the first N training examples only (default "
                        "all; the test split stays whole): a shorter budget for slow tasks")
    p.add_argument("--data-dir", default=_default_data_dir(),
                   help="raw dataset files (default $KERAS_STG_DATA or ../shared/data)")
    p.add_argument("--out", default=None,
                   help="folder for the plots and results.json (default benchmarks/results, "
                        "a temporary folder with --quick)")
    p.add_argument("--results", default=None,
                   help="markdown file whose generated section is rewritten (default "
                        "benchmarks/RESULTS.md, a temporary file with --quick)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore results of earlier runs in --out/results.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size of every method (default: the task's config in configs/; "
                        "the cost part: 128)")
    p.add_argument("--ep-lr", type=float, default=EP_LR, help="edge-popup learning rate")
    p.add_argument("--ep-wd", type=float, default=EP_WEIGHT_DECAY,
                   help="edge-popup weight decay on the scores")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be a positive number of training examples, got {args.limit}")
    if args.sparsities is None:
        args.sparsities = list(QUICK["sparsities"] if args.quick else FRONTIER_SPARSITIES)
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    tmp = None
    if args.quick and (args.out is None or args.results is None):
        tmp = tempfile.mkdtemp(prefix="keras_stg_bench_")
    out = args.out or (tmp if args.quick else os.path.join(REPO, "benchmarks", "results"))
    results_path = args.results or (os.path.join(tmp, "RESULTS.md") if args.quick
                                    else os.path.join(REPO, "benchmarks", "RESULTS.md"))
    os.makedirs(out, exist_ok=True)
    log(f"benchmarks.run{' --quick' if args.quick else ''}: parts {' '.join(args.only)}; "
        f"tasks {' '.join(args.tasks)}; out {out}; results {results_path}")

    import keras
    import tensorflow as tf

    setup = Setup(args)
    setup.out = out
    setup.work = tempfile.mkdtemp(prefix="keras_stg_bench_work_")
    json_path = os.path.join(out, "results.json")
    results = {"frontier": {}, "joint": {}, "cost": {}, "export": None,
               "meta": {"commands": {}}}
    if os.path.exists(json_path) and not args.fresh:
        with open(json_path) as f:
            old = json.load(f)
        if bool(old.get("meta", {}).get("quick")) == bool(args.quick):
            results.update(old)
            results["meta"].setdefault("commands", {})
    command = "python -m benchmarks.run " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if set(args.only) - {REPORT}:  # `--only report` keeps the meta of the runs it renders
        results["meta"].update({
            "quick": args.quick,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()} CPU x{os.cpu_count()}, no GPU"
                       if not tf.config.list_physical_devices("GPU") else "GPU",
            "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "versions": f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
                        f"Python {platform.python_version()}",
        })
    results["meta"].setdefault("date", "?")
    results["meta"].setdefault("machine", "?")
    results["meta"].setdefault("versions", "?")
    run_info = (f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, load average "
                f"{os.getloadavg()[0]:.1f}, keras_stg at {_library_state()}")
    for part in args.only:
        if part in PARTS:
            results["meta"]["commands"][part] = command
            results["meta"].setdefault("runs", {})[part] = run_info
    setup.command, setup.run_info = command, run_info

    def save():
        _atomic_write_text(json_path, json.dumps(results, indent=2))

    if "cost" in args.only:
        part_cost(setup, args.tasks, results, save)
    if "frontier" in args.only:
        part_frontier(setup, args.tasks, args.sparsities, results, save, args.methods)
    if "joint" in args.only:
        part_joint(setup, [t for t in args.tasks if t != "conv4_cifar10"],
                   args.joint_sparsities, results, save)
    if "export" in args.only:
        part_export(setup, results, save)

    rows = table_rows(results)
    plots = plot(results, out)
    save()
    replace_section(results_path, section(results, rows, plots, results_path))
    print()
    print(markdown_table(rows))
    print()
    for p in plots:
        print(f"wrote {p}")
    print(f"wrote {json_path}")
    print(f"wrote section of {results_path}")
    shutil.rmtree(setup.work, ignore_errors=True)
    log(f"done in {time.time() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
