"""Gate granularities: how many kernel entries one gate controls.

A granularity maps a kernel to the shape of its gate tensor and expands a gate
tensor back to something that multiplies the kernel. The rest of the library
(training step, sparsity accounting, strip, summary) only talks to this
interface, so a new granularity is one class and one `register_granularity`
call.

Built in:
- `"weight"`: one gate per kernel entry (unstructured; the paper).
- `"unit"`: one gate per output neuron / output channel (structured); the
  layer's bias is gated with the same gate, so a pruned unit is removed whole.
- `"channel"`: one gate per channel of a channel group, shared by every layer the
  channel passes through (residual branches, depthwise convolutions,
  normalization), so that `shrink` can remove it from the model.
- `"block"` / `"block4"` / `"block16"`: one gate per block of consecutive
  kernel entries along the last input axis (the 1x4 float and 1x16 int8 block
  patterns that TFLite's FULLY_CONNECTED runs natively sparse).
"""

import math
import re

import keras
from keras import ops


class Granularity:
    """Base class. Subclasses define `gate_shape` and, if not broadcastable,
    `expand` and `kept_weights`.

    Args of every method:
        kernel_shape: tuple of ints, the kernel's shape.
        out_axes: tuple of the kernel axes indexing output units.
        in_axes: tuple of the kernel axes contracted with the input (fan-in).
    """

    name = None
    #: Whether the layer's bias is gated with the same gate (unit pruning).
    gates_bias = False

    def gate_shape(self, kernel_shape, out_axes, in_axes):
        raise NotImplementedError

    def expand(self, gate, kernel_shape, out_axes, in_axes):
        """Returns `gate` as a tensor broadcastable against the kernel."""
        return gate

    def kept_weights(self, mask, kernel_shape, out_axes, in_axes):
        """How many kernel entries a binary `mask` (gate-shaped) keeps."""
        per_gate = math.prod(kernel_shape) // max(1, math.prod(mask.shape))
        return ops.sum(mask) * per_gate

    def get_config(self):
        """Constructor arguments (Keras serialization); {} for the built-in ones without."""
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __str__(self):
        """The identifier `get` takes back (`"weight"`, `"block4"`, ...)."""
        return self.name

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.get_config().items()))))

    def __repr__(self):
        return f"<granularity {str(self)!r}>"


@keras.saving.register_keras_serializable(package="keras_stg")
class WeightGranularity(Granularity):
    """One gate per kernel entry."""

    name = "weight"

    def gate_shape(self, kernel_shape, out_axes, in_axes):
        return tuple(kernel_shape)


@keras.saving.register_keras_serializable(package="keras_stg")
class UnitGranularity(Granularity):
    """One gate per output unit (neuron, channel, attention output feature)."""

    name = "unit"
    gates_bias = True

    def gate_shape(self, kernel_shape, out_axes, in_axes):
        return tuple(d if i in out_axes else 1 for i, d in enumerate(kernel_shape))


@keras.saving.register_keras_serializable(package="keras_stg")
class BlockGranularity(Granularity):
    """One gate per `size` consecutive entries along the last input axis.

    For a Dense kernel `(in, out)` the blocks run along `in`, which is a 1 x size
    block of the `(out, in)` weight matrix that TFLite stores.
    """

    name = "block"

    def __init__(self, size=4):
        if int(size) != size or size < 1:
            raise ValueError(
                f"Block size must be a positive integer, got {size!r}. "
                "Use e.g. granularity='block4' or 'block16'."
            )
        self.size = int(size)

    def _axis(self, kernel_shape, in_axes):
        if not in_axes:
            raise ValueError(
                "Block gates need a kernel with an input axis; use "
                "granularity='weight' or 'unit' for this layer."
            )
        return max(in_axes)

    def gate_shape(self, kernel_shape, out_axes, in_axes):
        axis = self._axis(kernel_shape, in_axes)
        shape = list(kernel_shape)
        shape[axis] = -(-shape[axis] // self.size)
        return tuple(shape)

    def expand(self, gate, kernel_shape, out_axes, in_axes):
        axis = self._axis(kernel_shape, in_axes)
        full = ops.repeat(gate, self.size, axis=axis)
        if full.shape[axis] == kernel_shape[axis]:
            return full
        return ops.take(full, ops.arange(kernel_shape[axis]), axis=axis)

    def kept_weights(self, mask, kernel_shape, out_axes, in_axes):
        return ops.sum(self.expand(mask, kernel_shape, out_axes, in_axes))

    def get_config(self):
        return {"size": self.size}

    def __str__(self):
        return f"block{self.size}"


@keras.saving.register_keras_serializable(package="keras_stg")
class ChannelGranularity(Granularity):
    """One gate per channel of a channel group (`keras_stg.channel_groups`), shared by
    every member: the producers' outputs, depthwise kernels, normalization, and (at
    inference) the consumers' inputs; so a closed channel can be removed by `shrink`.

    `GatedModel` applies these gates itself (`keras_stg.channel_gates`); the
    per-kernel methods below are not used.
    """

    name = "channel"
    #: Gates are shared across kernels (one per channel group), not one tensor per kernel.
    shared = True
    gates_bias = True

    def gate_shape(self, kernel_shape, out_axes, in_axes):
        raise TypeError("channel gates belong to channel groups, not to single kernels")


_REGISTRY = {
    "weight": WeightGranularity,
    "unit": UnitGranularity,
    "block": BlockGranularity,
    "channel": ChannelGranularity,
}


def register_granularity(name, factory):
    """Makes `granularity=name` (and `name<N>` if `factory` takes a size) usable.

    Args:
        name: lower-case identifier, e.g. `"row"`.
        factory: a `Granularity` subclass, or a callable returning an instance.
            A subclass is also registered with Keras (package "keras_stg"), so
            models gated with it save and load; its `get_config` must return
            its constructor arguments.
    """
    if not re.fullmatch(r"[a-z_]+", name):
        raise ValueError(f"Granularity names are lower-case letters, got {name!r}.")
    if isinstance(factory, type) and issubclass(factory, Granularity):
        keras.saving.register_keras_serializable(package="keras_stg")(factory)
    _REGISTRY[name] = factory


def get(identifier):
    """Resolves `"weight"`, `"unit"`, `"block4"`, ... or an instance."""
    if isinstance(identifier, Granularity):
        return identifier
    if isinstance(identifier, str):
        match = re.fullmatch(r"([a-z_]+?)(\d*)", identifier.strip().lower())
        if match and match.group(1) in _REGISTRY:
            factory = _REGISTRY[match.group(1)]
            return factory(int(match.group(2))) if match.group(2) else factory()
    known = ", ".join(sorted(_REGISTRY)) + ", block4, block16"
    raise ValueError(
        f"Unknown granularity {identifier!r}. Use one of: {known} "
        "(or register your own with keras_stg.granularity.register_granularity)."
    )


def serialize(granularity):
    """The saved form of a granularity (Keras' serialization of the instance)."""
    return keras.saving.serialize_keras_object(get(granularity))


def deserialize(config):
    """Inverse of `serialize`; also takes an identifier string (the form saved before 0.2)."""
    if isinstance(config, dict):
        granularity = keras.saving.deserialize_keras_object(config)
        if not isinstance(granularity, Granularity):
            raise ValueError(f"{config!r} does not describe a keras_stg granularity.")
        return granularity
    return get(config)
