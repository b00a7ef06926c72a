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
