"""`keras_stg.MaskedModel`: the life cycle shared by the masking methods, on a minimal one."""

import keras
import numpy as np
import pytest

import keras_stg
from keras_stg.masking import call_with_values


class HalfMask(keras_stg.MaskedModel):
    """Keeps a fixed random half of every kernel, scaled by one trainable number."""

    def __init__(self, model, **kwargs):
        super().__init__(model, freeze=True, **kwargs)
        rng = np.random.default_rng(0)
        self.fixed = [rng.random(t.variable.shape) < 0.5 for t in self.targets]
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones")
        self.extra_calls = 0
        self.freeze_base()

    def masked_values(self, training=False):
        return [(t.variable, t.variable.value * m.astype("float32") * self.scale)
                for t, m in zip(self.targets, self.fixed)]

    def extra_loss(self):
        self.extra_calls += 1
        return 0.5 * keras.ops.square(self.scale)  # pulls the scale towards 0

    def step_logs(self):
        return {"scale": keras.ops.convert_to_tensor(self.scale)}


def _model():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="d", activity_regularizer="l2")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="o")(x))


def test_substitution_freezing_losses_and_state_updates():
    base = _model()
    masked = HalfMask(base)
    assert [t.layer.name for t in masked.targets] == ["d", "o"]
    assert masked.trainable_weights == [masked.scale]  # base frozen, only the method's own
    kernels = [t.variable.numpy().copy() for t in masked.targets]
    mean = base.get_layer("bn").moving_mean.numpy().copy()
    x = np.random.default_rng(1).standard_normal((32, 6)).astype("float32") + 2.0
    y = np.zeros((32, 2), "float32")
    # The call computes with the masked kernels.
    expected = base.get_layer("o").kernel.numpy() * masked.fixed[1]
    out = masked(x[:2])
    assert out.shape == (2, 2) and masked.losses  # the activity regularizer is passed on
    masked.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history = masked.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert masked.extra_calls >= 1  # traced into the step
    assert float(masked.scale.numpy()) < 1.0  # the extra loss pulled it down
    assert history.history["scale"][-1] == pytest.approx(float(masked.scale.numpy()), abs=0.05)
    for a, t in zip(kernels, masked.targets):
        np.testing.assert_array_equal(a, t.variable.numpy())  # bit-identical
    assert not np.allclose(base.get_layer("bn").moving_mean.numpy(), mean)
    np.testing.assert_array_equal(base.get_layer("o").kernel.numpy() * masked.fixed[1], expected)


def test_call_with_values_does_not_write_the_substituted_values_back():
    model = _model()
    kernel = model.get_layer("d").kernel
    before = kernel.numpy().copy()
    x = np.ones((4, 6), "float32")
    outputs, losses = call_with_values(model, x, [(kernel, kernel.value * 0.0)], {id(kernel)},
                                       training=True)
    np.testing.assert_array_equal(kernel.numpy(), before)
    assert len(losses) == 1 and float(losses[0]) == pytest.approx(0.0)  # zero activations
    assert outputs.shape == (4, 2)


def test_a_method_without_masked_values_is_an_error_that_says_so():
    class Nothing(keras_stg.MaskedModel):
        pass

    with pytest.raises(NotImplementedError):
        Nothing(_model())(np.ones((1, 6), "float32"))
