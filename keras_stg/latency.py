"""Per-layer latency costs for `cost="latency"`, measured in the LiteRT interpreter.

A gated model with `cost="latency"` counts what its gates keep in milliseconds
of batch-1 LiteRT latency (XNNPACK, one thread) on the machine it runs on:

- Each gated layer's latency is modelled as `a + b * w`, `w` its kernel weights
  (kept inputs x kept outputs x kernel window: a shrunk layer's size). `b` is
  measured once per layer configuration: the layer alone, converted to TFLite
  at its full width and at half its input and output channels (half its input
  channels where its config has no width: an attention projection), timed in the
  interpreter, `b = (t_full - t_half) / (w_full - w_half)`.
- The rest of the model's latency (ungated layers, the `a` of every layer,
  the interpreter's own overhead) is the fixed part: the whole dense model's
  measured latency minus `sum b * w`. No gate removes it.

`target_sparsity` then means the share of the modelled latency removed, and the
gates' penalty weighs each channel by the milliseconds it costs. The
measurements of each layer configuration are cached in
`$KERAS_STG_CACHE/latency.json` (default `~/.cache/keras_stg`), keyed by the
CPU and the LiteRT version, so a model is measured once per machine; the
costs a model was trained with are saved with it (`GateConfig.cost_table`).
Measuring needs `ai-edge-litert` (`pip install "keras-stg[export]"`).

`channel_tile()` measures the runtime's output-channel tile on this machine:
vector kernels compute a layer's output channels in blocks, so a layer that
keeps 24 of 32 channels can run as slowly as one that keeps 32. A mask whose
groups keep whole tiles (`channel_multiple="auto"`) turns every removed channel
into saved time, and the per-layer costs above (timed at full and half width,
both whole tiles for widths of two tiles or more) hold at those widths.
"""

import hashlib
import json
import math
import os
import platform
import statistics

from keras_stg import _compat
from keras_stg import layer_table

#: Bumped when the measurement changes, so old cache entries are not reused.
CACHE_VERSION = 1
ROUNDS, RUNS = 5, 40


def cache_path():
    from keras_stg.fused import cache_dir

    return os.path.join(os.path.dirname(cache_dir()), "latency.json")


def vector_isa(flags):
    """The widest x86 vector extension among `/proc/cpuinfo` `flags` (one CPU model
    name may come with or without AVX-512, at different speeds), or "" if none."""
    flags = set(flags.split())
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in flags:
            return name
    return ""


def cpu():
    """The CPU's model name and widest vector extension ("AMD EPYC, AVX-512"), or the
    architecture where `/proc/cpuinfo` does not tell."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
    isa = vector_isa(next((line.split(":", 1)[1] for line in lines
                           if line.startswith("flags")), ""))
    return f"{name}, {isa}" if isa else name


def machine():
    """The CPU (model name and vector extension) and runtime the costs hold for (part of
    every cache key)."""
    cpu_name = cpu()
    try:
        from importlib.metadata import version

        runtime = f"ai-edge-litert {version('ai-edge-litert')}"
    except Exception:  # not installed: measuring fails later with the fix
        runtime = "ai-edge-litert ?"
    return f"{cpu_name}; {runtime}; XNNPACK, 1 thread"


def _require_litert():
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        raise ImportError(
            "cost='latency' measures per-layer latency in the LiteRT interpreter, which "
            "needs ai-edge-litert: pip install \"keras-stg[export]\" (or pass a measured "
            "cost_table).") from None


def _input_shape(layer):
    shape = layer_table.called_shape(layer, "input")
    if shape is None:
        raise ValueError(
            f"cost='latency' times every gated layer alone, but {layer.name!r} was never "
            "called on an input, so its input shape is unknown. Build the model from "
            "keras.Input(...) (Functional or Sequential), or use cost='flops'.")
    return shape


def _width_key(config):
    return "units" if "units" in config else "filters" if "filters" in config else None


def _signature(layer):
    config = {k: v for k, v in layer.get_config().items()
              if k not in ("name", "trainable", "dtype") and "initializer" not in k
              and "regularizer" not in k and "constraint" not in k}
    text = json.dumps([type(layer).__name__, config, _input_shape(layer)[1:]],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _model_signature(model):
    """The architecture without its names (Keras numbers auto-named layers per process)."""
    text = json.dumps(model.get_config(), sort_keys=True, default=str)
    for i, layer in enumerate(_compat.all_layers(model)):
        text = text.replace(f'"{layer.name}"', f'"#{i}"')
    text = text.replace(f'"{model.name}"', '"#model"')
    for i, tensor in enumerate(getattr(model, "inputs", None) or ()):
        name = getattr(getattr(tensor, "_keras_history", None), "operation", None)
        if name is not None:
            text = text.replace(f'"{name.name}"', f'"#input{i}"')
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _micro(layer, half):
    """The layer alone (same configuration), at full width or at half its input and
    output channels; returns `(model, kernel weights)`."""
    import keras

    shape = list(_input_shape(layer)[1:])
    if any(d is None for d in shape):
        raise ValueError(
            f"cost='latency' times {layer.name!r} at its input shape, which is dynamic "
            f"({tuple(shape)}); build the model with a fixed input shape.")
    config = layer.get_config()
    config.pop("name", None)
    key = _width_key(config)
    if half:
        shape[-1] = max(1, shape[-1] // 2)
        if key is not None:
            config[key] = max(1, int(config[key]) // 2)
    clone = type(layer).from_config(config)
    inputs = keras.Input(tuple(shape), batch_size=1)
    model = keras.Model(inputs, clone(inputs))
    weights = sum(math.prod(next(v for v in clone.weights if v.name == k.role).shape)
                  for k in layer_table.kernels(clone) or ())
    return model, weights


def _time(data_list, rounds=ROUNDS, runs=RUNS, reduce=statistics.median):
    """Each model's latency (ms): `reduce` over `rounds` of every model's median of `runs`
    runs in turn."""
    from export import tflite

    runners = [tflite.Runner(d) for d in data_list]
    times = [[] for _ in runners]
    for _ in range(rounds):
        for r, t in zip(runners, times):
            t.append(r.latency_ms(runs))
    return [reduce(t) for t in times]


def layer_slope(layer):
    """Milliseconds per kernel weight of `layer` (see the module docstring), >= 0."""
    from export import tflite

    (full, w_full), (half, w_half) = _micro(layer, False), _micro(layer, True)
    t_full, t_half = _time([tflite.convert(full), tflite.convert(half)])
    if w_full <= w_half:
        return 0.0
    return max(0.0, (t_full - t_half) / (w_full - w_half))


#: Output widths the channel-tile probe times (multiples of 4 up to 64).
TILE_WIDTHS = tuple(range(4, 65, 4))
#: The tiles the probe can report (each a multiple of the one before).
TILES = (4, 8, 16, 32)
#: Two widths of one tile run within this share of each other's time.
TILE_TOLERANCE = 0.08
#: The share of a tile's widths that may stray from its block's speed (a timing spike).
TILE_OUTLIERS = 0.15


def tile_from_times(times, tiles=TILES, tolerance=TILE_TOLERANCE, outliers=TILE_OUTLIERS):
    """The output-channel tile that `times` (`{output width: ms}` of one layer) show: the
    largest of `tiles` whose blocks each run at one speed: the widths within `tolerance`
    of the width that ends their block (`ceil(width / tile) * tile`, where that width was
    timed), all but at most `outliers` of them (a spike of a busy machine; a wrong tile
    puts about half of the widths a step away from their block's end). The smallest of
    `tiles` is the floor: the widths probed are its multiples, so a runtime without
    tiling reads as it."""
    tiles = sorted(tiles)
    best = tiles[0]
    for tile in tiles[1:]:
        ends = {width: -(-width // tile) * tile for width in times}
        checked = [abs(ms - times[ends[width]]) > tolerance * times[ends[width]]
                   for width, ms in times.items() if ends[width] in times]
        if not checked or sum(checked) > outliers * len(checked):
            return best
        best = tile
    return best


def _tile_probes():
    """`(label, layer factory)` of the probe layers: 3x3 and 1x1 convolutions on a
    16x16x32 input (the layers whose output tiles most models' time is spent in)."""
    import keras

    return [(f"conv{k}x{k}", lambda width, k=k: keras.layers.Conv2D(width, k, padding="same"))
            for k in (3, 1)]


def measure_tiles(verbose=True):
    """`{probe: {runtime: tile}}`: the tile of each probe layer in LiteRT float and int8
    (XNNPACK, one thread), timed at every width of `TILE_WIDTHS`."""
    import keras
    import numpy as np

    from export import tflite

    _require_litert()
    shape = (16, 16, 32)
    calibration = np.random.default_rng(0).standard_normal((16,) + shape).astype("float32")
    probes = _tile_probes()
    bar = keras.utils.Progbar(len(probes) * 2, verbose=1 if verbose else 0, unit_name="probe")
    tiles = {}
    for label, make in probes:
        models = []
        for width in TILE_WIDTHS:
            inputs = keras.Input(shape, batch_size=1)
            models.append(keras.Model(inputs, make(width)(inputs)))
        for runtime, convert in (
                ("f32", tflite.convert),
                ("int8", lambda m: tflite.convert(m, int8=True, representative=calibration))):
            # The fastest round: another process slows a round down, never up.
            times = _time([convert(m) for m in models], reduce=min)
            tiles.setdefault(label, {})[runtime] = tile_from_times(dict(zip(TILE_WIDTHS, times)))
            bar.add(1)
    return tiles


def channel_tile(verbose=True):
    """The output-channel tile of LiteRT (XNNPACK, one thread, float and int8) on this
    machine: the largest tile every probe (`measure_tiles`) agrees with. Measured once
    per machine and runtime version, cached (`$KERAS_STG_CACHE/latency.json`); measure
    it on an idle machine, as the per-layer costs. `channel_multiple="auto"` keeps each
    channel group's channels in multiples of it."""
    cache = _Cache()
    if "tile" not in cache:
        if verbose:
            print("keras_stg: measuring the LiteRT output-channel tile of this machine "
                  f"(cached in {cache.path})")
        tiles = measure_tiles(verbose)
        cache["tile"] = {"tile": min(t for probe in tiles.values() for t in probe.values()),
                         "probes": tiles}
        cache.save()
    return int(cache["tile"]["tile"])


def resolve_multiple(channel_multiple):
    """`channel_multiple` as a number: this machine's `channel_tile()` where it is "auto"."""
    return channel_tile() if channel_multiple == "auto" else channel_multiple


def model_latency(model):
    """The dense model's batch-1 LiteRT latency in milliseconds."""
    from export import tflite

    return _time([tflite.convert(model)])[0]


class _Cache:
    def __init__(self):
        self.path = cache_path()
        try:
            with open(self.path) as f:
                self.data = json.load(f)
        except (OSError, ValueError):
            self.data = {}
        self.changed = False

    def key(self, key):
        return f"v{CACHE_VERSION}|{machine()}|{key}"

    def __contains__(self, key):
        return self.key(key) in self.data

    def __getitem__(self, key):
        return self.data[self.key(key)]

    def __setitem__(self, key, value):
        self.data[self.key(key)] = value
        self.changed = True

    def save(self):
        if self.changed:
            from keras_stg import _files

            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            _files.atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def measure(model, targets, verbose=True):
    """The cost table of `model`'s gated kernels `targets` on this machine.

    Layer configurations and models measured before on this machine come from
    the cache; the rest are measured (a progress bar shows them).

    Returns a dict: `"unit_ms"` (per target name: milliseconds per kernel
    weight), `"fixed_ms"` (the latency no gate removes), `"total_ms"` (the
    dense model's measured latency) and `"machine"`.
    """
    import keras

    cache = _Cache()
    layer_table.record_shapes(model)
    layers = {}
    for t in targets:
        layers.setdefault(id(t.layer), (t.layer, f"layer:{_signature(t.layer)}"))
    model_key = f"model:{_model_signature(model)}"
    todo = [(layer, key) for layer, key in layers.values() if key not in cache]
    todo = list({key: (layer, key) for layer, key in todo}.values())  # one per configuration
    if todo or model_key not in cache:
        _require_litert()
        bar = keras.utils.Progbar(len(todo) + 1, verbose=1 if verbose else 0,
                                  unit_name="measurement")
        if verbose:
            print(f"keras_stg: measuring LiteRT latency of {len(todo)} layer configurations "
                  f"and the model {model.name!r} (cached in {cache.path})")
        for layer, key in todo:
            cache[key] = layer_slope(layer)
            bar.add(1)
        if model_key not in cache:
            cache[model_key] = model_latency(model)
        bar.add(1)
        cache.save()
    unit = {t.name: float(cache[layers[id(t.layer)][1]]) for t in targets}
    total = float(cache[model_key])
    variable = sum(unit[t.name] * math.prod(t.variable.shape) for t in targets)
    return {"unit_ms": unit, "fixed_ms": float(max(0.0, total - variable)),
            "total_ms": total, "machine": machine()}


def unit_costs(table, targets):
    """`(per-target cost of one kernel weight, fixed cost)` from a cost table; a target the
    table does not name is an error naming it."""
    missing = [t.name for t in targets if t.name not in table["unit_ms"]]
    if missing:
        raise ValueError(
            f"The latency cost table has no entry for {', '.join(missing[:5])}: it was "
            "measured for another model. Drop cost_table to measure this one.")
    return [float(table["unit_ms"][t.name]) for t in targets], float(table["fixed_ms"])
