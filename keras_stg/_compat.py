"""Every private Keras and TensorFlow call keras_stg makes, and every patch, in one place.

Keras 3 has no public API for a few things this library needs: the direct
sublayers of a layer, the inbound nodes of an operation in a Functional graph,
the shapes a layer sees when another layer's `call` calls it, the projections
of a MultiHeadAttention,
the classes of its operations and the arguments each was called with, the layers
a `keras.applications` model defines for itself,
the loss computation and loss tracker of `train_step`, the optimizer's slots
of one variable, and the step function's reduction across workers. Each is
reached through one function here, so that a Keras release that moves one of
them breaks one function, and `tests/test_compat.py` (which calls each of them
on the installed Keras) says which.

Tested with Keras `TESTED_KERAS` (setup.py pins the range).
"""

import contextlib

import keras

#: The Keras versions `tests/test_compat.py` was run against (setup.py's range).
TESTED_KERAS = ">=3.15,<3.16"


def sublayers(layer):
    """The layers `layer` holds directly (attributes, lists of layers; Keras tracks them
    in a private list)."""
    return layer._flatten_layers(include_self=False, recursive=False)


def all_layers(model):
    """Every layer below `model`, depth first, each once."""
    return model._flatten_layers(include_self=False, recursive=True)


def inbound_nodes(operation):
    """The graph nodes at which `operation` is called in the Functional models it is in."""
    return operation._inbound_nodes


def own_state(layer):
    """Variables and seed generators `layer` holds itself, not through sublayers."""
    return (list(getattr(layer, "_trainable_variables", ()))
            + list(getattr(layer, "_non_trainable_variables", ()))
            + list(getattr(layer, "_seed_generators", ())))


def mark_dense(tensor):
    """Marks a KerasTensor dense (Keras marks `x * 2.0` sparse: it takes a Python number
    for a sparse operand)."""
    tensor._sparse = False


def input_name(tensor):
    """The name of the InputLayer that made the model input `tensor`."""
    return tensor._keras_history.operation.name


def structures(model):
    """`(inputs, outputs)` of a Functional model in the nesting it was built with."""
    return model._inputs_struct, model._outputs_struct


def graph_calls(model, known):
    """Yields `(operation, node)` for each call in the Functional `model`'s graph, in
    an order where a call comes after the calls it reads (a shared layer's second call
    after what lies between), whose input tensors are all in `known` (a dict keyed by
    tensor id, which the caller fills with each call's outputs)."""
    by_depth = model._nodes_by_depth  # depth 0: the output calls; inputs deepest
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            op = node.operation
            if isinstance(op, keras.layers.InputLayer):
                continue
            inputs = list(node.input_tensors)
            if inputs and all(id(t) in known for t in inputs):
                yield op, node


def call_shapes(model, layers):
    """`{layer: (input shape, output shape)}` of `layers` (layers of `model` called inside
    another layer's `call`, which the Functional graph does not record: MultiHeadAttention's
    projections, the Dense layers of a keras-hub block), from one forward pass of `model`
    on zeros of batch 1 (dimensions the model leaves open are 1). Each layer's `call` is
    wrapped through an instance attribute (Keras' `__call__` looks `call` up on the
    instance) and restored after the pass. A layer the pass does not reach is left out;
    so is every layer when the model cannot run on zeros."""
    import numpy as np

    found = {}
    if not layers:
        return found

    def recorder(layer, original):
        def call(*args, **kwargs):
            outputs = original(*args, **kwargs)
            first_in = keras.tree.flatten(args[0] if args else next(iter(kwargs.values())))[0]
            first_out = keras.tree.flatten(outputs)[0]
            found.setdefault(layer, (tuple(first_in.shape), tuple(first_out.shape)))
            return outputs
        return call

    patched = []
    try:
        for layer in layers:
            object.__setattr__(layer, "call", recorder(layer, layer.call))
            patched.append(layer)
        zeros = [np.zeros([1] + [d or 1 for d in tuple(t.shape)[1:]], dtype=t.dtype)
                 for t in model.inputs]
        model(zeros[0] if len(zeros) == 1 else zeros, training=False)
    except Exception:  # noqa: BLE001 - a model that cannot run on zeros keeps no shapes
        return {}
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")
    return found


def attention_projections(layer):
    """`{"query", "key", "value", "output": EinsumDense}` of a built MultiHeadAttention
    (Keras keeps them in private attributes)."""
    return {"query": layer._query_dense, "key": layer._key_dense,
            "value": layer._value_dense, "output": layer._output_dense}


def operation_classes(names):
    """Keras' operation classes of `names` (what `x + 3.0` or `keras.ops.relu(x)` puts in a
    Functional graph: not layers), from its private op modules; names it lacks are left out."""
    from keras.src.ops import core, nn, numpy

    found = []
    for name in names:
        for module in (numpy, nn, core):
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, keras.Operation):
                found.append(cls)
                break
    return found


def infer_batch_in_reshapes(model):
    """Makes the `keras.ops.reshape` calls in `model`'s graph that reshape to a symbolic
    batch size (None: a block's `call` that reshaped to `ops.shape(x)[0]` on symbolic
    inputs put the unknown size into the graph, which no run can take) infer it (-1):
    a target shape with one None and no -1; or, for an input whose other axes are
    known, a None first (the batch) beside a -1, which is then worked out. Returns how
    many were changed."""
    import math

    from keras.src.ops import numpy

    changed = 0
    for op in model.operations:
        shape = getattr(op, "newshape", None)
        if not isinstance(op, numpy.Reshape) or not isinstance(shape, (tuple, list)) \
                or None not in shape:
            continue
        shape = list(shape)
        if sum(d is None for d in shape) == 1 and -1 not in shape:
            op.newshape = tuple(-1 if d is None else d for d in shape)
            changed += 1
            continue
        nodes = inbound_nodes(op)
        if len(nodes) != 1 or shape[0] is not None or None in shape[1:] \
                or shape[1:].count(-1) != 1:
            continue
        x = node_arguments(nodes[0])[0][0]
        if x.shape[0] is not None or None in x.shape[1:]:
            continue
        size = math.prod(x.shape[1:])
        known = math.prod(d for d in shape[1:] if d != -1)
        if known <= 0 or size % known:
            continue
        op.newshape = tuple([-1] + [size // known if d == -1 else d for d in shape[1:]])
        changed += 1
    return changed


def application_layer(module, name):
    """A layer class that a `keras.applications` model defines for itself (private to
    its module, e.g. InceptionResNetV2's `CustomScaleLayer`), or None."""
    import importlib

    try:
        found = getattr(importlib.import_module(f"keras.src.applications.{module}"), name)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) and issubclass(found, keras.layers.Layer) else None


def node_arguments(node):
    """`(args, kwargs)` of one call of an operation in a Functional graph (KerasTensors in
    place of its tensor inputs, the constants as given)."""
    return node.arguments.args, node.arguments.kwargs


def call_node(node, values):
    """Calls `node`'s operation again on its arguments, each input tensor replaced by
    `values[id(tensor)]`."""
    args, kwargs = node.arguments.fill_in(values)
    return node.operation(*args, **kwargs)


def compute_loss(model, x, y, y_pred, sample_weight, training=True):
    """The compiled loss plus the losses layers added, as `Model.train_step` computes it."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )


def loss_tracker(model):
    """The `Mean` metric behind the `loss` entry of `fit`'s logs."""
    return model._loss_tracker


def adam_slots(optimizer, variable):
    """`(first moment, second moment)` slot variables Adam keeps for `variable`."""
    index = optimizer._get_variable_index(variable)
    return optimizer._momentums[index], optimizer._velocities[index]


@contextlib.contextmanager
def update_step_override(optimizer, update_step):
    """While inside, `optimizer.apply_gradients` updates each variable with
    `update_step(gradient, variable, learning_rate)` (which may call Keras' own,
    passed as its `keras_update` attribute); everything else `apply_gradients`
    does (loss scale, clipping, weight decay, EMA, accumulation, constraints,
    the step counter) is Keras' own. No-op if the instance already has one."""
    if "update_step" in vars(optimizer):
        yield False
        return
    update_step.keras_update = optimizer.update_step
    optimizer.update_step = update_step
    try:
        yield True
    finally:
        del optimizer.update_step


def skip_symbolic_build(model, data_batch):
    """Builds `model`'s compiled metrics on `data_batch` once, then stops `fit` from
    rebuilding them symbolically (each rebuild traces the model once more)."""
    model._maybe_symbolic_build(data_batch=data_batch)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


def patch_multi_worker_reduce():
    """Makes Keras reduce scalar logs of a multi-worker step (idempotent, process-wide).

    Keras 3.15 reduces every per-replica log of a multi-worker step with
    `strategy.reduce("MEAN", v, axis=0)`, which fails on scalar logs ("Invalid
    reduction dimension 0 for input with 0 dimensions"). Scalars are reduced
    with `axis=None` instead (the mean over replicas); everything else, and
    every other strategy, goes to Keras' own function unchanged.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_keras_stg_patch", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(
            strategy
        ):
            def _reduce(v):
                if not tf_trainer._is_per_replica_instance(v):
                    return v  # already the same on every replica (e.g. lam)
                local = strategy.experimental_local_results(v)[0]
                axis = 0 if getattr(local.shape, "rank", 0) else None
                return strategy.reduce("MEAN", v, axis=axis)

            return keras.tree.map_structure(_reduce, values)
        return original(values, strategy, reduction)

    reduce_per_replica._keras_stg_patch = True
    tf_trainer.reduce_per_replica = reduce_per_replica


def freeze(concrete_function, **kwargs):
    """TensorFlow's `convert_variables_to_constants_v2` (no public API): the function
    with its variables folded in as constants."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    return convert_variables_to_constants_v2(concrete_function, **kwargs)


def tf2onnx_patch():
    """Keras' compatibility patch for tf2onnx, which `export.onnx` applies before converting."""
    from keras.src.export.tf2onnx_lib import patch_tf2onnx

    return patch_tf2onnx


def _init_parameters(cls):
    """Keyword names the constructors of the layer class `cls` name, down to
    `keras.layers.Layer`'s own (with the input-shape keys it takes from `**kwargs`);
    None for a class that is not a layer."""
    import inspect

    names = {"input_dim", "input_shape", "batch_size", "batch_input_shape"}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
        if klass is keras.layers.Layer:
            return names
    return None


def _base_config(layer):
    """`{name, trainable, dtype}` of `layer` if its class's constructors take no
    arguments of their own (only `keras.layers.Layer`'s), else None."""
    import inspect

    for klass in type(layer).__mro__:
        if klass is keras.layers.Layer:
            return {"name": layer.name, "trainable": layer.trainable,
                    "dtype": keras.dtype_policies.serialize(layer.dtype_policy)}
        if "__init__" in vars(klass) and any(
                p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
                and p.name != "self"
                for p in inspect.signature(klass.__init__).parameters.values()):
            return None
    return None


def rebuild_layer(layer, config=None):
    """A new, unbuilt `type(layer).from_config(config)` (`config`: the layer's own by
    default). Where that fails because the config holds keys the constructors do not
    take (keras-hub 0.32's `ViTPatchingAndEmbedding` stores its derived `num_patches`),
    it is rebuilt from the keys they take, and the copy's `get_config` returns those,
    so that it saves, loads and clones. A layer whose `get_config` fails although its
    constructors take nothing beyond `keras.layers.Layer`'s (keras-hub builds
    `layers.Identity(dtype=policy)`, which Keras 3.15's automatic config refuses) is
    rebuilt from its name, trainability and dtype policy."""
    if config is None:
        try:
            config = layer.get_config()
        except NotImplementedError:
            config = _base_config(layer)
            if config is None:
                raise
    accepted = getattr(layer, "_stg_config_keys", None)  # a copy made here before
    try:
        clone = type(layer).from_config(config)
    except Exception as error:  # noqa: BLE001 - retried below, else re-raised
        accepted = _init_parameters(type(layer))
        trimmed = {k: v for k, v in config.items() if accepted is None or k in accepted}
        if accepted is None or trimmed == config:
            raise
        try:
            clone = type(layer).from_config(trimmed)
        except Exception:  # noqa: BLE001 - the first error says more
            raise error
    if accepted is not None:
        original = clone.get_config

        def get_config():
            return {k: v for k, v in original().items() if k in accepted}

        clone.get_config = get_config
        clone._stg_config_keys = accepted
    return clone


def clone_model(model, **kwargs):
    """`keras.models.clone_model` without the compile state: Keras recompiles a clone of
    a compiled model from its compile config, which fails for an optimizer with an
    unregistered custom schedule; a stripped or shrunk model is a plain, uncompiled one.
    Layers are rebuilt with `rebuild_layer` unless a `clone_function` is given."""
    compiled = getattr(model, "compiled", False)
    if compiled:
        model.compiled = False
    kwargs.setdefault("clone_function", rebuild_layer)
    try:
        return keras.models.clone_model(model, **kwargs)
    finally:
        if compiled:
            model.compiled = True
