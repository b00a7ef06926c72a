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
    cache = json.loads((tmp_path / "cache" / "latency.json").read_text())
    assert sum(k.split("|")[-1].startswith("layer:") for k in cache) == 3
    assert sum(k.split("|")[-1].startswith("model:") for k in cache) == 1

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


# ------------------------------------------------------------ the channel tile


def test_tile_is_the_largest_block_that_runs_at_one_speed():
    # LiteRT float 3x3 convolutions on an AVX-512 machine (microseconds, measured):
    # 8 and 16 output channels run alike, 24 and 32, then 40 to 64.
    staircase = {8: 18.5, 16: 18.5, 24: 35.5, 32: 35.8, 40: 69.9, 48: 70.0, 56: 70.0,
                 64: 69.8}
    assert latency.tile_from_times(staircase) == 16
    # Every width its own speed: no tiling seen, the floor (the probe's width step).
    assert latency.tile_from_times({w: float(w) for w in range(4, 65, 4)}) == 4
    # Blocks of 32: 4 to 32 alike, 36 to 64 alike.
    assert latency.tile_from_times({w: 1.0 if w <= 32 else 2.0 for w in range(4, 65, 4)}) == 32
    # Noise within the tolerance does not split a block, nor does one spike (a busy
    # machine); a step every 8 channels does.
    tile16 = {w: float(-(-w // 16)) for w in range(4, 65, 4)}
    assert latency.tile_from_times({w: t * (1.05 if w % 8 else 1.0)
                                    for w, t in tile16.items()}) == 16
    assert latency.tile_from_times({**tile16, 20: 1.9, 36: 5.0}) == 16
    assert latency.tile_from_times({w: float(-(-w // 8)) for w in range(4, 65, 4)}) == 8


def test_channel_multiple_auto_is_the_cached_tile(tmp_path, monkeypatch):
    helpers.seed_channel_tile(tmp_path, monkeypatch, 4)
    gated = keras_stg.wrap(_chain(), mode="joint", granularity="channel", channel_multiple="auto",
                           target_sparsity=0.5, seed=0)
    assert gated.config.channel_multiple == 4
    gated.freeze_mask()
    kept = [int(np.sum(np.asarray(g.mu) > 0)) for g in gated.gates]
    sizes = [int(np.prod(g.mu.shape)) for g in gated.gates]
    assert all(k % 4 == 0 or k == n for k, n in zip(kept, sizes)), (kept, sizes)
    assert sum(kept) < sum(sizes), "nothing closed"
    # The resolved multiple is saved: loading measures nothing, even without the cache.
    monkeypatch.setenv("KERAS_STG_CACHE", str(tmp_path / "empty"))
    path = str(tmp_path / "gated.keras")
    gated.save(path)
    assert keras.models.load_model(path).config.channel_multiple == 4
    # shrink(channel_multiple="auto") rounds to the same tile.
    helpers.seed_channel_tile(tmp_path, monkeypatch, 8)
    stripped = gated.strip()
    assert (keras_stg.shrink(stripped, channel_multiple="auto").count_params()
            == keras_stg.shrink(stripped, channel_multiple=8).count_params())


def test_channel_multiple_auto_needs_channel_gates_and_bad_values_say_so():
    with pytest.raises(ValueError, match="channel_multiple='auto'.*needs granularity='channel'"):
        keras_stg.wrap(_chain(), granularity="unit", channel_multiple="auto")
    with pytest.raises(ValueError, match="integer >= 1 or 'auto'"):
        keras_stg.wrap(_chain(), granularity="channel", channel_multiple="fast")
    with pytest.raises(ValueError, match="integer >= 1 or 'auto'"):
        keras_stg.shrink(_chain(), channel_multiple="fast")


def test_the_tile_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_STG_CACHE", str(tmp_path / "cache"))
    tile = latency.channel_tile(verbose=False)
    assert tile in latency.TILES
    cache = json.loads((tmp_path / "cache" / "latency.json").read_text())
    (entry,) = [v for k, v in cache.items() if k.endswith("|tile")]
    assert entry["tile"] == tile
    assert set(entry["probes"]) == {"conv3x3", "conv1x1"}
    assert all(set(p) == {"f32", "int8"} and tile <= min(p.values())
               for p in entry["probes"].values())
    monkeypatch.setattr(latency, "measure_tiles", lambda *a, **k: pytest.fail("measured again"))
    assert latency.channel_tile(verbose=False) == tile


def test_a_layer_called_inside_another_is_timed_at_the_shape_it_sees():
    from keras_stg import layer_table

    inputs = keras.Input((16, 32))
    attention = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)
    model = keras.Model(inputs, attention(inputs, inputs))
    with pytest.raises(ValueError, match="'query' was never called on an input"):
        latency._micro(attention._query_dense, half=False)
    layer_table.record_shapes(model)
    micro, weights = latency._micro(attention._query_dense, half=False)
    assert tuple(micro.input_shape) == (1, 16, 32)
    assert tuple(micro(np.zeros((1, 16, 32), "float32")).shape) == (1, 16, 4, 8)
    assert weights == 32 * 4 * 8
    # Half its input channels: half its kernel, the slope's other point.
    half, weights = latency._micro(attention._query_dense, half=True)
    assert tuple(half.input_shape) == (1, 16, 16) and weights == 16 * 4 * 8
