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

Code: this file is the command line; `benchmarks/suite/` holds one module per
part (`part_frontier`, `part_joint`, `part_cost`, `part_export`), the shared
`tasks` (setup and trainers) and `common` (constants), the `report` and the
`plots`.

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

from benchmarks.suite import part_seeds
from benchmarks.suite.common import (DEFAULT_PARTS, DEFAULT_TASKS, EP_LR, EP_WEIGHT_DECAY, FRONTIER_SPARSITIES,
                                     JOINT_SPARSITIES, PARTS, QUICK, REPO, REPORT, SEEDS_BEGIN, SEEDS_END, TASKS,
                                     _atomic_write_text, log)
from benchmarks.suite.part_cost import part_cost
from benchmarks.suite.part_export import part_export
from benchmarks.suite.part_frontier import part_frontier
from benchmarks.suite.part_joint import part_joint
from benchmarks.suite.plots import plot
from benchmarks.suite.report import markdown_table, replace_section, section, table_rows
from benchmarks.suite.tasks import Setup


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
    p.add_argument("--only", nargs="+", choices=PARTS + (REPORT,), default=list(DEFAULT_PARTS),
                   help="parts to run (default all but 'seeds', which takes hours); 'report' "
                        "alone re-renders the tables, plots and sections from --out")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(DEFAULT_TASKS),
                   help="networks/datasets (default: all but conv4h_fashion; CIFAR-10 is "
                        "skipped when its files are absent)")
    p.add_argument("--sparsities", type=float, nargs="+", default=None,
                   help=f"frontier sparsities (default {' '.join(map(str, FRONTIER_SPARSITIES))})")
    p.add_argument("--methods", nargs="+", choices=part_seeds.METHODS,
                   default=None,
                   help="methods of the frontier part (ours: the library defaults, edge_popup; "
                        "default both) and the seeds part, where each method pins its "
                        "controller: ours and "
                        "the variants ours_layer, ours_sgd, ours_time the 'absolute' error at "
                        "rate 0.01 (the defaults up to 2026-12-05), ours_ratio the 'log_ratio' "
                        "error at rate 0.01, ours_rate at rate 0.05 (the defaults of 2026-12-05), "
                        "ours_polish that with polish=0.25, ours_psigma that with sigma=0.25 "
                        "(the current defaults), ours_erk ours_polish with an ERK-weighted "
                        "penalty, ours_phalf ours_psigma with polish=0.5, ours_ptime "
                        "ours_psigma for edge-popup's training time; "
                        f"default {part_seeds.DEFAULT_METHOD} (the current defaults) and "
                        "edge_popup")
    p.add_argument("--seeds", type=int, nargs="+", default=list(part_seeds.SEEDS),
                   help="seeds of the seeds part (default 0 1 2); run one per process to "
                        "use several cores: they append to the same files")
    p.add_argument("--gate-sgd-lr", type=float, default=part_seeds.GATE_SGD_LR,
                   help="learning rate of the ours_sgd variant on the gate locations")
    p.add_argument("--scale-fan", choices=("on", "off"), default=None,
                   help="scale-fan of the frozen weights for ours and edge-popup (default: "
                        "the task config's)")
    p.add_argument("--threads", type=int, default=None,
                   help="TensorFlow threads of this process (default: TensorFlow's choice)")
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
    args.sparsities_given = args.sparsities
    if args.sparsities is None:
        args.sparsities = list(QUICK["sparsities"] if args.quick else FRONTIER_SPARSITIES)
    return args


def _seeds_header(results_path, out):
    """How the seeds section was made: the commands of its rows, the machine."""
    commands = {}
    for task in TASKS:
        for r in part_seeds.read_rows(part_seeds.rows_path(out, task)):
            c = commands.setdefault(r.get("command") or "?", [r.get("run") or "?", 0])
            c[1] += 1
    lines = ["### The multi-seed frontier (generated by `python -m benchmarks.run "
             "--only seeds`)", "",
             "Commands that made the rows (first run's start, load average and library state; "
             "rows):", "", "```"]
    lines += [f"{c}    # {run}; {n} rows" for c, (run, n) in commands.items()]
    lines += ["```", "",
              "Ours: `keras_stg.wrap(model, target_sparsity=s, seed=seed, controller_error=e, "
              "controller_rate=r)` with the library defaults but the controller error `e` and "
              "rate `r` each method pins, and "
              "the task config's batch, learning rate and scale-fan (as the frontier part). "
              "Edge-popup: the very same frozen weights at each sparsity and "
              "seed, paper settings (SGD momentum 0.9, lr 0.1, cosine, weight decay 1e-4), same "
              "epochs, batch and data order. Variants: " + "; ".join(
                  f"{label}: {what}" for label, what in part_seeds.VARIANTS.values()) + ".", ""]
    return lines


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

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
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
        part_frontier(setup, args.tasks, args.sparsities, results, save,
                      args.methods or ["ours", "edge_popup"])
    if "joint" in args.only:
        part_joint(setup, [t for t in args.tasks if t != "conv4_cifar10"],
                   args.joint_sparsities, results, save)
    if "export" in args.only:
        part_export(setup, results, save)
    if "seeds" in args.only:
        part_seeds.part_seeds(setup, args.tasks, args.sparsities_given, args.seeds,
                              args.methods or [part_seeds.DEFAULT_METHOD, "edge_popup"], out)
    if "seeds" in args.only or REPORT in args.only:
        seeds_plots = part_seeds.plot(out)
        seeds_lines = part_seeds.report(out)
        if seeds_lines:
            body = "\n".join(_seeds_header(results_path, out) + seeds_lines)
            replace_section(results_path, body, SEEDS_BEGIN, SEEDS_END)
            print("\n".join(seeds_lines))
            for p in seeds_plots:
                print(f"wrote {p}")
        if set(args.only) <= {"seeds"}:
            shutil.rmtree(setup.work, ignore_errors=True)
            log(f"done in {time.time() - start:.0f} s")
            return results

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
