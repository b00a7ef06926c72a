"""`cost="latency"`: per-layer LiteRT costs, measured once, cached, saved with the model."""

import json
import os

import keras
import numpy as np
import pytest

import keras_stg
from keras_stg import latency
from tests import helpers


def _chain():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(x))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="out")(x))


def _table(model, unit=1.0, fixed=0.0):
    targets = keras_stg.wrap(model, granularity="channel", seed=0).targets
    return {"unit_ms": {t.name: unit for t in targets}, "fixed_ms": fixed,
            "total_ms": fixed + unit * sum(int(np.prod(t.variable.shape)) for t in targets),
            "machine": "test"}


def test_latency_costs_are_measured_cached_and_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_STG_CACHE", str(tmp_path / "cache"))
    # No target: how much of a model this small the gates can remove depends on the
    # interpreter's overhead in this measurement.
    gated = keras_stg.wrap(_chain(), mode="joint", granularity="channel", cost="latency",
                           seed=0)
    table = gated.config.cost_table
    assert set(table["unit_ms"]) == {"c1", "c2", "out"}
    assert all(v >= 0 for v in table["unit_ms"].values()) and table["total_ms"] > 0
    assert 0 <= table["fixed_ms"] <= table["total_ms"]
    assert isinstance(table["calibration"], str) and table["calibration"]
    cache = json.loads((tmp_path / "cache" / "latency.json").read_text())
    assert sum(k.split("|")[-1].startswith("layer:") for k in cache) == 3
    assert sum(k.split("|")[-1].startswith("model:") for k in cache) == 1
    half = [v for k, v in cache.items() if k.split("|")[-1].startswith("half:")]
    # c1 and c2 lose half their outputs (c2 and out half their inputs as well).
    assert len(half) == 1 and half[0]["kept"] == [3 * 9 * 4, 4 * 9 * 4, 4 * 4] and half[0]["ms"] > 0

    # A second model of the same architecture (other auto-generated names) is not timed.
    def no_timing(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(latency, "layer_slope", no_timing)
    monkeypatch.setattr(latency, "model_latency", no_timing)
    again = keras_stg.wrap(_chain(), mode="joint", granularity="channel", cost="latency",
                           seed=0)
    assert again.config.cost_table["unit_ms"] == table["unit_ms"]

    # The costs travel with the model: loading measures nothing, even without the cache.
    monkeypatch.setenv("KERAS_STG_CACHE", str(tmp_path / "empty"))
    path = str(tmp_path / "gated.keras")
    gated.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.config.cost_table == table
    assert loaded.sparsity() == pytest.approx(gated.sparsity())


def test_latency_sparsity_is_the_share_of_the_modelled_latency():
    model = _chain()
    table = _table(model, unit=2.0, fixed=1000.0)
    gated = keras_stg.wrap(model, granularity="channel", cost="latency", cost_table=table,
                           init_mu=0.5, seed=0)
    assert gated.sparsity() == 0.0
    weights = table["total_ms"] - 1000.0
    first, second = gated.gates  # c1 and c2's channels
    mu = np.full(8, 0.5, "float32")
    mu[:4] = -0.5
    first.mu.assign(mu)  # c1 loses 4 outputs: 3*3*3*4 weights, and c2 4*9*8 inputs
    removed = 2.0 * (3 * 3 * 3 * 4 + 3 * 3 * 4 * 8)
    assert gated.sparsity() == pytest.approx(removed / (weights + 1000.0), rel=1e-5)
    # Closing every channel still leaves the fixed part.
    with pytest.raises(ValueError, match=r"cannot be reached.*of the modelled LiteRT latency"):
        keras_stg.wrap(model, granularity="channel", cost="latency", cost_table=table,
                       target_sparsity=0.99)


def test_latency_cost_needs_structured_gates_and_its_own_table():
    with pytest.raises(ValueError, match="cost='latency' with granularity='weight'.*dense "
                                         "compute.*granularity='channel'"):
        keras_stg.wrap(_chain(), cost="latency")
    with pytest.raises(ValueError, match="`cost_table` holds latency costs; it needs "
                                         "cost='latency', not 'flops'"):
        keras_stg.wrap(_chain(), granularity="channel", cost="flops", cost_table={})
    with pytest.raises(ValueError, match="Unknown cost 'time'.*'latency'"):
        keras_stg.GateConfig(cost="time")
    table = _table(helpers.mlp())
    with pytest.raises(ValueError, match="no entry for c1, c2, out: it was measured for "
                                         "another model"):
        keras_stg.wrap(_chain(), granularity="channel", cost="latency", cost_table=table)


def test_measuring_needs_litert_and_says_how_to_get_it(tmp_path, monkeypatch):
    import builtins

    monkeypatch.setenv("KERAS_STG_CACHE", str(tmp_path))
    real = builtins.__import__

    def no_litert(name, *args, **kwargs):
        if name.startswith("ai_edge_litert"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_litert)
    with pytest.raises(ImportError, match=r"needs ai-edge-litert: pip install \"keras-stg\[export\]\""):
        keras_stg.wrap(_chain(), granularity="channel", cost="latency")
    assert not os.path.exists(tmp_path / "latency.json")


def test_the_cache_key_tells_cpus_with_and_without_avx512_apart():
    assert latency.vector_isa("fpu sse2 avx avx2 fma avx512f avx512bw") == "AVX-512"
    assert latency.vector_isa("fpu sse2 avx avx2 fma") == "AVX2"
    assert latency.vector_isa("fp asimd evtstrm") == ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            has_avx2 = " avx2" in f.read()
        if has_avx2:
            assert ", AVX" in latency.machine().split(";")[0]


def test_the_slopes_are_calibrated_on_the_half_width_model(tmp_path, monkeypatch):
    # Layers timed alone: 1 ms per 100 weights in c1, c2 and out; the dense model
    # takes 10 ms and the half-width one 8 ms, so each slope counts 2 ms of the
    # modelled saving for every ms the network measured: the factor is 0.5.
    monkeypatch.setenv("KERAS_STG_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "layer_slope", lambda layer: 0.01)
    monkeypatch.setattr(latency, "model_latency", lambda model, targets: (
        10.0, {"ms": 8.0, "kept": [3 * 9 * 4, 4 * 9 * 4, 4 * 4]}))
    model = _chain()
    table = keras_stg.wrap(model, granularity="channel", cost="latency", seed=0).config.cost_table
    sizes = {"c1": 3 * 9 * 8, "c2": 8 * 9 * 8, "out": 8 * 4}
    kept = {"c1": 3 * 9 * 4, "c2": 4 * 9 * 4, "out": 4 * 4}
    modelled = sum(0.01 * (sizes[n] - kept[n]) for n in sizes)
    factor = 2.0 / modelled
    assert table["unit_ms"] == pytest.approx({n: 0.01 * factor for n in sizes})
    assert table["fixed_ms"] == pytest.approx(10.0 - 0.01 * factor * sum(sizes.values()))
    assert "slopes x" in table["calibration"] and "8.0000 ms" in table["calibration"]
    # The calibrated model predicts the half-width model's measured latency.
    predicted = table["fixed_ms"] + sum(table["unit_ms"][n] * kept[n] for n in kept)
    assert predicted == pytest.approx(8.0)


def test_the_half_width_model_and_the_cases_without_calibration(monkeypatch):
    model = _chain()
    targets = keras_stg.wrap(model, granularity="channel", seed=0).targets
    before = [w.copy() for w in model.get_weights()]
    total, out = latency.model_latency(model, targets)
    assert out["kept"] == [3 * 9 * 4, 4 * 9 * 4, 4 * 4] and out["ms"] > 0 and total > 0
    for a, b in zip(before, model.get_weights()):  # the user's model is left alone
        np.testing.assert_array_equal(a, b)
    # A model that cannot be shrunk is timed alone, and says why it has no half width.
    from keras_stg import shrinking

    def cannot(*args, **kwargs):
        raise shrinking.ShrinkError("no shrink here")

    monkeypatch.setattr(shrinking, "shrink", cannot)
    total, out = latency.model_latency(model, targets)
    assert total > 0 and out == {"error": "the half-width model could not be built "
                                          "(ShrinkError: no shrink here)"}
    # Nothing to calibrate on: slopes as measured, and the table says why.
    assert latency.calibration(10.0, [1.0], [10], {"error": "no shrink"}) == (1.0, "no shrink")
    factor, note = latency.calibration(10.0, [1.0], [10], {"ms": 10.5, "kept": [5]})
    assert factor == 1.0 and "saved no measurable time" in note
    factor, note = latency.calibration(10.0, [1.0], [10], {"ms": 9.0, "kept": [10]})
    assert factor == 1.0 and "no gated layer" in note
    # The fixed part never turns negative: the factor is capped at total / variable.
    factor, _ = latency.calibration(10.0, [0.1], [10], {"ms": 2.0, "kept": [5]})
    assert factor == pytest.approx(10.0)
