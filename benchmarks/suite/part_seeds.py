"""The `seeds` part: the strong-ticket frontier with several seeds, ours against edge-popup.

Every point (method, target sparsity, seed) is one training run whose result is
appended as one JSON line to `<out>/seeds/<task>.jsonl` as soon as it ends:
the part resumes point by point (a point already in the file with the same
setting is not run again), and several processes may run it at once (one per
`--seeds` value, say) since each appends whole lines. The seed sets the
frozen weights, the data order, the gates' start and noise, and edge-popup's
scores; at one seed both methods search the very same random network.

Both methods are scored on the test split after every epoch (as Keras scores
`validation_data`, which training never sees): the headline is the final
epoch for both; edge-popup's best epoch (what its official code reports) is
listed beside it, labelled as such.

The summary (`summarize`) gives, per method and target, the mean and standard
deviation over seeds, and the iso-accuracy compression: for each accuracy
level, the highest sparsity each method's mean frontier reaches (linear
interpolation in log kept share between measured points) and the ratio of
kept weights, edge-popup / ours.
"""

import itertools
import json
import math
import os

import numpy as np

from benchmarks.edge_popup import sgd_cosine
from benchmarks.suite.common import EP_MOMENTUM, TASKS, log
from benchmarks.suite.tasks import task_available, train_edge_popup, train_ours
from benchmarks.suite.variants import (CONTROLLER_RATES, DEFAULT_METHOD, GATE_SGD_LR, POLISHES,
                                       SIGMAS, TIMED, VARIANTS, controller_error, wrap_for)

#: Default target sparsities per task (`--sparsities` overrides).
SEED_SPARSITIES = {"lenet_mnist": (0.5, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995)}
DEFAULT_SPARSITIES = (0.5, 0.9, 0.95, 0.98)
SEEDS = (0, 1, 2)
#: Accuracy levels of the iso-accuracy comparison, per task (none: no comparison).
ISO_LEVELS = {"lenet_mnist": (0.975, 0.97, 0.96, 0.95, 0.90),
              "conv4_fashion": (0.85, 0.80, 0.75, 0.70),
              "conv4h_fashion": (0.85, 0.80, 0.75, 0.70)}
#: Methods measured at fewer sparsities than this are left out of the iso-accuracy table.
MIN_ISO_POINTS = 3
#: Ours counts as short of a target when its mean sparsity is this far below edge-popup's.
MISSED_TARGET = 0.005
#: Methods whose verdicts on issue 18's targets the report gives.
TARGET_METHODS = (DEFAULT_METHOD, "ours_polish", "ours_rate", "ours")
#: Columns and plot order: the library default first.
METHODS = ("ours_psigma", "edge_popup", "ours_polish", "ours_erk", "ours_rate", "ours_sigma",
           "ours_ratio", "ours", "ours_layer", "ours_sgd", "ours_time", "ours_phalf", "ours_ptime")
LABELS = dict({k: v[0] for k, v in VARIANTS.items()}, edge_popup="edge-popup")
#: Methods the plots draw in full; the other variants are drawn faint.
PLOT_MAIN = (DEFAULT_METHOD, "edge_popup", "ours_ptime")


def rows_path(out, task):
    return os.path.join(out, "seeds", f"{task}.jsonl")


def read_rows(path):
    """The rows of a results file; a line cut short by a killed run is skipped."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_row(path, row):
    """Appends one JSON line with a single write (whole lines, also from parallel runs)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def setting(setup, task, method):
    """What a row's number depends on besides method, target and seed."""
    s = {"epochs": setup.epochs_for(task), "limit": setup.limits(task)[0],
         "batch": setup.batch_for(task), "scale_fan": setup.scale_fan(task),
         "quick": bool(setup.quick),
         # The training order is the seed's alone (`Setup.datasets`); rows from before
         # saw the order of the seed their process ran before, and are not mixed in.
         "order": "seed"}
    if method == "edge_popup":
        s["ep"] = f"SGD(lr={setup.ep_lr}, momentum={EP_MOMENTUM}, cosine), wd={setup.ep_wd}"
        return s
    if method == "ours_sgd":
        s["gate_sgd_lr"] = setup.gate_sgd_lr
    if POLISHES[method]:
        s["polish"] = POLISHES[method]
    # Recorded only where they differ from the values of the rows from before they existed.
    if controller_error(method) != "absolute":
        s["controller_error"] = controller_error(method)
    if CONTROLLER_RATES[method] != 0.01:
        s["controller_rate"] = CONTROLLER_RATES[method]
    if SIGMAS[method] != 0.5:
        s["sigma"] = SIGMAS[method]
    return s


def _key(row):
    return (row["method"], round(row["target"], 6), row["seed"])


def part_seeds(setup, tasks, sparsities, seeds, methods, out):
    """Runs the missing points of every task (target by target in the order given, then
    seed, then method), skipping those another live process has claimed."""
    for task in tasks:
        reason = task_available(setup, task)
        if reason:
            log(f"seeds {TASKS[task][2]}: skipped, {reason}")
            continue
        path = rows_path(out, task)
        targets = sparsities or SEED_SPARSITIES.get(task, DEFAULT_SPARSITIES)
        todo = [(seed, t, m) for t in targets for seed in seeds for m in methods]
        for i, (seed, target, method) in enumerate(todo, 1):
            s = setting(setup, task, method)
            done = {_key(r) for r in read_rows(path) if r.get("setting") == s}
            if (method, round(target, 6), seed) in done:
                continue
            setup.seed = seed
            epochs = None
            if method in TIMED:
                epochs = _equal_time_epochs(read_rows(path), setup, task, target, seed,
                                            TIMED[method])
                if epochs is None:
                    log(f"seeds {i}/{len(todo)}: {method} at {target} seed {seed} needs the "
                        f"{TIMED[method]} and edge-popup rows of that point first; skipped")
                    continue
            claim = _claim(path, method, target, seed)
            if claim is None:  # another process runs this point now
                continue
            if (method, round(target, 6), seed) in {
                    _key(r) for r in read_rows(path) if r.get("setting") == s}:
                os.remove(claim)  # finished by another process since the check above
                continue
            try:
                log(f"seeds {i}/{len(todo)} {TASKS[task][2]} {LABELS[method]} target {target} "
                    f"seed {seed} ...")
                r = _run_point(setup, task, method, target, epochs)
            finally:
                os.remove(claim)
            r.update(method=method, target=target, seed=seed, setting=s,
                     command=setup.command, run=setup.run_info)
            append_row(path, r)
            log(f"  {LABELS[method]}: accuracy {r['accuracy']:.4f} sparsity {r['sparsity']:.4f} "
                f"({r['wall_time_s']:.0f} s, {r['epochs']} epochs)")


def _run_point(setup, task, method, target, epochs):
    train, test, steps = setup.datasets(task)
    if method == "edge_popup":
        return train_edge_popup(setup, task, target, train, test, steps, per_epoch=True)
    kwargs = {"wrap": wrap_for(method)}
    if method == "ours_sgd":
        kwargs["optimizer"] = lambda total: sgd_cosine(setup.gate_sgd_lr, total)
    r, _ = train_ours(setup, task, target, "slt", train, test, epochs=epochs, per_epoch=True,
                      **kwargs)
    return r


def _claim(path, method, target, seed):
    """Claims a point for this process (a file holding its pid, created exclusively);
    None if a live process holds it. A claim of a dead process is taken over."""
    folder = path + ".claims"
    os.makedirs(folder, exist_ok=True)
    claim = os.path.join(folder, f"{method}_{target:g}_{seed}")
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(claim) as f:
                    os.kill(int(f.read().strip() or 0), 0)
                return None  # held by a live process
            except (ProcessLookupError, ValueError, FileNotFoundError):
                try:
                    os.remove(claim)  # left by a killed run
                except FileNotFoundError:
                    pass
                continue
            except PermissionError:
                return None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return claim
    return None


def _equal_time_epochs(rows, setup, task, target, seed, base="ours"):
    """Epochs of ours that take edge-popup's training time at this target and seed:
    the epochs of `base`'s run times the ratio of the two runs' measured times
    (None while either run is missing)."""
    def find(method):
        s = setting(setup, task, method)
        for r in rows:
            if _key(r) == (method, round(target, 6), seed) and r.get("setting") == s:
                return r
        return None

    ours, ep = find(base), find("edge_popup")
    if ours is None or ep is None:
        return None
    return max(1, int(round(ours["epochs"] * ep["wall_time_s"] / ours["wall_time_s"])))


# ------------------------------------------------------------------ summary


def summarize(rows):
    """Per method: sorted points {target, n, seeds, accuracy by seed, acc mean/std, sparsity
    mean, best-epoch mean/std, epochs mean, time mean}. Rows of different settings of one
    method are not mixed: the newest setting (last row's) wins."""
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    summary = {}
    for method, rs in by_method.items():
        latest = rs[-1]["setting"]
        points = {}
        for r in rs:
            if r["setting"] == latest:
                points.setdefault(round(r["target"], 6), {})[r["seed"]] = r  # last row per seed
        out = []
        for target in sorted(points):
            group = list(points[target].values())
            acc = np.array([r["accuracy"] for r in group])
            best = np.array([max(r.get("epoch_accuracy") or [r["accuracy"]]) for r in group])
            out.append({
                "target": target, "n": len(group), "seeds": sorted(points[target]),
                "by_seed": {seed: r["accuracy"] for seed, r in points[target].items()},
                "acc": float(acc.mean()), "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "best": float(best.mean()),
                "best_std": float(best.std(ddof=1)) if len(best) > 1 else 0.0,
                "sparsity": float(np.mean([r["sparsity"] for r in group])),
                "epochs": float(np.mean([r["epochs"] for r in group])),
                "time": float(np.mean([r["wall_time_s"] for r in group])),
            })
        summary[method] = {"setting": latest, "points": out}
    return summary


def iso_sparsity(points, level, key="acc"):
    """Highest sparsity at which the mean frontier still reaches `level`.

    Linear in log kept share between measured points, on the last crossing
    from above to below. Returns (sparsity, censored): `censored` is ">=" when
    even the sparsest point is at or above the level (the true figure is
    higher), None when no point reaches it, else "".
    """
    pts = sorted(points, key=lambda p: p["sparsity"])
    if not pts or max(p[key] for p in pts) < level:
        return None, None
    if pts[-1][key] >= level:
        return pts[-1]["sparsity"], ">="
    for a, b in reversed(list(zip(pts, pts[1:]))):
        if a[key] >= level > b[key]:
            la, lb = math.log(1 - a["sparsity"]), math.log(1 - b["sparsity"])
            f = (a[key] - level) / (a[key] - b[key])
            return 1 - math.exp(la + f * (lb - la)), ""
    return None, None


def iso_table(summary, levels, base="edge_popup", methods=None):
    """Rows (level, {method: (sparsity, censored)}, {method: kept ratio base / method})."""
    methods = [m for m in (methods or summary) if m != base and m in summary]
    rows = []
    for level in levels:
        found = {m: iso_sparsity(summary[m]["points"], level) for m in [base] + methods
                 if m in summary}
        ratios = {}
        for m in methods:
            (sb, cb), (sm, cm) = found.get(base, (None, None)), found[m]
            if sb is not None and sm is not None:
                ratios[m] = ((1 - sb) / (1 - sm), cb, cm)
        rows.append((level, found, ratios))
    return rows


def _pm(mean, std, n):
    return f"{100 * mean:.2f} ± {100 * std:.2f}" + ("" if n >= 3 else f" (n={n})")


def _summaries(out, tasks=None):
    """(task, rows, summary) of every task with rows in `out`."""
    for task in tasks or TASKS:
        rows = read_rows(rows_path(out, task))
        if rows:
            yield task, rows, summarize(rows)


def report(out, tasks=None):
    """Markdown of every task with rows: the frontier table, iso-accuracy, the targets."""
    lines = []
    for task, rows, summary in _summaries(out, tasks):
        budgets = {m: _budget(summary[m]["setting"]) for m in summary}
        budget = (budgets.get(DEFAULT_METHOD) or budgets.get("ours")
                  or next(iter(budgets.values())))
        if len(set(budgets.values())) > 1:
            budget += "; other methods: " + ", ".join(
                f"{LABELS[m]} {b}" for m, b in budgets.items() if b != budget)
        lines += [f"#### {TASKS[task][2]}: {len(rows)} runs ({budget})", ""]
        lines += _frontier_table(summary)
        levels = ISO_LEVELS.get(task, ())
        if "edge_popup" in summary and levels:
            lines += ["", "Iso-accuracy compression (highest sparsity whose 3-seed mean "
                      "accuracy reaches the level, interpolated in log kept share; ratio = "
                      "weights edge-popup keeps / weights ours keeps; '>=' the level holds at "
                      "the sparsest point measured, so the true figure is higher):", ""]
            lines += _iso_lines(summary, levels)
        for method in [m for m in TARGET_METHODS if m in summary]:
            lines += [""] + _targets(task, summary, method)
        lines += [""]
        lines += [f"![seeds_{task}.png](results/seeds_{task}.png)", ""]
    return lines


def _budget(setting):
    return (f"{setting['epochs']} epochs, batch {setting['batch']}, "
            + (f"first {setting['limit']} training examples, " if setting.get("limit") else "")
            + ("scale-fan" if setting.get("scale_fan") else "no scale-fan"))


def _frontier_table(summary):
    methods = [m for m in METHODS if m in summary]
    targets = sorted({p["target"] for m in methods for p in summary[m]["points"]})
    head = ["target"] + [LABELS[m] for m in methods]
    if "edge_popup" in summary:
        head.append("edge-popup, best epoch (its paper's figure)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in targets:
        cells = [f"{100 * t:g}%"]
        for m in methods:
            p = next((p for p in summary[m]["points"] if p["target"] == t), None)
            if p is None:
                cells.append("")
                continue
            extra = f", {p['epochs']:.0f} ep" if m in TIMED else ""
            cells.append(f"{_pm(p['acc'], p['acc_std'], p['n'])} at "
                         f"{100 * p['sparsity']:.2f}%{extra}")
        if "edge_popup" in summary:
            p = next((p for p in summary["edge_popup"]["points"] if p["target"] == t), None)
            cells.append(_pm(p["best"], p["best_std"], p["n"]) if p else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Test accuracy (%), mean ± standard deviation over seeds (n=3 unless noted), "
                 "at the mean sparsity reached; final epoch unless noted. Mean training time "
                 "per run: " + ", ".join(
                     f"{LABELS[m]} {np.mean([p['time'] for p in summary[m]['points']]):.0f} s"
                     for m in methods) + ".")
    return lines


def _iso_lines(summary, levels):
    # A method measured at fewer than MIN_ISO_POINTS sparsities has no frontier to read.
    methods = [m for m in METHODS if m in summary and m != "edge_popup"
               and len(summary[m]["points"]) >= MIN_ISO_POINTS]
    head = ["accuracy", "edge-popup"] + [LABELS[m] for m in methods] + \
        [f"kept ratio, {LABELS[m]}" for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for level, found, ratios in iso_table(summary, levels, methods=methods):
        def cell(m):
            s, c = found.get(m, (None, None))
            return "not reached" if s is None else f"{c}{100 * s:.2f}%"

        def ratio(m):
            if m not in ratios:
                return ""
            value, cb, cm = ratios[m]
            # A censored ours (its true sparsity is higher) makes the ratio a lower bound.
            return ("≥ " if cm and not cb else "") + f"{value:.2f}x"

        lines.append("| " + " | ".join([f"{100 * level:g}%", cell("edge_popup")]
                                       + [cell(m) for m in methods]
                                       + [ratio(m) for m in methods]) + " |")
    return lines


def _targets(task, summary, method="ours"):
    """Issue 18's targets with their measured verdicts for `method` (a method of ours)."""
    lines = [f"Targets of issue 18, {LABELS[method]}:", ""]
    ours, ep = summary.get(method), summary.get("edge_popup")
    if ours and ep:
        pairs = [(p, next((q for q in ep["points"] if q["target"] == p["target"]), None))
                 for p in ours["points"]]
        pairs = [(p, q) for p, q in pairs if q is not None]
        behind = [f"{100 * p['target']:g}% "
                  f"({100 * (p['acc'] - q['acc']):+.2f}{_paired(p, q)})"
                  for p, q in pairs if p["acc"] < q["acc"]]
        # Ahead in accuracy but sparser by less: not the same sparsity.
        missed = [f"{100 * p['target']:g}% (ours at {100 * p['sparsity']:.2f}%)"
                  for p, q in pairs if p["acc"] >= q["acc"]
                  and p["sparsity"] < q["sparsity"] - MISSED_TARGET]
        verdict = "**met**" if pairs and not behind and not missed else "**not met**"
        notes = ([f"behind at {', '.join(behind)}"] if behind else []) + (
            [f"ahead but short of the target sparsity at {', '.join(missed)}"] if missed else [])
        lines.append(f"- ours >= edge-popup (seed means, final epoch, equal epochs) at every "
                     f"sparsity measured ({len(pairs)}): {verdict}"
                     + (f" ({'; '.join(notes)})" if notes else ""))
        levels = [lv for lv in ISO_LEVELS.get(task, ()) if lv <= 0.97]
        if levels and len(ours["points"]) < MIN_ISO_POINTS:
            lines.append(f"- at every accuracy level <= 97%, ours keeps at most half the weights "
                         f"edge-popup keeps: not judged ({len(ours['points'])} sparsities "
                         f"measured, {MIN_ISO_POINTS} needed)")
        elif levels:
            bad = []
            for level, found, ratios in iso_table(summary, levels, methods=[method]):
                r = ratios.get(method)
                if r is None or r[0] < 2.0:
                    bad.append(f"{100 * level:g}%" + ("" if r is None else f" ({r[0]:.2f}x)"))
            lines.append("- at every accuracy level <= 97%, ours keeps at most half the weights "
                         "edge-popup keeps: " + ("**met**" if not bad else
                                                 f"**not met** at {', '.join(bad)}"))
    if task == "lenet_mnist" and ours:
        for target, need in ((0.9, 0.98), (0.95, 0.975)):
            p = next((p for p in ours["points"] if p["target"] == target), None)
            if p:
                verdict = "met" if p["acc"] >= need else "not met"
                lines.append(f"- >= {100 * need:g}% at {100 * target:g}% (seed mean): "
                             f"**{verdict}** ({_pm(p['acc'], p['acc_std'], p['n'])})")
    return lines


def _paired(p, q):
    """The per-seed differences of two points over their seeds in common (at least two),
    as "; paired by seed MEAN ± STD, ahead on A of N": how far a gap in the means is
    from the seeds' own spread."""
    seeds = sorted(set(p.get("by_seed", {})) & set(q.get("by_seed", {})))
    if len(seeds) < 2:
        return ""
    d = 100 * np.array([p["by_seed"][s] - q["by_seed"][s] for s in seeds])
    return (f"; paired by seed {d.mean():+.2f} ± {d.std(ddof=1):.2f}, "
            f"ahead on {int((d > 0).sum())} of {len(seeds)}")


def plot(out, tasks=None):
    """One PNG per task: mean accuracy ± std against kept share (log), every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.suite.plots import _save_fig

    paths = []
    for task, _, summary in _summaries(out, tasks):
        fig, ax = plt.subplots(figsize=(7.5, 5.0))
        for m, marker in zip(METHODS, itertools.cycle("osXv^Dph*<>dP")):
            if m not in summary:
                continue
            pts = sorted(summary[m]["points"], key=lambda p: p["sparsity"])
            # The default, edge-popup and the default at edge-popup's time stand out;
            # the other variants (hypotheses tried) are drawn faint.
            main = m in PLOT_MAIN
            ax.errorbar([100 * (1 - p["sparsity"]) for p in pts], [100 * p["acc"] for p in pts],
                        yerr=[100 * p["acc_std"] for p in pts], marker=marker, capsize=3,
                        label=LABELS[m], alpha=1.0 if main else 0.35,
                        linewidth=1.8 if main else 0.8, markersize=6 if main else 4)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("weights kept (%, log scale)")
        ax.set_ylabel("test accuracy (%), final epoch")
        ax.set_title(f"{TASKS[task][2]}: frozen random weights, mean ± std over seeds",
                     fontsize=10)
        lo = min(100 * p["acc"] for s in summary.values() for p in s["points"])
        ax.set_ylim(max(lo - 1, 0), None)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower left", fontsize=7, ncol=2 if len(summary) > 6 else 1)
        fig.tight_layout()
        path = os.path.join(os.path.dirname(rows_path(out, task)), "..", f"seeds_{task}.png")
        path = os.path.normpath(path)
        _save_fig(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths
