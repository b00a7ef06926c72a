"""`keras_stg.inline`: custom block layers opened into their sublayers, so channel
gates and `shrink` reach inside them."""

import os
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_stg
from keras_stg import inlining
from tests import helpers


def _x(n=4):
    return np.random.default_rng(0).normal(size=(n, 16, 16, 3)).astype("float32")


def test_inline_opens_nested_blocks_and_leaves_the_model_alone():
    model = helpers.custom_blocks()
    nodes = [len(layer._inbound_nodes) for layer in model._flatten_layers()]
    opened, info = keras_stg.inline(model, return_info=True)
    assert sorted(info["opened"]) == ["block_1", "block_1_first", "block_2", "block_2_first",
                                      "stem"]
    assert info["kept"] == {}
    names = [layer.name for layer in opened.layers]
    for name in ("stem_conv", "stem_bn", "block_1_first_conv", "block_1_first_bn",
                 "block_1_second", "block_1_squeeze", "block_1_excite", "block_2_second"):
        assert name in names
    assert not any(isinstance(layer, (helpers.ConvBN, helpers.ResidualBlock))
                   for layer in opened._flatten_layers())
    x = _x()
    np.testing.assert_allclose(helpers.infer(opened, x), helpers.infer(model, x), atol=1e-6)
    # The given model gets no new call, and the opened one owns copies of its weights.
    assert nodes == [len(layer._inbound_nodes) for layer in model._flatten_layers()]
    given = {id(v) for v in model.weights}
    assert not any(id(v) in given for v in opened.weights)
    assert sorted(v.numpy().sum() for v in opened.weights) == pytest.approx(
        sorted(v.numpy().sum() for v in model.weights))


def test_channel_groups_reach_inside_the_opened_blocks():
    model = helpers.custom_blocks()
    before = keras_stg.channel_groups(model)
    assert not any(g.prunable for g in before)  # the graph shows the blocks, not their convs
    groups = [g for g in keras_stg.channel_groups(keras_stg.inline(model)) if g.prunable]
    members = [{(m.layer.name, m.role) for m in g.members} for g in groups]
    # The residual stream: the stem and both blocks' last convolution and excitation.
    assert any({("stem_conv", "producer"), ("block_1_second", "producer"),
                ("block_2_second", "producer"), ("block_1_excite", "producer")} <= m
               for m in members)
    assert {("block_1_squeeze", "producer"), ("block_1_excite", "consumer")} in members
    assert any({("block_1_first_conv", "producer"), ("block_1_first_bn", "per_channel"),
                ("block_1_second", "consumer")} <= m for m in members)


@pytest.mark.parametrize("granularity", ["channel", "unit"])
def test_custom_blocks_shrink_to_plain_keras(granularity, tmp_path):
    model = helpers.custom_blocks()
    gated = keras_stg.wrap(model, mode="post_training", granularity=granularity, seed=0,
                           cost="flops", init_mu=0.5)
    if granularity == "channel":  # wrap opened the blocks: the gates sit inside them
        assert "block_1_first_conv" in [t.layer.name for t in gated.targets]
        helpers.random_channel_masks(gated, keep=0.6, seed=1)
        small = helpers.check_structured(gated, _x(), str(tmp_path))
    else:  # the stripped model still has its blocks: shrink opens them
        helpers.random_masks(gated, keep=0.6, seed=1)
        pruned = gated.strip()
        assert any(isinstance(layer, helpers.ResidualBlock) for layer in pruned.layers)
        small, info = keras_stg.shrink(pruned, return_info=True)
        assert info["parameters_after"] < info["parameters_before"] == model.count_params()
        assert helpers.max_diff(helpers.infer(small, _x()), helpers.infer(gated, _x())) <= 1e-5
    assert small.count_params() < model.count_params()
    # No custom class is left: the shrunk file loads with plain Keras.
    path = os.path.join(str(tmp_path), "small.keras")
    small.save(path)
    loaded = keras.saving.load_model(path)
    assert helpers.max_diff(helpers.infer(loaded, _x()), helpers.infer(small, _x())) == 0


class _BackendOnly(keras.layers.Layer):
    """A block whose call uses TensorFlow directly: it cannot run on Keras' symbolic
    inputs, so it stays whole."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)

    def call(self, x):
        import tensorflow as tf

        return tf.math.softplus(self.dense(x))


class _Counting(keras.layers.Layer):
    """A block whose output depends on how often it was called: a trace of its call
    does not describe it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)
        self.calls = 0

    def call(self, x):
        self.calls += 1
        return self.dense(x) * float(self.calls)


def _model_with(block):
    inputs = keras.Input((6,))
    x = block(name="block")(keras.layers.Dense(8, name="first")(inputs))
    x = helpers.ResidualBlock(8, name="kept")(keras.layers.Reshape((1, 1, 8))(x))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))


def test_shared_layers_stay_shared():
    """A block and a Dense called twice: one copy each, called twice, so training the
    opened model still trains one set of weights."""
    inputs = keras.Input((8, 8, 8))
    block = helpers.ResidualBlock(8, name="shared_block")
    dense = keras.layers.Dense(8, name="shared_dense")
    x = block(block(inputs))
    x = dense(dense(keras.layers.GlobalAveragePooling2D()(x)))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    opened = keras_stg.inline(model)
    assert len(opened.weights) == len(model.weights)
    names = [layer.name for layer in opened.layers]
    assert names.count("shared_dense") == 1 and names.count("shared_block_second") == 1
    assert len(opened.get_layer("shared_block_second")._inbound_nodes) == 2
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 8)).astype("float32")
    np.testing.assert_allclose(helpers.infer(opened, x), helpers.infer(model, x), atol=1e-5)
    reasons = [g.reason or "" for g in keras_stg.channel_groups(opened)]
    assert any("shared" in r for r in reasons)


def test_a_sequential_of_blocks_becomes_one_graph(tmp_path):
    model = keras.Sequential([keras.Input((16, 16, 3)), helpers.ConvBN(8, name="stem"),
                              helpers.ResidualBlock(8, name="block"),
                              keras.layers.GlobalAveragePooling2D(name="pool"),
                              keras.layers.Dense(4, name="head")])
    opened, info = keras_stg.inline(model, return_info=True)
    assert sorted(info["opened"]) == ["block", "block_first", "stem"]
    assert [layer.name for layer in opened.layers][1:4] == ["stem_conv", "stem_bn",
                                                            "block_first_conv"]
    np.testing.assert_allclose(helpers.infer(opened, _x()), helpers.infer(model, _x()),
                               atol=1e-6)
    gated = keras_stg.wrap(model, mode="post_training", granularity="channel", seed=0,
                           init_mu=0.5)
    helpers.random_channel_masks(gated, keep=0.6, seed=1)
    helpers.check_structured(gated, _x(), str(tmp_path), export=False)


def test_a_block_that_does_not_trace_stays_whole_with_the_reason():
    model = _model_with(_BackendOnly)
    opened, info = keras_stg.inline(model, return_info=True)
    assert "block" in info["kept"] and "symbolic" in info["kept"]["block"]
    assert "kept" in info["opened"]
    assert any(isinstance(layer, _BackendOnly) for layer in opened.layers)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    np.testing.assert_allclose(helpers.infer(opened, x), helpers.infer(model, x), atol=1e-6)


def _assert_discarded(model, why):
    """`inline` raises InlineError saying `why`; wrap's `open_custom_blocks` warns it and
    keeps the model."""
    with pytest.raises(inlining.InlineError, match=why):
        keras_stg.inline(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert inlining.open_custom_blocks(model) is model
    assert any(why in str(w.message) for w in caught)


def test_a_trace_that_changes_the_outputs_is_discarded():
    model = _model_with(_Counting)
    model(np.zeros((1, 6), "float32"))  # one more call than the trace's copy has had
    _assert_discarded(model, "changed its outputs")


class ApplyFunction(keras.layers.Layer):
    """A layer built on a Python function: its config cannot rebuild it."""

    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn

    def call(self, x):
        return self.fn(x)


class _WithApply(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)
        self.double = ApplyFunction(lambda x: 2.0 * x)

    def call(self, x):
        return self.double(self.dense(x))


class _BatchReshape(keras.layers.Layer):
    """Reshapes to the batch size it sees: on symbolic inputs that is None, which the
    opened graph infers instead (the only unknown axis of the target shape)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)

    def call(self, x):
        y = self.dense(x)
        return ops.reshape(y, (ops.shape(y)[0], -1))


def test_a_block_with_a_sublayer_its_config_cannot_rebuild_stays_whole():
    """Opening it would put a layer into the model that strip, shrink and saving cannot
    copy; the model still strips."""
    model = _model_with(_WithApply)
    opened, info = keras_stg.inline(model, return_info=True)
    assert "cannot be rebuilt" in info["kept"]["block"] and "kept" in info["opened"]
    assert any(isinstance(layer, _WithApply) for layer in opened.layers)
    gated = keras_stg.wrap(model, mode="post_training", granularity="channel", seed=0,
                           init_mu=0.5)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    assert helpers.max_diff(helpers.infer(gated.strip(), x), helpers.infer(gated, x)) <= 1e-5


class _Scaled(keras.layers.Layer):
    """An openable block: a Dense, then a product by two."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)

    def call(self, x):
        return self.dense(x) * 2.0


class _InnerWithApply(keras.layers.Layer):
    """An openable block first, then a sublayer its config cannot rebuild: the block
    stays whole, found out after its first sublayer was readied for the trace."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scaled = _Scaled(name="scaled")
        self.double = ApplyFunction(lambda x: 2.0 * x)

    def call(self, x):
        return self.double(self.scaled(x))


class _Outer(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = _InnerWithApply(name="inner")
        self.dense = keras.layers.Dense(8)

    def call(self, x):
        return self.dense(self.inner(x))


def test_a_nested_block_kept_whole_still_runs():
    """The outer block opens around the inner one, which stays whole and still computes
    what it did (its sublayers were left as they were, not as the trace readies them)."""
    model = _model_with(_Outer)
    opened, info = keras_stg.inline(model, return_info=True)
    assert "block" in info["opened"] and "cannot be rebuilt" in info["kept"]["block_inner"]
    kept = [layer for layer in opened.layers if isinstance(layer, _InnerWithApply)]
    assert len(kept) == 1 and type(kept[0].scaled) is _Scaled
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    assert helpers.max_diff(helpers.infer(opened, x), helpers.infer(model, x)) <= 1e-5


class _SplitHeads(keras.layers.Layer):
    """Reshapes a sequence of unknown length to `(batch, -1, 4)`: traced, the batch is
    None beside the -1, and the length is unknown too, so no axis can be worked out and
    the opened graph does not run."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)

    def call(self, x):
        y = self.dense(x)
        return ops.reshape(y, (ops.shape(y)[0], -1, 4))


def test_a_trace_that_does_not_run_is_discarded():
    inputs = keras.Input((None, 6))
    x = _SplitHeads(name="block")(keras.layers.Dense(8)(inputs))
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(x))
    _assert_discarded(keras.Model(inputs, outputs), "does not run")


class _HeadsReshape(keras.layers.Layer):
    """Reshapes to `(batch, -1, 4)` and back, as attention blocks split heads."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)

    def call(self, x):
        y = ops.reshape(self.dense(x), (ops.shape(x)[0], -1, 4))
        return ops.reshape(ops.relu(y), (ops.shape(x)[0], 8))


@pytest.mark.parametrize("block", [_BatchReshape, _HeadsReshape])
def test_reshapes_to_the_traced_batch_size_take_it_from_the_input(block):
    """A reshape to `ops.shape(x)[0]` traces to a None in the graph; the opened model
    infers that axis instead, so it runs at any batch size and matches."""
    model = _model_with(block)
    opened, info = keras_stg.inline(model, return_info=True)
    assert "block" in info["opened"]
    for n in (1, 5):
        x = np.random.default_rng(n).normal(size=(n, 6)).astype("float32")
        assert helpers.max_diff(helpers.infer(opened, x), helpers.infer(model, x)) <= 1e-5


def test_models_without_blocks_are_returned_as_they_are():
    for model in (helpers.lenet(), helpers.tiny_mobilenet_v2()):
        opened, info = keras_stg.inline(model, return_info=True)
        assert opened is model and info["opened"] == []


def test_keras_hub_mobilenet_blocks_open():
    """keras-hub's MobileNet backbone is built of its own block layers (inverted
    residuals, squeeze-and-excitation): opened, channel gates find their groups and
    the shrunk model equals the masked one."""
    import keras_hub

    backbone = keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[1], [4, 3]], stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[16], [24, 24]], stackwise_kernel_size=[[3], [3, 5]],
        stackwise_num_strides=[[2], [2, 1]], stackwise_se_ratio=[[0.25], [None, 0.25]],
        stackwise_activation=[["relu"], ["relu", "hard_swish"]],
        stackwise_padding=[[1], [1, 2]], output_num_filters=32, depthwise_filters=8,
        depthwise_stride=2, depthwise_residual=False, last_layer_filter=32,
        squeeze_and_excite=0.5, image_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    model = helpers.randomize_batch_norm(keras.Model(inputs, keras.layers.Dense(10)(features)))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    assert np.abs(helpers.infer(model, x)).max() > 1e-2  # an output check means something
    gated = keras_stg.wrap(model, mode="post_training", granularity="channel", seed=0,
                           init_mu=0.5)
    assert sum(g.prunable for g in gated.groups) >= 8
    helpers.random_channel_masks(gated, keep=0.6, seed=1)
    small, info = keras_stg.shrink(gated.strip(), return_info=True)
    assert info["parameters_after"] < 0.8 * info["parameters_before"]
    reference = helpers.infer(gated, x)
    scale = float(np.abs(reference).max())
    assert helpers.max_diff(helpers.infer(small, x), reference) <= 1e-5 * scale


def test_reductions_and_padding_in_the_op_table():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, name="conv")(inputs)
    x = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    pooled = ops.mean(x, axis=(1, 2))
    y = keras.layers.Conv2D(4, 1, name="conv2")(inputs)
    y = ops.pad(y, ((0, 0), (0, 0), (0, 0), (0, 2)))  # pads the channel axis
    y = ops.max(y, axis=(1, 2))
    z = keras.layers.Conv2D(5, 1, name="conv3")(inputs)
    z = ops.mean(z, axis=-1)  # reduces the channel axis
    model = keras.Model(inputs, [keras.layers.Dense(2, name="head")(pooled),
                                 keras.layers.Dense(2, name="head2")(y),
                                 keras.layers.Flatten()(z)])
    groups = {g.members[0].layer.name: g for g in keras_stg.channel_groups(model)}
    assert groups["conv"].prunable
    assert "channel axis" in groups["conv2"].reason
    assert "channel axis" in groups["conv3"].reason


def test_keras_hub_dinov2_blocks_open():
    """keras-hub's DINOv2 layers hold `layers.Identity(dtype=policy)`, whose config Keras
    cannot write: rebuilt from its name and dtype, the layers open, and heads and MLP
    units become channel groups that shrink."""
    import keras_hub

    backbone = keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=2, hidden_dim=32, num_heads=2, intermediate_dim=64,
        image_shape=(28, 28, 3))
    inputs = keras.Input((28, 28, 3))
    features = keras.layers.GlobalAveragePooling1D()(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10)(features))
    opened, info = keras_stg.inline(model, return_info=True)
    assert info["kept"] == {} and any("layers_1_attention" in n for n in info["opened"])
    gated = keras_stg.wrap(model, mode="post_training", granularity="channel", seed=0,
                           init_mu=0.5)
    sizes = sorted(g.size for g in gated.groups if g.prunable)
    assert sizes.count(2) == 2 and sizes.count(64) == 2  # heads and MLP units, per layer
    helpers.random_channel_masks(gated, keep=0.5, seed=1)
    small, info = keras_stg.shrink(gated.strip(), return_info=True)
    assert info["parameters_after"] < info["parameters_before"]
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype("float32")
    reference = helpers.infer(gated, x)
    scale = float(np.abs(reference).max())
    assert helpers.max_diff(helpers.infer(small, x), reference) <= 1e-5 * scale
