"""`keras_stg._compat`: every private Keras/TensorFlow call works on the installed versions.

Each test exercises one function of `_compat` on real objects, so a Keras or
TensorFlow release that moves a private attribute fails here, by name.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_stg import _compat
from tests.helpers import mlp

ROOT = __file__.rsplit("/tests/", 1)[0]


def test_installed_keras_is_in_the_tested_range():
    setup = open(f"{ROOT}/setup.py").read()
    assert f'"keras{_compat.TESTED_KERAS}"' in setup  # one range, stated in both places
    low, high = re.fullmatch(r">=([\d.]+),<([\d.]+)", _compat.TESTED_KERAS).groups()
    version = tuple(int(p) for p in keras.__version__.split(".")[:2])
    assert tuple(int(p) for p in low.split(".")[:2]) <= version < tuple(
        int(p) for p in high.split(".")[:2])


def test_layers_and_nodes():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="in1")], name="inner")
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(2, name="top")(inner(inputs))
    model = keras.Model(inputs, outputs)
    direct = [l.name for l in _compat.sublayers(model)
              if not isinstance(l, keras.layers.InputLayer)]
    assert direct == ["inner", "top"]
    assert "in1" in [l.name for l in _compat.all_layers(model)]
    nodes = _compat.inbound_nodes(model.get_layer("top"))
    assert len(nodes) == 1 and nodes[0].operation is model.get_layer("top")


def test_call_shapes_of_layers_called_inside_another_layer():
    inputs = keras.Input((16, 32))
    attention = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)
    model = keras.Model(inputs, attention(inputs, inputs))
    inside = [attention._query_dense, attention._output_dense]
    assert not any(_compat.inbound_nodes(l) for l in inside)  # the graph does not show them
    shapes = _compat.call_shapes(model, inside)
    assert shapes[inside[0]] == ((1, 16, 32), (1, 16, 4, 8))
    assert shapes[inside[1]] == ((1, 16, 4, 8), (1, 16, 32))
    assert not any("call" in vars(l) for l in inside)  # the instance wrappers are gone
    out = model(np.ones((2, 16, 32), "float32"))
    assert tuple(out.shape) == (2, 16, 32)


def test_attention_projections():
    inputs = keras.Input((6, 8))
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, value_dim=5)
    keras.Model(inputs, attention(inputs, inputs))
    parts = _compat.attention_projections(attention)
    assert {k: tuple(v.kernel.shape) for k, v in parts.items()} == {
        "query": (8, 2, 3), "key": (8, 2, 3), "value": (8, 2, 5), "output": (2, 5, 8)}


def test_graph_operations_their_classes_and_arguments():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.ops.relu(inputs * 2.0))
    ops = [op for op in model.operations if not isinstance(op, keras.layers.Layer)]
    multiply, relu = _compat.operation_classes(["Multiply", "Relu"])
    assert [type(op) for op in ops] == [multiply, relu]
    assert _compat.operation_classes(["NoSuchOperation"]) == []
    scale_sum = _compat.application_layer("inception_resnet_v2", "CustomScaleLayer")
    assert issubclass(scale_sum, keras.layers.Layer)
    assert _compat.application_layer("inception_resnet_v2", "NoSuchLayer") is None
    assert _compat.application_layer("no_such_application", "CustomScaleLayer") is None
    node = _compat.inbound_nodes(ops[0])[0]
    args, kwargs = _compat.node_arguments(node)
    assert args[0] is inputs and args[1] == 2.0 and kwargs == {}
    out = _compat.call_node(node, {id(inputs): np.full((1, 3), 1.5, "float32")})
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), 3.0)


def test_loss_and_tracker():
    model = mlp()
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((4, 6), "float32")
    y = np.zeros((4, 3), "float32")
    y_pred = model(x)
    loss = _compat.compute_loss(model, x, y, y_pred, None)
    np.testing.assert_allclose(float(loss), float(np.mean(np.square(y_pred))), rtol=1e-6)
    assert isinstance(_compat.loss_tracker(model), keras.metrics.Mean)


def test_adam_slots_and_update_step_override():
    v = keras.Variable(np.ones(3, "float32"))
    optimizer = keras.optimizers.Adam(0.1)
    optimizer.build([v])
    m, s = _compat.adam_slots(optimizer, v)
    assert tuple(m.shape) == tuple(s.shape) == (3,)
    calls = []

    def update_step(gradient, variable, learning_rate):
        calls.append(variable)
        return update_step.keras_update(gradient, variable, learning_rate)

    with _compat.update_step_override(optimizer, update_step) as active:
        assert active
        optimizer.apply_gradients([(tf.ones(3), v)])
    assert calls and "update_step" not in vars(optimizer)
    assert np.all(v.numpy() < 1.0)  # Keras' own update ran through the override


def test_skip_symbolic_build_and_multi_worker_patch():
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():  # Keras builds symbolically
        model = mlp()                                            # only under a strategy
        model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    x, y = np.ones((2, 6), "float32"), np.zeros((2, 3), "float32")
    before = len(model.metrics_variables)
    _compat.skip_symbolic_build(model, (x, y, None))
    assert model.optimizer.built and len(model.metrics_variables) > before
    model.fit(x, y, epochs=1, verbose=0)  # fit runs without its own symbolic build
    assert model._maybe_symbolic_build(data_batch=(x, y, None)) is None
    from keras.src.backend.tensorflow import trainer

    _compat.patch_multi_worker_reduce()
    _compat.patch_multi_worker_reduce()  # idempotent
    assert getattr(trainer.reduce_per_replica, "_keras_stg_patch", False)
    assert trainer._collective_all_reduce_multi_worker(tf.distribute.get_strategy()) is False


def test_freeze_folds_variables_into_constants():
    model = mlp()
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec((None, 6), tf.float32))
    frozen = _compat.freeze(concrete)
    assert not frozen.graph.variables
    x = np.ones((2, 6), "float32")
    np.testing.assert_allclose(frozen(tf.constant(x))[0].numpy(), model(x).numpy(), rtol=1e-6)


def test_tf2onnx_patch_is_importable():
    pytest.importorskip("tf2onnx")  # the export extra; installed by the test extras
    assert callable(_compat.tf2onnx_patch())


class _DerivedKey(keras.layers.Layer):
    """A layer whose config holds a value it derives (`count`) but does not take, as
    keras-hub 0.32's `ViTPatchingAndEmbedding` does: `from_config` fails on it."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units, self.count = units, 2 * units
        self.dense = keras.layers.Dense(units)

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "count": self.count}


def test_rebuild_layer_drops_config_keys_the_constructor_does_not_take(tmp_path):
    layer = _DerivedKey(3, name="derived")
    with pytest.raises(Exception, match="count"):
        _DerivedKey.from_config(layer.get_config())
    copy = _compat.rebuild_layer(layer)
    assert isinstance(copy, _DerivedKey) and copy.units == 3 and copy.name == "derived"
    assert "count" not in copy.get_config()  # so the copy saves and loads
    assert "count" not in _compat.rebuild_layer(copy).get_config()  # and a copy of it
    assert _compat.rebuild_layer(layer, {**layer.get_config(), "units": 5}).units == 5
    inputs = keras.Input((4,))
    model = keras.Model(inputs, copy(inputs))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, custom_objects={"_DerivedKey": _DerivedKey})
    assert loaded.layers[1].units == 3
    with pytest.raises(TypeError, match="units"):  # other failures stay errors
        _compat.rebuild_layer(keras.layers.Dense(2), {"units": 0})


def test_block_internals_inline_reads():
    block = _DerivedKey(3, name="derived")
    inputs = keras.Input((4,), name="features")
    model = keras.Model({"x": inputs}, [block(inputs)])
    assert _compat.sublayers(block) == [block.dense]
    assert _compat.own_state(block) == [] and len(_compat.own_state(block.dense)) == 2
    assert _compat.input_name(model.inputs[0]) == "features"
    ins, outs = _compat.structures(model)
    assert isinstance(ins, dict) and isinstance(outs, list)
    doubled = inputs * 2.0
    _compat.mark_dense(doubled)
    assert not doubled.sparse


def test_rebuild_layer_takes_a_layer_whose_automatic_config_fails():
    """`layers.Identity(dtype=policy)` (keras-hub's drop path at rate 0): Keras cannot
    write its config; it is rebuilt from name, trainability and dtype, and the copy's
    config works. A layer with constructor arguments of its own is not guessed."""
    layer = keras.layers.Identity(dtype=keras.DTypePolicy("float32"), name="drop_path")
    with pytest.raises(NotImplementedError):
        layer.get_config()
    copy = _compat.rebuild_layer(layer)
    assert type(copy) is keras.layers.Identity and copy.name == "drop_path"
    assert copy.dtype_policy.name == "float32"
    assert keras.layers.Identity.from_config(copy.get_config()).name == "drop_path"

    class Scale(keras.layers.Layer):
        def __init__(self, factor, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

    with pytest.raises(NotImplementedError):
        _compat.rebuild_layer(Scale(lambda: 2.0, name="scale"))
