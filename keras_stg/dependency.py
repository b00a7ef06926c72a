"""Channel dependency analysis: which channels of a model must be kept or removed together.

A *channel group* is a set of channel spaces that are the same channels: the
output channels of a convolution, the BatchNormalization after it, the
depthwise convolution after that, both branches of a residual `Add`, the trunk
and the excitation of a squeeze-and-excitation `Multiply`. Removing channel `c`
of a group removes it from every *member*: the producers' output axes (kernel
and bias), the per-channel layers' weights, the depthwise kernels, and the
consumers' input axes (at an offset after a `Concatenate`, and once per
position after a `Flatten`). The heads of a `MultiHeadAttention` are a group of
their own, whose members are its projections (`Member.axis` names the kernel
axis: 1 of the query, key and value kernels, 0 of the output kernel).

`channel_groups(model)` walks the layer graph (Sequential, Functional, nested
sub-models) and applies to every layer, and every operation that is not a layer
(`x + 3.0`, `x * y`, `keras.ops.relu(x)`), its channel behaviour from
`keras_stg.layer_table`. Where an element-wise merge adds tensors cut into
different channel spaces (a convolution's output and a concatenation), the
spaces are split at every input's boundaries, so one producer may own several
groups, each at its offset. A group that reaches a model input or output, an op
the table does not know, or a shared layer is *unprunable*, and says why.

Example:

```python
for group in keras_stg.channel_groups(model):
    print(group)           # size, producers, members, or why it is unprunable
```
"""

import dataclasses
import itertools
import math

import keras

from keras_stg import _compat
from keras_stg import layer_table as table


@dataclasses.dataclass(frozen=True)
class Member:
    """One place a group's channels live.

    Attributes:
        layer: the layer.
        role: `"producer"` (output axis of its kernel, and its bias),
            `"depthwise"` (channel axis of a depthwise kernel, and its bias),
            `"per_channel"` (every weight of the layer, indexed by channel),
            `"elementwise"` (no weights; on the channels' path),
            `"merge"` (an element-wise merge of coupled inputs),
            `"split"` (the input of a split or an index that cuts the channel axis,
            no weights: `shrink` moves its cuts) or `"consumer"` (input axis of its
            kernel).
        offset: where the group's channel 0 sits on the member's channel axis
            (after a `Concatenate`, or in a producer whose channels were split).
        repeat, period: a consumer after a `Flatten` sees channel `c` at the
            rows `offset + c + k * period` for `k < repeat`.
        src, dst: the tensors (walker ids) the member reads and writes, in the
            order of the walk (`step`): `shrink` follows a zero channel along them.
        axis: for a projection inside a multi-head attention layer (`layer` is the
            projection, see `layer_table.attention_parts`), the kernel axis that
            holds the group's channels; None: the axis the layer table gives.
        owner: that attention layer (None elsewhere).
    """

    layer: keras.layers.Layer
    role: str
    offset: int = 0
    repeat: int = 1
    period: int = 0
    src: tuple = ()
    dst: int = -1
    step: int = 0
    axis: object = None
    owner: object = None


class _Slot:
    """A channel space in the union-find of groups."""

    def __init__(self, size):
        self.size = int(size)
        self.parent = self
        self.members = []
        self.reasons = []
        #: After a split: `[(child slot, start)]`, the parts that replace this space.
        self.children = None

    def root(self):
        slot = self
        while slot.parent is not slot:
            slot.parent = slot.parent.parent
            slot = slot.parent
        return slot


def _union(a, b):
    a, b = a.root(), b.root()
    if a is b:
        return a
    if a.size != b.size:  # cannot happen for valid graphs; never merge mismatched spaces
        a.reasons.append(f"coupled with a space of {b.size} channels")
        b.reasons.append(f"coupled with a space of {a.size} channels")
        return a
    b.parent = a
    a.members.extend(b.members)
    a.reasons.extend(b.reasons)
    return a


@dataclasses.dataclass
class _View:
    """The channels of a tensor: segments `(slot, offset, tensor id)` in order; `repeat` > 1
    after a Flatten (the block of `period` channels repeats once per spatial position)."""

    segments: list
    repeat: int = 1

    @property
    def channels(self):
        return sum(s.size for s, _, _ in self.segments)

    def slots(self):
        return [s for s, _, _ in self.segments]


@dataclasses.dataclass
class ChannelGroup:
    """Channels that are kept or removed together.

    Attributes:
        size: number of channels.
        members: every `Member` (producers first).
        reason: why the group cannot be pruned, or None.
    """

    size: int
    members: list
    reason: object = None

    @property
    def prunable(self):
        return self.reason is None

    @property
    def producers(self):
        return [m.layer for m in self.members if m.role == "producer"]

    def zero(self, channels):
        """Zeroes `channels` (indices into the group) where a closed channel gate would:
        producers' kernel output slices and biases, normalization gamma and beta, depthwise
        biases; the channels are then zero everywhere they flow and `shrink` removes them."""
        import numpy as np

        channels = np.asarray(channels, int)
        for m in self.members:
            layer = m.layer
            if m.role == "producer" and m.axis is not None:  # an attention projection
                for variable, axis in ((layer.kernel, m.axis),) + (
                        ((layer.bias, table.bias_axis(layer, m.axis)),)
                        if table.bias(layer) is not None else ()):
                    value = np.array(variable.numpy())
                    np.moveaxis(value, axis, -1)[..., channels + m.offset] = 0
                    variable.assign(value)
                continue
            if m.role == "producer":
                for kernel, variable in table.channel_kernels(layer):
                    if kernel.channel_out is not None:
                        value = np.array(variable.numpy())
                        np.moveaxis(value, kernel.channel_out, -1)[..., channels + m.offset] = 0
                        variable.assign(value)
                variables = [layer.bias] if layer.use_bias else []
                index = channels + m.offset
            elif m.role == "per_channel":
                variables = [v for v in (getattr(layer, "gamma", None),
                                         getattr(layer, "beta", None)) if v is not None]
                index = channels + m.offset
            elif m.role == "depthwise" and layer.use_bias:
                variables, index = [layer.bias], channels + m.offset
            else:
                continue
            for v in variables:
                value = np.array(v.numpy())
                value[..., index] = 0
                v.assign(value)

    def __str__(self):
        names = ", ".join(f"{member_name(m)}:{m.role}" for m in self.members)
        state = "prunable" if self.prunable else f"unprunable ({self.reason})"
        return f"<channel group of {self.size}: {state}; {names}>"


def member_name(member):
    """The member's layer name; `attention/query` for a projection inside an attention
    layer."""
    if member.owner is not None:
        return f"{member.owner.name}/{member.layer.name}"
    return member.layer.name


def _mark(view, reason):
    for slot in view.slots():
        slot.root().reasons.append(reason)


def _channels(tensor):
    shape = tensor.shape
    return int(shape[-1]) if len(shape) and shape[-1] is not None else 0


class _SequentialOutput:
    """The output of a layer inside a Sequential (only its shape is read)."""

    def __init__(self, layer):
        self.shape = tuple(layer.output.shape) if _compat.inbound_nodes(layer) else (None,)


class _Walker:
    def __init__(self):
        self.slots = []  # every channel space made
        self.tensors = 0  # ids of the tensors (per segment) the walk has made
        self.steps = 0

    def tid(self):
        self.tensors += 1
        return self.tensors

    def new(self, size, reason=None):
        slot = _Slot(size)
        if reason:
            slot.reasons.append(reason)
        self.slots.append(slot)
        return _View([(slot, 0, self.tid())])

    def add(self, slot, layer, role, offset=0, **extra):
        self.steps += 1
        slot.root().members.append(Member(layer, role, offset, step=self.steps, **extra))

    def through(self, view, layer, role):
        """`view` after a per-channel layer: each segment a new tensor, read from the old."""
        segments = []
        for slot, offset, tid in view.segments:
            new = self.tid()
            self.add(slot, layer, role, offset, src=(tid,), dst=new)
            segments.append((slot, offset, new))
        return _View(segments, view.repeat)

    def resolve(self, view):
        """`view` with every segment whose channel space was split replaced by its parts."""
        segments, changed = [], False
        for slot, offset, tid in view.segments:
            parts = self._parts(slot.root(), offset)
            changed |= len(parts) != 1 or parts[0][0] is not slot
            segments.extend((part, start, tid) for part, start in parts)
        return _View(segments, view.repeat) if changed else view

    def _parts(self, root, offset):
        if root.children is None:
            return [(root, offset)]
        return [part for child, start in root.children
                for part in self._parts(child.root(), offset + start)]

    def split(self, root, cuts):
        """Splits the channel space `root` (and everything coupled to it) at the channel
        indices `cuts`: each part gets every member, at its offset, and the reasons."""
        bounds = [0] + sorted(cuts) + [root.size]
        root.children = []
        for start, end in zip(bounds, bounds[1:]):
            child = _Slot(end - start)
            child.reasons = list(root.reasons)
            child.members = [dataclasses.replace(m, offset=m.offset + start)
                             for m in root.members]
            self.slots.append(child)
            root.children.append((child, start))
        root.members = []

    def align(self, views):
        """`views` (tensors whose channel c is the same channel) with their channel spaces
        split until every view has its boundaries at the same channels."""
        while True:
            views = [self.resolve(v) for v in views]
            bounds = [{offset for _, offset, _ in v.segments} for v in views]
            cuts = set().union(*bounds)
            if all(b == cuts for b in bounds):
                return views
            for v in views:
                for slot, offset, _ in self.resolve(v).segments:
                    inner = [c - offset for c in cuts if offset < c < offset + slot.size]
                    if inner:
                        self.split(slot.root(), inner)

    def unknown(self, views, outputs, reason):
        for v in views:
            _mark(v, reason)
        return [self.new(_channels(t), reason) for t in outputs]

    def layer(self, layer, views, outputs, arguments=None):
        """Output views of one call of `layer` on inputs of `views`; `arguments`:
        `(args, kwargs, {id(input tensor): view})` of that call, where known."""
        views = [self.resolve(v) for v in views]
        if isinstance(layer, keras.Model):
            return self.model(layer, views)
        if getattr(layer, "weights", None) and len(_compat.inbound_nodes(layer)) > 1:
            # Its weights serve several calls: a channel cannot be removed from one alone.
            reason = f"{layer.name!r} is a shared layer"
            if table.channel_kind(layer) != table.PRODUCER or len(outputs) != 1:
                return self.unknown(views, outputs, reason)
            for v in views:
                _mark(v, reason)
            out = self.new(_channels(outputs[0]), reason)  # listed, with the reason
            slot, _, tid = out.segments[0]
            self.add(slot, layer, "producer", dst=tid)
            return [out]
        kind = table.channel_kind(layer)
        name = f"{layer.name!r} ({type(layer).__name__})"
        if isinstance(kind, table.Unsupported):
            return self.unknown(views, outputs, f"{name}: {kind.reason}")
        if kind == table.SPLIT:
            return self.split_op(layer, views, outputs, name)
        if kind == table.SLICE:
            return [self.slice_op(layer, views, outputs, arguments, name)]
        if len(outputs) != 1:
            return self.unknown(views, outputs, f"{name} has {len(outputs)} outputs")
        out_channels = _channels(outputs[0])
        if kind == table.ATTENTION:
            return [self.attention(layer, views, arguments, out_channels, name)]
        if kind == table.MERGE:
            return [self.merge(layer, views, out_channels)]
        if kind == table.CONCAT:
            if any(v.repeat != 1 for v in views):
                return self.unknown(views, outputs, f"{name} concatenates flattened tensors")
            segments, start = [], 0
            for v in views:
                segments.extend((slot, start + offset, tid) for slot, offset, tid in v.segments)
                start += v.channels
            return [_View(segments)]
        if len(views) != 1:
            return self.unknown(views, outputs, f"{name} takes {len(views)} inputs")
        (view,) = views
        if kind == table.PRODUCER:
            if view.repeat != 1 and not isinstance(layer, keras.layers.Dense):
                return self.unknown(views, outputs, f"{name} reads a flattened tensor")
            period = view.channels if view.repeat != 1 else 0
            for slot, offset, tid in view.segments:
                self.add(slot, layer, "consumer", offset, repeat=view.repeat, period=period,
                         src=(tid,))
            out = self.new(out_channels, table.activation_reason(layer))
            slot, _, tid = out.segments[0]
            self.add(slot, layer, "producer", dst=tid)
            return [out]
        if view.repeat != 1 and kind != table.ELEMENTWISE:
            return self.unknown(views, outputs, f"{name} after a Flatten")
        if kind == table.DEPTHWISE:
            if getattr(layer, "depth_multiplier", 1) != 1:
                return self.unknown(views, outputs, f"{name} has depth_multiplier > 1")
            if table.activation_reason(layer):
                _mark(view, table.activation_reason(layer))
            return [self.through(view, layer, "depthwise")]
        if kind == table.PER_CHANNEL:
            return [self.through(view, layer, "per_channel")]
        if kind == table.ELEMENTWISE:
            return [self.through(view, layer, "elementwise")]
        if kind in (table.SPATIAL, table.GLOBAL_POOL):
            return [view]
        if kind == table.FLATTEN:
            if view.channels == 0 or view.repeat != 1:
                return self.unknown(views, outputs, f"{name} flattens an unknown shape")
            return [_View(view.segments, repeat=max(1, out_channels // view.channels))]
        return self.unknown(views, outputs, f"{name}: unknown channel kind {kind!r}")

    def slice_op(self, op, views, outputs, arguments, name):
        """`x[key]`: every channel of `x` when the key keeps the channel axis whole, else
        the channels `[start, stop)` (the channel spaces split at both ends)."""
        if arguments is None or len(views) != 1 or views[0].repeat != 1 or len(outputs) != 1:
            return self._stopped(views, _channels(outputs[0]), f"{name}: an index this walk "
                                                               "cannot follow")
        args, kwargs, _ = arguments
        key = kwargs.get("key", args[1] if len(args) > 1 else None)
        view, rank = views[0], len(args[0].shape)
        found = table.channel_range(key, rank, view.channels)
        if isinstance(found, table.Unsupported):
            return self._stopped(views, _channels(outputs[0]), f"{name}: {found.reason}")
        start, stop = found
        if (start, stop) == (0, view.channels):
            return view
        view = self._cut(op, view, [start, stop])
        return _View([(slot, offset - start, tid) for slot, offset, tid in view.segments
                      if start <= offset < stop])

    def _cut(self, op, view, cuts):
        """`view` (the input of `op`) with its channel spaces split at the channel indices
        `cuts`, and `op` a `"split"` member at every segment (`shrink` moves the cuts)."""
        for slot, offset, _ in view.segments:
            inner = [c - offset for c in cuts if offset < c < offset + slot.size]
            if inner:
                self.split(slot.root(), inner)
        view = self.resolve(view)
        for slot, offset, tid in view.segments:
            self.add(slot, op, "split", offset, src=(tid,))
        return view

    def split_op(self, op, views, outputs, name):
        """A split: along the channel axis, output i holds the input's channels from where
        the outputs before it end (the channel spaces are split at those cuts, so each
        output's channels are whole spaces); along another axis every output holds the
        input's channels."""
        sizes = [_channels(t) for t in outputs]
        if len(views) != 1 or views[0].repeat != 1 or not all(sizes):
            return self.unknown(views, outputs, f"{name}: a split this walk cannot follow")
        view = views[0]
        if all(size == view.channels for size in sizes):
            return [view for _ in outputs]  # split along a spatial axis
        if sum(sizes) != view.channels:
            return self.unknown(views, outputs, f"{name}: parts of {sizes} channels do not "
                                                f"add up to its input's {view.channels}")
        view = self._cut(op, view, list(itertools.accumulate(sizes))[:-1])
        out, start = [], 0
        for size in sizes:
            out.append(_View([(slot, offset - start, tid) for slot, offset, tid in view.segments
                              if start <= offset < start + size]))
            start += size
        return out

    def attention(self, layer, views, arguments, out_channels, name):
        """A multi-head attention call: the query, key and value projections read their
        inputs, the heads make a channel space of their own (head h is zero after the
        attention when its value slice is), the output projection makes the output."""
        if arguments is None:
            return self._stopped(views, out_channels, f"{name}: its query and value are not known")
        args, kwargs, by_id = arguments
        query = kwargs.get("query", args[0] if args else None)
        value = kwargs.get("value", args[1] if len(args) > 1 else None)
        key = kwargs.get("key", args[2] if len(args) > 2 else None)
        key = value if key is None else key
        inputs = {"query": query, "key": key, "value": value}
        if any(id(t) not in by_id for t in inputs.values()):
            return self._stopped(views, out_channels, f"{name}: its query and value are not known")
        parts = table.attention_parts(layer)
        for role_name, tensor in inputs.items():
            view = self.resolve(by_id[id(tensor)])
            if view.repeat != 1:
                return self._stopped(views, out_channels, f"{name} reads a flattened tensor")
            for slot, offset, tid in view.segments:
                self.add(slot, parts[role_name].layer, "consumer", offset, src=(tid,),
                         axis=parts[role_name].input, owner=layer)
        heads = self.new(int(parts["value"].layer.kernel.shape[parts["value"].heads]))
        slot, _, values = heads.segments[0]
        for role_name in ("query", "key", "value"):
            dst = values if role_name == "value" else self.tid()
            self.add(slot, parts[role_name].layer, "producer", dst=dst,
                     axis=parts[role_name].heads, owner=layer)
        self.add(slot, parts["output"].layer, "consumer", src=(values,),
                 axis=parts["output"].heads, owner=layer)
        out = self.new(out_channels)
        slot, _, tid = out.segments[0]
        self.add(slot, parts["output"].layer, "producer", dst=tid, axis=parts["output"].output,
                 owner=layer)
        return out

    def merge(self, layer, views, out_channels):
        full = [v for v in views if v.channels == out_channels]
        if any(v.repeat != 1 for v in views) or not full:
            return self._merge_unknown(layer, views, out_channels)
        for v in views:  # broadcast inputs (one channel) do not couple
            if v not in full and v.channels != 1:
                return self._merge_unknown(layer, views, out_channels)
        # Channel c of every input is the same channel: where the inputs are cut into
        # different channel spaces (a convolution's output added to a concatenation),
        # every space is split at every input's boundaries.
        full = self.align(full)
        first = full[0]
        for v in full[1:]:
            if [s.size for s, _, _ in v.segments] != [s.size for s, _, _ in first.segments]:
                return self._merge_unknown(layer, views, out_channels)
        for v in full[1:]:
            for (a, _, _), (b, _, _) in zip(first.segments, v.segments):
                _union(a, b)
        segments = []
        for i, (slot, offset, _) in enumerate(first.segments):
            new = self.tid()
            self.add(slot, layer, "merge", offset, src=tuple(v.segments[i][2] for v in full),
                     dst=new)
            segments.append((slot.root(), offset, new))
        return _View(segments)

    def _merge_unknown(self, layer, views, out_channels):
        return self._stopped(views, out_channels, f"{layer.name!r} ({type(layer).__name__}) "
                                                  "merges tensors it cannot align")

    def _stopped(self, views, out_channels, reason):
        for v in views:
            _mark(v, reason)
        return self.new(out_channels, reason)

    def model(self, model, input_views):
        """Walks a Sequential or Functional `model` from `input_views`; returns output views."""
        if isinstance(model, keras.Sequential):
            views = input_views
            for layer in model.layers:
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                views = self.layer(layer, views, [_SequentialOutput(layer)])
            return views
        if not getattr(model, "inputs", None) or not hasattr(model, "operations"):
            raise TypeError(
                f"{model.name!r} ({type(model).__name__}) is a subclassed model: its layer "
                "graph is not visible, so its channels cannot be followed. Build it as a "
                "Functional or Sequential model.")
        known = {id(t): v for t, v in zip(model.inputs, input_views)}
        for op, node in _compat.graph_calls(model, known):
            inputs = list(node.input_tensors)
            views = [known[id(t)] for t in inputs]
            outputs = list(node.output_tensors)
            args, kwargs = _compat.node_arguments(node)
            new = self.layer(op, views, outputs,
                             (args, kwargs, {id(t): known[id(t)] for t in inputs}))
            for t, v in zip(outputs, new):
                known[id(t)] = v
        return [known[id(t)] for t in model.outputs]


def channel_groups(model):
    """The channel groups of `model` (a built Sequential or Functional Keras model).

    Returns a list of `ChannelGroup`, one per set of coupled output channels of
    the model's producers (Dense and convolution layers), in the model's layer
    order; unprunable ones carry their reason.
    """
    if not isinstance(model, keras.Model) or not model.built:
        raise TypeError(f"channel_groups takes a built keras.Model, got {model!r}.")
    walker = _Walker()
    inputs = getattr(model, "inputs", None)
    if not inputs or not (isinstance(model, keras.Sequential) or hasattr(model, "operations")):
        raise TypeError(
            f"{model.name!r} ({type(model).__name__}) is a subclassed model, or has no "
            "Input: its layer graph is not visible, so its channels cannot be followed. "
            "Build it as a Functional or Sequential model with keras.Input(...).")
    input_views = [walker.new(_channels(t), "reaches a model input") for t in model.inputs]
    outputs = walker.model(model, input_views)
    for v in outputs:
        _mark(walker.resolve(v), "reaches a model output")
    order = {id(layer): i for i, layer in enumerate(_compat.all_layers(model))}
    groups, seen = [], set()
    roots = []
    for slot in walker.slots:
        root = slot.root()
        if id(root) in seen or root.children is not None:
            continue
        seen.add(id(root))
        roots.append(root)
    for root in roots:
        members = sorted(root.members, key=lambda m: (m.role != "producer",
                                                      order.get(id(m.layer), math.inf)))
        if not any(m.role == "producer" for m in members):
            continue
        groups.append(ChannelGroup(root.size, members, root.reasons[0] if root.reasons else None))
    groups.sort(key=lambda g: order.get(id(g.members[0].layer), math.inf))
    return groups

