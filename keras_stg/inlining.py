"""`inline`: open up the custom blocks of a model so that its channels can be followed.

Channel analysis (`keras_stg.channel_groups`) and `shrink` see a Functional
graph's layers and operations, and know a layer's channels from the layer table.
A custom block layer (a user's residual block, keras-hub's `ViTEncoderBlock` or
`DepthwiseConvBlock`) hides its sublayers inside its `call`, so every channel that flows through it
stays whole. `inline` rebuilds
the model as one Functional graph in which every such block is replaced by the
graph its `call` builds when it runs on symbolic inputs: its sublayers (Dense,
convolutions, normalization, `MultiHeadAttention`, ...) and the `keras.ops`
between them (`x + y`, reshapes, slicing) become nodes of the graph, repeatedly,
until no block is left that can be opened. Nested Functional models are opened
the same way.

A layer is opened when its channel behaviour is not in the layer table, it
holds sublayers, and it holds no variables or random state of its own (those
would become constants of the graph). A block whose `call` cannot run on
symbolic inputs (Python arithmetic on the batch size, backend-only code) stays
as it is, and the reason is kept. Every layer of the result is a copy with the
same weights (one per layer: a shared layer stays shared), its sublayers named
`<block>_<attribute>`, so the given model is left untouched. Copies are rebuilt
from their config (`keras_stg._compat.rebuild_layer`, which also takes configs
holding keys the constructor does not, as keras-hub 0.32's
`ViTPatchingAndEmbedding`'s); a model holding a layer whose config cannot be
rebuilt (keras-hub's Swin `PatchEmbedding`) is not opened, nor is a block with a
sublayer that cannot be. A reshape to the batch size the trace saw (None) infers
that axis in the opened graph (`keras_stg._compat.infer_batch_in_reshapes`). The
result's outputs are checked against the given model's on random inputs; a result
that differs or does not run is discarded.
"""

import warnings

import keras

from keras_stg import _compat
from keras_stg import layer_table as table


class InlineError(ValueError):
    """The model cannot be opened (a layer its config does not rebuild), or the opened
    model's outputs differ from the model's: it is discarded."""


class _Log:
    """The blocks opened and those kept whole (name: reason) during one `inline`."""

    def __init__(self):
        self.opened, self.kept = [], {}
        self.copies = {}  # id(layer of the given model) -> its copy, for shared layers


def _openable(op):
    """Why `op` cannot be opened, or None if it can."""
    if not isinstance(op, keras.layers.Layer):
        return "an operation"
    if isinstance(op, keras.Sequential) or isinstance(op, keras.Model) and hasattr(op, "operations"):
        return None  # a nested Sequential or Functional model
    if type(op).__module__.split(".")[0] == "keras":
        return "a Keras layer (its channels are the layer table's business)"
    if table.spec(op).channels is not None or table.spec(op).kernels is not None:
        return "in the layer table"
    if not _compat.sublayers(op):
        return "holds no sublayers"
    if _compat.own_state(op):
        return "holds variables of its own"
    return None


def _copy(layer, args, kwargs, reasons, rename=False, name=None):
    """A copy of `layer` called on `args, kwargs` (KerasTensors), its weights copied;
    `rename`: its sublayers named `<layer>_<attribute>` (before the build, so the
    variables' paths carry the names, and after it, for sublayers made in `build`).
    A layer called more than once gets one copy, called each time (its weights stay
    shared)."""
    if id(layer) in reasons.copies:
        clone = reasons.copies[id(layer)]
        return clone, clone(*args, **kwargs)
    clone = _compat.rebuild_layer(layer)
    if name is not None:
        clone.name = name
    if rename:
        _rename_sublayers(clone)
    out = clone(*args, **kwargs)  # a symbolic call: it builds, but records no sublayer node
    if rename:
        _rename_sublayers(clone)
    if len(clone.weights) != len(layer.weights):
        raise ValueError(f"its copy has {len(clone.weights)} weights, not {len(layer.weights)}")
    for src, dst in zip(layer.weights, clone.weights):
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"its copy's weight {dst.path} has shape {dst.shape}, not {src.shape}")
        dst.assign(src.numpy())
    reasons.copies[id(layer)] = clone  # only a copy that holds the layer's weights
    return clone, out


def _open(layer, args, kwargs, reasons, prefix=""):
    """A copy of the block `layer` (named `prefix + layer.name`) whose `call` runs on
    the symbolic `args, kwargs` (its sublayers renamed `<block>_<attribute>`, the
    blocks among them opened the same way): returns the outputs (KerasTensors)."""
    if kwargs.get("mask") is not None:
        raise ValueError("it is called with a mask")
    if isinstance(layer, keras.Sequential):
        return _sequence(layer, args[0], f"{prefix}{layer.name}_", reasons)
    if hasattr(layer, "operations"):  # a nested Functional model: replay its graph
        flat = [t for t in keras.tree.flatten(args) if isinstance(t, keras.KerasTensor)]
        return _replay(layer, flat, f"{prefix}{layer.name}_", reasons)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("training", "mask")}
    if id(layer) in reasons.copies:  # a shared block: its copy's sublayers are shared too
        return _trace(reasons.copies[id(layer)], args, kwargs, reasons)
    clone, _ = _copy(layer, args, kwargs, reasons, rename=True, name=prefix + layer.name)
    return _trace(clone, args, kwargs, reasons)


def _sequence(model, x, prefix, reasons):
    """Calls a copy of every layer of the Sequential `model` on `x` in turn, opening
    the blocks that can be; returns the output."""
    for sub in model.layers:
        if not isinstance(sub, keras.layers.InputLayer):
            x = _call_copy(sub, (_dense(x),), {}, prefix, reasons)
    return x


def _call_copy(op, args, kwargs, prefix, reasons):
    """One call of the given model's `op` in the opened graph: the block opened where it
    can be, else a copy of the layer (named `prefix + op.name`) or a fresh operation,
    called on `args, kwargs`; returns its outputs."""
    if _openable(op) is None:
        before = len(reasons.opened)
        try:
            out = _open(op, args, kwargs, reasons, prefix)
            reasons.opened.append(f"{prefix}{op.name}")
            return out
        except Exception as e:  # noqa: BLE001 - any failure keeps the block whole
            del reasons.opened[before:]  # the blocks inside it stay closed with it
            reasons.kept[f"{prefix}{op.name}"] = _why(e)
    if not isinstance(op, keras.layers.Layer):
        return _fresh(op)(*args, **kwargs)
    try:
        clone, out = _copy(op, args, kwargs, reasons)
    except Exception as e:
        raise InlineError(
            f"{op.name!r} ({type(op).__name__}) cannot be copied: its config "
            f"does not rebuild it ({type(e).__name__}: {str(e)[:200]}).") from e
    clone.name = f"{prefix}{op.name}"
    return out


def _trace(block, args, kwargs, reasons):
    """Runs `block.call` (a built copy of ours) on symbolic inputs. Its direct
    sublayers record graph nodes, except the blocks among them, whose own `call`
    is traced in turn (their class is swapped for the call's duration)."""
    swapped = []
    try:
        for sub in _compat.sublayers(block):
            opens = not isinstance(sub, keras.Model) and _openable(sub) is None
            if not opens:
                _check_rebuilds(sub)  # it becomes a layer of the opened model
            if isinstance(sub, keras.Model):
                continue
            swapped.append((sub, sub.__class__))
            sub.__class__ = _tracing_class(sub.__class__, opens)
        _ACTIVE.append(reasons)
        try:
            return block.call(*_dense(args), **_dense(kwargs))
        finally:
            _ACTIVE.pop()
    finally:  # also when a sublayer fails the check: no class stays swapped
        for sub, cls in swapped:
            sub.__class__ = cls


_ACTIVE = []  # the `_Log` of the trace in progress
_TRACING = {}


def _tracing_class(cls, opens):
    """A subclass of `cls` for the length of a trace. Its `__call__` traces the
    block's own `call` where `opens` (or records a node, the block staying whole,
    when that fails), else records a node as `cls` does."""
    key = (cls, opens)
    if key in _TRACING:
        return _TRACING[key]

    def __call__(self, *args, **kwargs):
        args, kwargs = _dense(args), _dense(kwargs)
        if opens:
            log = _ACTIVE[-1]
            before = len(log.opened)
            try:
                if kwargs.get("mask") is not None:
                    raise ValueError("it is called with a mask")
                _rename_sublayers(self)
                inner = {k: v for k, v in kwargs.items() if k not in ("training", "mask")}
                out = _trace(self, args, inner, log)
                log.opened.append(self.name)
                return out
            except Exception as e:  # noqa: BLE001 - any failure keeps the block whole
                del log.opened[before:]
                log.kept[self.name] = _why(e)
                _check_rebuilds(self)  # else the block around it stays whole
        return cls.__call__(self, *args, **kwargs)

    _TRACING[key] = type(cls.__name__, (cls,), {"__call__": __call__,
                                                "__module__": cls.__module__})
    return _TRACING[key]


def _check_rebuilds(layer):
    """Raises ValueError unless `layer` can be rebuilt from its config: every layer of
    the opened model must be, or `strip`, `shrink` and saving could not copy it."""
    try:
        _compat.rebuild_layer(layer)
    except Exception as e:  # noqa: BLE001 - any failure: the block around it stays whole
        raise ValueError(f"its sublayer {layer.name!r} ({type(layer).__name__}) cannot be "
                         f"rebuilt from its config ({type(e).__name__}: {e})") from e


def _dense(structure):
    """`structure` with its KerasTensors marked dense: Keras marks `x * 2.0` sparse (it
    takes a Python number for a sparse operand), which no layer after it can take;
    `inline` only opens models whose inputs are dense, where no tensor is sparse."""
    for t in keras.tree.flatten(structure):
        if isinstance(t, keras.KerasTensor) and t.sparse:
            _compat.mark_dense(t)
    return structure


def _fresh(op):
    """A new instance of the graph operation `op` (`x + y`), so that the given model's
    operations get no call of ours; `op` itself where its config does not rebuild it."""
    try:
        return type(op).from_config(op.get_config())
    except Exception:  # noqa: BLE001 - an operation holds no weights: sharing it is safe
        return op


def _why(error):
    return f"its call does not run on symbolic inputs ({type(error).__name__}: {error})"[:300]


def _rename_sublayers(block):
    """Names each direct sublayer of `block` `<block>_<attribute>` (unique in a graph
    where block names are), once."""
    names = _attribute_names(block)
    for sub in _compat.sublayers(block):
        if not getattr(sub, "_stg_inlined_name", False):
            sub.name = f"{block.name}_{names.get(id(sub), sub.name)}"
            sub._stg_inlined_name = True


def _attribute_names(layer):
    """`{id(sublayer): name}`: the attribute that holds each direct sublayer of
    `layer` (`conv`, or `blocks_2` for the third of a list `blocks`)."""
    names = {}
    for attribute, value in vars(layer).items():
        if attribute.startswith("_"):
            continue
        if isinstance(value, keras.layers.Layer):
            names.setdefault(id(value), attribute)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    names.setdefault(id(item), f"{attribute}_{i}")
    return names


def _replay(model, inputs, prefix, reasons):
    """Calls a copy of every operation of the Functional `model` on the symbolic
    `inputs` (one per `model.inputs`), opening the blocks that can be; returns the
    outputs in the structure of the model's."""
    if len(inputs) != len(model.inputs):
        raise ValueError(f"{model.name!r} takes {len(model.inputs)} inputs, got {len(inputs)}")
    new = {id(t): x for t, x in zip(model.inputs, inputs)}

    def mapped(structure):
        return keras.tree.map_structure(
            lambda t: new[id(t)] if isinstance(t, keras.KerasTensor) else t, structure)

    for op, node in _compat.graph_calls(model, new):
        call_args, call_kwargs = _compat.node_arguments(node)
        call_args, call_kwargs = _dense(mapped(call_args)), _dense(mapped(call_kwargs))
        out = _call_copy(op, call_args, call_kwargs, prefix, reasons)
        for t, o in zip(node.output_tensors, keras.tree.flatten(out)):
            new[id(t)] = o
    return keras.tree.map_structure(lambda t: new[id(t)], _compat.structures(model)[1])


def inline(model, check=True, atol=1e-5, seed=0, return_info=False):
    """Returns `model` as one Functional graph with its custom blocks opened.

    Args:
        model: a built Functional or Sequential Keras model.
        check: compare the outputs of both models on random inputs and raise
            `InlineError` when they differ by more than `atol` (relative to the
            output scale).
        return_info: also return `{"opened": [names], "kept": {name: reason}}`:
            the blocks opened and the ones that stay whole, with the reason.

    A model with nothing to open is returned as it is. See the module docstring
    for what is opened.
    """
    if not _graph_visible(model) or any(t.sparse for t in model.inputs):
        info = {"opened": [], "kept": {}}
        return (model, info) if return_info else model
    log = _Log()
    inputs = [keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype,
                          name=_compat.input_name(t)) for t in model.inputs]
    if isinstance(model, keras.Sequential):
        outputs, structure = _sequence(model, inputs[0], "", log), inputs[0]
    else:
        outputs = _replay(model, inputs, "", log)
        structure = keras.tree.pack_sequence_as(_compat.structures(model)[0], inputs)
    opened, kept = log.opened, log.kept
    current = model
    if opened:
        try:
            current = keras.Model(structure, outputs, name=model.name)
        except ValueError as e:  # two opened layers of one name
            raise InlineError(f"The opened graph of {model.name!r} is not a model: {e}") from e
    info = {"opened": opened, "kept": kept}
    if current is model:
        return (model, info) if return_info else model
    # Reshapes a trace made to the batch size it saw (None) take it from the input.
    _compat.infer_batch_in_reshapes(current)
    if check:
        from keras_stg.shrinking import output_difference

        try:
            diff, scale = output_difference(model, current, seed)
        except Exception as e:  # noqa: BLE001 - a trace that baked in a symbolic value
            raise InlineError(
                f"The opened graph of {model.name!r} (blocks {opened}) does not run "
                f"({type(e).__name__}: {str(e)[:300]}), so it was discarded: a block's "
                "`call` depends on values it only has when it runs (the batch size).") from e
        info["max_abs_diff"] = diff
        if diff > atol * scale:
            raise InlineError(
                f"Opening the blocks {opened} of {model.name!r} changed its outputs by {diff:g} "
                f"(allowed {atol * scale:g}), so the opened model was discarded. Their `call` "
                "does not describe their computation on symbolic inputs; register the block "
                "in keras_stg's layer table instead (keras_stg.register_layer).")
    return (current, info) if return_info else current


def _graph_visible(model):
    """A Functional model, or a Sequential one built on an input."""
    if isinstance(model, keras.Sequential):
        try:
            return len(model.inputs) == 1
        except (AttributeError, ValueError):
            return False
    return hasattr(model, "operations") and bool(getattr(model, "inputs", None))


def custom_blocks(model):
    """The custom block layers anywhere in `model` that `inline` would try to open."""
    return [layer for layer in _compat.all_layers(model)
            if not isinstance(layer, keras.Model) and _openable(layer) is None]


def open_custom_blocks(model):
    """`inline(model)` when `model` is Functional or Sequential and holds custom blocks,
    else `model`;
    when the opened model's outputs differ, warns and returns `model`."""
    if not _graph_visible(model) or not custom_blocks(model):
        return model
    try:
        return inline(model)
    except InlineError as e:
        warnings.warn(str(e), stacklevel=3)
        return model
