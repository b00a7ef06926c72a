"""Shared model builders and the invariants every gated model must keep."""

import os

import keras
import numpy as np

import keras_stg
from keras_stg import models


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


def mobilenet_v2():
    return keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), classes=10, alpha=0.35
    )


def resnet50():
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
        image_shape=(16, 16, 3), embed_dim=8, depths=(2, 2), num_heads=(2, 2),
        window_size=2, patch_size=2,
    )
    inputs = keras.Input((16, 16, 3))
    features = keras.ops.mean(backbone(inputs), axis=1)
    outputs = keras.layers.Dense(10, name="head")(features)
    return keras.Model(inputs, outputs, name="swin")


MODELS = {
    "lenet": lenet,
    "cnn_bn": cnn_bn,
    "mobilenet_v2": mobilenet_v2,
    "resnet50": resnet50,
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


def check_invariants(gated, x, y, tmp_path, steps=3):
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
    loaded.fit(x, y, batch_size=len(x), epochs=1, verbose=0)

    stripped_path = os.path.join(tmp_path, "stripped.keras")
    pruned.save(stripped_path)
    reloaded = keras.models.load_model(stripped_path)
    assert max_diff(infer(reloaded, x), y_gated) <= 1e-5
    return history
