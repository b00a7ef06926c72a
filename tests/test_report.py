import keras
import numpy as np

import keras_stg


def test_summary_counts_kept_weights_and_fractional_gates():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="a"), keras.layers.Dense(2, name="b")])
    gated = keras_stg.wrap(model, seed=0)
    mu = np.full((4, 5), 0.7, "float32")
    mu[0] = -0.9         # 5 removed, not fractional
    mu[1, :2] = 0.2      # kept but fractional
    gated.gates[0].mu.assign(mu)
    rows = keras_stg.layer_stats(gated)
    assert rows[0]["params"] == 20 and rows[0]["kept"] == 15
    assert abs(rows[0]["sparsity"] - 0.25) < 1e-9
    assert abs(rows[0]["fractional"] - 2 / 20) < 1e-9
    text = keras_stg.summary(gated)
    assert "25.00%" in text and "total" in text
    assert abs(gated.sparsity() - 5 / 30) < 1e-6


def test_summary_counts_multiply_adds_per_layer():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="c"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="d")])
    gated = keras_stg.wrap(model, seed=0)
    gated.gates[0].mu.assign(np.where(np.arange(108).reshape(3, 3, 3, 4) % 2, 0.5, -0.5)
                             .astype("float32"))
    rows = {r["name"].split("/")[-1]: r for r in keras_stg.layer_stats(gated)}
    assert rows["c"]["macs"] == 108 * 36  # every weight once per 6x6 output position
    assert rows["c"]["kept_macs"] == 54 * 36
    assert rows["d"]["macs"] == 144 * 2
    text = keras_stg.summary(gated)
    assert "kept MACs" in text and f"{108 * 36 + 288:,}" in text and "cost=params" in text


def test_effective_kept_counts_only_weights_on_an_input_output_path():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="a"),
                              keras.layers.ReLU(), keras.layers.Dense(2, name="b")])
    gated = keras_stg.wrap(model, seed=0)
    mu_a = np.full((3, 4), 0.5, "float32")
    mu_a[:, 3] = -0.5    # unit 3 of a: no kept input, so b's weights from it are off path
    mu_b = np.full((4, 2), 0.5, "float32")
    mu_b[0, :] = -0.5    # unit 0 of a: no kept output, so a's weights into it are off path
    gated.gates[0].mu.assign(mu_a)
    gated.gates[1].mu.assign(mu_b)
    assert keras_stg.report.effective_kept(gated) == [6, 4]  # of 9 and 6 kept
    rows = keras_stg.layer_stats(gated)
    assert [r["effective"] for r in rows] == [6, 4] and [r["kept"] for r in rows] == [9, 6]
    assert "On an input-output path: 10 of the 15 kept weights (effective sparsity 50.00%)" \
        in keras_stg.summary(gated)  # of 20


def test_effective_kept_follows_flatten_and_depthwise_channels():
    model = keras.Sequential([
        keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 3, name="c"),             # 2x2x3
        keras.layers.DepthwiseConv2D(1, depth_multiplier=2, name="dw"),          # 2x2x6
        keras.layers.BatchNormalization(), keras.layers.Flatten(),               # 24
        keras.layers.Dense(2, name="d")])
    gated = keras_stg.wrap(model, seed=0)
    gates = {t.name.split("/")[-1]: g for t, g in zip(gated.targets, gated.gates)}
    mu_c = np.full((3, 3, 2, 3), 0.5, "float32")
    mu_c[..., 0] = -0.5                 # channel 0 of c is dead
    gates["c"].mu.assign(mu_c)
    gates["dw"].mu.assign(np.full((1, 1, 3, 2), 0.5, "float32"))
    mu_d = np.full((24, 2), 0.5, "float32")
    mu_d[np.arange(24) % 6 == 5] = -0.5  # depthwise output 5 (channel 2, copy 1) unread
    gates["d"].mu.assign(mu_d)
    counts = dict(zip([t.name.split("/")[-1] for t in gated.targets],
                      keras_stg.report.effective_kept(gated)))
    assert counts["c"] == 36              # channels 1 and 2 (channel 2 still feeds copy 0)
    assert counts["dw"] == 3              # outputs 2-4 (channel 0's 0-1 dead, 5 unread)
    assert counts["d"] == 4 * 3 * 2       # 4 positions x live, read channels 2-4 x 2 units
    assert keras_stg.report.effective_kept(keras_stg.wrap(
        keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35,
                                       classes=2), seed=0)) is None  # branches: not followed
    transposed = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2DTranspose(3, 3),
                                   keras.layers.Flatten(), keras.layers.Dense(2)])
    assert keras_stg.report.effective_kept(keras_stg.wrap(transposed, seed=0)) is None


def test_effective_kept_starts_from_the_input_through_a_flatten():
    model = keras.Sequential([keras.Input((2, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2, name="a"), keras.layers.Dense(1, name="b")])
    gated = keras_stg.wrap(model, seed=0)
    mu_a = np.full((6, 2), 0.5, "float32")
    mu_a[:, 1] = -0.5  # unit 1 of a gets nothing
    gated.gates[0].mu.assign(mu_a)
    gated.gates[1].mu.assign(np.full((2, 1), 0.5, "float32"))
    assert keras_stg.report.effective_kept(gated) == [6, 1]
