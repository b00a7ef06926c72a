"""`shrink`: physically remove pruned neurons and channels from a stripped model.

A unit whose kernel slice and bias are all zero (what `granularity="unit"`
gates leave after `strip`) outputs exactly zero before its activation. The
shrunk model drops that unit from its layer and the matching inputs of the
next producer (Dense or convolution), so it is smaller and faster on every
device, not only on sparse kernels.

A removed unit need not be zero after the layers that follow it: a
BatchNormalization with a shift, or an activation with `f(0) != 0`, turns it
into a per-channel constant `v`. That constant is folded into the next
layer's bias (`bias += v * W[unit]`) when this is exact: a Dense consumer, or
a convolution with `padding="valid"` that sees the same constant at every
position. Where it is not (a `"same"`-padded convolution sees the constant
only inside the image, not in its zero padding), the unit is kept. The
model's output layer keeps all its units. Outputs equal the masked model's up
to float rounding, which `shrink` checks before returning.

What each layer does to channels comes from `keras_stg.layer_table`.
Supported: Sequential or Functional chains (one input, one output, no
branches) of Dense and Conv1D/2D/3D producers with per-channel,
element-wise, spatial (pooling, padding, cropping), global-pooling and
Flatten layers between. Anything else raises `ShrinkError` naming the layer
and the reason.
"""

import numpy as np

from keras_stg import _compat
from keras_stg import layer_table as table


class ShrinkError(ValueError):
    """The model's topology cannot be shrunk; the message names the layer."""


def _fail(layer, reason):
    raise ShrinkError(
        f"Cannot shrink layer {layer.name!r} ({type(layer).__name__}): {reason}. "
        "shrink supports chains of Dense and convolution layers with per-channel, "
        "element-wise, pooling, padding and Flatten layers between; export this model "
        "without --shrink (--sparse still stores the zeros compactly)."
    )


_CHAIN_KINDS = {table.PRODUCER, table.PER_CHANNEL, table.ELEMENTWISE, table.SPATIAL,
                table.GLOBAL_POOL, table.FLATTEN}


def _kind(layer):
    """The layer's channel kind from the layer table; fails unless shrink handles it."""
    import keras

    if isinstance(layer, keras.Model):
        _fail(layer, "nested models are not supported (build the model as one chain)")
    kind = table.channel_kind(layer)
    if isinstance(kind, table.Unsupported):
        _fail(layer, kind.reason)
    if kind not in _CHAIN_KINDS:
        _fail(layer, f"its channels are {kind!r}, which a chain cannot have")
    if kind == table.PRODUCER and not (
            isinstance(layer, keras.layers.Dense) or _is_conv(layer)):
        _fail(layer, "only Dense and plain convolution producers can be shrunk")
    return kind


def _is_conv(layer):
    import keras

    L = keras.layers
    return isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D))


def _chain(model):
    """The model's layers in order; raises `ShrinkError` unless it is a plain chain."""
    import keras

    if isinstance(model, keras.Sequential):
        layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
        return layers
    operations = getattr(model, "operations", None)
    if operations is None or not hasattr(model, "inputs") or model.inputs is None:
        raise ShrinkError(
            f"Cannot shrink {model.name!r} ({type(model).__name__}): only Sequential and "
            "Functional models expose their layer graph; subclassed models do not."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ShrinkError(
            f"Cannot shrink {model.name!r}: it has {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs; --shrink needs exactly one of each."
        )
    layers = []
    previous = model.inputs[0]
    for op in operations:
        if isinstance(op, keras.layers.InputLayer):
            continue
        if not isinstance(op, keras.layers.Layer):
            raise ShrinkError(
                f"Cannot shrink {model.name!r}: operation {op.name!r} "
                f"({type(op).__name__}) is not a layer; --shrink supports chains of "
                "Dense and convolution layers."
            )
        nodes = [n for n in _compat.inbound_nodes(op) if n.operation is op]
        if len(_compat.inbound_nodes(op)) != 1:
            _fail(op, "it is called more than once (shared layer)")
        inputs = nodes[0].input_tensors
        if len(inputs) != 1:
            _fail(op, f"it merges {len(inputs)} branches")
        if inputs[0] is not previous:
            _fail(op, "its input is not the previous layer's output (the model branches)")
        layers.append(op)
        previous = nodes[0].output_tensors[0]
    if previous is not model.outputs[0]:
        raise ShrinkError(f"Cannot shrink {model.name!r}: the model's output is not the end of its layer chain.")
    return layers


def _dead_units(kernel, bias):
    axes = tuple(range(kernel.ndim - 1))
    dead = ~np.any(kernel != 0, axis=axes)
    if bias is not None:
        dead &= bias == 0
    return dead


def _producer_weights(layer):
    kernel = np.asarray(layer.kernel.numpy())
    bias = np.asarray(layer.bias.numpy()) if layer.use_bias else None
    return kernel, bias


def _count_params(model):
    return int(sum(int(np.prod(v.shape)) for v in model.weights))


def shrink(model, check=True, atol=1e-5, seed=0, return_info=False):
    """Returns the shrunk plain `keras.Model` (and an info dict with `return_info=True`).

    Args:
        model: a plain (stripped) Keras model whose pruned units have zero
            kernel slices and zero biases (`GatedModel.strip()` of a
            `granularity="unit"` model).
        check: compare the outputs of both models on random inputs and raise
            `RuntimeError` if they differ by more than `atol` (relative to the
            output scale).
        return_info: also return `{"units": {layer: (before, after)},
            "parameters_before", "parameters_after", "max_abs_diff"}`.

    Raises:
        ShrinkError: the topology is not a supported chain; names the layer.
    """
    import keras

    layers = _chain(model)
    kinds = [_kind(layer) for layer in layers]
    producers = [i for i, k in enumerate(kinds) if k == table.PRODUCER]
    for i in producers:
        if isinstance(layers[i], keras.layers.Dense) and len(layers[i].input.shape) != 2:
            _fail(layers[i], f"it takes a rank-{len(layers[i].input.shape)} input; only "
                  "Dense layers on flat vectors are supported")

    # Current (possibly modified) weights of each producer.
    weights = {i: list(_producer_weights(layers[i])) for i in producers}
    keep_out = {}       # producer index -> kept unit indices
    keep_in = {}        # producer index -> kept input indices (flat for Dense)
    units = {}

    for n, p in enumerate(producers):
        layer = layers[p]
        kernel, bias = weights[p]
        c_out = kernel.shape[-1]
        if n == len(producers) - 1:
            keep_out[p] = np.arange(c_out)
            continue
        q = producers[n + 1]
        segment = layers[p + 1:q]
        dead = _dead_units(kernel, bias)
        # Value of every position after the segment when the layer outputs 0:
        # a removed unit stays this constant through the segment.
        t = keras.ops.zeros((1,) + tuple(layer.output.shape[1:]), "float32")
        t = layer.activation(t)
        for s in segment:
            t = s(t, training=False)
        t = np.asarray(keras.ops.convert_to_numpy(t)).reshape(-1)
        consumer = layers[q]
        ck, cb = weights[q]
        if isinstance(consumer, keras.layers.Dense):
            if ck.shape[0] != t.size or t.size % c_out:
                _fail(consumer, f"its {ck.shape[0]} inputs do not match the {c_out} "
                      f"units of {layer.name!r}")
            drop = dead.copy()
        else:
            if t.size % c_out:
                _fail(consumer, f"its input does not match the {c_out} channels of {layer.name!r}")
            positions = t.reshape(-1, c_out)
            consts = positions[0]
            # Exact to remove: zero everywhere, or one constant at every position
            # (not varied by padding) seen by a convolution without padding.
            zero = ~np.any(positions != 0, axis=0)
            uniform = np.all(positions == consts, axis=0)
            drop = dead & (zero | (uniform & (consumer.padding == "valid")))
        if not (~drop).any():
            drop[0] = False  # keep one unit so that every shape stays valid
        keep_out[p] = np.flatnonzero(~drop)
        units[layer.name] = (int(c_out), int(len(keep_out[p])))

        # Inputs of the consumer, and the removed constants folded into its bias.
        if isinstance(consumer, keras.layers.Dense):
            flat_drop = np.tile(drop, t.size // c_out)
            fold = (t[flat_drop, None] * ck[flat_drop]).sum(0)
            keep_in[q] = np.flatnonzero(~flat_drop)
        else:
            spatial = tuple(range(ck.ndim - 2))
            fold = (consts[drop][:, None] * np.take(ck, np.flatnonzero(drop), axis=ck.ndim - 2)
                    .sum(spatial)).sum(0)
            keep_in[q] = keep_out[p]
        if np.any(fold != 0):
            cb = (np.zeros(ck.shape[-1], ck.dtype) if cb is None else cb) + fold.astype(ck.dtype)
        weights[q] = [ck, cb]

    # Rebuild the chain with the new widths.
    inputs = keras.Input(tuple(model.input_shape[1:]))
    x = inputs
    current_keep = None
    new_layers = []
    for i, (layer, kind) in enumerate(zip(layers, kinds)):
        config = layer.get_config()
        if kind == table.PRODUCER:
            kernel, bias = weights[i]
            if i in keep_in:
                kernel = np.take(kernel, keep_in[i], axis=kernel.ndim - 2)
            kernel = np.take(kernel, keep_out[i], axis=-1)
            if bias is not None:
                bias = bias[keep_out[i]]
            key = "units" if isinstance(layer, keras.layers.Dense) else "filters"
            config[key] = int(len(keep_out[i]))
            config["use_bias"] = bias is not None
            new = type(layer).from_config(config)
            x = new(x)
            new.set_weights([kernel] + ([bias] if bias is not None else []))
            current_keep = keep_out[i]
        else:
            new = type(layer).from_config(config)
            x = new(x)
            if layer.weights:
                if kind != table.PER_CHANNEL:
                    _fail(layer, "it has weights but is not per-channel")
                values = [np.asarray(v.numpy()) for v in layer.weights]
                if current_keep is not None:
                    values = [v[current_keep] for v in values]
                new.set_weights(values)
        new_layers.append(new)
    shrunk = keras.Model(inputs, x, name=model.name)

    info = {
        "units": units,
        "parameters_before": _count_params(model),
        "parameters_after": _count_params(shrunk),
    }
    if check:
        shape = tuple(model.input_shape[1:])
        rng = np.random.default_rng(seed)
        probe = rng.standard_normal((8,) + shape).astype("float32")
        a = np.asarray(model(probe, training=False))
        b = np.asarray(shrunk(probe, training=False))
        diff = float(np.max(np.abs(a - b)))
        scale = max(1.0, float(np.max(np.abs(a))))
        info["max_abs_diff"] = diff
        if diff > atol * scale:
            raise RuntimeError(
                f"Shrinking changed the outputs of {model.name!r} by {diff:g} "
                f"(allowed {atol * scale:g}); this is a bug, please report it."
            )
    return (shrunk, info) if return_info else shrunk
