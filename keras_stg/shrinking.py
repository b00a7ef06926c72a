"""`shrink`: physically remove pruned neurons and channels from a stripped model.

A unit or channel whose kernel slices and bias are all zero (what
`granularity="unit"` or `"channel"` gates leave after `strip`) outputs exactly
zero before its activation. The shrunk model drops it from its producer and
from everything it flows through: normalization weights, depthwise kernels,
both branches of a residual `Add`, a `Concatenate` at its offset, a channel
split (`keras.ops.split`) or range (`x[..., a:b]`), whose cuts move to the kept
channels, a `Flatten`
once per position, and the input axis of every consumer (Dense, convolution,
separable and transposed convolutions, an attention's projections, or any layer
whose layer-table entry names its channel axes); a `MultiHeadAttention` also
loses the heads whose value projection is zero. It is then smaller and faster on
every device, not only on sparse kernels.

Two paths, both checked against the model they were given before returning:

- A plain chain (Sequential, or Functional without branches) of Dense and
  convolution producers with per-channel, element-wise, pooling, padding and
  Flatten layers between. Here a removed unit need not be zero after the
  layers that follow it: a BatchNormalization with a shift, or an activation
  with `f(0) != 0`, turns it into a per-channel constant `v`, folded into the
  next layer's bias (`bias += v * W[unit]`) when this is exact: a Dense
  consumer, or a convolution with `padding="valid"` that sees the same
  constant at every position. Where it is not (a `"same"`-padded convolution
  sees the constant only inside the image, not in its zero padding), the unit
  is kept. The model's output layer keeps all its units.
- Any other graph: per channel group of `keras_stg.channel_groups`, the
  channels that are exactly zero everywhere they flow are removed. Groups the
  analysis cannot follow (an unknown layer, a model output, a shared layer)
  stay whole and are listed with the reason (`return_info=True`).
"""

import warnings

import numpy as np

from keras_stg import _compat
from keras_stg import layer_table as table


class ShrinkError(ValueError):
    """The model's topology cannot be shrunk; the message names the layer."""


class ShrinkCheckError(ShrinkError):
    """The shrunk model's outputs differ from the model's: it is discarded."""


def _fail(layer, reason):
    raise ShrinkError(
        f"Cannot shrink layer {layer.name!r} ({type(layer).__name__}): {reason}. "
        "shrink supports chains of Dense and convolution layers with per-channel, "
        "element-wise, pooling, padding and Flatten layers between; export this model "
        "without --shrink (--sparse still stores the zeros compactly)."
    )


_CHAIN_KINDS = {table.PRODUCER, table.PER_CHANNEL, table.ELEMENTWISE, table.SPATIAL,
                table.GLOBAL_POOL, table.FLATTEN}


def _kind(layer, outputs_kept=False):
    """The layer's channel kind from the layer table; fails unless shrink handles it.
    `outputs_kept`: the chain's last producer, whose outputs all stay, so its own
    activation (the classifier's softmax) does not matter."""
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
    if (kind in (table.PRODUCER, table.DEPTHWISE) and table.activation_reason(layer)
            and not outputs_kept):
        _fail(layer, table.activation_reason(layer))
    return kind


def _chain_layer(layer):
    """Can the chain path (with constant folding) shrink `layer`? Others take the graph path."""
    import keras

    kind = table.channel_kind(layer)
    if kind not in _CHAIN_KINDS:
        return False
    return kind != table.PRODUCER or isinstance(layer, keras.layers.Dense) or _is_conv(layer)


def _is_conv(layer):
    import keras

    L = keras.layers
    return isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D))


def _chain(model):
    """The model's layers in order, or None if it is not a plain chain (it branches,
    merges, calls a layer twice or nests a model). Raises `ShrinkError` for models
    whose graph is not visible."""
    import keras

    if isinstance(model, keras.Sequential):
        layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
        return None if any(isinstance(l, keras.Model) for l in layers) else layers
    operations = getattr(model, "operations", None)
    if operations is None or not hasattr(model, "inputs") or model.inputs is None:
        raise ShrinkError(
            f"Cannot shrink {model.name!r} ({type(model).__name__}): only Sequential and "
            "Functional models expose their layer graph; subclassed models do not."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return None  # the graph path follows several inputs and outputs
    layers = []
    previous = model.inputs[0]
    for op in operations:
        if isinstance(op, keras.layers.InputLayer):
            continue
        if not isinstance(op, keras.layers.Layer):
            return None  # an operation (`x + 3.0`): the graph path follows it
        nodes = [n for n in _compat.inbound_nodes(op) if n.operation is op]
        if len(_compat.inbound_nodes(op)) != 1 or isinstance(op, keras.Model):
            return None
        inputs = nodes[0].input_tensors
        if len(inputs) != 1 or inputs[0] is not previous:
            return None
        layers.append(op)
        previous = nodes[0].output_tensors[0]
    if previous is not model.outputs[0]:
        return None
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


def _rounded(drop, multiple):
    """`drop` with as few removable units kept (the first ones) as make the kept count a
    multiple of `multiple` (or all); at least one unit is kept, so every shape stays
    valid. Keeping a removable unit is always exact."""
    drop = drop.copy()
    kept = int((~drop).sum())
    want = min(drop.size, max(multiple, -(-kept // multiple) * multiple))
    drop[np.flatnonzero(drop)[:want - kept]] = False
    return drop


def _shrink_chain(model, layers, multiple=1):
    """`(shrunk model, units)` of a chain, with removed constants folded where exact."""
    import keras

    last = max((i for i, layer in enumerate(layers)
                if table.channel_kind(layer) == table.PRODUCER), default=-1)
    kinds = [_kind(layer, outputs_kept=i == last) for i, layer in enumerate(layers)]
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
        drop = _rounded(drop, multiple)
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
            current_keep, current_channels = keep_out[i], int(weights[i][0].shape[-1])
        else:
            keep = None
            if current_keep is not None:
                keep = np.zeros(current_channels, bool)
                keep[current_keep] = True
            if kind == table.PER_CHANNEL and keep is not None:
                config = _per_channel_config(config, keep)
            new = type(layer).from_config(config)
            x = new(x)
            if layer.weights:
                if kind != table.PER_CHANNEL:
                    _fail(layer, "it has weights but is not per-channel")
                values = [np.asarray(v.numpy()) for v in layer.weights]
                if keep is not None:
                    values = [_per_channel_value(v, keep) for v in values]
                _set_weights(new, values)
        new_layers.append(new)
    return keras.Model(inputs, x, name=model.name), units


def _set_weights(layer, values):
    layer.set_weights(values)
    # An adapted preprocessing layer (Normalization) computes its statistics from
    # these weights when it is loaded; `set_weights` alone leaves the old ones.
    finalize = getattr(layer, "finalize_state", None)
    if callable(finalize):
        finalize()


def _per_channel_value(value, keep):
    """A per-channel layer's weight with the removed channels' entries dropped: its
    last axis if that has one entry per channel (a vector, or Normalization's
    broadcast shape), else unchanged (a scalar such as Normalization's count)."""
    if value.ndim >= 1 and value.shape[-1] == keep.size:
        return value[..., keep]
    return value


def _per_channel_config(config, keep):
    """A per-channel layer's config with the removed channels' entries dropped from
    every list of one number per channel (a Normalization built with `mean=` and
    `variance=` holds them there, not in weights)."""
    config = dict(config)
    for key, value in config.items():
        if (key != "axis" and isinstance(value, (list, tuple, np.ndarray))
                and len(value) == keep.size > 1
                and all(isinstance(v, (int, float, np.number)) for v in value)):
            config[key] = [float(v) for v, k in zip(value, keep) if k]
    return config


# ------------------------------------------------------------------ graphs


def _input_shape(layer):
    node = _compat.inbound_nodes(layer)[0]
    return tuple(node.input_tensors[0].shape)


def _output_channels(layer):
    node = _compat.inbound_nodes(layer)[0]
    return int(node.output_tensors[0].shape[-1])


def _dead_outputs(layer):
    """Per output channel of a producer: are its kernel slices and bias all zero?"""
    dead = np.ones(_output_channels(layer), bool)
    kernels = table.channel_kernels(layer)
    for kernel, variable in kernels:
        if kernel.channel_out is not None:
            value = np.moveaxis(np.asarray(variable.numpy()), kernel.channel_out, -1)
            dead &= ~np.any(value != 0, axis=tuple(range(value.ndim - 1)))
    others = {id(v) for _, v in kernels}
    for v in layer.weights:  # biases, whatever their name
        if id(v) not in others and tuple(v.shape) == dead.shape:
            dead &= np.asarray(v.numpy()) == 0
    return dead


def _dead_along(layer, axis):
    """Per entry of `axis` of an attention projection's kernel: are its kernel slice and
    bias row all zero?"""
    kernel = np.moveaxis(np.asarray(layer.kernel.numpy()), axis, 0)
    dead = ~kernel.reshape(kernel.shape[0], -1).any(1)
    if table.bias(layer) is not None:
        bias = np.moveaxis(np.asarray(layer.bias.numpy()), table.bias_axis(layer, axis), 0)
        dead &= ~bias.reshape(bias.shape[0], -1).any(1)
    return dead


def _resizable(layer, role):
    """Can shrink cut `role` channels of `layer` (its table kernels name the axes)?"""
    kernels = table.channel_kernels(layer)
    if role == "consumer":
        return any(k.channel_in is not None for k, _ in kernels)
    config = layer.get_config()
    return any(k.channel_out is not None for k, _ in kernels) and (
        "units" in config or "filters" in config)


def _zero_maps_to_zero(layer, channels):
    """Per channel: does `layer` (inference), or a graph operation on its constants, map
    an all-zero input to zero?"""
    import keras

    shape = tuple(d if d is not None else 1 for d in _input_shape(layer)[1:])
    zeros = keras.ops.zeros((1,) + shape)
    if isinstance(layer, keras.layers.Layer):
        out = layer(zeros, training=False)
    else:
        node = _compat.inbound_nodes(layer)[0]
        out = _compat.call_node(node, {id(node.input_tensors[0]): zeros})
    out = np.asarray(keras.ops.convert_to_numpy(out)).reshape(-1, channels)
    return ~np.any(out != 0, axis=0)


def _activation_keeps_zero(layer, channels):
    import keras

    act = getattr(layer, "activation", None)
    if act is None:
        return np.ones(channels, bool)
    return np.full(channels, float(keras.ops.convert_to_numpy(act(keras.ops.zeros(())))) == 0)


def _removable(group):
    """Channels of `group` that are exactly zero wherever they are read.

    The group's tensors are followed in the order of the walk: a producer's
    channel is zero when its kernel slices and bias are zero and its activation
    keeps 0; a depthwise, per-channel or element-wise layer keeps a zero input
    zero where its own weights do; an element-wise merge is zero when every
    input is (a `Multiply`: when any is, so the excitation of a
    squeeze-and-excitation block may be non-zero). A channel every consumer
    reads as zero is removed from every member.
    """
    import keras

    zero = {}  # tensor id -> per channel: exactly zero?
    none = np.zeros(group.size, bool)
    removable = np.ones(group.size, bool)
    for m in sorted(group.members, key=lambda m: m.step):
        idx = slice(m.offset, m.offset + group.size)
        inputs = [zero.get(t, none) for t in m.src]
        if m.role == "producer" and m.axis is not None:  # an attention projection
            value = _dead_along(m.layer, m.axis)[idx]
        elif m.role == "producer":
            value = _dead_outputs(m.layer)[idx] & _activation_keeps_zero(m.layer, group.size)
        elif m.role == "depthwise":
            value = inputs[0] & _activation_keeps_zero(m.layer, group.size)
            if m.layer.use_bias:
                value = value & (np.asarray(m.layer.bias.numpy())[idx] == 0)
        elif m.role in ("per_channel", "elementwise"):
            channels = int(_input_shape(m.layer)[-1])
            value = inputs[0] & _zero_maps_to_zero(m.layer, channels)[idx]
        elif m.role == "merge":
            combine = np.any if table.absorbs_zero(m.layer) else np.all
            value = combine(np.stack(inputs), axis=0)
        elif m.role == "consumer":
            removable &= inputs[0]
            continue
        else:
            continue
        zero[m.dst] = value
    return removable


def _attention_config(layer, out_drop):
    """A MultiHeadAttention's config with its removed heads and output channels gone."""
    parts = table.attention_parts(layer)
    heads = out_drop.get(id(parts["value"].layer))
    output = out_drop.get(id(parts["output"].layer))
    out = parts["output"]
    width = int(out.layer.kernel.shape[out.output])
    # Explicit: a smaller query input would otherwise set the output width.
    config = {"output_shape": width - (0 if output is None else int(output.sum()))}
    if heads is not None:
        config["num_heads"] = int((~heads).sum())
    return config


def _attention_weights(layer, out_drop, in_drop):
    """A MultiHeadAttention's weights without its removed inputs, heads and outputs."""
    parts = table.attention_parts(layer)
    heads = out_drop.get(id(parts["value"].layer))
    values = []
    for name in ("query", "key", "value", "output"):
        part = parts[name]
        cuts = [(part.heads, heads)]
        if part.input is not None:
            cuts.append((part.input, in_drop.get(id(part.layer))))
        if part.output is not None:
            cuts.append((part.output, out_drop.get(id(part.layer))))
        variables = [(part.layer.kernel, 0)]
        if table.bias(part.layer) is not None:
            variables.append((part.layer.bias, len(part.layer.kernel.shape)
                              - len(part.layer.bias.shape)))
        for variable, skip in variables:
            value = np.asarray(variable.numpy())
            for axis, drop in cuts:
                if drop is not None and axis - skip >= 0:
                    value = np.compress(~drop, value, axis=axis - skip)
            values.append(value)
    return values


def _recut(op, drop):
    """What replaces `op`, a split or an index (`x[..., a:b]`) that cuts the channel axis,
    in the shrunk graph: the same cuts moved to where they fall once the channels `drop`
    marks are gone (each part keeps a channel: every group does). A split into equal parts
    stays a split; into unequal ones it becomes one index per part, which TFLite runs as
    STRIDED_SLICE (its SPLIT_V, what an uneven split converts to, is not an Edge TPU op).
    An index becomes a function indexing its input with the moved key (the key is an
    argument of the graph's node, not of the operation)."""
    kept = np.concatenate([[0], np.cumsum(~drop)])
    if table.channel_kind(op) == table.SPLIT:
        sizes = [int(t.shape[-1]) for t in _compat.inbound_nodes(op)[0].output_tensors]
        bounds = [int(kept[c]) for c in np.concatenate([[0], np.cumsum(sizes)])]
        parts = np.diff(bounds)
        if len(set(parts)) == 1:
            (split,) = _compat.operation_classes(("Split",))
            return split(len(parts), axis=op.axis)
        return lambda x: [x[..., a:b] for a, b in zip(bounds, bounds[1:])]

    def index(x, key):
        rank = len(x.shape)
        start, stop = table.channel_range(key, rank, drop.size)
        moved = table.full_key(key, rank)[:-1] + (slice(int(kept[start]), int(kept[stop])),)
        return x[moved]

    return index


def _shrink_graph(model, multiple=1):
    """`(shrunk model, units)`: the channels of each group that are zero everywhere removed."""
    import keras

    from keras_stg.dependency import channel_groups, member_name

    try:
        groups = channel_groups(model)
    except TypeError as e:
        raise ShrinkError(f"Cannot shrink {model.name!r}: {e}") from None
    # Per layer: which entries of its output axis (producers, depthwise,
    # per-channel) and of its kernel's input axis (consumers) are removed.
    out_drop, in_drop, units, unprunable = {}, {}, {}, []
    for group in groups:
        names = "/".join(member_name(m) for m in group.members if m.role == "producer")
        if not group.prunable:
            unprunable.append(f"{names}: {group.reason}")
            continue
        # Attention projections (an explicit axis) are resized with their attention layer.
        odd = [m.layer for m in group.members if m.role in ("producer", "consumer")
               and m.axis is None and not _resizable(m.layer, m.role)]
        if odd:
            unprunable.append(f"{names}: the layer table gives {odd[0].name!r} "
                              f"({type(odd[0]).__name__}) no channel axes to cut")
            continue
        dead = _rounded(_removable(group), multiple)
        if not dead.any():
            continue
        for m in group.members:
            layer = m.layer
            if m.axis is not None:  # an attention projection: its kernel axis
                drops = out_drop if m.role == "producer" else in_drop
                drop = drops.setdefault(id(layer), np.zeros(int(layer.kernel.shape[m.axis]),
                                                            bool))
                drop[m.offset:m.offset + group.size] |= dead
                continue
            if m.role == "consumer":
                size = int(_input_shape(layer)[-1])
                drop = in_drop.setdefault(id(layer), np.zeros(size, bool))
                for k in range(m.repeat):
                    start = m.offset + k * m.period
                    drop[start:start + group.size] |= dead
            elif m.role in ("producer", "depthwise", "per_channel", "split"):
                size = (_output_channels(layer) if m.role == "producer" else
                        int(_input_shape(layer)[-1]))
                drop = out_drop.setdefault(id(layer), np.zeros(size, bool))
                drop[m.offset:m.offset + group.size] |= dead
        for m in group.members:  # a producer split over groups sums its parts
            if m.role == "producer":
                before, after = units.get(member_name(m), (0, 0))
                units[member_name(m)] = (before + group.size, after + int((~dead).sum()))

    new_layers = {}

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):
            if id(layer) in out_drop:  # a split or an index of the channels: its cuts move
                return _recut(layer, out_drop[id(layer)])
            return layer  # a graph operation (`x + 3.0`): no weights, any channel count
        config = layer.get_config()
        if table.channel_kind(layer) == table.ATTENTION:
            config.update(_attention_config(layer, out_drop))
        drop = out_drop.get(id(layer))
        if drop is not None and table.channel_kind(layer) == table.PRODUCER:
            config["units" if "units" in config else "filters"] = int((~drop).sum())
        if drop is not None and table.depthwise_groups(layer):  # one channel per group
            config["filters"] = config["groups"] = int((~drop).sum())
        if drop is not None and table.channel_kind(layer) == table.PER_CHANNEL:
            config = _per_channel_config(config, ~drop)
        if isinstance(layer, keras.layers.Reshape) and -1 not in config["target_shape"]:
            config["target_shape"] = tuple(config["target_shape"][:-1]) + (-1,)  # channels
        new = _compat.rebuild_layer(layer, config)
        new_layers[id(layer)] = (layer, new)
        return new

    shrunk = _compat.clone_model(model, clone_function=clone, recursive=True)
    for old, new in new_layers.values():
        values = []
        keep_out = None if id(old) not in out_drop else ~out_drop[id(old)]
        keep_in = None if id(old) not in in_drop else ~in_drop[id(old)]
        kind = table.channel_kind(old)
        if kind == table.ATTENTION:
            _set_weights(new, _attention_weights(old, out_drop, in_drop))
            continue
        kernels = {id(v): k for k, v in table.channel_kernels(old)}
        for v in old.weights:
            value = np.asarray(v.numpy())
            kernel = kernels.get(id(v))
            if kernel is not None and kind == table.PRODUCER:
                if keep_in is not None and kernel.channel_in is not None:
                    value = np.compress(np.repeat(keep_in, kernel.in_block), value,
                                        axis=kernel.channel_in)
                if keep_out is not None and kernel.channel_out is not None:
                    value = np.compress(keep_out, value, axis=kernel.channel_out)
            elif kernel is not None and kind == table.DEPTHWISE:
                if keep_out is not None:
                    value = np.compress(keep_out, value, axis=kernel.channel_in)
            elif keep_out is not None and value.ndim == 1 and value.shape[0] == keep_out.size:
                value = value[keep_out]  # biases and per-channel weights
            elif keep_out is not None and kind == table.PER_CHANNEL:
                value = _per_channel_value(value, keep_out)
            values.append(value)
        if values:
            _set_weights(new, values)
    return shrunk, units, unprunable


def _probe(model, seed, n=8):
    """Random inputs for the output check, one array per model input: normal floats,
    integers 0 and 1 (token ids any vocabulary has), random booleans (masks)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for tensor in model.inputs:
        shape = (n,) + tuple(d or 1 for d in tuple(tensor.shape)[1:])
        dtype = np.dtype(str(tensor.dtype))
        if dtype == bool:
            arrays.append(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays[0] if len(arrays) == 1 else arrays


def output_difference(reference, model, seed=0):
    """`(max abs difference, output scale)` of `model`'s inference outputs against
    `reference`'s on the same random inputs (`_probe`); the scale is at least 1."""
    import keras

    probe = _probe(reference, seed)
    a = [np.asarray(t) for t in keras.tree.flatten(reference(probe, training=False))]
    b = [np.asarray(t) for t in keras.tree.flatten(model(probe, training=False))]
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    return diff, max(1.0, max(float(np.max(np.abs(x))) for x in a))


def shrink(model, check=True, atol=1e-5, seed=0, return_info=False, channel_multiple=1):
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
        channel_multiple: keep each layer's (channel group's) units in multiples
            of this many, keeping some removable zero ones where needed: runtimes
            vectorize channels by 4 to 16, and 9 channels can run slower than 16;
            `"auto"`: LiteRT's output-channel tile on this machine
            (`keras_stg.latency.channel_tile`, measured once and cached).

    A chain (Sequential, or Functional without branches) also loses the units
    that are a constant after a normalization shift, folded into the next
    layer's bias where that is exact. Any other graph (residual `Add`s,
    `Concatenate`, depthwise convolutions, squeeze-and-excitation, nested
    models) loses, per channel group (`keras_stg.channel_groups`), the
    channels that are exactly zero everywhere they flow: zero kernel slices
    and biases in every producer, and every layer on their path mapping 0 to
    0 (what `granularity="channel"` leaves after `strip`).

    A model holding custom block layers (a layer of yours whose `call` runs
    sublayers) is opened first (`keras_stg.inline`), so the shrunk model is
    plain Keras layers and the blocks' insides lose their zero channels too.

    Raises:
        ShrinkError: the model cannot be shrunk (a subclassed model, an
            unsupported layer in a chain); names the layer and the fix.
        ShrinkCheckError: (a `ShrinkError`) the output check failed.
    """

    from keras_stg import latency

    channel_multiple = latency.resolve_multiple(channel_multiple)
    if isinstance(channel_multiple, bool) or not (
            isinstance(channel_multiple, int) and channel_multiple >= 1):
        raise ValueError(f"`channel_multiple` must be an integer >= 1 or 'auto' (the runtime's "
                         f"channel tile on this machine), got {channel_multiple!r}.")
    from keras_stg import inlining

    given, model = model, inlining.open_custom_blocks(model)  # custom blocks' sublayers
    layers = _chain(model)
    unprunable = []
    if layers is not None and all(_chain_layer(l) for l in layers):
        shrunk, units = _shrink_chain(model, layers, channel_multiple)
    else:
        shrunk, units, unprunable = _shrink_graph(model, channel_multiple)
    info = {
        "units": units,
        "unprunable": unprunable,
        "parameters_before": _count_params(given),
        "parameters_after": _count_params(shrunk),
    }
    if check:
        diff, scale = output_difference(given, shrunk, seed)
        info["max_abs_diff"] = diff
        if diff > atol * scale:
            raise ShrinkCheckError(
                f"Shrinking changed the outputs of {model.name!r} by {diff:g} (allowed "
                f"{atol * scale:g}), so the shrunk model was discarded. This is a bug in "
                "keras_stg, please report it with the model; meanwhile use the unshrunk model "
                "(export without --shrink).")
    if info["parameters_after"] == info["parameters_before"]:
        why = f" Unprunable: {'; '.join(unprunable)}." if unprunable else ""
        warnings.warn(
            f"shrink removed nothing from {model.name!r}: no unit or channel is zero "
            "everywhere it flows. Gate the model with granularity='unit' (or 'channel') and "
            f"strip it first.{why}", stacklevel=2)
    return (shrunk, info) if return_info else shrunk
