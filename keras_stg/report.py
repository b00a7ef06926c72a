"""Per-layer sparsity report of a gated model."""

import numpy as np
from keras import ops

from keras_stg import gate_math
from keras_stg import layer_table


def _positions(layer):
    try:
        return layer_table.positions(layer)
    except ValueError:  # never called on a symbolic input (a subclassed model)
        return None


def layer_stats(gated):
    """One dict per gated kernel: name, class, params, kept, sparsity, fractional,
    macs and kept_macs (multiply-adds per example; None where the layer's output
    shape is unknown).

    `fractional` is the share of the kernel's gates whose noise-free value
    `clip(mu + 0.5, 0, 1)` is strictly between 0 and 1; the binary mask rounds
    them, so a high share means training has not settled.
    """
    rows = []
    for i, (target, mask) in enumerate(zip(gated.targets, gated.masks())):
        gate = gated.target_gate(i)
        mu = ops.convert_to_numpy(gate.mu) if gate is not None else np.zeros((0,))
        params = int(mask.size)
        kept = int(mask.sum())
        positions = _positions(target.layer)
        rows.append(
            {
                "name": target.name,
                "class": type(target.layer).__name__,
                "params": params,
                "kept": kept,
                "sparsity": 1.0 - kept / params,
                "gates": int(mu.size),
                "fractional": float(gate_math.fractional_count(mu)) / max(1, mu.size),
                "macs": None if positions is None else params * positions,
                "kept_macs": None if positions is None else kept * positions,
            }
        )
    return rows


def summary(gated):
    """A text table of the gated layers: params, kept, sparsity, fractional gates and
    multiply-adds per example (all, and kept).

    Example:

    ```python
    print(keras_stg.summary(gated))
    ```
    """
    rows = layer_stats(gated)
    total = sum(r["params"] for r in rows)
    kept = sum(r["kept"] for r in rows)
    gates = sum(r["gates"] for r in rows)
    frac = sum(r["fractional"] * r["gates"] for r in rows) / max(1, gates)
    width = max([len(r["name"]) for r in rows] + [5])
    known = all(r["macs"] is not None for r in rows)
    macs = sum(r["macs"] for r in rows) if known else None
    kept_macs = sum(r["kept_macs"] for r in rows) if known else None

    def count(x):
        return f"{x:>13,}" if x is not None else f"{'-':>13}"

    head = (
        f"{'layer':<{width}}  {'class':<16} {'params':>10} {'kept':>10} "
        f"{'sparsity':>9} {'fractional':>10} {'MACs':>13} {'kept MACs':>13}"
    )
    lines = [
        f"Gated model {gated.name!r}: mode={gated.mode}, "
        f"granularity={str(gated.granularity)}, cost={gated.config.cost}, "
        f"lambda={float(gated.lam.numpy()):.4g}",
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r['name']:<{width}}  {r['class']:<16} {r['params']:>10,} {r['kept']:>10,} "
            f"{r['sparsity']:>8.2%} {r['fractional']:>10.2%} {count(r['macs'])} "
            f"{count(r['kept_macs'])}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<{width}}  {'':<16} {total:>10,} {kept:>10,} "
        f"{1 - kept / max(1, total):>8.2%} {frac:>10.2%} {count(macs)} {count(kept_macs)}"
    )
    if gated.skipped:
        lines.append("Not gated:")
        lines.extend(f"  {s.path} ({s.class_name}): {s.reason}" for s in gated.skipped)
    return "\n".join(lines)
