"""Finding the kernels of a Keras 3 model that stochastic gates can control.

Every layer of the model is visited, nested ones included (keras-hub backbones
keep their attention kernels deep inside custom layers). A layer is gateable
when it is one of the supported kernel layers; every other layer that owns
trainable weights is reported with the reason it is not gated, never dropped
silently.
"""

import dataclasses
import re

import keras

_NORMALIZATION = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.UnitNormalization,
)


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
    """

    layer: keras.layers.Layer
    path: str
    role: str
    variable: object
    out_axes: tuple
    in_axes: tuple
    bias: object = None

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


def _depthwise_types():
    return (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


def _conv_types():
    return (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def _transpose_types():
    return (
        keras.layers.Conv1DTranspose,
        keras.layers.Conv2DTranspose,
        keras.layers.Conv3DTranspose,
    )


def _separable_types():
    return (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)


def sublayers(layer):
    """Direct sublayers of `layer` (Keras keeps them in a private list)."""
    return layer._flatten_layers(include_self=False, recursive=False)


def all_layers(model):
    """Every layer below `model`, depth first, each once."""
    return model._flatten_layers(include_self=False, recursive=True)


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


def _einsum_axes(equation, rank):
    inputs, output = equation.replace(" ", "").split("->")
    kernel_spec = inputs.split(",")[1].replace("...", "")
    output = output.replace("...", "")
    if len(kernel_spec) != rank:
        return None
    out_axes = tuple(i for i, c in enumerate(kernel_spec) if c in output)
    in_axes = tuple(i for i, c in enumerate(kernel_spec) if c not in output)
    return out_axes, in_axes


def kernel_targets(layer):
    """The gateable kernels of one layer as `(role, variable, out_axes, in_axes)`.

    Returns None if the layer type is not supported.
    """
    if isinstance(layer, keras.layers.EinsumDense):
        kernel = _variable(layer, "kernel")
        axes = _einsum_axes(layer.equation, len(kernel.shape))
        if axes is None:
            return None
        return [("kernel", kernel, *axes)]
    if isinstance(layer, keras.layers.Dense):
        return [("kernel", _variable(layer, "kernel"), (1,), (0,))]
    if isinstance(layer, _separable_types()):
        dw = _variable(layer, "depthwise_kernel")
        pw = _variable(layer, "pointwise_kernel")
        r_dw, r_pw = len(dw.shape), len(pw.shape)
        return [
            ("depthwise_kernel", dw, (r_dw - 2, r_dw - 1), tuple(range(r_dw - 2))),
            ("pointwise_kernel", pw, (r_pw - 1,), tuple(range(r_pw - 1))),
        ]
    if isinstance(layer, _depthwise_types()):
        dw = _variable(layer, "kernel")
        if dw is None:
            dw = _variable(layer, "depthwise_kernel")
        r = len(dw.shape)
        return [("kernel", dw, (r - 2, r - 1), tuple(range(r - 2)))]
    if isinstance(layer, _transpose_types()):
        k = _variable(layer, "kernel")
        r = len(k.shape)
        return [("kernel", k, (r - 2,), tuple(range(r - 2)) + (r - 1,))]
    if isinstance(layer, _conv_types()):
        k = _variable(layer, "kernel")
        r = len(k.shape)
        return [("kernel", k, (r - 1,), tuple(range(r - 1)))]
    return None


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
        if isinstance(layer, _NORMALIZATION):
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
        for i, (role, variable, out_axes, in_axes) in enumerate(found):
            if variable is None or id(variable) in seen:
                continue
            seen.add(id(variable))
            last = i == len(found) - 1
            targets.append(
                GateTarget(
                    layer=layer,
                    path=path,
                    role=role,
                    variable=variable,
                    out_axes=tuple(out_axes),
                    in_axes=tuple(in_axes),
                    bias=bias if last else None,
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
