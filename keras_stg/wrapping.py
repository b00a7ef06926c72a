"""`wrap`: put a stochastic gate on every kernel of a Keras 3 model."""

import keras

from keras_stg import initializers
from keras_stg.gated_model import GatedModel


def wrap(model, config=None, **options):
    """Wraps a built Keras 3 model so that `fit` learns binary masks over its kernels.

    The returned `GatedModel` owns `model`: in the frozen modes it marks the
    model's variables non-trainable, and with an `init` it re-draws the kernels.
    With `granularity="channel"`, a Functional model that holds custom block
    layers is first opened into their sublayers (`keras_stg.inline`): the
    `GatedModel` then owns that copy and `model` is left as it is.

    Two forms, the same options:

    ```python
    gated = keras_stg.wrap(model, target_sparsity=0.9, seed=0)           # keywords
    config = keras_stg.GateConfig(penalty=keras_stg.TargetSparsity(0.9), seed=0)
    gated = keras_stg.wrap(model, config)                                # a config
    ```

    Args:
        model: a built Keras 3 model (Sequential, Functional, or subclassed
            such as keras-hub backbones).
        config: a `keras_stg.GateConfig`; its fields (documented there, with
            every automatic default) are also accepted as keywords: `mode`,
            `granularity`, `sigma`, `include`, `exclude`, `init`,
            `init_density`, `init_mu`, `mu_bound`, `seed`, `fused`, `finetune`,
            `polish`, `gate_lr`, `cost`, `channel_multiple`, `penalty`.
        **options: the config's fields, or the penalty by its parts:
            `lam` (the penalty weight; with a target, the controller's start;
            default 1.0), `target_sparsity` (in (0, 1): lambda adapts every
            step so that the binary mask's sparsity settles there),
            `controller_rate` (0.05), `target_ramp` (None: automatic),
            `controller_horizon` (3.0 epochs) and `controller_error`
            ("log_ratio", default, or "absolute"); see `keras_stg.TargetSparsity`.

    Returns:
        A `keras_stg.GatedModel`; `gated.config` is the resolved config.

    Example:

    ```python
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    gated = keras_stg.wrap(model, mode="slt", target_sparsity=0.9, seed=0)
    gated.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    gated.fit(train_ds, epochs=10)
    pruned = gated.strip()
    ```
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"keras_stg needs the TensorFlow backend, but Keras runs on "
            f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before "
            "importing keras."
        )
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"wrap() takes a keras.Model, got {type(model).__name__}. Wrap single "
            "layers in a keras.Sequential first."
        )
    if isinstance(model, GatedModel):
        raise ValueError("This model is already gated; call wrap() on the plain model.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built, so its kernels do not exist yet. "
            "Build it first: give it an input shape (keras.Input(...) or "
            "`input_shape=`), call `model.build(input_shape)`, or call it on a batch."
        )
    return draw_init(GatedModel(model, config, **options))


def draw_init(gated):
    """Re-draws the kernels of a freshly built `GatedModel` (or subclass) with its
    config's `init`, if any; returns it. `wrap` ends with this."""
    resolved = gated.config
    if resolved.init is not None:
        initializers.get(resolved.init)(gated, seed=0 if resolved.seed is None else resolved.seed,
                                        density=resolved.init_density)
    return gated
