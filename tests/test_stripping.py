"""`keras_stg.strip`: a plain model with `kernel * mask` (the invariant matrix checks it on
every family; these are its own cases)."""

import keras
import numpy as np
import pytest

import keras_stg
from tests import helpers


@keras.saving.register_keras_serializable(package="tests")
class TwoLayer(keras.Model):
    """A subclassed model: strip rebuilds it from its config."""

    def __init__(self, units=5, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(units, name="hidden")
        self.out = keras.layers.Dense(2, name="out")

    def call(self, x):
        return self.out(keras.ops.relu(self.hidden(x)))

    def get_config(self):
        return {"units": self.units, "name": self.name}


def test_strip_rebuilds_a_subclassed_model_and_zeroes_the_bias_of_removed_units():
    model = TwoLayer()
    model(np.zeros((1, 4), "float32"))
    gated = helpers.random_masks(keras_stg.wrap(model, granularity="unit", seed=0), 0.5, 0)
    pruned = keras_stg.strip(gated)
    assert type(pruned) is TwoLayer and pruned is not model
    x = np.random.default_rng(0).standard_normal((3, 4)).astype("float32")
    np.testing.assert_allclose(pruned(x), gated(x, training=False), atol=1e-6)
    unit = gated.masks()[0][0]  # which hidden units are kept
    np.testing.assert_array_equal(pruned.hidden.bias.numpy()[~unit], 0)
    assert all(v.trainable for v in pruned.weights)
    np.testing.assert_array_equal(model.hidden.bias.numpy(), gated.base_model.hidden.bias.numpy())


def test_strip_takes_only_a_gated_model():
    with pytest.raises(TypeError, match="strip\\(\\) takes a keras_stg.GatedModel"):
        keras_stg.strip(helpers.mlp())
