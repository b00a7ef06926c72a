"""`keras_stg.channel_groups`: channels coupled through the graph, and why some are not prunable."""

import keras
import pytest

import keras_stg
from tests import helpers

L = keras.layers


def _group_of(groups, producer):
    (group,) = [g for g in groups if producer in [l.name for l in g.producers]]
    return group


def _roles(group):
    return {(m.layer.name, m.role, m.offset, m.repeat, m.period) for m in group.members}


def test_residual_adds_couple_the_shortcut_and_both_blocks():
    groups = keras_stg.channel_groups(helpers.tiny_resnet50())
    stage2 = _group_of(groups, "conv2_block1_0_conv")
    assert {l.name for l in stage2.producers} == {"conv2_block1_0_conv", "conv2_block1_3_conv",
                                                  "conv2_block2_3_conv"}
    assert stage2.prunable
    members = _roles(stage2)
    assert ("conv2_block1_0_bn", "per_channel", 0, 1, 0) in members
    assert ("conv2_block2_1_conv", "consumer", 0, 1, 0) in members  # the next block reads it
    assert ("conv2_block1_out", "elementwise", 0, 1, 0) in members
    inner = _group_of(groups, "conv2_block1_1_conv")
    assert inner.producers == [inner.members[0].layer] and inner.prunable


def test_depthwise_convolutions_share_their_input_channels():
    groups = keras_stg.channel_groups(helpers.tiny_mobilenet_v2())
    expand = _group_of(groups, "block_1_expand_conv")
    members = _roles(expand)
    assert ("block_1_depthwise", "depthwise", 0, 1, 0) in members
    assert ("block_1_project_conv", "consumer", 0, 1, 0) in members
    # block 2 adds its projection to block 1's: one group.
    assert {l.name for l in _group_of(groups, "block_1_project_conv").producers} == {
        "block_1_project_conv", "block_2_project_conv"}
    head = _group_of(groups, "predictions")
    assert not head.prunable and "softmax" in head.reason


def test_concat_offsets_se_coupling_and_flatten_rows():
    groups = keras_stg.channel_groups(helpers.se_concat_flatten())
    a, b = _group_of(groups, "a"), _group_of(groups, "b")
    assert ("bn", "per_channel", 0, 1, 0) in _roles(a) and ("bn", "per_channel", 4, 1, 0) in _roles(b)
    assert ("trunk", "consumer", 4, 1, 0) in _roles(b)
    assert ("se1", "consumer", 4, 1, 0) in _roles(b)  # through pooling and a channel-keeping reshape
    excite = _group_of(groups, "trunk")
    assert {l.name for l in excite.producers} == {"trunk", "se2"}  # the SE multiply couples them
    flat = _group_of(groups, "d")
    assert ("out", "consumer", 0, 64, 5) in _roles(flat)  # channel c at rows c + 5k, 64 positions
    assert all(g.prunable for g in (a, b, excite, flat))
    assert not _group_of(groups, "out").prunable


def test_a_concatenation_on_the_channel_axis_by_index_keeps_its_offsets():
    groups = keras_stg.channel_groups(helpers.dense_block())
    stem, grow0, grow1 = (_group_of(groups, n) for n in ("stem", "grow0", "grow1"))
    assert all(g.prunable for g in (stem, grow0, grow1))
    # cat0 = [stem 0-5, grow0 6-9]; cat1 = [cat0 0-9, grow1 10-13].
    assert {("bn1", "per_channel", 0, 1, 0), ("bn", "per_channel", 0, 1, 0),
            ("transition", "consumer", 0, 1, 0)} <= _roles(stem)
    assert {("bn1", "per_channel", 6, 1, 0), ("bn", "per_channel", 6, 1, 0)} <= _roles(grow0)
    assert ("transition", "consumer", 10, 1, 0) in _roles(grow1)
    tall = _group_of(groups, "transition")  # concatenated on a spatial axis: same channels
    assert tall.prunable and ("tall", "merge", 0, 1, 0) in _roles(tall)


def test_unknown_ops_outputs_and_shared_layers_are_unprunable_with_the_reason():
    inputs = keras.Input((6,))
    x = L.Dense(4, name="d1")(inputs)
    y = keras.ops.flip(x, axis=-1)  # an op the table does not know
    shared = L.Dense(4, name="shared")
    z = shared(L.Dense(4, name="d2")(inputs))
    z = shared(z)
    outputs = L.Dense(2, name="out")(L.Concatenate()([y, z]))
    groups = keras_stg.channel_groups(keras.Model(inputs, outputs))
    assert "'flip' (Flip): the operation Flip is not in keras_stg's layer table" in _group_of(
        groups, "d1").reason
    assert "shared layer" in _group_of(groups, "d2").reason
    assert _group_of(groups, "out").reason == "reaches a model output"
    assert "channel group of 4: unprunable" in str(_group_of(groups, "d1"))


def test_a_shared_layer_called_again_after_other_layers_is_listed():
    """The second call of a shared convolution reads a later layer's output: the walk
    follows the graph's depth order (it failed on this with a KeyError), and the shared
    layer's channels are listed as a group with the reason."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    shared = L.Conv2D(4, 3, padding="same", name="shared")
    x = shared(L.ReLU(name="relu")(shared(x)))
    outputs = L.Dense(2, name="out")(L.GlobalAveragePooling2D()(x))
    groups = keras_stg.channel_groups(keras.Model(inputs, outputs))
    shared_groups = [g for g in groups if g.members[0].layer.name == "shared"]
    assert len(shared_groups) == 2
    assert all("'shared' is a shared layer" in g.reason for g in shared_groups)
    assert "shared layer" in _group_of(groups, "stem").reason


def test_graph_operations_that_are_not_layers_carry_and_couple_channels():
    """`x + 3.0`, `x * y`, `keras.ops.relu(x)` in a Functional graph (MobileNetV3's hard
    swish and hard-sigmoid excitation, ConvNeXt's residual `x + y`) are operations, not
    layers: entry-wise with a scalar, a merge with two tensors."""
    groups = keras_stg.channel_groups(helpers.graph_ops())
    trunk = _group_of(groups, "stem")
    assert {l.name for l in trunk.producers} == {"stem", "se2", "branch"}
    assert trunk.prunable
    roles = {(type(m.layer).__name__, m.role) for m in trunk.members}
    assert {("Add", "elementwise"), ("Multiply", "elementwise"), ("Multiply", "merge"),
            ("Add", "merge"), ("Relu", "elementwise"), ("BatchNormalization", "per_channel"),
            ("Conv2D", "consumer")} <= roles
    assert _group_of(groups, "se1").prunable and _group_of(groups, "gate").prunable
    for name in ("num", "den"):
        assert "divides by a tensor" in _group_of(groups, name).reason
    assert "a constant of shape (4,)" in _group_of(groups, "offset").reason


def test_an_add_of_a_convolution_and_a_concatenation_splits_its_channels():
    groups = keras_stg.channel_groups(helpers.split_adds())
    by_producers = {tuple(sorted((m.layer.name, m.offset) for m in g.members
                                 if m.role == "producer")): g for g in groups}
    first, second, third = (by_producers[k] for k in (
        (("a", 0), ("b", 0), ("g", 0)), (("a", 2), ("b", 2), ("h", 0)),
        (("a", 4), ("c", 0), ("h", 2))))
    assert (first.size, second.size, third.size) == (2, 2, 4)
    assert all(g.prunable for g in (first, second, third))
    assert ("bn_cat", "per_channel", 4, 1, 0) in _roles(third)  # after the concat
    assert ("bn", "per_channel", 2, 1, 0) in _roles(second)  # after the add
    assert ("d", "consumer", 4, 1, 0) in _roles(third)
    assert ("g", "consumer", 0, 1, 0) in _roles(first)
    assert sum("a" in [layer.name for layer in g.producers] for g in groups) == 3


def test_a_channel_split_cuts_its_producers_channels_into_groups():
    """`keras.ops.split` on the channel axis: each part is its own group (the residual
    block couples only the first part), read by the consumer at the part's offset; a
    split along the height keeps the channels."""
    groups = keras_stg.channel_groups(helpers.channel_split())
    by_offset = {m.offset: g for g in groups for m in g.members
                 if m.layer.name == "exp" and m.role == "producer"}
    first, second = by_offset[0], by_offset[5]
    assert (first.size, second.size) == (5, 7)
    assert {l.name for l in first.producers} == {"exp", "block"}
    assert {l.name for l in second.producers} == {"exp"}
    assert first.prunable and second.prunable
    assert ("trans", "consumer", 0, 1, 0) in _roles(first)
    assert ("trans", "consumer", 5, 1, 0) in _roles(second)
    assert ("block", "consumer", 0, 1, 0) in _roles(first)
    assert ("bn", "per_channel", 5, 1, 0) in _roles(second)
    assert {m.offset for m in first.members + second.members if m.role == "split"} == {0, 5}
    trans = _group_of(groups, "trans")
    assert trans.prunable and trans.size == 6


def test_an_index_of_a_channel_range_cuts_its_producers_channels_into_groups():
    groups = keras_stg.channel_groups(helpers.channel_slices())
    by_offset = {m.offset: g for g in groups for m in g.members
                 if m.layer.name == "wide" and m.role == "producer"}
    assert sorted((o, g.size) for o, g in by_offset.items()) == [(0, 2), (2, 4), (6, 4)]
    assert all(g.prunable for g in by_offset.values())
    assert {l.name for l in by_offset[2].producers} == {"wide", "p"}
    assert ("mix", "consumer", 4, 1, 0) in _roles(by_offset[6])
    assert not [m for m in by_offset[0].members if m.role == "consumer"]  # read by nothing
    assert _group_of(groups, "mix").prunable  # through the crop


@pytest.mark.parametrize("index, reason", [
    (lambda t: t[:, 0], None),  # a class token: the channels stay
    (lambda t: t[..., ::2], "in steps of 2"),
    (lambda t: t[:1, :], "indexes the batch axis"),
    (lambda t: t[:, :, 3], "takes channel 3 alone"),
])
def test_indexing_keeps_or_stops_the_channels_with_the_reason(index, reason):
    inputs = keras.Input((5, 8))
    x = L.Dense(8, name="d")(inputs)
    model = keras.Model(inputs, L.Dense(2, name="out")(index(x)))
    group = _group_of(keras_stg.channel_groups(model), "d")
    assert group.prunable if reason is None else reason in group.reason


def test_a_split_or_concatenation_of_the_batch_axis_stops_its_channels():
    inputs = keras.Input((4, 4, 3))
    x = L.Conv2D(6, 1, name="c")(inputs)
    y = L.Conv2D(6, 1, name="d")(inputs)
    a, b = keras.ops.split(x, 2, axis=0)
    model = keras.Model(inputs, [L.Conv2D(2, 1, name="out")(a + b),
                                 L.Conv2D(2, 1, name="out2")(keras.ops.concatenate([y, y]))])
    groups = keras_stg.channel_groups(model)
    assert "splits the batch axis" in _group_of(groups, "c").reason
    assert "concatenates on axis 0, the batch axis" in _group_of(groups, "d").reason


def test_inception_resnet_v2s_own_scaled_residual_couples_its_inputs():
    groups = keras_stg.channel_groups(helpers.scale_residual())
    trunk = _group_of(groups, "x")
    assert {l.name for l in trunk.producers} == {"x", "up"} and trunk.prunable
    assert ("scaled_sum", "merge", 0, 1, 0) in _roles(trunk)
    assert _group_of(groups, "down").prunable


def test_register_op_takes_operations_that_are_not_layers():
    from keras_stg import _compat
    from keras_stg import layer_table

    with pytest.raises(TypeError, match="register_layer takes layers"):
        layer_table.register_op(keras.layers.ReLU, layer_table.ELEMENTWISE)
    (flip,) = _compat.operation_classes(["Flip"])
    with pytest.raises(ValueError, match="Unknown channel kind"):
        layer_table.register_op(flip, "sideways")


def test_channels_are_followed_into_nested_models():
    inner = keras.Sequential([keras.Input((8, 8, 4)), L.BatchNormalization(name="inner_bn"),
                              L.ReLU(name="inner_relu"), L.Conv2D(3, 1, name="inner_conv")],
                             name="inner")
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(4, 3, padding="same", name="outer")(inputs)
    outputs = L.Dense(2, name="out")(L.GlobalAveragePooling2D()(inner(x)))
    groups = keras_stg.channel_groups(keras.Model(inputs, outputs))
    outer = _group_of(groups, "outer")
    assert {("inner_bn", "per_channel"), ("inner_conv", "consumer")} <= {
        (m.layer.name, m.role) for m in outer.members}
    assert _group_of(groups, "inner_conv").prunable


def test_subclassed_models_are_a_clear_error():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = L.Dense(2)

        def call(self, x):
            return self.d(x)

    model = Sub()
    model(keras.ops.zeros((1, 3)))
    with pytest.raises(TypeError, match="subclassed model.*Functional or Sequential"):
        keras_stg.channel_groups(model)


def test_separable_transposed_convolutions_and_every_merge_couple_their_channels():
    groups = keras_stg.channel_groups(helpers.separable_transposed_merges())
    first = _group_of(groups, "sep")
    assert {l.name for l in first.producers} == {"sep", "up"}  # the Subtract couples them
    assert {("bn", "per_channel", 0, 1, 0), ("sep2", "consumer", 0, 1, 0)} <= _roles(first)
    assert _group_of(groups, "sep2").prunable
    assert {l.name for l in _group_of(groups, "c").producers} == {"c", "d"}  # max, min, average
    assert ("up2", "consumer", 0, 1, 0) in _roles(_group_of(groups, "c"))
    assert _group_of(groups, "up2").prunable
    normalized = _group_of(groups, "e")
    assert not normalized.prunable
    assert "GroupNormalization computes its statistics over the channels" in normalized.reason


@pytest.mark.parametrize("layer,shape", [
    (L.Conv1D(6, 3, name="p"), (10, 3)), (L.Conv3D(6, 3, name="p"), (6, 6, 6, 2)),
    (L.Conv1DTranspose(6, 3, name="p"), (10, 3)),
])
def test_1d_and_3d_producers_form_groups(layer, shape):
    inputs = keras.Input(shape)
    x = L.BatchNormalization(name="bn")(layer(inputs))
    x = L.ReLU()(x)
    x = type(layer)(4, 1, name="q")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(L.Flatten()(x)))
    group = _group_of(keras_stg.channel_groups(model), "p")
    assert group.prunable and ("q", "consumer", 0, 1, 0) in _roles(group)


def test_a_depthwise_convolution_written_with_groups_passes_its_channels_through():
    model = helpers.grouped_depthwise(four_per_group=True)
    groups = keras_stg.channel_groups(model)
    trunk = next(g for g in groups if "stem" in [m.layer.name for m in g.members])
    roles = {}
    for m in trunk.members:
        roles.setdefault(m.layer.name, set()).add(m.role)
    # The depthwise convolution passes the trunk's channels to `pw`, which reads and
    # writes the trunk (the residual add).
    assert trunk.prunable and roles["dw"] == {"depthwise"} and roles["stem"] == {"producer"}
    assert roles["pw"] == {"consumer", "producer"} and roles["expand"] == {"consumer"}
    assert roles["bn"] == {"per_channel"}
    # A depth multiplier (two outputs per group) and four channels per group stop
    # their input groups, with the reason.
    reasons = {g.producers[0].name: g.reason for g in groups}
    assert reasons["expand"].startswith("'dw_x2' (Conv2D): grouped convolutions are "
                                        "supported with one input and one output channel")
    assert reasons["project"].startswith("'grouped' (Conv2D): grouped convolutions")


def test_attention_heads_are_a_group_and_its_projections_read_their_inputs():
    groups = keras_stg.channel_groups(helpers.tiny_transformer())

    def members(group):
        return {(keras_stg.dependency.member_name(m), m.role, m.axis) for m in group.members}

    heads = [g for g in groups if any(m.owner is not None and m.axis == 1 for m in g.members)]
    assert [g.size for g in heads] == [4, 4] and all(g.prunable for g in heads)
    # Head h: axis 1 of the query, key and value kernels, axis 0 of the output kernel.
    assert members(heads[1]) == {("mha1/query", "producer", 1), ("mha1/key", "producer", 1),
                                 ("mha1/value", "producer", 1),
                                 ("mha1/attention_output", "consumer", 0)}
    # The key and value projections read `memory` (axis 0); the query reads the trunk.
    memory = _group_of(groups, "memory")
    assert memory.prunable and members(memory) == {
        ("memory", "producer", None), ("mha1/key", "consumer", 0),
        ("mha1/value", "consumer", 0)}
    # The output projection writes the residual trunk, which LayerNormalization keeps whole.
    trunk = _group_of(groups, "patches")
    assert ("mha0/attention_output", "producer", 2) in members(trunk)
    assert not trunk.prunable and "LayerNormalization" in trunk.reason
    assert "mha1/attention_output:producer" in str(trunk)


def test_gated_attention_stops_its_groups_with_the_reason():
    inputs = keras.Input((6, 8))
    x = L.Dense(8, name="embed")(inputs)
    x = L.MultiHeadAttention(2, 4, use_gate=True, name="mha")(x, x)
    model = keras.Model(inputs, L.Dense(2, name="out")(L.GlobalAveragePooling1D()(x)))
    groups = keras_stg.channel_groups(model)
    assert _group_of(groups, "embed").reason == (
        "'mha' (MultiHeadAttention): gated attention (use_gate=True) is not followed")
    assert not any(m.owner is not None for g in groups for m in g.members)
