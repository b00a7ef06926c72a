"""`keras_stg.layer_table`: one table of layer behaviour, looked up along the class hierarchy."""

import keras
import numpy as np
import pytest

import keras_stg
from keras_stg import layer_table as table
from tests import helpers

L = keras.layers


def _built(layer, shape):
    layer(keras.Input(shape))
    return layer


@pytest.mark.parametrize("layer, shape, kernels", [
    (L.Dense(4), (3,), [("kernel", (1,), (0,))]),
    (L.Conv2D(4, 3), (8, 8, 2), [("kernel", (3,), (0, 1, 2))]),
    (L.Conv1DTranspose(4, 3), (8, 2), [("kernel", (1,), (0, 2))]),
    (L.DepthwiseConv2D(3), (8, 8, 2), [("kernel", (2, 3), (0, 1))]),
    (L.SeparableConv2D(4, 3), (8, 8, 2),
     [("depthwise_kernel", (2, 3), (0, 1)), ("pointwise_kernel", (3,), (0, 1, 2))]),
    (L.EinsumDense("abc,cd->abd", (None, 4)), (5, 3), [("kernel", (1,), (0,))]),
])
def test_kernel_roles_and_axes(layer, shape, kernels):
    found = table.kernels(_built(layer, shape))
    assert [(k.role, k.out_axes, k.in_axes) for k in found] == kernels


@pytest.mark.parametrize("layer, shape, kind", [
    (L.Dense(4, activation="relu"), (3,), table.PRODUCER),
    (L.Conv2D(4, 3), (8, 8, 2), table.PRODUCER),
    (L.DepthwiseConv2D(3), (8, 8, 2), table.DEPTHWISE),
    (L.BatchNormalization(), (8, 8, 2), table.PER_CHANNEL),
    (L.ReLU(), (4,), table.ELEMENTWISE),
    (L.Activation("gelu"), (4,), table.ELEMENTWISE),
    (L.MaxPooling2D(), (8, 8, 2), table.SPATIAL),
    (L.ZeroPadding2D(), (8, 8, 2), table.SPATIAL),
    (L.GlobalAveragePooling2D(), (8, 8, 2), table.GLOBAL_POOL),
    (L.Flatten(), (8, 8, 2), table.FLATTEN),
])
def test_channel_kinds(layer, shape, kind):
    assert table.channel_kind(_built(layer, shape)) == kind


@pytest.mark.parametrize("layer, shape, reason", [
    (L.Activation("softmax"), (4,), "not element-wise"),
    (L.Conv2D(4, 3, groups=2), (8, 8, 2), "grouped convolutions"),
    (L.BatchNormalization(axis=1), (8, 8, 2), "normalizes axis 1"),
    (L.Concatenate(axis=1), None, "axis 1"),
    (L.Embedding(10, 4), (3,), "not in keras_stg's layer table"),
])
def test_unsupported_channels_say_why(layer, shape, reason):
    if shape is not None:
        _built(layer, shape)
    kind = table.channel_kind(layer)
    assert isinstance(kind, table.Unsupported) and reason in kind.reason


def test_a_producers_activation_concerns_its_output_only():
    softmax = _built(L.Dense(4, activation="softmax", name="p"), (3,))
    assert table.channel_kind(softmax) == table.PRODUCER
    assert table.activation_reason(softmax) == \
        "the activation 'softmax' of 'p' is not element-wise"
    assert table.activation_reason(_built(L.Conv2D(4, 3, activation="relu"), (8, 8, 2))) is None
    assert table.activation_reason(L.ReLU()) is None


def test_subclass_inherits_its_parent_entry_and_normalization_is_never_gated():
    class MyDense(L.Dense):
        pass

    layer = _built(MyDense(3), (4,))
    assert table.spec(layer) is table.spec(L.Dense(1))
    assert table.kernels(_built(L.LayerNormalization(), (4,))) is None
    assert table.spec(L.BatchNormalization()).never_gated


class Affine(L.Layer):
    """y = x @ w + b, with the kernel named `w`."""

    def __init__(self, units=5, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.w = self.add_weight(name="w", shape=(input_shape[-1], self.units))
        self.b = self.add_weight(name="b", shape=(self.units,), initializer="zeros")

    def call(self, x):
        return x @ self.w + self.b

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_a_registered_custom_layer_is_gated_stripped_and_shrunk():
    def model():
        return keras.Sequential([keras.Input((6,)), Affine(name="aff"), L.ReLU(),
                                 L.Dense(2, name="out")])

    gated = keras_stg.wrap(model(), seed=0)
    assert [t.layer.name for t in gated.targets] == ["out"]
    assert [s.class_name for s in gated.skipped] == ["Affine"]
    try:
        keras_stg.register_layer(Affine, kernels=lambda layer: [table.Kernel("w", (1,), (0,))],
                                 channels=table.PRODUCER)
        gated = keras_stg.wrap(model(), seed=0, granularity="unit")
        assert [t.layer.name for t in gated.targets] == ["aff", "out"]
        assert gated.targets[0].fan_in == 6
        helpers.random_masks(gated, keep=0.5, seed=0)
        stripped = gated.strip()
        x, _ = helpers.batch(stripped, 4)
        assert helpers.max_diff(helpers.infer(stripped, x), helpers.infer(gated, x)) <= 1e-6
        # Without channel axes in its entry, shrink names the layer and leaves it whole.
        with pytest.warns(UserWarning, match="removed nothing.*'aff' \\(Affine\\) no channel "
                                             "axes to cut"):
            keras_stg.shrink(stripped)
        # With them (and a `units` in its config), it is cut like a Dense.
        keras_stg.register_layer(Affine, channels=table.PRODUCER, kernels=lambda layer: [
            table.Kernel("w", (1,), (0,), channel_in=0, channel_out=1)])
        small = keras_stg.shrink(stripped)
        kept = np.any(stripped.get_layer("aff").w.numpy() != 0, axis=0)
        assert small.get_layer("aff").units == int(kept.sum())
        assert small.get_layer("aff").units < 5
        assert helpers.max_diff(helpers.infer(small, x), helpers.infer(gated, x)) <= 1e-6
    finally:
        table._TABLE.pop(Affine, None)


def test_register_layer_rejects_bad_entries():
    with pytest.raises(TypeError, match="keras.layers.Layer subclass"):
        keras_stg.register_layer(object)
    with pytest.raises(ValueError, match="Unknown channel kind 'diagonal'"):
        keras_stg.register_layer(Affine, channels="diagonal")
    assert "Dense" in table.kernel_layer_names().split(", ")
    assert table.channel_kind(L.Add()) == table.MERGE
    assert table.channel_kind(L.Concatenate()) == table.CONCAT
