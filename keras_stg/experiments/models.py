"""Reference architectures of the paper and of edge-popup (Ramanujan et al. 2020).

Kernels have no bias by default, as in the strong-lottery-ticket literature:
with frozen random weights a bias is just another frozen weight, and a gated
network without biases stays exactly zero where a unit is pruned.
"""

import keras
from keras import layers


def lenet_300_100(input_shape=(784,), classes=10, use_bias=False, name="lenet_300_100"):
    """LeNet-300-100: the MLP 784-300-100-10 (266,200 kernel weights)."""
    inputs = keras.Input(input_shape)
    x = layers.Flatten()(inputs) if len(input_shape) > 1 else inputs
    x = layers.Dense(300, activation="relu", use_bias=use_bias, name="fc1")(x)
    x = layers.Dense(100, activation="relu", use_bias=use_bias, name="fc2")(x)
    outputs = layers.Dense(classes, use_bias=use_bias, name="fc3")(x)
    return keras.Model(inputs, outputs, name=name)


def _conv_net(widths, input_shape, classes, use_bias, batch_norm, name):
    inputs = keras.Input(input_shape)
    x = inputs
    block = 0
    for i, width in enumerate(widths):
        x = layers.Conv2D(width, 3, padding="same", use_bias=use_bias, name=f"conv{i + 1}")(x)
        if batch_norm:
            x = layers.BatchNormalization(center=False, scale=False, name=f"bn{i + 1}")(x)
        x = layers.ReLU()(x)
        if i % 2 == 1:
            block += 1
            x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256, activation="relu", use_bias=use_bias, name="fc1")(x)
    x = layers.Dense(256, activation="relu", use_bias=use_bias, name="fc2")(x)
    outputs = layers.Dense(classes, use_bias=use_bias, name="fc3")(x)
    return keras.Model(inputs, outputs, name=name)


def conv4(input_shape=(32, 32, 3), classes=10, use_bias=False, batch_norm=False, width_factor=1.0):
    """Conv-4 of edge-popup: 64, 64, pool, 128, 128, pool, FC 256, 256, classes.

    `width_factor` multiplies the channels of the four convolutions (0.5: 32, 32,
    64, 64; the FC layers keep 256 units)."""
    widths = tuple(max(1, int(round(w * width_factor))) for w in (64, 64, 128, 128))
    name = "conv4" if width_factor == 1.0 else f"conv4_x{width_factor:g}"
    return _conv_net(widths, input_shape, classes, use_bias, batch_norm, name)


def conv6(input_shape=(32, 32, 3), classes=10, use_bias=False, batch_norm=False):
    """Conv-6 of edge-popup: Conv-4 plus a 256, 256, pool block."""
    return _conv_net(
        (64, 64, 128, 128, 256, 256), input_shape, classes, use_bias, batch_norm, "conv6"
    )


# ----------------------------------------------------------------- ResNets


def _bottleneck(x, width, stride, expansion, batch_norm_args, name):
    """ResNet v1.5 bottleneck: 1x1 (width), 3x3 (width, stride), 1x1 (width * 4)."""
    out_channels = expansion
    shortcut = x
    if stride != 1 or x.shape[-1] != out_channels:
        shortcut = layers.Conv2D(out_channels, 1, strides=stride, use_bias=False,
                                 name=f"{name}_proj")(x)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn", **batch_norm_args)(shortcut)
    y = layers.Conv2D(width, 1, use_bias=False, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(name=f"{name}_bn1", **batch_norm_args)(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(name=f"{name}_bn2", **batch_norm_args)(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(out_channels, 1, use_bias=False, name=f"{name}_conv3")(y)
    y = layers.BatchNormalization(name=f"{name}_bn3", **batch_norm_args)(y)
    return layers.ReLU()(layers.Add()([shortcut, y]))


def resnet50(input_shape=(32, 32, 3), classes=10, width_factor=1, blocks=(3, 4, 6, 3),
             base_width=64, cifar_stem=None, affine_bn=False, name=None):
    """ResNet-50 (bottleneck blocks 3, 4, 6, 3; ~23.5M weights at 10 classes).

    Args:
        width_factor: multiplies the inner width of every bottleneck: 2 gives
            Wide-ResNet-50-2 (~66.8M weights), as in torchvision.
        cifar_stem: 3x3 stride-1 stem without max-pooling, for 32x32 inputs
            (default: when the input is smaller than 64 pixels); else the
            ImageNet 7x7 stride-2 stem with max-pooling.
        affine_bn: learn BatchNormalization's gamma and beta (the strong
            lottery ticket literature uses non-affine BN).
    """
    if cifar_stem is None:
        cifar_stem = input_shape[0] < 64
    bn = {"center": affine_bn, "scale": affine_bn}
    inputs = keras.Input(input_shape)
    if cifar_stem:
        x = layers.Conv2D(base_width, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    else:
        x = layers.Conv2D(base_width, 7, strides=2, padding="same", use_bias=False,
                          name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn", **bn)(x)
    x = layers.ReLU()(x)
    if not cifar_stem:
        x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, count in enumerate(blocks):
        planes = base_width * 2 ** stage
        for block in range(count):
            stride = 2 if block == 0 and stage > 0 else 1
            x = _bottleneck(x, planes * width_factor, stride, planes * 4, bn,
                            f"stage{stage + 1}_block{block + 1}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(classes, use_bias=False, name="fc")(x)
    default = "resnet50" if width_factor == 1 else f"wide_resnet50_{width_factor}"
    return keras.Model(inputs, outputs, name=name or default)


def wide_resnet50(input_shape=(32, 32, 3), classes=10, width_factor=2, **kwargs):
    """Wide-ResNet-50-2: ResNet-50 with bottlenecks twice as wide."""
    return resnet50(input_shape, classes, width_factor=width_factor, **kwargs)


# ------------------------------------------------------ keras-hub backbones


def vit(input_shape=(224, 224, 3), classes=10, patch_size=16, num_layers=12, num_heads=12,
        hidden_dim=768, mlp_dim=3072, name="vit"):
    """ViT (default ViT-B/16) from keras-hub's `ViTBackbone`, randomly initialised
    (no download), with a linear head on the class token."""
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(
        image_shape=tuple(input_shape), patch_size=patch_size, num_layers=num_layers,
        num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, name="vit_backbone",
    )
    inputs = keras.Input(input_shape)
    tokens = backbone(inputs)
    outputs = layers.Dense(classes, name="head")(tokens[:, 0, :])  # class token
    return keras.Model(inputs, outputs, name=name)


def swin_t(input_shape=(224, 224, 3), classes=10, embed_dim=96, depths=(2, 2, 6, 2),
           num_heads=(3, 6, 12, 24), window_size=7, patch_size=4, name="swin_t"):
    """Swin-T from keras-hub's `SwinTransformerBackbone`, randomly initialised (no
    download), with global average pooling and a linear head."""
    import keras_hub

    backbone = keras_hub.models.SwinTransformerBackbone(
        image_shape=tuple(input_shape), embed_dim=embed_dim, depths=list(depths),
        num_heads=list(num_heads), window_size=window_size, patch_size=patch_size,
        name="swin_backbone",
    )
    inputs = keras.Input(input_shape)
    features = backbone(inputs)
    if len(features.shape) == 4:
        x = layers.GlobalAveragePooling2D(name="pool")(features)
    else:
        x = layers.GlobalAveragePooling1D(name="pool")(features)
    outputs = layers.Dense(classes, name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def resnet20(input_shape=(32, 32, 3), classes=10, width=16, blocks=3):
    """ResNet-20 for CIFAR (He et al. 2016): a 3x3 stem of `width` channels, three
    stages of `blocks` basic blocks (3x3, 3x3; `width`, 2x, 4x channels, stride 2
    between stages) with a 1x1 projection shortcut where the shape changes,
    BatchNormalization after every convolution, global pooling and a linear head."""
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    for stage in range(3):
        filters = width * 2 ** stage
        for block in range(blocks):
            name = f"stage{stage + 1}_block{block + 1}"
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                         name=f"{name}_proj")(x)
                shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
            y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                              name=f"{name}_conv1")(x)
            y = layers.ReLU(name=f"{name}_relu1")(layers.BatchNormalization(name=f"{name}_bn1")(y))
            y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
            y = layers.BatchNormalization(name=f"{name}_bn2")(y)
            x = layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(classes, name="head")(x)
    return keras.Model(inputs, outputs, name="resnet20")


#: Builders by config name: `builder(input_shape=..., classes=..., **model_args)`.
MODELS = {
    "lenet_300_100": lenet_300_100,
    "conv4": conv4,
    "conv6": conv6,
    "resnet20": resnet20,
    "resnet50": resnet50,
    "wide_resnet50": wide_resnet50,
    "vit": vit,
    "swin_t": swin_t,
}


def build(name, input_shape, classes, **model_args):
    """Builds the model `name` of `MODELS`; `model_args` go to its builder."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Use one of {', '.join(sorted(MODELS))}.")
    try:
        return MODELS[name](input_shape=tuple(input_shape), classes=classes, **model_args)
    except TypeError as e:
        raise ValueError(f"Bad model_args for {name!r}: {e}") from e
