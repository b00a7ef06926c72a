"""The report: the table, the generated section of RESULTS.md and its markers."""

import os

from benchmarks.suite.common import (BEGIN, END, EP_LR, EP_MOMENTUM, EP_WEIGHT_DECAY, JOINT_LR, PARTS,
                                     TASKS, _atomic_write_text)


def replace_section(path, body, begin=BEGIN, end=END):
    """Replaces the text between the markers `begin` and `end` in `path` (appends them
    if absent), atomically."""
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    block = f"{begin}\n{body.rstrip()}\n{end}"
    i, j = text.find(begin), text.find(end)
    if i != -1 and j != -1 and j > i:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    _atomic_write_text(path, text)





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
