"""`strip`: turn a gated model into a plain Keras model with masked kernels."""

import keras
import numpy as np


def _clone(model):
    try:
        from keras_stg import _compat

        clone = _compat.clone_model(model)
    except Exception:  # Subclassed models: rebuild from their config.
        clone = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(model)
        )
    if not clone.built:
        clone.build(model.input_shape if hasattr(model, "input_shape") else None)
    return clone


def strip(gated):
    """Returns the pruned network as a plain `keras.Model` with no gate state.

    The result has the wrapped model's architecture and layer names; every
    gated kernel is `kernel * mask` with the binary inference mask (and, for
    unit-like granularities, the bias of a removed unit is zeroed too), all
    other weights and BatchNormalization statistics are copied. Its outputs
    equal `gated(x, training=False)`. It saves to `.keras` and loads with plain
    `keras.models.load_model`, no keras_stg needed. All of its weights are
    trainable again, ready for fine-tuning.

    Args:
        gated: a `keras_stg.GatedModel`.

    Example:

    ```python
    pruned = keras_stg.strip(gated)      # same as gated.strip()
    pruned.save("ticket.keras")
    ```
    """
    from keras_stg.gated_model import GatedModel

    if not isinstance(gated, GatedModel):
        raise TypeError(
            f"strip() takes a keras_stg.GatedModel (from keras_stg.wrap), got "
            f"{type(gated).__name__}."
        )
    values = {}
    for variable, value in gated.effective_kernels(training=False):
        values[id(variable)] = keras.ops.convert_to_numpy(value)
    source = gated.base_model
    clone = _clone(source)
    if len(clone.weights) != len(source.weights):
        raise RuntimeError(
            f"Cloning {source.name!r} gave {len(clone.weights)} weights instead of "
            f"{len(source.weights)}; the model's get_config() does not rebuild it."
        )
    for src, dst in zip(source.weights, clone.weights):
        if tuple(src.shape) != tuple(dst.shape):
            raise RuntimeError(
                f"Weight {src.path} has shape {src.shape} but its clone has {dst.shape}."
            )
        dst.assign(values.get(id(src), np.asarray(src.numpy())))
    for v in clone.weights:
        v.trainable = True
    return clone
