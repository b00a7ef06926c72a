"""Selection of layers, modes, normalization policy and the guard clauses of wrap."""

import numpy as np
import pytest
import keras

import keras_stg


def mlp():
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, name="a"), keras.layers.Dense(3, name="b")],
        name="mlp",
    )


def test_include_and_exclude_by_name_and_regex():
    assert [t.layer.name for t in keras_stg.wrap(mlp(), include="a").targets] == ["a"]
    assert [t.layer.name for t in keras_stg.wrap(mlp(), exclude=["b"]).targets] == ["a"]
    assert [t.layer.name for t in keras_stg.wrap(mlp(), include="[ab]").targets] == ["a", "b"]
    gated = keras_stg.wrap(mlp(), exclude="b")
    assert [(s.path, s.reason) for s in gated.skipped] == [("mlp/b", "matched by `exclude`")]


def test_unsupported_layers_are_listed():
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(10, 6, name="emb")(inputs)
    outputs = keras.layers.Dense(2, name="out")(x)
    gated = keras_stg.wrap(keras.Model(inputs, outputs))
    assert [t.layer.name for t in gated.targets] == ["out"]
    assert len(gated.skipped) == 1
    assert gated.skipped[0].class_name == "Embedding"
    assert "unsupported layer type" in gated.skipped[0].reason
    assert "Not gated:" in keras_stg.summary(gated)


def test_error_nothing_to_gate():
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="has no kernel to mask, so there is nothing to gate.*"
                                         "normalization layers are never gated"):
        keras_stg.wrap(model)


def test_error_built_model_without_weights_says_nothing_to_gate_not_unbuilt():
    model = keras.Sequential([keras.Input((4, 4)), keras.layers.Flatten(), keras.layers.ReLU()])
    assert model.built and not model.weights
    with pytest.raises(ValueError, match="nothing to gate.*Dense.*register_layer") as info:
        keras_stg.wrap(model)
    assert "not built" not in str(info.value)


def test_error_unbuilt_model():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="is not built, so its kernels do not exist yet"):
        keras_stg.wrap(model)


def test_error_not_a_model():
    with pytest.raises(TypeError, match="wrap\\(\\) takes a keras.Model, got Dense"):
        keras_stg.wrap(keras.layers.Dense(3))


def test_error_already_gated():
    with pytest.raises(ValueError, match="already gated"):
        keras_stg.wrap(keras_stg.wrap(mlp()))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "frozen"}, "Unknown mode 'frozen'. Use one of 'slt', 'post_training', 'joint'"),
        ({"granularity": "neuron"}, "Unknown granularity 'neuron'"),
        ({"lam": -1.0}, "`lam` must be a number >= 0, got -1.0"),
        ({"target_sparsity": 1.0}, "`target_sparsity` must be strictly between 0 and 1"),
        ({"target_sparsity": 0}, "`target_sparsity` must be strictly between 0 and 1"),
        ({"include": "nope"}, "`include=\\['nope'\\]` matches no layer of the model"),
        ({"exclude": ["zz.*"]}, "`exclude=\\['zz.\\*'\\]` matches no layer of the model"),
        ({"sigma": 0}, "`sigma` must be a number > 0"),
        ({"init": "xavier"}, "Unknown init 'xavier'"),
        ({"controller_horizon": -1}, "`controller_horizon` must be >= 0 \\(epochs\\), got -1"),
        ({"target_sparsity": 0.5, "init_density": 1.5}, "`init_density` must be in \\(0, 1\\], 'auto' or None, got 1.5"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_stg.wrap(mlp(), **kwargs)


def test_modes_freeze_exactly_the_weights():
    for mode, trainable in (("slt", 2), ("post_training", 2), ("joint", 6)):
        gated = keras_stg.wrap(mlp(), mode=mode)
        assert len(gated.trainable_variables) == trainable, mode


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


def test_batchnorm_statistics_follow_masked_network_weights_frozen():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="d")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="o")(x))
    gated = keras_stg.wrap(model, mode="post_training", lam=0.0, seed=0)
    bn = model.get_layer("bn")
    gamma, mean = bn.gamma.numpy().copy(), bn.moving_mean.numpy().copy()
    x = np.random.default_rng(0).standard_normal((32, 4)).astype("float32") + 3.0
    gated.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    gated.fit(x, np.zeros(32, "int32"), epochs=2, verbose=0)
    np.testing.assert_array_equal(bn.gamma.numpy(), gamma)
    assert not np.allclose(bn.moving_mean.numpy(), mean)


def test_target_sparsity_controller_moves_lambda_both_ways():
    x = np.random.default_rng(0).standard_normal((64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    # All gates open (sparsity 0) with a high target: lambda must rise; all
    # closed (sparsity 1) with a low target: it must fall.
    for target, init_mu, direction in ((0.95, 0.5, 1), (0.05, -0.2, -1)):
        gated = keras_stg.wrap(
            mlp(), target_sparsity=target, lam=0.5, init_mu=init_mu, seed=0, target_ramp=0
        )
        gated.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        gated.fit(x, y, epochs=3, batch_size=16, verbose=0)
        assert direction * (float(gated.lam.numpy()) - 0.5) > 0, target


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


def big_mlp():
    return keras.Sequential(
        [keras.Input((200,)), keras.layers.Dense(100, name="a"), keras.layers.Dense(10, name="b")]
    )


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_slt_with_a_target_starts_from_a_random_mask_at_the_target(target):
    gated = keras_stg.wrap(big_mlp(), target_sparsity=target, seed=4)
    assert gated.penalty.ramp == 0.0  # already at the target: nothing to ramp
    for gate in gated.gates:
        mu = gate.mu.numpy()
        assert -1.0 <= mu.min() and mu.max() <= 1.0  # inside the bound
        # A random subnetwork in every layer, near the target's density.
        assert abs((mu > 0).mean() - (1 - target)) < 0.03
        assert len(np.unique(mu)) > mu.size // 2
    assert abs(gated.sparsity() - target) < 0.01
    again = keras_stg.wrap(big_mlp(), target_sparsity=target, seed=4)
    for a, b in zip(gated.gates, again.gates):
        np.testing.assert_array_equal(a.mu.numpy(), b.mu.numpy())
    # Gate tensors are drawn independently of each other.
    a, b = (g.mu.numpy().ravel()[:1000] for g in gated.gates)
    assert not np.array_equal(a, b[: a.size])


@pytest.mark.parametrize("kwargs", [
    {"mode": "joint", "target_sparsity": 0.9},  # a trained or training network starts whole
    {"mode": "post_training", "target_sparsity": 0.9},
    {"lam": 1.0},  # no target to start at
    {"target_sparsity": 0.9, "init_mu": 0.5},
    {"target_sparsity": 0.5, "granularity": "unit"},  # measured better from the whole net
])
def test_dense_start_otherwise(kwargs):
    gated = keras_stg.wrap(big_mlp(), seed=0, **kwargs)
    assert gated.sparsity() == 0.0
    if "target_sparsity" in kwargs:
        assert gated.penalty == keras_stg.TargetSparsity(kwargs["target_sparsity"], ramp=0.4)
    else:
        assert gated.penalty == keras_stg.FixedPenalty(1.0)
    for gate in gated.gates:
        np.testing.assert_array_equal(gate.mu.numpy(), 0.5)


def test_random_start_on_request_and_ramp_override():
    gated = keras_stg.wrap(big_mlp(), mode="joint", target_sparsity=0.8, init_mu="random",
                           target_ramp=0.3, seed=0)
    assert abs(gated.sparsity() - 0.8) < 0.02
    assert gated.penalty.ramp == 0.3


@pytest.mark.parametrize("kwargs, message", [
    ({"init_mu": "random"}, "no target is given"),
    ({"init_mu": "rand", "target_sparsity": 0.9}, "'random' or 'auto'"),
    ({"init_mu": [0.5]}, "'random' or 'auto'"),
    ({"target_ramp": 2.0}, "target_ramp"),
])
def test_bad_gate_start(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_stg.wrap(mlp(), **kwargs)


def test_random_start_survives_save_and_load(tmp_path):
    gated = keras_stg.wrap(big_mlp(), target_sparsity=0.9, seed=1)
    gated.compile(optimizer="adam", loss="mse")
    path = str(tmp_path / "g.keras")
    gated.save(path)
    loaded = keras.models.load_model(path)
    # The resolved config is saved: the loaded model does what the first one did.
    assert loaded.config == gated.config
    assert loaded.config.init_mu == "random" and loaded.penalty.ramp == 0.0
    for a, b in zip(gated.gates, loaded.gates):
        np.testing.assert_array_equal(a.mu.numpy(), b.mu.numpy())
    assert loaded.sparsity() == gated.sparsity()


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


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "slt", "target_sparsity": 0.9, "finetune": 0.3}, "mode='slt' trains no weights"),
    ({"mode": "joint", "finetune": 0.3}, "no target is given"),
    ({"mode": "joint", "target_sparsity": 0.9, "finetune": 1.0}, "share of the epochs in"),
    ({"mode": "joint", "target_sparsity": 0.9, "finetune": True}, "share of the epochs in"),
])
def test_bad_finetune(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_stg.wrap(mlp(), **kwargs)


def test_freeze_mask_keeps_exactly_the_target_with_the_largest_mu():
    gated = keras_stg.wrap(big_mlp(), mode="joint", target_sparsity=0.7, init_mu="random",
                           seed=2, finetune=0.5)
    mus = np.concatenate([g.mu.numpy().ravel() for g in gated.gates])
    assert abs(gated.sparsity() - 0.7) > 1e-4  # the random start is only near the target
    gated.freeze_mask()
    kept = np.concatenate([g.mask().ravel() for g in gated.gates]).astype(bool)
    assert kept.sum() == round(0.3 * mus.size)
    assert mus[kept].min() >= mus[~kept].max()  # the largest mu are kept
    frozen = np.concatenate([g.mu.numpy().ravel() for g in gated.gates])
    np.testing.assert_array_equal(np.abs(frozen), 1.0)  # saturated at the bound
    assert not any(g.mu.trainable for g in gated.gates)
    assert float(gated.mask_frozen.numpy()) == 1.0
    gated.freeze_mask()  # idempotent
    again = np.concatenate([g.mask().ravel() for g in gated.gates]).astype(bool)
    np.testing.assert_array_equal(kept, again)


def test_finetune_freezes_the_mask_and_trains_the_weights_under_it(tmp_path):
    keras.utils.set_random_seed(0)
    x = np.random.normal(size=(256, 200)).astype("float32")
    y = np.random.randint(0, 10, size=256)
    gated = keras_stg.wrap(big_mlp(), mode="joint", target_sparsity=0.8, seed=0,
                           finetune=0.34)  # the last 1 of 3 epochs
    gated.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = {}

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen[epoch] = ([g.mu.numpy().copy() for g in gated.gates],
                           [t.variable.numpy().copy() for t in gated.targets],
                           float(gated.lam.numpy()))

    gated.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[Snapshot()])
    mus_1 = seen[1][0]
    mus_2, kernels_2, lam_2 = seen[2]
    assert any(not np.array_equal(a, b) for a, b in zip(mus_1, mus_2))  # gates trained
    # Frozen at the start of the last epoch at exactly 80%, then left alone.
    assert gated.sparsity() == pytest.approx(0.8, abs=1e-4)
    for a, g in zip(mus_2, gated.gates):
        np.testing.assert_array_equal(a, g.mu.numpy())
    assert float(gated.lam.numpy()) == lam_2
    # The weights kept training, and the stripped model is the frozen mask.
    assert any(not np.array_equal(a, t.variable.numpy())
               for a, t in zip(kernels_2, gated.targets))
    np.testing.assert_allclose(gated.strip().predict(x[:8], verbose=0),
                               gated.predict(x[:8], verbose=0), rtol=1e-5, atol=1e-5)
    assert gated.get_config()["config"]["finetune"] == 0.34
    # A saved and reloaded model (as a resumed run) stays frozen in its next fit.
    path = str(tmp_path / "frozen.keras")
    gated.save(path)
    loaded = keras.models.load_model(path)
    assert float(loaded.mask_frozen.numpy()) == 1.0
    before = [g.mu.numpy().copy() for g in loaded.gates]
    kernels = [t.variable.numpy().copy() for t in loaded.targets]
    loaded.fit(x, y, batch_size=32, epochs=1, verbose=0)
    for a, g in zip(before, loaded.gates):
        np.testing.assert_array_equal(a, g.mu.numpy())
    assert any(not np.array_equal(a, t.variable.numpy())
               for a, t in zip(kernels, loaded.targets))
