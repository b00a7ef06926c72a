"""Selection of layers, modes, normalization policy and the guard clauses of wrap."""

import keras
import pytest

import keras_stg
from tests.helpers import mlp



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
        ({"sigma": 0}, "`sigma` must be a number > 0"), ({"sigma": "wide"}, "or 'auto'"),
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


@pytest.mark.parametrize("kwargs, message", [
    ({"init_mu": "random"}, "no target is given"),
    ({"init_mu": "rand", "target_sparsity": 0.9}, "'random' or 'auto'"),
    ({"init_mu": [0.5]}, "'random' or 'auto'"),
    ({"target_ramp": 2.0}, "target_ramp"),
])
def test_bad_gate_start(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_stg.wrap(mlp(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "slt", "target_sparsity": 0.9, "finetune": 0.3}, "mode='slt' trains no weights"),
    ({"mode": "joint", "finetune": 0.3}, "no target is given"),
    ({"mode": "joint", "target_sparsity": 0.9, "finetune": 1.0}, "share of the training steps in"),
    ({"mode": "joint", "target_sparsity": 0.9, "finetune": True}, "share of the training steps in"),
])
def test_bad_finetune(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_stg.wrap(mlp(), **kwargs)
