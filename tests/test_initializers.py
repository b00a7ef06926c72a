"""`keras_stg.initializers`: ticket initialisations and gate-location initializers."""

import hashlib
import math

import keras
import numpy as np
import pytest

import keras_stg
from keras_stg import initializers
from tests.helpers import lenet, mlp


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


def _digest(values):
    return hashlib.sha256(values.astype(values.dtype.newbyteorder("<")).tobytes()).hexdigest()


@pytest.mark.parametrize("kind, digest", [
    ("sign", "888095852da3b0d64b9023ba99f818963d4ad755a746a1f053f42c500ce305a8"),
    ("uniform", "f3fdbe4e430c1c38e2598adc4b60397a5e7a41c1b65c97f990e7ee08a7fe493c"),
])
def test_regenerated_weights_match_the_checked_in_digest(kind, digest):
    """A ticket's weights are regenerated from its seed: the same bits on every platform
    and with every NumPy that keeps Philox's raw stream (checked-in SHA-256)."""
    values = initializers.kernel_values(kind, 2024, 5, (3, 3, 16, 32), 144, math.sqrt(2.0), 0.1)
    assert values.dtype == np.float32 and values.shape == (3, 3, 16, 32)
    assert _digest(values) == digest


def test_each_kernel_reads_its_own_stream():
    gated = keras_stg.wrap(lenet(), seed=11)
    for index, target in enumerate(gated.targets):
        expected = initializers.kernel_values(
            "sign", 11, index, tuple(target.variable.shape), target.fan_in, math.sqrt(2.0))
        np.testing.assert_array_equal(target.variable.numpy(), expected)
    # The plain-model form with include/exclude numbers the kernels it draws.
    model = lenet()
    initializers.signed_constant(model, seed=11, exclude="fc1")
    fc2 = model.get_layer("fc2").kernel.numpy()
    np.testing.assert_array_equal(
        fc2, initializers.kernel_values("sign", 11, 0, fc2.shape, 300, math.sqrt(2.0)))


@pytest.mark.parametrize("name", ["kaiming_uniform", "uniform", "kaiming_normal"])
def test_distributions(name):
    model = keras.Sequential([keras.Input((400,)), keras.layers.Dense(300, name="a")])
    initializers.get(name)(model, seed=3, density=0.25)
    values = model.layers[0].kernel.numpy().astype("float64")
    gain = 1.0 / math.sqrt(3.0) if name == "uniform" else math.sqrt(2.0)
    std = gain / math.sqrt(400) * 2.0  # 1/sqrt(0.25) = 2
    assert abs(values.mean()) < 0.01 * std
    assert abs(values.std() / std - 1.0) < 0.01
    if name != "kaiming_normal":
        assert np.abs(values).max() < std * math.sqrt(3.0)
    assert name in initializers.EXACT or name == "kaiming_normal"


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
