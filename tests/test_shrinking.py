"""`keras_stg.shrink`: physical removal of pruned units, exact against the masked model."""

import keras
import numpy as np
import pytest

import keras_stg
from keras_stg.experiments import models
from keras_stg.shrinking import shrink
from tests import helpers


def _unit_ticket(model, seed=0, keep=0.5):
    gated = keras_stg.wrap(model, mode="slt", granularity="unit", seed=seed)
    return helpers.random_masks(gated, keep, seed)


def _bn_cnn():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, padding="valid", name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Activation("sigmoid")(x)  # f(0) != 0: removed units are constants
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="c3")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(12, activation="tanh", name="d1")(x)
    x = keras.layers.Dropout(0.1)(x)
    outputs = keras.layers.Dense(10, name="d2")(x)
    return keras.Model(inputs, outputs, name="bn_cnn")


@pytest.mark.parametrize("build", [_bn_cnn, lambda: models.conv4((16, 16, 1)),
                                   lambda: models.lenet_300_100((784,))])
def test_shrink_equals_masked_model(build):
    model = build()
    rng = np.random.default_rng(3)
    for layer in model.layers:  # BatchNormalization with non-trivial statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            for v in layer.weights:
                v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32")
                         * (1 if ("variance" in v.name or "gamma" in v.name)
                            else rng.choice([-1, 1], v.shape)))
    gated = _unit_ticket(model, seed=1)
    stripped = gated.strip()
    small, info = shrink(stripped, return_info=True)
    assert info["parameters_after"] < 0.75 * info["parameters_before"]
    assert any(after < before for before, after in info["units"].values())
    x, _ = helpers.batch(stripped, 6, seed=5)
    assert helpers.max_diff(helpers.infer(small, x), helpers.infer(stripped, x)) <= 1e-5
    assert helpers.max_diff(helpers.infer(small, x), helpers.infer(gated, x)) <= 1e-5
    assert small.output_shape == stripped.output_shape


def test_shrink_depthwise_chains_go_through_the_channel_groups():
    dw = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(6, 1, name="pw"),
                           keras.layers.DepthwiseConv2D(3, name="dw"),
                           keras.layers.Flatten(), keras.layers.Dense(2, name="out")])
    helpers.zero_channel_groups(dw, share=0.5, seed=3)
    small, info = shrink(dw, return_info=True)
    assert info["units"]["pw"][1] < 6 and small.get_layer("dw").kernel.shape[-2] < 6
    assert info["max_abs_diff"] <= 1e-6


def _check_exact(model, seed=0):
    gated = _unit_ticket(model, seed=seed)
    stripped = gated.strip()
    small, info = shrink(stripped, return_info=True)
    x, _ = helpers.batch(stripped, 6, seed=5)
    assert helpers.max_diff(helpers.infer(small, x), helpers.infer(stripped, x)) <= 1e-5
    return small, info


def test_shrink_through_padding_keeps_channels_a_padded_constant_would_change():
    """ZeroPadding after a BatchNormalization shift: a removed channel is a constant inside
    the image and zero on its border, so a valid conv after it cannot fold it; only the
    channels that are zero everywhere go."""
    inputs = keras.Input((10, 10, 2))
    x = keras.layers.Conv2D(8, 3, name="c1")(inputs)
    x = keras.layers.BatchNormalization(center=True, name="bn")(x)
    x = keras.layers.ZeroPadding2D(1, name="pad")(x)
    x = keras.layers.Conv2D(6, 3, name="c2")(x)
    outputs = keras.layers.Dense(3, name="out")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    beta = np.zeros(8, "float32")
    beta[:4] = 1.0  # channels 0-3 shifted: a constant after BN, not removable past the pad
    model.get_layer("bn").beta.assign(beta)
    gated = _unit_ticket(model, seed=0)
    mu = np.full(gated.gates[0].mu.shape, -0.5, "float32")  # close every c1 channel
    gated.gates[0].mu.assign(mu)
    stripped = gated.strip()
    small, info = shrink(stripped, return_info=True)
    assert info["units"]["c1"] == (8, 4)  # the four shifted channels stay
    x, _ = helpers.batch(stripped, 4, seed=1)
    assert helpers.max_diff(helpers.infer(small, x), helpers.infer(stripped, x)) <= 1e-5


def test_shrink_conv1d_chain_and_returns_a_plain_model(tmp_path):
    model = keras.Sequential([
        keras.Input((16, 3)), keras.layers.Conv1D(8, 3, activation="relu", name="a"),
        keras.layers.MaxPooling1D(2), keras.layers.Conv1D(8, 3, activation="relu", name="b"),
        keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(4, name="out")])
    small, info = _check_exact(model)
    assert info["units"]["a"][1] < 8 and info["units"]["b"][1] < 8
    assert small.get_layer("a").filters == info["units"]["a"][1]
    path = str(tmp_path / "small.keras")
    small.save(path)
    loaded = keras.models.load_model(path)  # plain Keras: nothing of keras_stg in it
    x, _ = helpers.batch(small, 3)
    assert helpers.max_diff(helpers.infer(loaded, x), helpers.infer(small, x)) == 0


def test_a_chain_classifier_with_a_softmax_output_shrinks():
    # The output layer keeps every unit, so its softmax (which mixes them) is no obstacle.
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu", name="c"),
        keras.layers.Flatten(), keras.layers.Dense(16, activation="relu", name="d"),
        keras.layers.Dense(10, activation="softmax", name="out")])
    small, info = _check_exact(model)
    assert info["units"]["c"][1] < 8 and info["units"]["d"][1] < 16
    assert small.get_layer("out").units == 10
    assert small.get_layer("out").get_config()["activation"] == "softmax"


def test_an_unknown_layer_makes_its_channels_unprunable_and_says_so():
    class Odd(keras.layers.Layer):
        def call(self, x):
            return x[..., ::-1]

    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="d"),
                              Odd(name="odd"), keras.layers.Dense(2)])
    with pytest.warns(UserWarning, match="shrink removed nothing.*'odd' \\(Odd\\).*layer table"):
        small, info = shrink(model, return_info=True)
    assert info["parameters_after"] == info["parameters_before"]
    assert any("'odd' (Odd)" in reason for reason in info["unprunable"])


@pytest.mark.parametrize("build", [helpers.tiny_resnet50, helpers.tiny_mobilenet_v2,
                                   helpers.se_concat_flatten, helpers.dense_block,
                                   helpers.graph_ops, helpers.split_adds,
                                   helpers.scale_residual, helpers.channel_split,
                                   helpers.channel_slices],
                         ids=["resnet", "mobilenet_v2", "se_concat_flatten", "dense_block",
                              "graph_ops", "split_adds", "scale_residual", "channel_split",
                              "channel_slices"])
def test_graph_shrink_removes_coupled_zero_channels_exactly(build, tmp_path):
    model = build()
    rng = np.random.default_rng(0)
    for layer in model.layers:  # non-trivial normalization statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.uniform(-1, 1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2, layer.moving_variance.shape))
    helpers.zero_channel_groups(model, share=0.5, seed=1)
    small, info = shrink(model, return_info=True)
    assert info["parameters_after"] < 0.8 * info["parameters_before"]
    assert info["max_abs_diff"] <= 1e-5
    x, _ = helpers.batch(model, 4, seed=2)
    assert helpers.max_diff(helpers.infer(small, x), helpers.infer(model, x)) <= 1e-5
    before, after = next(iter(info["units"].values()))
    assert after < before
    path = str(tmp_path / "small.keras")
    small.save(path)
    assert helpers.max_diff(helpers.infer(keras.models.load_model(path), x),
                            helpers.infer(small, x)) == 0


def test_graph_shrink_keeps_a_channel_that_a_shift_makes_non_zero():
    inputs = keras.Input((6, 6, 2))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    a = keras.layers.BatchNormalization(name="bn")(a)
    b = keras.layers.Conv2D(4, 1, name="b")(inputs)
    x = keras.layers.Add()([a, b])
    outputs = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    for layer in (model.get_layer("a"), model.get_layer("b")):  # every channel's kernels zero
        layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
    beta = np.zeros(4, "float32")
    beta[1] = 0.5  # channel 1 is 0.5 after the normalization, not 0
    model.get_layer("bn").beta.assign(beta)
    small, info = shrink(model, return_info=True)
    assert info["units"]["a"] == (4, 1) and small.get_layer("a").filters == 1
    x, _ = helpers.batch(model, 3)
    assert helpers.max_diff(helpers.infer(small, x), helpers.infer(model, x)) <= 1e-6


def test_graph_shrink_of_a_full_keras_application():
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)
    helpers.zero_channel_groups(model, share=0.5, seed=0)
    small, info = shrink(model, return_info=True)  # checks the outputs itself
    assert info["parameters_after"] < 0.6 * info["parameters_before"]
    assert info["max_abs_diff"] <= 1e-5


def test_channel_gates_shrink_a_channel_split_and_move_its_cut():
    """The parts of a split channel space get a gate each; the shrunk model splits its
    smaller input where the first part's kept channels end."""
    model = helpers.channel_split()
    gated = keras_stg.wrap(model, mode="post_training", granularity="channel", seed=0)
    assert sorted(g.mu.shape[0] for g in gated.gates) == [5, 6, 7]
    rng = np.random.default_rng(0)
    for gate in gated.gates:
        mu = np.where(rng.random(gate.mu.shape) < 0.5, 0.5, -0.5).astype("float32")
        mu[0], mu[-1] = 0.5, -0.5
        gate.mu.assign(mu)
    kept = {g.mu.shape[0]: int((g.mu.numpy() > 0).sum()) for g in gated.gates}
    small, info = shrink(gated.strip(), return_info=True)
    x, _ = helpers.batch(model, 4)
    assert helpers.max_diff(helpers.infer(small, x), helpers.infer(gated, x)) <= 1e-5
    assert small.get_layer("exp").filters == kept[5] + kept[7]
    assert small.get_layer("block").filters == kept[5]
    assert small.get_layer("trans").kernel.shape[-2:] == (kept[5] + kept[7], kept[6])
    # The uneven channel split became two indexes (the height split stays a split).
    assert [op.indices_or_sections for op in small.operations
            if type(op).__name__ == "Split"] == [2]
    assert sum(type(op).__name__ == "GetItem" for op in small.operations) == 2
    assert info["unprunable"] == ["out: reaches a model output"]


def test_a_shrunk_uneven_channel_split_stays_edge_tpu_ready():
    """An uneven split converts to TFLite's SPLIT_V, which the Edge TPU lacks: the shrunk
    model cuts with indexes (STRIDED_SLICE) instead; the split of the height into equal
    parts stays a SPLIT, whose constant axis operand is no activation."""
    from export import edgetpu, tflite

    model = helpers.channel_split()
    gated = keras_stg.wrap(model, mode="post_training", granularity="channel", seed=0)
    for gate in gated.gates:
        mu = np.full(gate.mu.shape, 0.5, "float32")
        mu[1:3] = -0.5  # every group loses two channels: parts of 3 and 5
        gate.mu.assign(mu)
    small = shrink(gated.strip())
    x, _ = helpers.batch(model, 8)
    data = tflite.convert(small, int8=True, representative=x)
    assert [str(p) for p in edgetpu.check(data)] == []


def test_a_gated_linear_unit_couples_the_halves_of_its_split_and_shrinks():
    """SwiGLU (DINOv2's MLP, Llama's): one Dense's output split in halves that multiply,
    so its unit c and unit c + h are one channel: one gate, removed together."""
    inputs = keras.Input((5, 8))
    x1, x2 = keras.ops.split(keras.layers.Dense(12, name="up")(inputs), 2, axis=-1)
    hidden = keras.ops.silu(x1) * x2
    outputs = keras.layers.Dense(3, name="out")(keras.layers.Dense(8, name="down")(hidden))
    model = keras.Model(inputs, outputs)
    gated = keras_stg.wrap(model, mode="post_training", granularity="channel", seed=0)
    (group,) = [g for g in gated.groups if "up" in [l.name for l in g.producers]]
    assert group.size == 6 and group.prunable
    assert {(m.layer.name, m.offset) for m in group.members if m.role == "producer"} == {
        ("up", 0), ("up", 6)}
    gate = gated.gates[gated.groups.index(group)]
    gate.mu.assign(np.array([0.5, -0.5, 0.5, -0.5, -0.5, 0.5], "float32"))
    small, info = shrink(gated.strip(), return_info=True)
    assert info["units"]["up"] == (12, 6) and small.get_layer("down").kernel.shape[0] == 3
    x, _ = helpers.batch(model, 4)
    assert helpers.max_diff(helpers.infer(small, x), helpers.infer(gated, x)) <= 1e-5


def test_channel_gates_shrink_separable_and_transposed_convolutions_exactly():
    model = helpers.separable_transposed_merges()
    gated = keras_stg.wrap(model, mode="post_training", granularity="channel", seed=0)
    rng = np.random.default_rng(0)
    for gate in gated.gates:  # every group keeps some channels and loses some
        mu = np.where(rng.random(gate.mu.shape) < 0.5, 0.5, -0.5).astype("float32")
        mu[0], mu[-1] = 0.5, -0.5
        gate.mu.assign(mu)
    small, info = shrink(gated.strip(), return_info=True)
    x, _ = helpers.batch(model, 4)
    assert helpers.max_diff(helpers.infer(small, x), helpers.infer(gated, x)) <= 1e-5
    kept = {name: int((gate.mu.numpy() > 0).sum()) for name, gate in
            zip(("sep", "sep2", "c", "up2"), gated.gates)}
    assert small.get_layer("sep").filters == small.get_layer("up").filters == kept["sep"]
    # The second separable convolution loses each removed input's 2 pointwise rows.
    assert small.get_layer("sep2").pointwise_kernel.shape[-2] == 2 * kept["sep"]
    assert small.get_layer("up2").kernel.shape[-2:] == (kept["up2"], kept["c"])
    assert any("statistics over the channels" in r for r in info["unprunable"])
    from keras_stg import layer_table

    weights = sum(int(np.prod(v.shape)) for layer in small.layers
                  for k, v in layer_table.channel_kernels(layer))
    assert weights == sum(int(m.sum()) for m in gated.masks())


def test_shrink_and_strip_of_models_compiled_with_a_custom_schedule():
    class Halving(keras.optimizers.schedules.LearningRateSchedule):  # not registered
        def __call__(self, step):
            return 1e-3 * 0.5 ** keras.ops.cast(step, "float32")

    model = helpers.tiny_resnet50()
    model.compile(optimizer=keras.optimizers.Adam(Halving()), loss="mse")
    x, _ = helpers.batch(model, 2)
    model.train_on_batch(x, np.zeros((2, 10), "float32"))
    helpers.zero_channel_groups(model, share=0.5, seed=0)
    small = shrink(model)
    assert not small.compiled and model.compiled
    gated = keras_stg.wrap(helpers.tiny_resnet50(), mode="joint", granularity="channel", seed=0)
    gated.base_model.compile(optimizer=keras.optimizers.Adam(Halving()), loss="mse")
    assert not gated.strip().compiled


@pytest.mark.parametrize("multiple", [4, 8])
def test_shrink_rounds_kept_channels_up_to_a_multiple(multiple):
    model = helpers.tiny_resnet50()
    helpers.zero_channel_groups(model, share=0.6, seed=3)
    plain = shrink(model)
    small, info = shrink(model, return_info=True, channel_multiple=multiple)
    x, _ = helpers.batch(model, 3)
    assert helpers.max_diff(helpers.infer(small, x), helpers.infer(model, x)) <= 1e-5
    for name, (before, after) in info["units"].items():
        assert after % multiple == 0 or after == before, (name, after)
        assert after >= plain.get_layer(name).filters
    assert info["parameters_after"] < info["parameters_before"]
    # The chain path rounds too (LeNet's units, the output layer whole).
    gated = _unit_ticket(models.lenet_300_100((784,)), keep=0.3)
    chain = shrink(gated.strip(), channel_multiple=multiple)
    dense = [l for l in chain.layers if isinstance(l, keras.layers.Dense)]
    assert [l.units % multiple for l in dense[:2]] == [0, 0] and dense[2].units == 10
    with pytest.raises(ValueError, match="`channel_multiple` must be an integer >= 1"):
        shrink(model, channel_multiple=0)


@pytest.mark.parametrize("axis,in_config,graph", [(-1, True, False), (3, True, False),
                                                  (3, False, False), (3, True, True),
                                                  (-1, False, True)])
def test_shrink_through_a_preprocessing_normalization_on_the_channel_axis(axis, in_config,
                                                                         graph):
    # Built with `mean=`/`variance=` the layer keeps them in its config, else in weights.
    rng = np.random.default_rng(0)
    mean = rng.uniform(-1, 1, 8)
    mean[:3] = 0.0  # channels 0-2 then map zero to zero
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(8, 3, padding="same", name="a")(inputs)
    norm = keras.layers.Normalization(axis=axis, mean=mean if in_config else None,
                                      variance=rng.uniform(0.5, 2, 8) if in_config else None,
                                      name="norm")
    if not in_config:
        norm.adapt(rng.normal(size=(16, 6, 6, 8)).astype("float32"))
        norm.adapt_mean.assign(mean.astype("float32"))
        norm.finalize_state()
    x = norm(x)
    x = keras.layers.Conv2D(4, 1, name="b")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    if graph:  # a branch: the graph path, which keeps a channel a shift makes non-zero
        pooled = keras.layers.Concatenate()([pooled, keras.layers.Dense(3)(pooled)])
    outputs = keras.layers.Dense(2, name="out")(pooled)
    model = keras.Model(inputs, outputs)
    (group,) = [g for g in keras_stg.channel_groups(model) if g.producers[0].name == "a"]
    assert group.prunable and "norm" in {m.layer.name for m in group.members}
    kernel = model.get_layer("a").kernel.numpy()
    kernel[..., :4] = 0.0  # channel 3 is a non-zero constant after the shift
    model.get_layer("a").kernel.assign(kernel)
    model.get_layer("a").bias.assign(np.zeros(8, "float32"))
    small, info = shrink(model, return_info=True)  # checks the outputs itself
    kept = 5 if graph else 4  # a chain folds the constant into b's bias
    assert small.get_layer("a").filters == kept and small.get_layer("b").kernel.shape[2] == kept
    assert info["max_abs_diff"] <= 1e-5


def test_a_model_with_token_and_mask_inputs_shrinks_through_its_attention():
    tokens = keras.Input((10,), dtype="int32")
    mask = keras.Input((10, 10), dtype="bool")
    x = keras.layers.Dense(16, name="pre")(keras.layers.Embedding(50, 16)(tokens))
    x = keras.layers.MultiHeadAttention(4, 4, name="mha")(x, x, attention_mask=mask,
                                                          use_causal_mask=True)
    x = keras.layers.Dense(16, name="post")(x)
    outputs = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling1D()(x))
    model = keras.Model([tokens, mask], outputs)
    gated = keras_stg.wrap(model, mode="post_training", granularity="channel", seed=0,
                           init_mu=0.5)
    helpers.random_channel_masks(gated, keep=0.6, seed=1)
    inputs = [np.random.default_rng(0).integers(0, 50, (4, 10)).astype("int32"),
              np.random.default_rng(1).random((4, 10, 10)) < 0.8]
    reference = np.asarray(gated(inputs, training=False))
    small, info = shrink(gated.strip(), return_info=True)  # checked on its own probe too
    assert np.abs(np.asarray(small(inputs)) - reference).max() <= 1e-5
    heads = info["units"]["mha/value"]
    assert heads[1] < heads[0] == 4 and small.get_layer("mha").num_heads == heads[1]
    assert info["units"]["pre"][1] < 16 and info["units"]["post"][1] < 16
