import numpy as np
import pytest
import keras

import keras_stg
from keras_stg import granularity
from keras_stg.targets import find_targets


def _gate_shapes(layer, input_shape, gran):
    model = keras.Sequential([keras.Input(input_shape), layer])
    targets, _ = find_targets(model)
    g = granularity.get(gran)
    return [g.gate_shape(tuple(t.variable.shape), t.out_axes, t.in_axes) for t in targets]


@pytest.mark.parametrize(
    "layer,input_shape,unit_shapes",
    [
        (keras.layers.Dense(5), (3,), [(1, 5)]),
        (keras.layers.Conv1D(4, 3), (8, 2), [(1, 1, 4)]),
        (keras.layers.Conv2D(4, 3), (8, 8, 2), [(1, 1, 1, 4)]),
        (keras.layers.Conv3D(4, 3), (5, 5, 5, 2), [(1, 1, 1, 1, 4)]),
        (keras.layers.Conv2DTranspose(4, 3), (8, 8, 2), [(1, 1, 4, 1)]),
        (keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (8, 8, 3), [(1, 1, 3, 2)]),
        (keras.layers.SeparableConv2D(4, 3), (8, 8, 3), [(1, 1, 3, 1), (1, 1, 1, 4)]),
        (keras.layers.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de"), (4, 6), [(1, 2, 3)]),
    ],
)
def test_unit_gate_shapes(layer, input_shape, unit_shapes):
    assert _gate_shapes(layer, input_shape, "unit") == unit_shapes


def test_weight_gate_shape_is_kernel_shape():
    assert _gate_shapes(keras.layers.Conv2D(4, 3), (8, 8, 2), "weight") == [(3, 3, 2, 4)]


def test_multi_head_attention_kernels_are_all_gated():
    inputs = keras.Input((4, 8))
    out = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs)
    targets, skipped = find_targets(keras.Model(inputs, out))
    assert len(targets) == 4 and not skipped
    assert all(type(t.layer).__name__ == "EinsumDense" for t in targets)


def test_block_granularity_expands_along_input_axis():
    g = granularity.get("block4")
    assert g.gate_shape((10, 3), (1,), (0,)) == (3, 3)
    gate = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]], "float32")
    full = np.asarray(g.expand(gate, (10, 3), (1,), (0,)))
    assert full.shape == (10, 3)
    np.testing.assert_array_equal(full[:4], np.repeat(gate[:1], 4, axis=0))
    np.testing.assert_array_equal(full[8:], np.repeat(gate[2:], 2, axis=0))
    assert float(g.kept_weights(gate, (10, 3), (1,), (0,))) == full.sum()


def test_block_granularity_trains_and_strips():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8), keras.layers.Dense(3)])
    gated = keras_stg.wrap(model, granularity="block4", lam=1.0, seed=0)
    for g in gated.gates:
        g.mu.assign(np.random.default_rng(0).uniform(-0.3, 0.3, g.mu.shape))
    mask = gated.masks()[0]
    # Every run of 4 inputs feeding one output is kept or removed together.
    assert np.all(mask.reshape(4, 4, 8).min(axis=1) == mask.reshape(4, 4, 8).max(axis=1))
    x = np.random.rand(4, 16).astype("float32")
    assert np.abs(np.asarray(gated(x)) - np.asarray(gated.strip()(x))).max() <= 1e-6


def test_unknown_granularity_error():
    with pytest.raises(ValueError, match="Unknown granularity 'rows'. Use one of: block, channel, unit, weight"):
        granularity.get("rows")


def test_register_granularity():
    class Everything(granularity.Granularity):
        name = "everything"

        def gate_shape(self, kernel_shape, out_axes, in_axes):
            return (1,) * len(kernel_shape)

    granularity.register_granularity("everything", Everything)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    gated = keras_stg.wrap(model, granularity="everything", seed=0)
    assert gated.gates[0].mu.shape == (1, 1)
