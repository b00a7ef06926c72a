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
    with pytest.raises(ValueError, match="has no kernel that stochastic gates can control"):
        keras_stg.wrap(model)


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
