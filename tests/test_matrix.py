"""Every model family x mode x granularity through the shared invariants.

The families are small models with the structure that matters (a ResNet and a
MobileNetV2 as keras.applications builds them, at two blocks; a one- or
two-layer ViT and Swin with tiny dims); the full-size keras.applications
models are checked once, where their size is the point.
"""

import keras
import numpy as np
import pytest

import keras_stg
from tests import helpers

CASES = [
    (model, mode, gran)
    for model in helpers.MODELS
    for mode in ("slt", "post_training", "joint")
    for gran in ("weight", "unit")
] + [
    # Channel gates need channel groups: the families whose layers the table follows.
    # The ResNet's residual coupling in the frozen modes is in tests/test_channel_gates.py.
    (model, mode, "channel")
    for model in ("lenet", "tiny_mobilenet_v2")
    for mode in ("slt", "post_training", "joint")
] + [("tiny_resnet50", "joint", "channel"), ("vit", "joint", "channel")]


@pytest.mark.parametrize("model_name,mode,granularity", CASES)
def test_invariants(model_name, mode, granularity, tmp_path):
    model = helpers.MODELS[model_name]()
    x, y = helpers.batch(model)
    gated = keras_stg.wrap(model, mode=mode, granularity=granularity, lam=1.0, seed=0)
    helpers.compile_gated(gated)
    helpers.check_invariants(gated, x, y, str(tmp_path))


_KERNEL_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


@pytest.mark.parametrize("build", [helpers.keras_mobilenet_v2, helpers.keras_resnet50],
                         ids=["MobileNetV2", "ResNet50"])
def test_full_size_keras_applications(build):
    """The real applications: every kernel of their 100+ layers is gated, none is
    skipped, a training step moves only the gates, and strip equals the gated model."""
    model = build()
    expected = [layer.name for layer in model.layers if isinstance(layer, _KERNEL_LAYERS)]
    gated = keras_stg.wrap(model, mode="slt", target_sparsity=0.5, seed=0)
    assert [t.layer.name for t in gated.targets] == expected
    assert gated.skipped == []
    assert sum(m.size for m in gated.masks()) == sum(
        int(np.prod(t.variable.shape)) for t in gated.targets)
    kernels = [np.array(t.variable.numpy()) for t in gated.targets]
    mus = [np.array(g.mu.numpy()) for g in gated.gates]
    helpers.compile_gated(gated, lr=0.01)
    x, y = helpers.batch(model, n=4)
    gated.train_on_batch(x, y)
    for before, t in zip(kernels, gated.targets):
        np.testing.assert_array_equal(before, t.variable.numpy())
    assert all(not np.array_equal(a, g.mu.numpy()) for a, g in zip(mus, gated.gates))
    assert 0.4 < gated.sparsity() < 0.6
    assert helpers.max_diff(helpers.infer(gated.strip(), x), helpers.infer(gated, x)) <= 1e-5


STRUCTURED = [(build, gran) for build in ("keras_mobilenet_v2", "keras_efficientnet_b0",
                                          "keras_resnet50", "tiny_resnet50", "cnn_bn")
              for gran in ("channel", "unit")] + [("keras_mobilenet_v3_small", "channel"),
                                                  ("split_adds", "channel"),
                                                  ("grouped_depthwise", "channel"),
                                                  ("tiny_transformer", "channel"),
                                                  ("vit", "channel")]


@pytest.mark.parametrize("build,granularity", STRUCTURED)
def test_structured_tickets_of_real_applications(build, granularity, tmp_path):
    """keras.applications (smallest alpha and input, weights=None) and the reference nets:
    channel and unit tickets shrink exactly to the counts their masks predict, and the
    shrunk model exports (channel gates: TFLite and ONNX match it)."""
    model = getattr(helpers, build)()
    gated = keras_stg.wrap(model, mode="post_training", granularity=granularity, seed=0,
                           cost="flops", init_mu=0.5)
    helpers.random_channel_masks(gated, keep=0.6, seed=1)
    x, _ = helpers.batch(model, n=4)
    small = helpers.check_structured(gated, x, str(tmp_path),
                                     export=granularity == "channel" and build != "keras_resnet50")
    # Nothing removed but channels (custom blocks, keras-hub's ViT's, opened by wrap).
    assert len(small.layers) == len(gated.base_model.layers)
