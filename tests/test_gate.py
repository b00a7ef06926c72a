import numpy as np
import keras

import keras_stg


def test_stochastic_gate_layer_selects_features_and_serializes(tmp_path):
    inputs = keras.Input((5,))
    gate = keras_stg.StochasticGate(lam=0.5, seed=0, name="gate")
    outputs = keras.layers.Dense(1)(gate(inputs))
    model = keras.Model(inputs, outputs)
    assert gate.mu.shape == (5,)
    gate.mu.assign(np.array([0.5, -0.5, 0.2, -0.1, 0.0], "float32"))
    x = np.ones((3, 5), "float32")
    # Inference: strictly binary.
    np.testing.assert_array_equal(np.asarray(gate(x)), np.tile([1, 0, 1, 0, 0], (3, 1)))
    # Training: the penalty is added once per call.
    model(x, training=True)
    assert len(model.losses) == 1 and float(model.losses[0]) > 0
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.get_layer("gate").mask(), gate.mask())
    assert loaded.get_layer("gate").lam == 0.5


def test_mu_bound_keeps_gates_revivable():
    gate = keras_stg.StochasticGate(gate_shape=(3,), mu_bound=1.0)
    assert float(np.max(np.asarray(gate.mu.constraint(np.array([5.0, -5.0, 0.2]))))) == 1.0
    assert float(np.min(np.asarray(gate.mu.constraint(np.array([5.0, -5.0, 0.2]))))) == -1.0
