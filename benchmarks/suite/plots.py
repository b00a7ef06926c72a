"""The plots of the report (PNG, written atomically)."""

import os



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
