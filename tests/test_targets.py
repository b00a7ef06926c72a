"""`keras_stg.targets`: which kernels are gated, which layers are skipped and why."""

import keras

import keras_stg
from tests.helpers import mlp



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
