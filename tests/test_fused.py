"""The fused CPU gate kernels against the pure-TensorFlow gate path."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_stg
from keras_stg import fused, gate_math


@pytest.fixture(scope="module")
def lib():
    lib = fused.load()
    assert lib is not None, f"fused kernels did not build: {fused.error()}"
    return lib


def _reference(kernel, mu, table, start, sigma, grad, grad_l0):
    n = mu.size
    eps = np.roll(table, -start)[:n].reshape(mu.shape)
    with tf.GradientTape(persistent=True) as tape:
        k, m = tf.constant(kernel), tf.constant(mu)
        tape.watch([k, m])
        value = k * gate_math.relaxed_gate(m, sigma, eps=eps)
        l0 = gate_math.expected_l0(m, sigma)
        total = tf.reduce_sum(value * grad) + grad_l0 * l0
    dmu, dkernel = tape.gradient(total, [m, k])
    return value.numpy(), float(l0), dmu.numpy(), dkernel.numpy()


# 40x1000 gates span three chunks of the kernels' parallel loop; 39990: the
# noise wraps around the table.
@pytest.mark.parametrize("start", [0, 17, 39990])
def test_op_matches_reference_math(lib, start):
    rng = np.random.default_rng(start)
    shape = (40, 1000)
    kernel = rng.standard_normal(shape).astype("float32")
    mu = rng.uniform(-1.2, 1.2, shape).astype("float32")
    table = rng.standard_normal(40000).astype("float32")
    grad = rng.standard_normal(shape).astype("float32")
    value, l0, kept = lib.stg_weight_gate(
        kernel, mu, table, tf.constant(start, tf.int64), sigma=0.5
    )
    dmu, dkernel = lib.stg_weight_gate_grad(
        grad, tf.constant(0.7), kernel, mu, table, tf.constant(start, tf.int64),
        sigma=0.5, kernel_grad=True,
    )
    ref_value, ref_l0, ref_dmu, ref_dkernel = _reference(kernel, mu, table, start, 0.5, grad, 0.7)
    np.testing.assert_allclose(value.numpy(), ref_value, atol=1e-6)
    assert float(l0) == pytest.approx(ref_l0, rel=1e-5)
    np.testing.assert_allclose(dmu.numpy(), ref_dmu, atol=1e-5)
    np.testing.assert_allclose(dkernel.numpy(), ref_dkernel, atol=1e-6)
    assert int(kept) == int((mu > 0).sum())
    clipped = lib.stg_clip(mu, bound=1.0)
    np.testing.assert_array_equal(clipped.numpy(), np.clip(mu, -1.0, 1.0))


def test_op_rejects_bad_inputs(lib):
    k = np.zeros((3, 4), "float32")
    with pytest.raises(tf.errors.InvalidArgumentError, match="same shape"):
        lib.stg_weight_gate(k, np.zeros((4, 3), "float32"), np.zeros(12, "float32"),
                            tf.constant(0, tf.int64), sigma=0.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least as long"):
        lib.stg_weight_gate(k, k, np.zeros(5, "float32"), tf.constant(0, tf.int64), sigma=0.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="start must be in"):
        lib.stg_weight_gate(k, k, np.zeros(12, "float32"), tf.constant(12, tf.int64), sigma=0.5)


def _mlp():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((20,))
    x = keras.layers.Dense(32, activation="relu")(inputs)
    outputs = keras.layers.Dense(4)(x)
    return keras.Model(inputs, outputs)


def _train(fused_flag, mode, steps=5, optimizer=None, return_model=False):
    gated = keras_stg.wrap(_mlp(), mode=mode, target_sparsity=0.5, seed=1, fused=fused_flag)
    gated.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16 * steps, 20)).astype("float32")
    y = rng.integers(0, 4, 16 * steps)
    history = gated.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    mus = [g.mu.numpy() for g in gated.gates]
    kernels = [t.variable.numpy() for t in gated.targets]
    if return_model:
        return mus, kernels, history.history, gated
    return mus, kernels, history.history


@pytest.mark.parametrize("mode", ["slt", "joint"])
def test_fused_training_equals_tensorflow_path(lib, mode):
    mus_f, kernels_f, hist_f = _train(True, mode)
    mus_t, kernels_t, hist_t = _train(False, mode)
    for a, b in zip(mus_f, mus_t):
        assert np.abs(a - 0.5).max() > 1e-3  # the gates moved
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(kernels_f, kernels_t):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for key in ("loss", "sparsity", "expected_l0", "lam"):
        assert hist_f[key][-1] == pytest.approx(hist_t[key][-1], rel=1e-4, abs=1e-6), key
    # The epoch's logs hold the mask after its last step.
    pruned = sum(int((m <= 0).sum()) for m in mus_f) / sum(m.size for m in mus_f)
    assert hist_f["sparsity"][-1] == pytest.approx(pruned, abs=1e-7)


def _adam():
    # A schedule and weight decay: both must reach the fused update as in Keras.
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5)
    return keras.optimizers.AdamW(schedule, weight_decay=0.01, clipnorm=1.0)


@pytest.mark.parametrize("mode", ["slt", "joint"])
def test_fused_gate_adam_equals_keras_adam(lib, mode, monkeypatch):
    """Gate locations updated by the fused Adam op equal Keras' Adam update."""

    calls = []
    apply_adam = tf.raw_ops.ResourceApplyAdam

    def spy(**kwargs):
        calls.append(kwargs["var"])
        return apply_adam(**kwargs)

    monkeypatch.setattr(tf.raw_ops, "ResourceApplyAdam", spy)
    mus_f, kernels_f, hist_f, gated = _train(True, mode, steps=6, optimizer=_adam(),
                                             return_model=True)
    # Traced for every gate (once per trace of the step), never for a kernel.
    handles = [g.mu.value.handle for g in gated.gates]
    assert calls and len(calls) % len(handles) == 0
    assert all(any(c is h for h in handles) for c in calls)
    assert all(any(c is h for c in calls) for h in handles)
    assert "update_step" not in vars(gated.optimizer)  # the optimizer is left as it was
    # The optimizer's own moment slots hold the gates' state (saved with it).
    index = gated.optimizer._get_variable_index(gated.gates[0].mu)
    assert np.abs(gated.optimizer._momentums[index].numpy()).max() > 0
    assert int(gated.optimizer.iterations.numpy()) == 6

    monkeypatch.setattr(tf.raw_ops, "ResourceApplyAdam", apply_adam)
    monkeypatch.setattr(fused, "fusable_adam", lambda optimizer: False)
    mus_k, kernels_k, hist_k = _train(True, mode, steps=6, optimizer=_adam())
    for a, b in zip(mus_f, mus_k):
        assert np.abs(a - 0.5).max() > 1e-3  # the gates moved
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(kernels_f, kernels_k):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert hist_f["loss"][-1] == pytest.approx(hist_k["loss"][-1], rel=1e-5)


@pytest.mark.parametrize("optimizer", [
    keras.optimizers.SGD(0.1), keras.optimizers.Adam(0.01, amsgrad=True),
    keras.optimizers.RMSprop(0.01),
])
def test_other_optimizers_keep_keras_update(optimizer):

    assert not fused.fusable_adam(optimizer)
    assert fused.fusable_adam(keras.optimizers.Adam(0.01))
    assert fused.fusable_adam(keras.optimizers.AdamW(0.01))

    class MyAdam(keras.optimizers.Adam):
        def update_step(self, gradient, variable, learning_rate):
            return super().update_step(gradient, variable, learning_rate)

    assert not fused.fusable_adam(MyAdam(0.01))


def test_env_switch_and_fused_true_error(monkeypatch):
    monkeypatch.setenv("KERAS_STG_FUSED", "0")
    assert fused.load() is None
    gated = keras_stg.wrap(_mlp(), seed=0, fused=True)
    with pytest.raises(RuntimeError, match="fused gate kernels are unavailable"):
        gated._fused_lib()
    with pytest.raises(ValueError, match="`fused` must be"):
        keras_stg.wrap(_mlp(), fused="yes")
