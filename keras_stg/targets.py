"""Finding the kernels of a Keras 3 model that stochastic gates can control.

Every layer of the model is visited, nested ones included (keras-hub backbones
keep their attention kernels deep inside custom layers). A layer is gateable
when the layer table (`keras_stg.layer_table`) gives it kernels; every other layer that owns
trainable weights is reported with the reason it is not gated, never dropped
silently.
"""

import dataclasses
import re

import keras

from keras_stg import _compat
from keras_stg import layer_table

@dataclasses.dataclass
class GateTarget:
    """One gated kernel.

    Attributes:
        layer: the layer owning the kernel.
        path: the layer's path inside the model (e.g. `"model/block1/conv"`).
        role: the kernel's attribute name (`"kernel"`, `"depthwise_kernel"`, ...).
        variable: the kernel variable.
        out_axes: kernel axes that index output units.
        in_axes: kernel axes that are contracted with the input (fan-in).
        bias: the bias that unit gates on this kernel also gate, or None.
        kernel: the layer table's `keras_stg.layer_table.Kernel` (its channel
            axes are what channel gates act on).
    """

    layer: keras.layers.Layer
    path: str
    role: str
    variable: object
    out_axes: tuple
    in_axes: tuple
    bias: object = None
    kernel: object = None

    @property
    def name(self):
        return self.path if self.role == "kernel" else f"{self.path}/{self.role}"

    @property
    def fan_in(self):
        shape = self.variable.shape
        fan = 1
        for axis in self.in_axes:
            fan *= shape[axis]
        return max(1, fan)


@dataclasses.dataclass
class Skipped:
    """A layer with trainable weights that is not gated, and why."""

    path: str
    class_name: str
    reason: str


sublayers = _compat.sublayers
all_layers = _compat.all_layers


def own_weights(layer):
    """Weights created by `layer` itself, not by its sublayers."""
    nested = {id(v) for sub in sublayers(layer) for v in sub.weights}
    return [v for v in layer.weights if id(v) not in nested]


def _variable(layer, name):
    for v in own_weights(layer):
        if v.name == name:
            return v
    return None


def layer_path(layer):
    """A stable, unique-in-model path for `layer`, taken from its variables."""
    for v in own_weights(layer):
        return v.path.rsplit("/", 1)[0]
    return layer.name


def kernel_targets(layer):
    """The gateable kernels of one layer as `(Kernel, variable)` pairs.

    Returns None if the layer table (`keras_stg.layer_table`) gives it none.
    """
    found = layer_table.kernels(layer)
    if found is None:
        return None
    return [(k, _variable(layer, k.role)) for k in found]


def _matches(patterns, layer, path):
    for pattern in patterns:
        if pattern in (layer.name, path):
            return True
        if re.fullmatch(pattern, layer.name) or re.fullmatch(pattern, path):
            return True
    return False


def _as_list(patterns, arg):
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        patterns = None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"`{arg}` takes a layer name, a regex, or a list of them; "
            f"got {patterns!r}."
        )
    return patterns


def find_targets(model, include=None, exclude=None):
    """Finds the kernels to gate.

    Args:
        model: a built Keras 3 model.
        include: None (all supported layers), or layer names / regexes
            (full match against the layer name or its path).
        exclude: layer names / regexes to leave ungated.

    Returns:
        `(targets, skipped)`: a list of `GateTarget` and a list of `Skipped`.
    """
    include = _as_list(include, "include")
    exclude = _as_list(exclude, "exclude")
    targets, skipped = [], []
    seen = set()
    used_include, used_exclude = set(), set()
    for layer in all_layers(model):
        own = [v for v in own_weights(layer) if v.trainable or v.name.endswith("kernel")]
        if not own:
            continue
        path = layer_path(layer)
        cls = type(layer).__name__
        if layer_table.spec(layer).never_gated:
            continue  # Not gated by design; see the normalization policy.
        found = kernel_targets(layer)
        if include is not None and not _matches(include, layer, path):
            if found:
                skipped.append(Skipped(path, cls, "not matched by `include`"))
            continue
        if include is not None:
            used_include.add(id(layer))
        if exclude is not None and _matches(exclude, layer, path):
            used_exclude.add(id(layer))
            skipped.append(Skipped(path, cls, "matched by `exclude`"))
            continue
        if found is None:
            names = ", ".join(sorted(v.name for v in own))
            skipped.append(
                Skipped(path, cls, f"unsupported layer type (weights: {names})")
            )
            continue
        if getattr(layer, "quantization_mode", None):
            skipped.append(Skipped(path, cls, "quantized layer"))
            continue
        if getattr(layer, "lora_enabled", False):
            skipped.append(Skipped(path, cls, "LoRA is enabled on this layer"))
            continue
        bias = _variable(layer, "bias") if getattr(layer, "use_bias", True) else None
        for i, (kernel, variable) in enumerate(found):
            if variable is None or id(variable) in seen:
                continue
            seen.add(id(variable))
            last = i == len(found) - 1
            targets.append(
                GateTarget(
                    layer=layer,
                    path=path,
                    role=kernel.role,
                    variable=variable,
                    out_axes=tuple(kernel.out_axes),
                    in_axes=tuple(kernel.in_axes),
                    bias=bias if last else None,
                    kernel=kernel,
                )
            )
    # Report in the model's own weight order (input to output).
    order = {id(v): i for i, v in enumerate(model.weights)}
    targets.sort(key=lambda t: order.get(id(t.variable), len(order)))
    if include is not None and not used_include:
        raise ValueError(
            f"`include={include!r}` matches no layer of the model. Patterns are "
            "compared (exact or full regex match) with layer names and paths; "
            "see `[l.name for l in model.layers]`."
        )
    if exclude is not None and not used_exclude:
        raise ValueError(
            f"`exclude={exclude!r}` matches no layer of the model. Patterns are "
            "compared (exact or full regex match) with layer names and paths."
        )
    return targets, skipped
