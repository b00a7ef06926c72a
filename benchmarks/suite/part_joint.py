"""The `joint` part: our joint mode against tfmot magnitude pruning (in a subprocess)."""

import json
import os
import shlex
import subprocess
import sys

from benchmarks.suite.common import JOINT_LR, REPO, TASKS, log
from benchmarks.suite.tasks import task_available, train_ours


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
