"""Channel gates: one stochastic gate per channel of a channel group, shared by all its members.

Used by `GatedModel` with `granularity="channel"`. Each prunable group of
`keras_stg.channel_groups` whose producers are all gated gets one gate tensor
of shape `(channels,)`. The gate multiplies, along their channel axis, every
producer's kernel output axis and bias, every depthwise kernel and bias, and
every BatchNormalization's gamma and beta in the group (for an attention head:
its slice of the query, key and value kernels and biases), so a closed channel is
exactly zero everywhere it flows (after normalization too) and `shrink` can
remove it. At inference the consumers' input rows are multiplied by the binary
mask as well (they only ever see zeros there), so `strip` leaves them zero.

The kept weights of a kernel are `spatial x kept inputs x kept outputs`; the
expected kept weights use each gate's probability of being open, the same
product (gates of different groups are independent). Both count channels no
gate controls as kept.
"""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_stg import gate_math
from keras_stg import layer_table
from keras_stg.dependency import channel_groups


@dataclasses.dataclass
class _Axis:
    """The gated channels along one axis of a variable: segments `(gate, offset)` of a
    channel vector of `period` channels, each channel `block` entries long (a separable
    convolution's depth multiplier), tiled `repeat` times (after a Flatten)."""

    length: int
    segments: list = dataclasses.field(default_factory=list)
    period: int = 0
    repeat: int = 1
    block: int = 1

    def vector(self, values, sizes):
        """The per-entry vector: `values[g]` on gate g's channels, 1 elsewhere."""
        period = self.period or self.length // self.block
        pieces, at = [], 0
        for g, offset in sorted(self.segments, key=lambda s: s[1]):
            if offset > at:
                pieces.append(ops.ones((offset - at,)))
            pieces.append(ops.cast(values[g], "float32"))
            at = offset + sizes[g]
        if at < period:
            pieces.append(ops.ones((period - at,)))
        vector = pieces[0] if len(pieces) == 1 else ops.concatenate(pieces, axis=0)
        if self.block > 1:
            vector = ops.repeat(vector, self.block, axis=0)
        return ops.tile(vector, (self.repeat,)) if self.repeat > 1 else vector


@dataclasses.dataclass
class _Target:
    """How the gates act on one gated kernel."""

    index: int
    out_axis: int = None
    out: _Axis = None
    in_axis: int = None
    inputs: _Axis = None
    depthwise: bool = False
    #: The bias axis of `out_axis` (the bias spans the kernel's last axes).
    bias_axis: int = -1


class ChannelPlan:
    """The channel gates of a model: which groups are gated and where each gate acts."""

    def __init__(self, model, targets):
        self.groups = []
        by_layer = {}
        for i, t in enumerate(targets):
            if t.kernel is not None:
                by_layer.setdefault(id(t.layer), []).append(i)

        def axis_of(m, i):
            """The axis of target i's kernel that holds member m's channels, or None."""
            if m.axis is not None:  # an attention projection
                return m.axis if targets[i].kernel.role == "kernel" else None
            table = targets[i].kernel
            return table.channel_out if m.role in ("producer", "depthwise") else table.channel_in

        self.skipped = []
        for group in channel_groups(model):
            if not group.prunable:
                self.skipped.append(group)
                continue
            if any(all(axis_of(m, i) is None for i in by_layer.get(id(m.layer), []))
                   for m in group.members if m.role == "producer"):
                self.skipped.append(group)  # a producer is not gated (exclude / include)
                continue
            self.groups.append(group)
        self.sizes = [g.size for g in self.groups]
        self.targets = {}
        self.norms = {}  # id(layer) -> (layer, _Axis) of per-channel layers
        for g, group in enumerate(self.groups):
            for m in group.members:
                if m.role == "per_channel":
                    if isinstance(m.layer, keras.layers.BatchNormalization):
                        length = int(m.layer.moving_mean.shape[0])
                        axis = self.norms.setdefault(id(m.layer), (m.layer, _Axis(length)))[1]
                        axis.segments.append((g, m.offset))
                    continue
                if m.role not in ("producer", "consumer", "depthwise"):
                    continue
                for i in by_layer.get(id(m.layer), []):
                    table = targets[i].kernel
                    shape = tuple(targets[i].variable.shape)
                    axis = axis_of(m, i) if m.role != "depthwise" else table.channel_in
                    if axis is None:
                        continue  # e.g. the depthwise half of a separable convolution
                    spec = self.targets.setdefault(i, _Target(i))
                    if m.role in ("producer", "depthwise"):
                        spec.depthwise = m.role == "depthwise"
                        spec.out_axis = axis
                        spec.bias_axis = axis - len(shape)
                        spec.out = spec.out or _Axis(int(shape[axis]))
                        spec.out.segments.append((g, m.offset))
                    else:
                        spec.in_axis = axis
                        spec.inputs = spec.inputs or _Axis(
                            int(shape[axis]), period=m.period, repeat=m.repeat,
                            block=table.in_block)
                        spec.inputs.segments.append((g, m.offset))

    # ---------------------------------------------------------------- values

    def _shaped(self, vector, rank, axis):
        shape = [1] * rank
        shape[axis] = -1
        return ops.reshape(vector, shape)

    def mapping(self, targets, values, binary_inputs=None):
        """`(variable, value)` pairs: kernels, biases and BN affine weights times the gates.

        `values[g]` is gate g's value; `binary_inputs` (inference) also masks the
        consumers' input rows.
        """
        mapping = []
        for i, spec in self.targets.items():
            t = targets[i]
            kernel = t.variable.value
            value = kernel
            rank = len(kernel.shape)
            if spec.out is not None:
                vector = spec.out.vector(values, self.sizes)
                value = value * ops.cast(self._shaped(vector, rank, spec.out_axis), value.dtype)
                bias = layer_table.bias(t.layer)
                if bias is not None:
                    shaped = self._shaped(vector, len(bias.shape),
                                          spec.bias_axis % len(bias.shape))
                    mapping.append((bias, bias.value * ops.cast(shaped, bias.dtype)))
            if spec.inputs is not None and binary_inputs is not None:
                vector = spec.inputs.vector(binary_inputs, self.sizes)
                value = value * ops.cast(self._shaped(vector, rank, spec.in_axis), value.dtype)
            if value is not kernel:
                mapping.append((t.variable, value))
        for layer, axis in self.norms.values():
            vector = axis.vector(values, self.sizes)
            for v in (layer.gamma, layer.beta):
                if v is not None:
                    mapping.append((v, v.value * ops.cast(vector, v.dtype)))
        return mapping

    def substituted(self, targets):
        ids = set()
        for i, spec in self.targets.items():
            t = targets[i]
            ids.add(id(t.variable))
            if spec.out is not None and layer_table.bias(t.layer) is not None:
                ids.add(id(t.layer.bias))
        for layer, _ in self.norms.values():
            ids |= {id(v) for v in (layer.gamma, layer.beta) if v is not None}
        return ids

    # -------------------------------------------------------------- counting

    def kept(self, targets, values, costs=None):
        """Kept weights (a scalar tensor) when gate g keeps `values[g]` (probabilities or a
        binary mask) of each channel; each target's weights count `costs[i]` (default 1)."""
        total = 0.0
        for i, t in enumerate(targets):
            shape = tuple(t.variable.shape)
            spec = self.targets.get(i)
            cost = 1.0 if costs is None else costs[i]
            if spec is None:
                total = total + float(math.prod(shape)) * cost
                continue
            rest = float(math.prod(shape)) * cost
            factor = 1.0
            for axis, spec_axis in ((spec.out_axis, spec.out), (spec.in_axis, spec.inputs)):
                if spec_axis is None:
                    continue
                rest /= shape[axis]
                factor = factor * ops.sum(spec_axis.vector(values, self.sizes))
            total = total + rest * factor
        return total

    def max_sparsity(self, targets, costs=None, fixed=0.0, keep=1):
        """The share of the cost removed when every group keeps only `keep` channels (all
        of a smaller group), the least a frozen mask keeps (`fixed`: cost no gate
        controls)."""
        closed = [(np.arange(s) < keep).astype("float32") for s in self.sizes]
        costs = costs or [1.0] * len(targets)
        total = sum(math.prod(t.variable.shape) * c for t, c in zip(targets, costs)) + fixed
        kept = float(ops.convert_to_numpy(self.kept(targets, closed, costs))) + fixed
        return 1.0 - kept / total

    def masks(self, targets, binary):
        """Boolean masks broadcast to each kernel's shape."""
        out = []
        for i, t in enumerate(targets):
            shape = tuple(t.variable.shape)
            mask = np.ones(shape, bool)
            spec = self.targets.get(i)
            if spec is not None:
                for axis, spec_axis in ((spec.out_axis, spec.out), (spec.in_axis, spec.inputs)):
                    if spec_axis is None:
                        continue
                    vector = np.asarray(ops.convert_to_numpy(
                        spec_axis.vector(binary, self.sizes))) > 0.5
                    view = [1] * len(shape)
                    view[axis] = -1
                    mask = mask & vector.reshape(view)
            out.append(np.broadcast_to(mask, shape))
        return out

    def binary(self, gates):
        return [gate_math.binary_mask(g.mu) for g in gates]
