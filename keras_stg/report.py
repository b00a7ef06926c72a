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


def _chain_steps(gated):
    """The gated model as a chain of steps for `effective_kept`, or None: per layer
    with a kernel `("kernel", depthwise?, mask (..., inputs, outputs), target index or
    None)`, per Flatten `("flatten", positions)`; channel-keeping layers drop out."""
    from keras_stg import shrinking

    try:
        layers = shrinking._chain(gated.base_model)
    except shrinking.ShrinkError:
        return None
    if not layers:
        return None
    masks = {id(t.variable): (i, m) for i, (t, m) in enumerate(zip(gated.targets,
                                                                 gated.masks()))}
    steps = []
    for layer in layers:
        kind = layer_table.channel_kind(layer)
        kernels = layer_table.channel_kernels(layer)
        if kernels:
            if len(kernels) != 1 or getattr(layer, "groups", 1) != 1:
                return None  # separable convolutions, grouped convolutions
            spec, variable = kernels[0]
            rank = len(variable.shape)
            if spec.channel_in != rank - 2 or spec.channel_out not in (
                    rank - 1, None if kind == layer_table.DEPTHWISE else rank - 1):
                return None  # another kernel layout (transposed convolutions)
            index, mask = masks.get(id(variable), (None, np.ones(variable.shape, bool)))
            mask = np.asarray(mask, bool)
            steps.append(("kernel", kind == layer_table.DEPTHWISE,
                          mask.reshape((-1,) + mask.shape[-2:]), index))
        elif kind == layer_table.FLATTEN:
            steps.append(("flatten", int(np.prod(layer.input.shape[1:-1]))))
        elif kind not in (layer_table.ELEMENTWISE, layer_table.PER_CHANNEL,
                          layer_table.SPATIAL, layer_table.GLOBAL_POOL):
            return None
    return steps if any(step[0] == "kernel" for step in steps) else None


def effective_kept(gated):
    """Per gated kernel, how many kept weights lie on a path of kept weights from
    the model's input to its output. A kept weight off every such path adds a
    constant or nothing (its input unit is reached by no kept path, or its output
    unit leads nowhere): the "effective sparsity" of Vysogorets and Kempe (2023).

    Returns a list of counts (None for a kernel that is not gated), or None when the
    model is not a chain of Dense / convolution / depthwise layers and layers that
    keep channels apart (activations, normalization, pooling, Flatten): the paths
    are not followed through branches yet.
    """
    steps = _chain_steps(gated)
    if steps is None:
        return None
    # Forward: the units some kept path from the input reaches.
    alive = np.ones(int(gated.base_model.inputs[0].shape[-1]), bool)
    alive_in = []
    for step in steps:
        if step[0] == "flatten":
            alive = np.tile(alive, step[1])  # channels last: index = position * C + c
            continue
        _, depthwise, mask, _ = step
        if mask.shape[1] != alive.size:
            return None
        alive_in.append(alive)
        reach = mask.any(0) & alive[:, None]  # (inputs, outputs or multiplier)
        alive = reach.reshape(-1) if depthwise else reach.any(0)
    # Backward: the units from which some kept path reaches the output.
    used = np.ones(alive.shape, bool)
    counts = [None] * len(gated.targets)
    for step in reversed(steps):
        if step[0] == "flatten":
            used = used.reshape(step[1], -1).any(0)
            continue
        _, depthwise, mask, index = step
        live = alive_in.pop()
        out_used = used.reshape(mask.shape[1:]) if depthwise else used[None, :]
        on_path = mask & live[None, :, None] & out_used[None]
        if index is not None:
            counts[index] = int(on_path.sum())
        used = (mask & out_used[None]).any(0).any(1)
    return counts


def layer_stats(gated):
    """One dict per gated kernel: name, class, params, kept, sparsity, fractional,
    macs and kept_macs (multiply-adds per example; None where the layer's output
    shape is unknown), and effective (kept weights on an input-output path, see
    `effective_kept`; None where it is not followed).

    `fractional` is the share of the kernel's gates whose noise-free value
    `clip(mu + 0.5, 0, 1)` is strictly between 0 and 1; the binary mask rounds
    them, so a high share means training has not settled.
    """
    rows = []
    layer_table.record_shapes(gated.base_model)
    effective = effective_kept(gated) or [None] * len(gated.targets)
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
                "effective": effective[i],
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
    if kept and all(r["effective"] is not None for r in rows):
        on_path = sum(r["effective"] for r in rows)
        lines.append(
            f"On an input-output path: {on_path:,} of the {kept:,} kept weights "
            f"(effective sparsity {1 - on_path / max(1, total):.2%}); the others add a "
            "constant or nothing.")
    if gated.skipped:
        lines.append("Not gated:")
        lines.extend(f"  {s.path} ({s.class_name}): {s.reason}" for s in gated.skipped)
    return "\n".join(lines)
