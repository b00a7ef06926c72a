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


def conv4(input_shape=(32, 32, 3), classes=10, use_bias=False, batch_norm=False):
    """Conv-4 of edge-popup: 64, 64, pool, 128, 128, pool, FC 256, 256, classes."""
    return _conv_net((64, 64, 128, 128), input_shape, classes, use_bias, batch_norm, "conv4")


def conv6(input_shape=(32, 32, 3), classes=10, use_bias=False, batch_norm=False):
    """Conv-6 of edge-popup: Conv-4 plus a 256, 256, pool block."""
    return _conv_net(
        (64, 64, 128, 128, 256, 256), input_shape, classes, use_bias, batch_norm, "conv6"
    )
