"""`keras_stg.initializers`: ticket initialisations and gate-location initializers."""

import keras
import numpy as np

import keras_stg
from tests.helpers import mlp



def test_slt_init_is_signed_constant_and_deterministic():
    a = keras_stg.wrap(mlp(), seed=3)
    b = keras_stg.wrap(mlp(), seed=3)
    ka, kb = a.targets[0].variable.numpy(), b.targets[0].variable.numpy()
    np.testing.assert_array_equal(ka, kb)
    np.testing.assert_allclose(np.abs(ka), np.sqrt(2.0 / 6.0), rtol=1e-6)
    # post_training keeps the trained weights.
    model = mlp()
    before = model.layers[0].kernel.numpy().copy()
    keras_stg.wrap(model, mode="post_training")
    np.testing.assert_array_equal(model.layers[0].kernel.numpy(), before)


def test_init_density_scales_for_the_target():
    plain = keras_stg.wrap(mlp(), target_sparsity=0.75, seed=3)
    scaled = keras_stg.wrap(mlp(), target_sparsity=0.75, seed=3, init_density="auto")
    explicit = keras_stg.wrap(mlp(), target_sparsity=0.75, seed=3, init_density=0.25)
    for a, b, c in zip(plain.targets, scaled.targets, explicit.targets):
        a, b, c = (np.asarray(t.variable.value) for t in (a, b, c))
        # 1/sqrt(0.25) = 2: same signs, twice the magnitude.
        np.testing.assert_allclose(b, 2.0 * a, rtol=1e-6)
        np.testing.assert_array_equal(b, c)
    # Without a target, "auto" has nothing to scale for.
    no_target = keras_stg.wrap(mlp(), lam=1.0, seed=3, init_density="auto")
    for a, b in zip(plain.targets, no_target.targets):
        np.testing.assert_array_equal(np.asarray(a.variable.value), np.asarray(b.variable.value))


def test_clipped_normal_initializer_round_trips():
    init = keras_stg.initializers.ClippedNormal(-0.6, 0.5, bound=1.0, seed=3)
    values = np.asarray(init((4000,)))
    assert values.min() == -1.0 and values.max() <= 1.0
    assert abs(np.mean(values > 0) - 0.115) < 0.02  # P(N(-0.6, 0.5) > 0)
    same = keras.initializers.deserialize(keras.initializers.serialize(init))
    np.testing.assert_array_equal(np.asarray(same((4000,))), values)
    gate = keras_stg.StochasticGate(init_mu=init, gate_shape=(4000,))
    np.testing.assert_array_equal(gate.mu.numpy(), values)
    rebuilt = keras_stg.StochasticGate.from_config(gate.get_config())
    np.testing.assert_array_equal(rebuilt.mu.numpy(), values)
