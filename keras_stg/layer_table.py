"""What keras_stg knows about each layer type, in one table.

Every part of the library that needs layer knowledge reads it here: finding
the kernels to gate (`keras_stg.targets`), their fan-in for the
initialisations (`keras_stg.initializers`), the summary, the export stage's
weight statistics, and how channels flow through a layer for `shrink`. A new
layer type is one `register_layer` call; a graph operation that is not a layer
(`x + 3.0`, `keras.ops.relu(x)` in a Functional model) one `register_op` call.

A `LayerSpec` says two things about a layer type:

- `kernels(layer)`: its gateable kernels, as `Kernel(role, out_axes,
  in_axes)`: `role` is the name of the kernel variable (`"kernel"`,
  `"depthwise_kernel"`, ...), `out_axes` the kernel axes indexing output units
  (what unit gates and channel gates act on), `in_axes` the axes contracted
  with the input (the fan-in). It returns None when this layer instance has no
  kernel the gates can control (an EinsumDense equation it cannot read).
- `channels(layer)`: how the layer treats the channels (last axis) of its
  input, one of the `CHANNEL_KINDS`, or `Unsupported(reason)`. A producer's
  own activation is checked apart (`activation_reason`): it only concerns
  its output channels.

Lookup follows the class hierarchy: a subclass of a registered type (a
custom `Dense`) gets its parent's entry unless it has its own.

Example, a custom layer with a gateable kernel:

```python
class Affine(keras.layers.Layer):   # y = x @ w, w of shape (in, out)
    ...

keras_stg.register_layer(Affine, kernels=lambda layer: [Kernel("w", (1,), (0,))],
                         channels=PRODUCER)
```
"""

import dataclasses
import math
import weakref
from typing import Callable, Optional

import keras

from keras_stg import _compat

# Channel kinds: how a layer maps the channels (last axis) of its input to
# those of its output.
#: Makes a new channel space: output channel j mixes every input channel
#: (Dense, Conv); consumers' input axes are its `in_axes`.
PRODUCER = "producer"
#: One filter per input channel, output channel = input channel (depthwise conv).
DEPTHWISE = "depthwise"
#: Weights indexed by channel, channels unchanged (BatchNormalization).
PER_CHANNEL = "per_channel"
#: Acts on every entry alone, channels unchanged (activations, dropout).
ELEMENTWISE = "elementwise"
#: Spatial windows per channel, channels unchanged (pooling, padding, cropping).
SPATIAL = "spatial"
#: Spatial axes reduced away, channels kept (global pooling).
GLOBAL_POOL = "global_pool"
#: Spatial and channel axes flattened into one: channel c maps to the rows
#: `c, c + C, c + 2C, ...` of the consumer.
FLATTEN = "flatten"
#: Several inputs combined entry by entry (Add, Multiply, ...): every input
#: must keep the same channels.
MERGE = "merge"
#: Inputs concatenated on the channel axis.
CONCAT = "concat"

#: Outputs that are parts of the input along one axis (`keras.ops.split`): along the
#: channel axis each output holds a contiguous range of the input's channels (its
#: offset is where the previous outputs end), along another axis every output holds
#: them all.
SPLIT = "split"

#: An index into the tensor (`x[..., a:b]`, `x[:, 0]`, keras' `GetItem`): the batch
#: axis whole, any other axis indexed, the channel axis whole or cut to one range of
#: channels (`channel_range`).
SLICE = "slice"

#: Multi-head attention: projections read its query, key and value inputs (their
#: kernels' input axis), its heads are a channel space of their own, and its output
#: is its output projection's (see `attention_parts`).
ATTENTION = "attention"

CHANNEL_KINDS = (PRODUCER, DEPTHWISE, PER_CHANNEL, ELEMENTWISE, SPATIAL, GLOBAL_POOL,
                 FLATTEN, MERGE, CONCAT, SPLIT, SLICE, ATTENTION)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One gateable kernel of a layer: its variable name and axis roles.

    Attributes:
        role: the kernel variable's name (`"kernel"`, `"depthwise_kernel"`, ...).
        out_axes: the axes indexing output units (unit gates act on them).
        in_axes: the axes contracted with the input (the fan-in).
        channel_in: the axis indexing the layer's input channels (what a
            removed input channel removes), or None.
        channel_out: the axis indexing the layer's output channels, or None
            (the depthwise half of a separable convolution).
        in_block: entries of `channel_in` per input channel (a separable
            convolution's pointwise kernel has `depth_multiplier` per channel).
    """

    role: str
    out_axes: tuple
    in_axes: tuple
    channel_in: Optional[int] = None
    channel_out: Optional[int] = None
    in_block: int = 1


@dataclasses.dataclass(frozen=True)
class Unsupported:
    """A layer whose channels keras_stg cannot follow, and why."""

    reason: str


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Behaviour of one layer type; see the module docstring."""

    kernels: Optional[Callable] = None
    channels: object = None  # a kind, or a callable `layer -> kind | Unsupported`
    #: `layer -> int`: how many times each kernel weight is used per example (one
    #: multiply-add each): the output positions of a convolution, 1 for a Dense on
    #: vectors. None: the output positions (every axis but batch and channels).
    positions: Optional[Callable] = None
    #: Never gated, by design (normalization layers: see `keras_stg.gated_model`).
    never_gated: bool = False

    def channel_kind(self, layer):
        kind = self.channels(layer) if callable(self.channels) else self.channels
        if kind is None:
            return Unsupported("its channel behaviour is not in keras_stg's layer table")
        return kind


_TABLE = {}


def register_layer(layer_type, kernels=None, channels=None, never_gated=False,
                   positions=None):
    """Adds (or replaces) the entry of `layer_type`; see the module docstring.

    Args:
        layer_type: a `keras.layers.Layer` subclass.
        kernels: `layer -> list of Kernel` (or None for this instance); None:
            the layer has no gateable kernel.
        channels: a channel kind, or `layer -> kind | Unsupported(reason)`;
            None: unknown (shrink stops at this layer and says so).
        never_gated: the layer's weights are never gated even if it has a kernel.
        positions: `layer -> int`, multiply-adds per kernel weight and example
            (default: the output's positions, every axis but batch and channels).
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, keras.layers.Layer)):
        raise TypeError(f"register_layer takes a keras.layers.Layer subclass, got {layer_type!r}.")
    if isinstance(channels, str) and channels not in CHANNEL_KINDS:
        raise ValueError(f"Unknown channel kind {channels!r}; use one of {CHANNEL_KINDS}.")
    _TABLE[layer_type] = LayerSpec(kernels=kernels, channels=channels, never_gated=never_gated,
                                   positions=positions)


_OP_TABLE = {}


def register_op(op_type, channels):
    """Adds (or replaces) the channel behaviour of an operation type that is not a
    layer: what `x + 3.0`, `x * y` or `keras.ops.relu(x)` puts in a Functional graph.

    Args:
        op_type: a `keras.Operation` subclass that is not a `keras.layers.Layer`.
        channels: a channel kind, or `op -> kind | Unsupported(reason)` (the op's
            calls are `keras_stg._compat.inbound_nodes(op)`).
    """
    if not (isinstance(op_type, type) and issubclass(op_type, keras.Operation)) or issubclass(
            op_type, keras.layers.Layer):
        raise TypeError(f"register_op takes a keras.Operation subclass that is not a layer "
                        f"(register_layer takes layers), got {op_type!r}.")
    if isinstance(channels, str) and channels not in CHANNEL_KINDS:
        raise ValueError(f"Unknown channel kind {channels!r}; use one of {CHANNEL_KINDS}.")
    _OP_TABLE[op_type] = channels


def _op_kind(op):
    for cls in type(op).__mro__:
        if cls in _OP_TABLE:
            entry = _OP_TABLE[cls]
            return entry(op) if callable(entry) else entry
    return Unsupported(f"the operation {type(op).__name__} is not in keras_stg's layer table "
                       "(keras_stg.layer_table.register_op adds it)")


def spec(layer):
    """The `LayerSpec` of `layer`'s most specific registered class (empty if none)."""
    for cls in type(layer).__mro__:
        entry = _TABLE.get(cls)
        if entry is not None:
            return entry
    return LayerSpec()


def kernels(layer):
    """The layer's gateable kernels as `Kernel`s, or None if it has none."""
    entry = spec(layer)
    if entry.kernels is None or entry.never_gated:
        return None
    return entry.kernels(layer)


def kernel_layer_names():
    """Names of the registered layer types that have gateable kernels, for messages."""
    return ", ".join(sorted(cls.__name__ for cls, entry in _TABLE.items()
                            if entry.kernels is not None and not entry.never_gated))


#: Shapes of layers called inside another layer's `call` (no graph node records them),
#: filled by `record_shapes`: `{layer: (input shape, output shape)}`.
_CALLED_INSIDE = weakref.WeakKeyDictionary()
_TRACED = weakref.WeakSet()


def record_shapes(model):
    """Find the input and output shapes of `model`'s layers that the Functional graph does
    not show (called inside another layer, as MultiHeadAttention calls its projections)
    by running `model` once on zeros, so that their multiply-adds and latency are known.
    A model runs at most once (a layer the pass does not reach stays unknown)."""
    if model in _TRACED:
        return
    todo = [layer for layer in _compat.all_layers(model)
            if not _compat.inbound_nodes(layer) and layer not in _CALLED_INSIDE]
    if todo:
        _CALLED_INSIDE.update(_compat.call_shapes(model, todo))
    _TRACED.add(model)


def called_shape(layer, which):
    """`layer`'s input (`which="input"`) or output shape, batch axis first, from its first
    graph node or from `record_shapes`; None when neither knows it."""
    nodes = _compat.inbound_nodes(layer)
    if nodes:
        tensors = nodes[0].output_tensors if which == "output" else nodes[0].input_tensors
        return tuple(tensors[0].shape)
    if layer in _CALLED_INSIDE:
        return _CALLED_INSIDE[layer][1 if which == "output" else 0]
    return None


def _shape(layer, which):
    shape = called_shape(layer, which)
    if shape is None:
        raise ValueError(
            f"{layer.name!r} has not been called on an input, so its multiply-adds are "
            "unknown; build the model from keras.Input(...) (a Functional or Sequential "
            "model) with an input shape it can run on.")
    return shape


def _spatial(shape):
    return math.prod(int(d) for d in shape[1:-1] if d is not None) if len(shape) > 2 else 1


def positions(layer):
    """Multiply-adds per kernel weight and example (see `LayerSpec.positions`)."""
    entry = spec(layer)
    if entry.positions is not None:
        return int(entry.positions(layer))
    return _spatial(_shape(layer, "output"))


def _input_positions(layer):
    return _spatial(_shape(layer, "input"))


def _einsum_positions(layer):
    out = _shape(layer, "output")
    elements = math.prod(int(d) for d in out[1:] if d is not None)
    kernel = table_kernel_out_size(layer)
    return max(1, elements // kernel)


def table_kernel_out_size(layer):
    found = kernels(layer)
    shape = tuple(layer.kernel.shape)
    return math.prod(shape[a] for a in found[0].out_axes) if found else 1


def channel_kind(layer):
    """How `layer` (or a graph operation that is not a layer) treats its input's
    channels: a kind from `CHANNEL_KINDS` or `Unsupported`."""
    if not isinstance(layer, keras.layers.Layer) and isinstance(layer, keras.Operation):
        return _op_kind(layer)
    return spec(layer).channel_kind(layer)


def absorbs_zero(layer):
    """Is `layer` a merge whose output is zero where any input is (a product)?"""
    return isinstance(layer, (keras.layers.Multiply,) + _PRODUCT_OPS)


# ------------------------------------------------------------------ built in

#: Activation names that act on each entry alone (softmax does not).
ELEMENTWISE_ACTIVATIONS = {
    "linear", "relu", "relu6", "sigmoid", "tanh", "elu", "selu", "gelu", "silu",
    "swish", "softplus", "softsign", "hard_sigmoid", "hard_silu", "hard_swish",
    "leaky_relu", "exponential", "mish", "celu", "sparse_plus", "squareplus",
    "tanh_shrink", "hard_tanh", "soft_shrink", "hard_shrink", "log_sigmoid",
}


def activation_name(fn):
    """The registered name of a Keras activation function, or None."""
    try:
        name = keras.activations.serialize(fn)
    except Exception:
        name = getattr(fn, "__name__", None)
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return name if isinstance(name, str) else None


def _after_activation(kind):
    """`kind` if the layer's own activation is element-wise, else Unsupported."""
    def channels(layer):
        name = activation_name(getattr(layer, "activation", None))
        if name not in ELEMENTWISE_ACTIVATIONS:
            return Unsupported(f"its activation {name!r} is not element-wise")
        return kind
    return channels


def _channels_last(kind):
    def channels(layer):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return Unsupported("only the channels_last data format is supported")
        return kind
    return channels


def depthwise_groups(layer):
    """Is `layer` a grouped convolution with one input and one output channel per group
    (`Conv2D(filters=C, groups=C)` on C channels, as ConvNeXt writes its depthwise
    convolution)? Its kernel is `(*spatial, 1, C)`: output channel c reads input channel
    c only."""
    kernel = getattr(layer, "kernel", None)
    groups = getattr(layer, "groups", 1)
    return (groups != 1 and kernel is not None and int(kernel.shape[-2]) == 1
            and getattr(layer, "filters", None) == groups)


def _conv_channels(layer):
    if layer.data_format != "channels_last":
        return Unsupported("only the channels_last data format is supported")
    if getattr(layer, "groups", 1) != 1:
        if depthwise_groups(layer):
            return _after_activation(DEPTHWISE)(layer)
        return Unsupported("grouped convolutions are supported with one input and one "
                           "output channel per group only (a depthwise convolution: "
                           "filters == groups == input channels)")
    return PRODUCER


def activation_reason(layer):
    """Why the layer's own activation mixes its output channels (softmax), or None.

    A producer's activation acts on its output only: its input channels can
    still be pruned, its output channels not.
    """
    if not hasattr(layer, "activation"):
        return None
    name = activation_name(layer.activation)
    if name not in ELEMENTWISE_ACTIVATIONS:
        return f"the activation {name!r} of {layer.name!r} is not element-wise"
    return None


def _einsum_kernels(layer):
    rank = len(layer.kernel.shape)
    inputs, output = layer.equation.replace(" ", "").split("->")
    kernel_spec = inputs.split(",")[1].replace("...", "")
    output = output.replace("...", "")
    if len(kernel_spec) != rank:
        return None
    out_axes = tuple(i for i, c in enumerate(kernel_spec) if c in output)
    in_axes = tuple(i for i, c in enumerate(kernel_spec) if c not in output)
    return [Kernel("kernel", out_axes, in_axes)]


@dataclasses.dataclass(frozen=True)
class AttentionPart:
    """One projection of a multi-head attention layer and its kernel's axes: `input`
    (the channels of the tensor it reads), `heads` and `output` (the layer's output
    channels), each None where the projection has none."""

    layer: keras.layers.Layer
    input: Optional[int]
    heads: int
    output: Optional[int] = None


def attention_parts(layer):
    """`{"query", "key", "value", "output": AttentionPart}` of a MultiHeadAttention.

    Head h of the query, key and value projections is their kernel's axis-1 slice h
    (and bias row h); the output projection reads head h at its kernel's axis 0. A
    head whose value slice and bias are zero adds nothing to the output (its
    attention weights mix zero rows), so the head can be removed from all four."""
    sub = _compat.attention_projections(layer)
    parts = {name: AttentionPart(sub[name], 0, 1) for name in ("query", "key", "value")}
    parts["output"] = AttentionPart(sub["output"], None, 0, 2)
    return parts


def bias(layer):
    """The layer's bias variable, or None (`use_bias=False`; an EinsumDense without
    `bias_axes`, which has no `use_bias`)."""
    if not getattr(layer, "use_bias", True):
        return None
    return getattr(layer, "bias", None)


def bias_axis(layer, axis):
    """The axis of `layer.bias` that matches its kernel's `axis` (the bias spans the
    kernel's last axes)."""
    return axis - (len(layer.kernel.shape) - len(layer.bias.shape))


def _attention_channels(layer):
    if not layer.built:
        return Unsupported("it is not built, so its projections do not exist yet")
    if getattr(layer, "_use_gate", False):
        return Unsupported("gated attention (use_gate=True) is not followed")
    sub = _compat.attention_projections(layer)
    if any(len(sub[name].kernel.shape) != 3 for name in sub):
        return Unsupported("an output_shape of more than one axis is not followed")
    return ATTENTION


def _dense_kernels(layer):
    return [Kernel("kernel", (1,), (0,), channel_in=0, channel_out=1)]


def _conv_kernels(layer):
    r = len(layer.kernel.shape)  # (*spatial, in / groups, out)
    if depthwise_groups(layer):  # (*spatial, 1, channels): the channel axis is the last
        return [Kernel("kernel", (r - 1,), tuple(range(r - 1)), channel_in=r - 1)]
    return [Kernel("kernel", (r - 1,), tuple(range(r - 1)), channel_in=r - 2, channel_out=r - 1)]


def _transpose_kernels(layer):
    r = len(layer.kernel.shape)  # (*spatial, out, in)
    return [Kernel("kernel", (r - 2,), tuple(range(r - 2)) + (r - 1,), channel_in=r - 1,
                   channel_out=r - 2)]


def _depthwise_kernels(layer):
    role = "kernel" if any(v.name == "kernel" for v in layer.weights) else "depthwise_kernel"
    r = len(layer.kernel.shape)  # (*spatial, channels, multiplier)
    return [Kernel(role, (r - 2, r - 1), tuple(range(r - 2)), channel_in=r - 2)]


def _separable_kernels(layer):
    r_dw, r_pw = len(layer.depthwise_kernel.shape), len(layer.pointwise_kernel.shape)
    return [
        Kernel("depthwise_kernel", (r_dw - 2, r_dw - 1), tuple(range(r_dw - 2)),
               channel_in=r_dw - 2),
        Kernel("pointwise_kernel", (r_pw - 1,), tuple(range(r_pw - 1)), channel_in=r_pw - 2,
               channel_out=r_pw - 1, in_block=int(layer.depth_multiplier)),
    ]


def channel_kernels(layer):
    """`(Kernel, variable)` of every kernel of `layer` with a channel axis (for
    channel gates and `shrink`), in the table's order."""
    out = []
    for k in kernels(layer) or ():
        if k.channel_in is None and k.channel_out is None:
            continue
        variable = next((v for v in layer.weights if v.name == k.role), None)
        if variable is not None:
            out.append((k, variable))
    return out


def _input_rank(layer):
    """The rank of the first input of `layer`'s first call, or None if never called."""
    nodes = _compat.inbound_nodes(layer)
    if not nodes or not nodes[0].input_tensors:
        return None
    return len(nodes[0].input_tensors[0].shape)


def _is_last_axis(layer, axis):
    """Is `axis` the last (channel) axis of `layer`'s input? Keras names it -1 or by
    its index (DenseNet's `Concatenate(axis=3)` on 4-D feature maps)."""
    rank = _input_rank(layer)
    return axis == -1 or (rank is not None and axis == rank - 1)


def _batch_norm_channels(layer):
    if not _is_last_axis(layer, layer.axis):
        return Unsupported(f"it normalizes axis {layer.axis}, not the channel axis")
    return PER_CHANNEL


def _norm_over_channels(layer):
    axis = getattr(layer, "axis", -1)
    axes = tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)
    if _input_rank(layer) is not None and not any(_is_last_axis(layer, a) for a in axes):
        return Unsupported(f"it normalizes axes {axes}, not the channel axis, and its "
                           "channel handling is not in the layer table")
    return Unsupported(f"{type(layer).__name__} computes its statistics over the channels, "
                       "so removing one (even a zero one) changes the others")


def _concat_channels(layer):
    """CONCAT on the channel axis; along another axis but the batch axis, channel c of
    every input is channel c of the output: coupled as by an element-wise merge (a
    removed channel is zero in the output where it is zero in every input)."""
    if _is_last_axis(layer, layer.axis):
        return CONCAT
    rank = _input_rank(layer)
    if rank is None or layer.axis % rank == 0:
        return Unsupported(f"it concatenates on axis {layer.axis}, the batch axis")
    return MERGE


def _normalization_channels(layer):
    axes = tuple(layer.axis)
    if len(axes) == 1 and _is_last_axis(layer, axes[0]):
        return PER_CHANNEL
    return Unsupported(f"it normalizes axes {layer.axis}")


def _reshape_channels(layer):
    node = _compat.inbound_nodes(layer)[0] if _compat.inbound_nodes(layer) else None
    before = node.input_tensors[0].shape[-1] if node is not None else None
    if before is None or tuple(layer.target_shape)[-1] != before:
        return Unsupported(f"it reshapes the channel axis (to {tuple(layer.target_shape)})")
    return SPATIAL  # the last axis is unchanged, so every entry keeps its channel


#: Graph operations (not layers) that act on every entry alone.
_UNARY_OPS = ("Negative", "Abs", "Absolute", "Square", "Clip", "Tanh", "Cast", "Relu",
              "Relu6", "Sigmoid", "HardSigmoid", "Silu", "HardSilu", "Gelu", "Elu", "Selu",
              "LeakyRelu", "Softplus", "Softsign", "Celu", "SparsePlus", "Squareplus",
              "TanhShrink", "HardTanh", "SoftShrink", "HardShrink", "LogSigmoid")
#: Graph operations combining two operands entry by entry: with a scalar constant
#: they act on every entry alone, with two tensors they merge them.
_BINARY_OPS = ("Add", "Subtract", "Multiply", "Maximum", "Minimum")
#: Graph operations whose product is zero where any operand is.
_PRODUCT_OPS = tuple(_compat.operation_classes(("Multiply",)))


def _constant_shape(value):
    shape = getattr(value, "shape", None)
    if shape is None and isinstance(value, (list, tuple)):
        shape = (len(value),)
    return tuple(shape) if shape is not None else ()


def _entrywise_op(merges, numerator_only=False):
    """Channel kind of an element-wise operation from its calls: ELEMENTWISE with one
    tensor and scalar constants, MERGE with several tensors (if `merges`)."""
    def channels(op):
        kinds = set()
        for node in _compat.inbound_nodes(op):
            args, kwargs = _compat.node_arguments(node)
            leaves = keras.tree.flatten((args, kwargs))
            tensors = [v for v in leaves if isinstance(v, keras.KerasTensor)]
            for v in leaves:
                if not isinstance(v, keras.KerasTensor) and math.prod(_constant_shape(v)) > 1:
                    return Unsupported(f"it combines the channels with a constant of shape "
                                       f"{_constant_shape(v)}")
            if numerator_only and not (args and isinstance(args[0], keras.KerasTensor)
                                       and len(tensors) == 1):
                return Unsupported("it divides by a tensor (a removed channel would divide "
                                   "by zero)")
            if len(tensors) > 1 and not merges:
                return Unsupported(f"it takes {len(tensors)} tensors")
            kinds.add(ELEMENTWISE if len(tensors) == 1 else MERGE)
        if len(kinds) != 1:
            return Unsupported("its calls take different numbers of tensors" if kinds
                               else "it is not called in a graph")
        return kinds.pop()
    return channels


def _pad_op(op):
    """`keras.ops.pad` moves entries within their channel when it pads neither the
    batch nor the channel axis, and keeps a zero channel zero with zeros as fill."""
    widths = tuple(tuple(w) for w in op.pad_width)
    if len(widths) < 2 or any(widths[0]) or any(widths[-1]):
        return Unsupported(f"it pads the batch or channel axis (pad_width={widths})")
    for node in _compat.inbound_nodes(op):
        args, kwargs = _compat.node_arguments(node)
        fill = kwargs.get("constant_values", args[1] if len(args) > 1 else None)
        if op.mode == "constant" and fill not in (None, 0, 0.0):
            return Unsupported(f"it pads with {fill!r}, which a removed channel would keep")
    return SPATIAL


def _reduce_op(op):
    """A reduction (`keras.ops.mean(x, axis=(1, 2))`, a squeeze-and-excitation's pool)
    keeps the channels when it reduces neither the batch nor the channel axis; a zero
    channel reduces to zero (`Max`/`Min` with an `initial` value aside)."""
    axes = op.axis if isinstance(op.axis, (list, tuple)) else (op.axis,)
    if getattr(op, "initial", None) not in (None, 0, 0.0):
        return Unsupported(f"it reduces with initial={op.initial!r}")
    for node in _compat.inbound_nodes(op):
        rank = len(node.input_tensors[0].shape)
        if any(a is None for a in axes) or {a % rank for a in axes} & {0, rank - 1}:
            return Unsupported(f"it reduces the batch or channel axis (axis={op.axis!r})")
    return GLOBAL_POOL


def _split_op(op):
    """`keras.ops.split` (and `array_split`) along any axis but the batch axis."""
    axis = getattr(op, "axis", -1)
    for node in _compat.inbound_nodes(op):
        if axis % len(node.input_tensors[0].shape) == 0:
            return Unsupported(f"it splits the batch axis (axis={axis!r})")
    return SPLIT


def full_key(key, rank):
    """`key` of `x[key]` as one entry per axis of a rank-`rank` tensor (the Ellipsis and
    the missing trailing axes made whole slices), or None for a key this table does not
    read (tensors, lists, `None` for a new axis, more entries than axes)."""
    key = tuple(key) if isinstance(key, (tuple, list)) else (key,)
    if any(k is None or not isinstance(k, (int, slice, type(Ellipsis))) or isinstance(k, bool)
           for k in key) or sum(k is Ellipsis for k in key) > 1:
        return None
    if Ellipsis in key:
        at = key.index(Ellipsis)
        key = key[:at] + (slice(None),) * (rank - len(key) + 1) + key[at + 1:]
    key = key + (slice(None),) * (rank - len(key))
    if len(key) != rank or any(isinstance(k, slice) and not all(
            v is None or isinstance(v, int) and not isinstance(v, bool)
            for v in (k.start, k.stop, k.step)) for k in key):
        return None
    return key


def channel_range(key, rank, channels):
    """`(start, stop)` of the channels `x[key]` keeps of a rank-`rank` tensor with
    `channels` channels, or `Unsupported(reason)`."""
    full = full_key(key, rank)
    if full is None:
        return Unsupported(f"it indexes with {key!r}, which the layer table does not read")
    if full[0] != slice(None):
        return Unsupported(f"it indexes the batch axis ({full[0]!r})")
    last = full[-1]
    if not isinstance(last, slice):
        return Unsupported(f"it takes channel {last!r} alone, dropping the channel axis")
    start, stop, step = last.indices(channels)
    if step != 1:
        return Unsupported(f"it takes the channels in steps of {step}")
    return start, max(start, stop)


def _getitem_op(op):
    """`x[key]` (`GetItem`): SLICE when every call's key keeps the batch axis whole and
    takes one range of channels (or all)."""
    for node in _compat.inbound_nodes(op):
        args, kwargs = _compat.node_arguments(node)
        key = kwargs.get("key", args[1] if len(args) > 1 else None)
        shape = node.input_tensors[0].shape
        if not shape or shape[-1] is None:
            return Unsupported("its input's channel count is not known")
        found = channel_range(key, len(shape), shape[-1])
        if isinstance(found, Unsupported):
            return found
    return SLICE


def _register_builtin_ops():
    for cls in _compat.operation_classes(("GetItem",)):
        register_op(cls, _getitem_op)
    for cls in _compat.operation_classes(("Split", "ArraySplit")):
        register_op(cls, _split_op)
    for cls in _compat.operation_classes(("Concatenate",)):  # keras.ops.concatenate
        register_op(cls, _concat_channels)
    for cls in _compat.operation_classes(("Pad",)):
        register_op(cls, _pad_op)
    for cls in _compat.operation_classes(("Mean", "Max", "Min", "Sum", "Amax", "Amin")):
        register_op(cls, _reduce_op)
    for cls in _compat.operation_classes(_UNARY_OPS):
        register_op(cls, _entrywise_op(merges=False))
    for cls in _compat.operation_classes(_BINARY_OPS):
        register_op(cls, _entrywise_op(merges=True))
    for cls in _compat.operation_classes(("Divide", "TrueDivide")):
        register_op(cls, _entrywise_op(merges=False, numerator_only=True))


def _register_builtins():
    L = keras.layers
    register_layer(L.Dense, kernels=_dense_kernels, channels=PRODUCER)
    register_layer(L.EinsumDense, kernels=_einsum_kernels, positions=_einsum_positions,
                   channels=Unsupported("EinsumDense channels are not followed yet"))
    for cls in (L.Conv1D, L.Conv2D, L.Conv3D):
        register_layer(cls, kernels=_conv_kernels, channels=_conv_channels)
    for cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
        register_layer(cls, kernels=_transpose_kernels, positions=_input_positions,
                       channels=_conv_channels)
    for cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
        register_layer(cls, kernels=_depthwise_kernels, channels=_after_activation(DEPTHWISE))
    for cls in (L.SeparableConv1D, L.SeparableConv2D):
        register_layer(cls, kernels=_separable_kernels, channels=_conv_channels)
    register_layer(L.BatchNormalization, channels=_batch_norm_channels, never_gated=True)
    # Their statistics run over the channels: a removed channel, even a zero one,
    # would change every other channel's output.
    for cls in (L.LayerNormalization, L.GroupNormalization, L.UnitNormalization):
        register_layer(cls, never_gated=True, channels=_norm_over_channels)
    register_layer(L.Activation, channels=_after_activation(ELEMENTWISE))
    for cls in (L.ReLU, L.LeakyReLU, L.ELU, L.PReLU, L.GaussianNoise, L.GaussianDropout,
                L.AlphaDropout, L.Identity):
        register_layer(cls, channels=ELEMENTWISE)
    register_layer(L.Dropout, channels=ELEMENTWISE)  # zeros stay zero, at any noise_shape
    register_layer(L.SpatialDropout1D, channels=ELEMENTWISE)
    register_layer(L.SpatialDropout2D, channels=ELEMENTWISE)
    register_layer(L.Rescaling, channels=ELEMENTWISE)
    register_layer(L.Normalization, channels=_normalization_channels)
    register_layer(L.Reshape, channels=_reshape_channels)
    for cls in (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D,
                L.AveragePooling2D, L.AveragePooling3D):
        register_layer(cls, channels=_channels_last(SPATIAL))
    for cls in (L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D,
                L.Cropping2D, L.Cropping3D):
        register_layer(cls, channels=_channels_last(SPATIAL))
    for cls in (L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
                L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D):
        register_layer(cls, channels=_channels_last(GLOBAL_POOL))
    register_layer(L.Flatten, channels=_channels_last(FLATTEN))
    for cls in (L.Add, L.Subtract, L.Multiply, L.Maximum, L.Minimum, L.Average):
        register_layer(cls, channels=MERGE)
    register_layer(L.Concatenate, channels=_concat_channels)
    # Its kernels are its projections' (EinsumDense layers, gated as such).
    register_layer(L.MultiHeadAttention, channels=_attention_channels)
    # InceptionResNetV2's residual: `inputs[0] + inputs[1] * scale`, zero where both are.
    scale_sum = _compat.application_layer("inception_resnet_v2", "CustomScaleLayer")
    if scale_sum is not None:
        register_layer(scale_sum, channels=MERGE)


_register_builtins()
_register_builtin_ops()
