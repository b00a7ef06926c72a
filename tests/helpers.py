"""Shared model builders and the invariants every gated model must keep."""

import os

import keras
from keras import ops
import numpy as np

import keras_stg
from keras_stg.experiments import models


def lenet():
    return models.lenet_300_100(input_shape=(28, 28, 1))


def cnn_bn():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.SeparableConv2D(12, 3, padding="same", name="sep")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2DTranspose(6, 3, strides=2, padding="same", name="up")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.1)(x)
    outputs = keras.layers.Dense(10, name="head")(x)
    return keras.Model(inputs, outputs, name="cnn_bn")


def _conv_bn(x, filters, kernel, name, strides=1, padding="same", use_bias=True,
             activation="relu"):
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding=padding,
                            use_bias=use_bias, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_bn")(x)
    if activation == "relu6":
        return keras.layers.ReLU(6.0, name=f"{name}_relu")(x)
    return keras.layers.Activation(activation, name=f"{name}_relu")(x) if activation else x


def tiny_mobilenet_v2():
    """MobileNetV2's structure in two inverted-residual blocks.

    As keras.applications.MobileNetV2 builds it: a strided stem, then a
    strided block (1x1 expansion, ZeroPadding2D + valid 3x3 depthwise, 1x1
    linear projection, no residual) and a stride-1 block whose projection is
    added to its input; a 1x1 head conv, global pooling and a softmax
    classifier. Convs have no bias, BatchNormalization is affine, ReLU6.
    """
    inputs = keras.Input((32, 32, 3))
    x = _conv_bn(inputs, 8, 3, "Conv1", strides=2, use_bias=False, activation="relu6")
    for block, stride in ((1, 2), (2, 1)):
        name = f"block_{block}"
        shortcut = x
        y = _conv_bn(x, 48, 1, f"{name}_expand", use_bias=False, activation="relu6")
        if stride == 2:
            y = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"{name}_pad")(y)
        y = keras.layers.DepthwiseConv2D(3, strides=stride, use_bias=False,
                                         padding="same" if stride == 1 else "valid",
                                         name=f"{name}_depthwise")(y)
        y = keras.layers.BatchNormalization(name=f"{name}_depthwise_BN")(y)
        y = keras.layers.ReLU(6.0, name=f"{name}_depthwise_relu")(y)
        y = _conv_bn(y, 8, 1, f"{name}_project", use_bias=False, activation=None)
        x = keras.layers.Add(name=f"{name}_add")([shortcut, y]) if stride == 1 else y
    x = _conv_bn(x, 16, 1, "Conv_1", use_bias=False, activation="relu6")
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny_mobilenet_v2")


def tiny_resnet50():
    """ResNet50's structure at two stages of two bottleneck blocks, 8-32 channels.

    As keras.applications.ResNet50 builds it: ZeroPadding2D + 7x7 stride-2
    stem conv with bias, affine BatchNormalization, max-pooling; per stage a
    block with a projection shortcut (1x1 conv + BN) and an identity block,
    each 1x1 -> 3x3 -> 1x1 with BN, `Add` and ReLU; global pooling and a
    softmax classifier.
    """
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = _conv_bn(x, 8, 7, "conv1", strides=2, padding="valid")
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, (filters, stride) in enumerate(((4, 1), (8, 2)), start=2):
        for block in (1, 2):
            name = f"conv{stage}_block{block}"
            first = block == 1
            shortcut = (_conv_bn(x, 4 * filters, 1, f"{name}_0", strides=stride,
                                 activation=None) if first else x)
            y = _conv_bn(x, filters, 1, f"{name}_1", strides=stride if first else 1)
            y = _conv_bn(y, filters, 3, f"{name}_2")
            y = _conv_bn(y, 4 * filters, 1, f"{name}_3", activation=None)
            x = keras.layers.Add(name=f"{name}_add")([shortcut, y])
            x = keras.layers.Activation("relu", name=f"{name}_out")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny_resnet50")


def keras_mobilenet_v2():
    """The real keras.applications.MobileNetV2 (alpha 0.35, 32x32): 155 layers."""
    return keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), classes=10, alpha=0.35
    )


def keras_resnet50():
    """The real keras.applications.ResNet50 at 32x32: 23.6M weights."""
    return keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)


def vit():
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32,
    )
    inputs = keras.Input((16, 16, 3))
    outputs = keras.layers.Dense(10, name="head")(backbone(inputs)[:, 0])
    return keras.Model(inputs, outputs, name="vit")


def swin():
    import keras_hub

    backbone = keras_hub.models.SwinTransformerBackbone(
        image_shape=(16, 16, 3), embed_dim=8, depths=(1, 1), num_heads=(2, 2),
        window_size=2, patch_size=2,
    )
    inputs = keras.Input((16, 16, 3))
    features = keras.ops.mean(backbone(inputs), axis=1)
    outputs = keras.layers.Dense(10, name="head")(features)
    return keras.Model(inputs, outputs, name="swin")


MODELS = {
    "lenet": lenet,
    "cnn_bn": cnn_bn,
    "tiny_mobilenet_v2": tiny_mobilenet_v2,
    "tiny_resnet50": tiny_resnet50,
    "vit": vit,
    "swin": swin,
}


def batch(model, n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + tuple(model.input_shape[1:])).astype("float32")
    y = rng.integers(0, 10, size=n)
    return x, y


def compile_gated(gated, lr=0.05):
    gated.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return gated


def infer(model, x):
    """Inference outputs (an eager call: no retracing as `predict` would do)."""
    return np.asarray(model(x, training=False))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def check_invariants(gated, x, y, tmp_path, steps=4):
    """Trains a few steps and checks every promise a gated model makes.

    Returns the history of the first `fit`.
    """
    mode = gated.mode
    base = gated.base_model
    originally_trainable = list(gated.frozen) if mode != "joint" else list(
        base.trainable_variables
    )
    before = {id(v): np.array(v.numpy()) for v in base.weights}
    # Spread the gates around the threshold so that a few steps leave a mask
    # with both kept and removed weights.
    rng = np.random.default_rng(1)
    for g in gated.gates:
        g.mu.assign(rng.uniform(-0.3, 0.3, g.mu.shape).astype("float32"))
    mu_before = [np.array(g.mu.numpy()) for g in gated.gates]

    history = gated.fit(x, y, batch_size=max(1, len(x) // steps), epochs=1, verbose=0)
    for key in ("loss", "sparsity", "expected_l0", "lam"):
        assert key in history.history, f"fit did not log {key!r}"

    # Frozen weights bit-identical; joint mode trains the kernels.
    if mode == "joint":
        changed = [
            v for v in originally_trainable if not np.array_equal(before[id(v)], v.numpy())
        ]
        assert changed, "joint mode left every weight untouched"
    else:
        assert originally_trainable, "nothing was frozen"
        for v in originally_trainable:
            np.testing.assert_array_equal(
                before[id(v)], v.numpy(), err_msg=f"frozen weight {v.path} changed"
            )
        trainable_ids = {id(v) for v in gated.trainable_variables}
        assert trainable_ids == {id(g.mu) for g in gated.gates}

    # Gates moved, masks are binary, inference uses exactly kernel * mask.
    moved = [not np.array_equal(a, g.mu.numpy()) for a, g in zip(mu_before, gated.gates)]
    assert any(moved), "no gate moved during fit"
    masks = gated.masks()
    for m, t in zip(masks, gated.targets):
        assert m.dtype == bool and m.shape == tuple(t.variable.shape)
    sparsity = gated.sparsity()
    assert 0.0 < sparsity < 1.0, f"masks are trivial (sparsity {sparsity})"
    kept = sum(int(m.sum()) for m in masks)
    total = sum(m.size for m in masks)
    assert abs((1 - kept / total) - sparsity) < 1e-6

    # Strip: plain model, no gate state, same inference outputs.
    y_gated = infer(gated, x)
    pruned = gated.strip()
    assert not isinstance(pruned, keras_stg.GatedModel)
    assert all("mu" != v.name for v in pruned.weights)
    assert len(pruned.weights) == len(base.weights)
    assert all(v.trainable for v in pruned.weights if "moving" not in v.name)
    assert max_diff(infer(pruned, x), y_gated) <= 1e-5
    for t, m in zip(gated.targets, masks):
        stripped = next(
            w for w, src in zip(pruned.weights, base.weights) if src is t.variable
        )
        assert np.all(stripped.numpy()[~m] == 0), f"{t.name}: pruned weights not zero"

    # .keras round trips: gated (masks, outputs, training continues) and stripped.
    path = os.path.join(tmp_path, "gated.keras")
    gated.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_stg.GatedModel)
    assert loaded.mode == mode
    for a, b in zip(masks, loaded.masks()):
        np.testing.assert_array_equal(a, b)
    assert max_diff(infer(loaded, x), y_gated) <= 1e-5
    # Training continues from the loaded state: one eager step (the graph step
    # was traced and checked above; tracing it again is most of a case's time).
    loaded.run_eagerly = True
    mu_loaded = [np.array(g.mu.numpy()) for g in loaded.gates]
    loaded.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    assert any(not np.array_equal(a, g.mu.numpy()) for a, g in zip(mu_loaded, loaded.gates))

    if str(gated.granularity) == "channel":
        # Closed channels are zero wherever they flow: shrink removes exactly them.
        small, info = keras_stg.shrink(pruned, return_info=True)
        scale = max(1.0, float(np.max(np.abs(y_gated))))
        assert max_diff(infer(small, x), y_gated) <= 1e-5 * scale
        from keras_stg import layer_table

        kernels = sum(int(np.prod(v.shape)) for layer in small._flatten_layers()
                      if layer_table.kernels(layer) for v in layer.weights
                      if v.name in ("kernel", "depthwise_kernel"))
        # A group with every channel closed keeps one (no layer has zero width).
        whole = not any(np.all(g.mask() == 0) for g in gated.gates)
        assert kernels == kept if whole else kernels >= kept, (kernels, kept)

    stripped_path = os.path.join(tmp_path, "stripped.keras")
    pruned.save(stripped_path)
    reloaded = keras.models.load_model(stripped_path)
    assert max_diff(infer(reloaded, x), y_gated) <= 1e-5
    return history


def random_masks(gated, keep=0.5, seed=0, skip=()):
    """Sets every gate to a random binary mask keeping about `keep` of it."""
    rng = np.random.default_rng(seed)
    for gate, target in zip(gated.gates, gated.targets):
        if target.path.split("/")[-1] in skip:
            continue
        mu = np.where(rng.random(gate.mu.shape) < keep, 0.5, -0.5).astype("float32")
        gate.mu.assign(mu)
    return gated


def mlp():
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, name="a"), keras.layers.Dense(3, name="b")],
        name="mlp",
    )


def big_mlp():
    return keras.Sequential(
        [keras.Input((200,)), keras.layers.Dense(100, name="a"), keras.layers.Dense(10, name="b")]
    )


def zero_channel_groups(model, share=0.5, seed=0):
    """Zeroes a random `share` of every prunable channel group's channels where a
    channel gate would: producers' kernel slices and biases, normalization gamma and
    beta, depthwise biases (the channel is then zero everywhere it flows)."""
    from keras_stg.dependency import channel_groups

    rng = np.random.default_rng(seed)
    zeroed = {}
    for group in channel_groups(model):
        if not group.prunable:
            continue
        dead = np.flatnonzero(rng.random(group.size) < share)
        zeroed[id(group.members[0].layer)] = dead
        group.zero(dead)
    return zeroed


def se_concat_flatten():
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(6, 3, padding="same", name="b")(inputs)
    x = keras.layers.Concatenate(name="cat")([a, b])
    x = keras.layers.BatchNormalization(name="bn")(x)
    se = keras.layers.GlobalAveragePooling2D(name="squeeze")(x)
    se = keras.layers.Reshape((1, 1, 10), name="reshape")(se)
    se = keras.layers.Conv2D(3, 1, activation="relu", name="se1")(se)
    se = keras.layers.Conv2D(10, 1, activation="sigmoid", name="se2")(se)
    y = keras.layers.Conv2D(10, 1, name="trunk")(x)
    y = keras.layers.Multiply(name="excite")([y, se])
    z = keras.layers.Conv2D(5, 1, name="d")(y)
    outputs = keras.layers.Dense(2, name="out")(keras.layers.Flatten(name="flat")(z))
    return keras.Model(inputs, outputs)


def dense_block():
    """A DenseNet block as `keras.applications.DenseNet121` builds it: each layer's
    output concatenated to its input on `axis=3` (the channel axis, named by index),
    then BatchNormalization, ReLU and a 1x1 convolution; and a concatenation on a
    spatial axis (1), which does not keep channels apart."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    for i in range(2):
        y = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        y = keras.layers.ReLU()(y)
        y = keras.layers.Conv2D(4, 3, padding="same", name=f"grow{i}")(y)
        x = keras.layers.Concatenate(axis=3, name=f"cat{i}")([x, y])
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(5, 1, name="transition")(keras.layers.ReLU()(x))
    tall = keras.layers.Concatenate(axis=1, name="tall")([x, x])
    outputs = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling2D()(tall))
    return keras.Model(inputs, outputs)


def graph_ops():
    """Channels through graph operations that are not layers, as MobileNetV3 and ConvNeXt
    build them: a hard swish (`x * relu6(x + 3.0) * (1 / 6)`), a hard-sigmoid
    squeeze-and-excitation, a residual `x + y` of two tensors, `keras.ops` activations;
    and two the channels cannot pass: a division by a tensor and a per-channel constant."""
    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization(name="bn")(L.Conv2D(6, 3, padding="same", name="stem")(inputs))
    x = x * L.ReLU(6.0, name="hs_relu6")(x + 3.0) * (1.0 / 6.0)
    se = L.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    se = L.Conv2D(3, 1, activation="relu", name="se1")(se)
    se = L.Conv2D(6, 1, name="se2")(se)
    se = L.ReLU(6.0, name="hsig_relu6")(se + 3.0) * (1.0 / 6.0)
    x = L.Multiply(name="excite")([x, se])
    x = keras.ops.relu(x + L.Conv2D(6, 1, name="branch")(x))
    ratio = L.Conv2D(4, 1, name="num")(x) / (keras.ops.abs(L.Conv2D(4, 1, name="den")(x)) + 1.0)
    shifted = L.Conv2D(4, 1, name="offset")(x) + np.arange(4, dtype="float32")
    x = L.Concatenate(name="cat")([ratio, shifted, keras.ops.sigmoid(L.Conv2D(5, 1, name="gate")(x))])
    outputs = L.Dense(2, name="out")(L.GlobalAveragePooling2D()(L.Conv2D(3, 1, name="mix")(x)))
    return keras.Model(inputs, outputs, name="graph_ops")


def split_adds():
    """Residual adds of a convolution's output and concatenations (NASNet's cells):
    `a` (8 channels) + [b (4), c (4)] makes channels 0-3 of `a` the same channels as
    `b`'s and 4-7 as `c`'s; that sum + [g (2), h (6)] cuts them again at 2."""
    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inputs)
    bc = L.Concatenate(name="cat")([L.Conv2D(4, 1, name="b")(inputs),
                                    L.Conv2D(4, 3, padding="same", name="c")(inputs)])
    x = L.Add(name="add")([a, L.BatchNormalization(name="bn_cat")(bc)])
    x = L.ReLU()(L.BatchNormalization(name="bn")(x))
    gh = L.Concatenate(name="cat2")([L.Conv2D(2, 1, name="g")(x), L.Conv2D(6, 1, name="h")(x)])
    x = L.Add(name="add2")([gh, x])
    outputs = L.Dense(2, name="out")(L.GlobalAveragePooling2D()(L.Conv2D(5, 1, name="d")(x)))
    return keras.Model(inputs, outputs, name="split_adds")


def channel_split():
    """A cross-stage-partial stage (CSPNet, YOLO's C2f): `exp` (12 channels) split into
    its first 5 channels, which a residual block adds to, and the other 7, concatenated
    back; a split along a spatial axis after it keeps the channels."""
    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization(name="bn")(L.Conv2D(12, 3, padding="same",
                                                          name="exp")(inputs)))
    part, cross = keras.ops.split(x, [5], axis=-1)
    block = L.Conv2D(5, 3, padding="same", name="block")(part)
    x = L.Concatenate(name="cat")([L.Add(name="res")([part, block]), cross])
    x = L.Conv2D(6, 1, name="trans")(x)
    top, bottom = keras.ops.split(x, 2, axis=1)
    x = L.Concatenate(axis=1, name="rows")([bottom, top])
    outputs = L.Dense(2, name="out")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="channel_split")


def channel_slices():
    """Channel ranges taken by indexing (`x[..., a:b]`, GhostNet's and many a hand-written
    CSP block's way): `wide` (10 channels) read as channels 2-5, which a residual block
    adds to, and 6-9, concatenated back (channels 0-1 are read by nothing); a crop of the
    rows and columns by index keeps the channels."""
    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization(name="bn")(L.Conv2D(10, 3, padding="same",
                                                          name="wide")(inputs)))
    part, rest = x[..., 2:6], x[:, :, :, 6:]
    x = L.Concatenate(name="cat")([L.Add(name="res")([part, L.Conv2D(4, 1, name="p")(part)]),
                                   rest])
    x = L.Conv2D(6, 1, name="mix")(x)[:, 1:-1, 1:-1]
    outputs = L.Dense(2, name="out")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="channel_slices")


def scale_residual():
    """InceptionResNetV2's residual, its own `CustomScaleLayer` (`x + branch * scale`)."""
    from keras_stg import _compat

    L = keras.layers
    scale_sum = _compat.application_layer("inception_resnet_v2", "CustomScaleLayer")
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization(name="bn")(L.Conv2D(6, 3, padding="same", name="x")(inputs)))
    branch = L.Conv2D(6, 1, name="up")(L.Conv2D(4, 1, activation="relu", name="down")(x))
    x = scale_sum(scale=0.17, name="scaled_sum")([x, branch])
    outputs = L.Dense(2, name="out")(L.GlobalAveragePooling2D()(L.Conv2D(5, 1, name="d")(x)))
    return keras.Model(inputs, outputs, name="scale_residual")


def separable_transposed_merges():
    """Separable (depth multiplier 2) and transposed convolutions coupled by a `Subtract`,
    two producers tied by `Maximum`, `Minimum` and `Average`, a GroupNormalization (whose
    statistics run over its channels) and a pooled Dense head."""
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.SeparableConv2D(6, 3, padding="same", depth_multiplier=2, name="sep")(inputs)
    b = keras.layers.Conv2DTranspose(6, 3, padding="same", name="up")(inputs)
    x = keras.layers.Subtract(name="sub")([a, b])
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.SeparableConv2D(4, 3, padding="same", depth_multiplier=2, name="sep2")(x)
    c = keras.layers.Conv2D(5, 1, name="c")(x)
    d = keras.layers.Conv2D(5, 1, name="d")(x)
    y = keras.layers.Average(name="avg")([keras.layers.Maximum(name="max")([c, d]),
                                          keras.layers.Minimum(name="min")([c, d])])
    y = keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same", name="up2")(y)
    z = keras.layers.GroupNormalization(groups=1, name="gn")(keras.layers.Conv2D(4, 1, name="e")(y))
    outputs = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling2D()(z))
    return keras.Model(inputs, outputs, name="separable_transposed_merges")


def grouped_depthwise(four_per_group=False):
    """Depthwise convolutions written as `Conv2D(filters=C, groups=C)` (as ConvNeXt
    writes them) in a residual block, one with a depth multiplier (`filters=2C`: its
    input group cannot be cut) and, with `four_per_group`, a grouped convolution with 4
    channels per group (nor can its)."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    y = keras.layers.Conv2D(8, 3, padding="same", groups=8, activation="relu", name="dw")(x)
    y = keras.layers.BatchNormalization(name="bn")(y)
    y = keras.layers.Conv2D(8, 1, name="pw")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.Conv2D(12, 1, name="expand")(x)
    x = keras.layers.Conv2D(24, 3, padding="same", groups=12, name="dw_x2")(x)
    x = keras.layers.Conv2D(8, 1, name="project")(x)
    if four_per_group:
        x = keras.layers.Conv2D(8, 3, padding="same", groups=2, name="grouped")(x)
    x = keras.layers.Conv2D(6, 1, name="head")(x)
    outputs = keras.layers.Dense(3, name="out")(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="grouped_depthwise")


def tiny_transformer():
    """A Functional vision transformer (the keras.io ViT example's blocks, small):
    patches, two pre-norm blocks of MultiHeadAttention (4 heads; the second attends
    from the tokens to a projected copy, key and value apart) and a GELU MLP, mean
    over the tokens."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 2, strides=2, name="patches")(inputs)
    x = keras.layers.Reshape((16, 16), name="tokens")(x)
    for i in range(2):
        h = keras.layers.LayerNormalization(name=f"ln{i}a")(x)
        if i == 0:
            a = keras.layers.MultiHeadAttention(4, 4, name=f"mha{i}")(h, h)
        else:
            memory = keras.layers.Dense(12, name="memory")(h)
            a = keras.layers.MultiHeadAttention(4, 3, value_dim=5, name=f"mha{i}")(
                h, memory, key=memory)
        x = keras.layers.Add(name=f"res{i}a")([x, a])
        h = keras.layers.LayerNormalization(name=f"ln{i}b")(x)
        h = keras.layers.Dense(32, activation="gelu", name=f"mlp{i}a")(h)
        h = keras.layers.Dense(16, name=f"mlp{i}b")(h)
        x = keras.layers.Add(name=f"res{i}b")([x, h])
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="out")(x)
    return keras.Model(inputs, outputs, name="tiny_transformer")


class ConvBN(keras.layers.Layer):
    """Conv2D, BatchNormalization and ReLU as one layer (a user's building block)."""

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.strides = filters, strides
        self.conv = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return ops.relu(self.bn(self.conv(x), training=training))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


class ResidualBlock(keras.layers.Layer):
    """Two ConvBN blocks, a squeeze-and-excitation gate and the shortcut `x + y`."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.first = ConvBN(filters)
        self.second = keras.layers.Conv2D(filters, 3, padding="same")
        self.pool = keras.layers.GlobalAveragePooling2D(keepdims=True)
        self.squeeze = keras.layers.Dense(max(1, filters // 4), activation="relu")
        self.excite = keras.layers.Dense(filters, activation="sigmoid")

    def call(self, x):
        y = self.second(self.first(x))
        y = y * self.excite(self.squeeze(self.pool(y)))
        return ops.relu(x + y)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def custom_blocks():
    """A user's model of custom block layers: a stem `ConvBN`, two `ResidualBlock`s
    (a nested `ConvBN`, squeeze-and-excitation, `x + y` in their `call`)."""
    inputs = keras.Input((16, 16, 3))
    x = ConvBN(16, strides=2, name="stem")(inputs)
    x = ResidualBlock(16, name="block_1")(x)
    x = ResidualBlock(16, name="block_2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs, name="custom_blocks")


def keras_efficientnet_b0():
    """The real keras.applications.EfficientNetB0 (32x32): Rescaling, Normalization, SE blocks."""
    return keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)


def keras_mobilenet_v3_small():
    """The real keras.applications.MobileNetV3Small (alpha 0.75, 32x32, logits): hard
    swish and hard-sigmoid excitation built from graph operations (`x + 3.0`), not
    layers. Its fresh BatchNormalization statistics make outputs of about 1e-12, so
    they are drawn at random here (outputs in the hundreds): an output check means
    something."""
    model = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), classes=10, alpha=0.75,
        classifier_activation=None)
    return randomize_batch_norm(model, seed=3)


def randomize_batch_norm(model, seed=0):
    """Draws every BatchNormalization's gamma, beta and moving variance (at any depth) at
    random, so that a model whose fresh statistics make outputs of about 1e-12 gives
    outputs an output check can tell apart; returns the model."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            layer.beta.assign(rng.uniform(-0.5, 0.5, layer.beta.shape))
            layer.moving_variance.assign(rng.uniform(0.01, 0.1, layer.moving_variance.shape))
    return model


def random_channel_masks(gated, keep=0.6, seed=0):
    """Random binary gates in which every gate tensor keeps and closes some entries."""
    rng = np.random.default_rng(seed)
    for gate in gated.gates:
        mu = np.where(rng.random(gate.mu.shape) < keep, 0.5, -0.5).astype("float32")
        flat = mu.reshape(-1)
        if flat.size > 1:
            flat[0], flat[-1] = 0.5, -0.5
        gate.mu.assign(mu)
    return gated


def check_structured(gated, x, tmp_path, export=True):
    """The promises of a structured (unit or channel) ticket, without training:
    coupled producers share one mask, strip leaves a plain model, shrink equals the
    masked model and (channel gates) its kernel weights and multiply-adds are the
    counts the masks predict, the shrunk `.keras` loads with plain Keras, and its
    TFLite and ONNX exports match it. Returns the shrunk model."""
    from keras_stg import layer_table

    reference = infer(gated, x)
    scale = max(1.0, float(np.max(np.abs(reference))))
    masks = gated.masks()
    if str(gated.granularity) == "channel":
        for group, gate in zip(gated.groups, gated.gates):
            closed = np.asarray(gate.mu.numpy()) <= 0
            for m in group.members:
                if m.role != "producer":
                    continue
                t = next(i for i, t in enumerate(gated.targets) if t.layer is m.layer
                         and (m.axis is not None or t.kernel.channel_out is not None))
                axis = m.axis if m.axis is not None else gated.targets[t].kernel.channel_out
                out = np.moveaxis(masks[t], axis, -1)
                dead = ~out.reshape(-1, out.shape[-1]).any(0)[m.offset:m.offset + group.size]
                np.testing.assert_array_equal(dead, closed, err_msg=m.layer.name)
    pruned = gated.strip()
    assert type(pruned) in (keras.Model, keras.Sequential) or not isinstance(
        pruned, keras_stg.GatedModel)
    assert not any(v.name == "mu" for v in pruned.weights)
    small, info = keras_stg.shrink(pruned, return_info=True)
    assert max_diff(infer(small, x), reference) <= 1e-5 * scale
    assert info["parameters_after"] < info["parameters_before"]

    def counts(model):
        layer_table.record_shapes(model)  # attention projections have no graph node
        weights = macs = 0
        for layer in model._flatten_layers():
            for kernel in layer_table.kernels(layer) or ():
                n = int(np.prod(next(v for v in layer.weights if v.name == kernel.role).shape))
                weights += n
                macs += n * layer_table.positions(layer)
        return weights, macs

    kept_weights = sum(int(m.sum()) for m in masks)
    kept_macs = sum(int(m.sum()) * layer_table.positions(t.layer)
                    for m, t in zip(masks, gated.targets))
    weights, macs = counts(small)
    if str(gated.granularity) == "channel":
        assert (weights, macs) == (kept_weights, kept_macs)
    else:  # unit gates: shrink also drops the inputs of closed units, where coupling allows
        assert weights <= kept_weights and macs <= kept_macs
    path = os.path.join(tmp_path, "small.keras")
    small.save(path)
    loaded = keras.saving.load_model(path, custom_objects={})
    assert max_diff(infer(loaded, x), infer(small, x)) == 0
    if export:
        from export import onnx, tflite

        lite = tflite.Runner(tflite.convert(small))(x[:2])
        assert max_diff(lite, reference[:2]) <= 1e-4 * scale
        ort = onnx.Runner(onnx.convert(small))(x[:2])
        assert max_diff(ort, reference[:2]) <= 1e-4 * scale
    return small


def seed_channel_tile(tmp_path, monkeypatch, tile):
    """A latency cache under `tmp_path` holding `tile` as this machine's channel tile
    (`keras_stg.latency.channel_tile`), and no measuring: `channel_multiple="auto"` reads
    `tile` without timing anything."""
    from keras_stg import latency

    monkeypatch.setenv("KERAS_STG_CACHE", str(tmp_path / "cache"))
    cache = latency._Cache()
    cache["tile"] = {"tile": tile, "probes": {}}
    cache.save()

    def no_timing(*args, **kwargs):
        raise AssertionError("the channel tile was measured, not read from the cache")

    monkeypatch.setattr(latency, "measure_tiles", no_timing)
