import math

import numpy as np
import keras
from keras import ops

from keras_stg import gate_math


def test_relaxed_gate_is_clipped_gaussian():
    mu = ops.zeros((20000,))
    z = ops.convert_to_numpy(gate_math.relaxed_gate(mu, 0.5, keras.random.SeedGenerator(0)))
    assert z.min() >= 0.0 and z.max() <= 1.0
    # clip(0.5 + 0.5 eps): P(z == 1) = P(eps >= 1) ~ 0.159.
    assert abs(np.mean(z == 1.0) - 0.1587) < 0.01
    assert abs(np.mean(z == 0.0) - 0.1587) < 0.01


def test_relaxed_gate_resamples_every_call():
    seed = keras.random.SeedGenerator(0)
    mu = ops.zeros((100,))
    a = ops.convert_to_numpy(gate_math.relaxed_gate(mu, 0.5, seed))
    b = ops.convert_to_numpy(gate_math.relaxed_gate(mu, 0.5, seed))
    assert not np.array_equal(a, b)


def test_binary_mask_is_mu_positive():
    mu = np.array([-0.7, -0.1, 0.0, 1e-6, 0.3], "float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(gate_math.binary_mask(mu)), [0, 0, 0, 1, 1])
    # The noise-free relaxed gate rounds to the same mask.
    np.testing.assert_array_equal(ops.convert_to_numpy(gate_math.binary_mask(mu)),
                                  np.clip(mu + 0.5, 0, 1) > 0.5)


def test_expected_l0_is_sum_of_normal_cdf():
    mu = np.array([-1.0, -0.5, 0.0, 0.5], "float32")
    sigma = 0.5
    expected = sum(0.5 * (1 + math.erf((m + 0.5) / sigma / math.sqrt(2))) for m in mu)
    assert abs(float(gate_math.expected_l0(mu, sigma)) - expected) < 1e-5


def test_fractional_count():
    mu = np.array([-0.6, -0.4, 0.0, 0.49, 0.5, 0.9], "float32")
    assert int(gate_math.fractional_count(mu)) == 3


def test_straight_through_mask_is_binary_forward_and_the_identity_backward():
    import tensorflow as tf

    mu = tf.Variable([-0.7, -1e-8, 0.0, 3e-8, 0.3, 0.9])
    with tf.GradientTape() as tape:
        m = gate_math.straight_through_mask(mu)
        loss = tf.reduce_sum(m * tf.constant([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    np.testing.assert_array_equal(m.numpy(), [0, 0, 0, 1, 1, 1])  # exactly binary
    np.testing.assert_array_equal(tape.gradient(loss, mu).numpy(), [1, 2, 3, 4, 5, 6])
