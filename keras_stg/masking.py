"""`MaskedModel`: the life cycle shared by every method that learns a mask over a model.

A masked model wraps a built Keras 3 model without rewriting or cloning it.
For each forward pass the masked kernel values are substituted for the kernel
variables with `keras.StatelessScope`, which works the same for Sequential,
Functional and nested subclassed models (keras-hub backbones). Updates the
wrapped model makes to its own state during the call (BatchNormalization
moving statistics, dropout seed generators) are applied afterwards, and
losses its layers add are passed on.

The base fixes the life cycle; a method fills in hooks:

- `masked_values(training)` (required): `(variable, value)` pairs to substitute.
- `extra_loss()`: a per-model term added to the loss inside the tape (the
  gates' penalty); the base scales it for distribution strategies.
- `transform_gradients(gradients, variables)`: e.g. weight decay on scores.
- `apply_gradients(gradients, variables)`: the optimizer update.
- `after_step(iteration)`: state updates that follow a step.
- `step_logs()`: entries added to the step's logs.

`keras_stg.GatedModel` (stochastic gates) and the benchmarks' edge-popup
(`benchmarks.edge_popup.EdgePopupModel`) are both masked models.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_stg import _compat
from keras_stg.targets import find_targets


def replicas():
    """Replicas of the current distribution strategy (1 outside one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_for_replicas(value):
    """`value / replicas`: Keras divides each replica's loss by the replica count and sums
    the gradients, so a quantity computed once per model is scaled the same way."""
    n = replicas()
    return value if n == 1 else value * (1.0 / n)


def call_with_values(model, inputs, mapping, substituted, training=False):
    """Calls `model` with the `(variable, value)` pairs of `mapping` substituted.

    State the model updates inside the call (BatchNormalization moving
    statistics, dropout seeds) is applied afterwards, except to the variables
    whose `id` is in `substituted`. Returns `(outputs, losses the layers added)`.
    """
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
        outputs = model(inputs, training=training)
    for v in model.variables:
        if id(v) in substituted:
            continue
        new_value = scope.get_current_value(v)
        if new_value is not None:
            v.assign(new_value)
    return outputs, scope.losses


class MaskedModel(keras.Model):
    """Base class of models that learn a mask over the kernels of a wrapped model.

    Args:
        model: a built Keras 3 model.
        freeze: mark every trainable variable of `model` non-trainable (the
            frozen modes); they are listed in `self.frozen`.
        include / exclude: which layers to mask (see `keras_stg.targets.find_targets`).

    Attributes:
        base_model: the wrapped model.
        targets: `keras_stg.targets.GateTarget`s, one per masked kernel.
        skipped: layers with trainable weights that are not masked, with reasons.
        frozen: the variables this model froze.
    """

    def __init__(self, model, freeze=True, include=None, exclude=None, **kwargs):
        super().__init__(**kwargs)
        self.base_model = model
        self.targets, self.skipped = find_targets(model, include, exclude)
        if not self.targets:
            raise ValueError(self._nothing_to_mask_message(model))
        self.frozen = []
        self._freeze = bool(freeze)
        # Ids of the variables `masked_values` replaces (their values inside
        # the call are not written back); a subclass adds gated biases.
        self.substituted = {id(t.variable) for t in self.targets}

    def _nothing_to_mask_message(self, model):
        from keras_stg import layer_table

        skipped = ", ".join(f"{s.path} ({s.reason})" for s in self.skipped)
        return (
            f"Model {model.name!r} has no kernel to mask, so there is nothing to gate. "
            f"Layers with kernels keras_stg knows: {layer_table.kernel_layer_names()} "
            "(register others with keras_stg.register_layer). "
            + (f"Not gated: {skipped}." if skipped else
               "None of its layers has such a kernel (normalization layers are never gated).")
        )

    def freeze_base(self):
        """Marks the wrapped model's trainable variables non-trainable (if `freeze`)."""
        if self._freeze:
            for v in self.base_model.trainable_variables:
                v.trainable = False
                self.frozen.append(v)

    # ------------------------------------------------------------- hooks

    def masked_values(self, training=False):
        """`(variable, value)` pairs: the masked kernels (and biases) of this forward pass."""
        raise NotImplementedError

    def extra_loss(self):
        return None

    def transform_gradients(self, gradients, variables):
        return gradients

    def apply_gradients(self, gradients, variables):
        self.optimizer.apply_gradients(zip(gradients, variables))

    def before_step(self):
        pass

    def after_step(self, iteration):
        pass

    def step_logs(self):
        return {}

    # -------------------------------------------------------- life cycle

    def call(self, inputs, training=False):
        outputs, losses = call_with_values(
            self.base_model, inputs, self.masked_values(training), self.substituted, training
        )
        for loss in losses:
            self.add_loss(loss)
        return outputs

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # Read before the update, so that nothing below waits for it.
        iteration = ops.cast(self.optimizer.iterations, "float32") + 1.0
        self.before_step()
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = _compat.compute_loss(self, x, y, y_pred, sample_weight)
            extra = self.extra_loss()
            if extra is not None:
                loss = loss + scale_for_replicas(ops.cast(extra, loss.dtype))
            batch = tf.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0]
            _compat.loss_tracker(self).update_state(loss * replicas(), sample_weight=batch)
            scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_weights
        gradients = tape.gradient(scaled_loss, variables)
        gradients = self.transform_gradients(gradients, variables)
        self.apply_gradients(gradients, variables)
        self.after_step(iteration)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs.update(self.step_logs())
        return logs
