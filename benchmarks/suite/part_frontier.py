"""The `frontier` part: accuracy against sparsity, ours against edge-popup."""

import math
import os

from benchmarks.suite.common import EP_MOMENTUM, TASKS, log
from benchmarks.suite.tasks import task_available, train_edge_popup, train_ours


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
