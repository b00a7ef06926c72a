"""Compact tickets (issue 19): `save_ticket` / `load_ticket`, the file's checks, the CLI."""

import json
import os
import struct
import subprocess
import sys
import zlib

import keras
import numpy as np
import pytest

import keras_stg
from keras_stg import ticket
from keras_stg.experiments import models
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv_bn():
    """A small conv net with BatchNormalization that every granularity gates."""
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(12, 3, padding="same", name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu", name="d1")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="d2")(x), name="conv_bn")


def _gated(build, granularity="weight", keep=0.3, seed=7, **options):
    """A ticket: `wrap`'s weights, a random mask keeping about `keep`, and (with
    BatchNormalization) moving statistics that are not the initial ones."""
    gated = keras_stg.wrap(build(), seed=seed, granularity=granularity, **options)
    rng = np.random.default_rng(seed)
    for gate in gated.gates:
        gate.mu.assign(np.where(rng.random(gate.mu.shape) < keep, 0.5, -0.5).astype("float32"))
    for v in gated.base_model.weights:
        if "moving" in v.path:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
    return gated


def _bits(model):
    return [np.asarray(v.numpy()).tobytes() for v in model.weights]


def _rewrite(data, version=None, header=None, body=None):
    """The ticket `data` with another version, header dict or body, its checksum valid."""
    magic, old_version, header_size, body_size, _ = ticket._PREAMBLE.unpack_from(data)
    start = ticket._PREAMBLE.size
    packed = data[start:start + header_size]
    if header is not None:
        packed = zlib.compress(json.dumps(header).encode())
    body = data[start + header_size:] if body is None else body
    version = old_version if version is None else version
    fields = struct.pack("<HII", version, len(packed), len(body))
    crc = zlib.crc32(body, zlib.crc32(packed, zlib.crc32(fields)))
    return ticket._PREAMBLE.pack(magic, version, len(packed), len(body), crc) + packed + body


def _header(data):
    size = ticket._PREAMBLE.unpack_from(data)[2]
    start = ticket._PREAMBLE.size
    return json.loads(zlib.decompress(data[start:start + size]))


@pytest.fixture(scope="module")
def lenet_ticket(tmp_path_factory):
    """`(path, bytes, stripped model)` of a LeNet ticket at about 90% sparsity."""
    keras.utils.set_random_seed(0)
    gated = _gated(lambda: models.lenet_300_100((28, 28, 1)), keep=0.1, seed=3)
    path = str(tmp_path_factory.mktemp("ticket") / "lenet.ticket")
    keras_stg.save_ticket(gated, path)
    with open(path, "rb") as f:
        return path, f.read(), gated.strip()


# --------------------------------------------------------------- round trips


@pytest.mark.parametrize("build, granularity", [
    (helpers.lenet, "weight"), (helpers.lenet, "unit"), (helpers.lenet, "block4"),
    (conv_bn, "weight"), (conv_bn, "unit"), (conv_bn, "block4"), (conv_bn, "channel"),
])
def test_round_trip_is_exact(build, granularity, tmp_path):
    gated = _gated(build, granularity)
    path = str(tmp_path / "m.ticket")
    info = keras_stg.save_ticket(gated, path)
    loaded = keras_stg.load_ticket(path)
    stripped = gated.strip()

    assert isinstance(loaded, keras.Model) and not isinstance(loaded, keras_stg.MaskedModel)
    assert type(loaded) is type(stripped)
    assert [v.path for v in loaded.weights] == [v.path for v in stripped.weights]
    assert _bits(loaded) == _bits(stripped)  # bit for bit, zeros' signs included
    x, _ = helpers.batch(stripped, 8)
    assert helpers.max_diff(helpers.infer(loaded, x), helpers.infer(gated, x)) == 0.0
    assert helpers.max_diff(helpers.infer(loaded, x), helpers.infer(stripped, x)) == 0.0

    # The masks are the gated model's, and only they (and the stored weights) take bytes.
    position = {id(v): i for i, v in enumerate(gated.base_model.weights)}
    for target, mask in zip(gated.targets, gated.masks()):
        kept = loaded.weights[position[id(target.variable)]].numpy() != 0
        np.testing.assert_array_equal(kept, mask)
    assert info["bytes"] == os.path.getsize(path)
    assert info["bytes"] == info["header_bytes"] + info["mask_bytes"] + info["weight_bytes"]
    assert info["granularity"] == granularity and info["recipe"]["seed"] == 7
    gates = {k["path"]: k["bits"] for k in info["kernels"]}
    if granularity == "weight":
        assert info["mask_bytes"] <= 1.05 * info["entropy_bound_bytes"] + 8 * len(gates)
    elif granularity in ("unit", "block4"):  # at most one bit per gate
        for target, gate in zip(gated.targets, gated.gates):
            assert gates[target.variable.path] <= np.prod(gate.gate_shape)
    elif granularity == "channel":  # kept inputs and outputs, not their product
        assert gates["c2/kernel"] <= 8 + 12
    if granularity != "weight":
        assert info["mask_bytes"] < 0.3 * info["entropy_bound_bytes"]


def test_plain_stripped_model_with_its_recipe(tmp_path):
    gated = _gated(helpers.lenet, target_sparsity=0.8, init_density="auto", seed=5)
    stripped = gated.strip()
    path = str(tmp_path / "s.ticket")
    keras_stg.save_ticket(stripped, path, seed=5, density=gated.config.init_density)
    assert _bits(keras_stg.load_ticket(path)) == _bits(stripped)
    # `np.where(mask, w, 0)` leaves positive zeros: also reproduced bit for bit.
    for v in stripped.weights:
        v.assign(np.where(v.numpy() != 0, v.numpy(), 0.0).astype("float32"))
    keras_stg.save_ticket(stripped, path, seed=5, density=gated.config.init_density)
    assert _bits(keras_stg.load_ticket(path)) == _bits(stripped)
    assert _header(open(path, "rb").read())["weights"][0]["zeros"] == "positive"


@pytest.mark.parametrize("recipe, message", [
    ({"seed": 6, "density": 0.2}, "Kernel 'fc1/kernel' is not the recipe's weights times a mask:"),
    ({"seed": 5}, "The recipe (init='signed_constant', seed=5, gain=1.4142135623730951, "
                  "density=None) does not regenerate this model"),
    ({"seed": 5, "density": 0.2, "init": "kaiming_uniform"}, "kept weights differ"),
    ({}, "save_ticket(model, path, seed=...) needs the seed"),
    ({"seed": -1}, "`seed` must be an integer in [0, 2**64), got -1."),
    ({"seed": 5, "init": "kaiming_normal"}, "init='kaiming_normal' cannot be saved as a ticket"),
    ({"seed": 5, "init": "glorot"}, "Unknown init 'glorot'"),
])
def test_plain_model_with_a_wrong_recipe_is_refused(recipe, message, tmp_path):
    stripped = _gated(helpers.lenet, target_sparsity=0.8, init_density="auto", seed=5).strip()
    path = tmp_path / "s.ticket"
    with pytest.raises(keras_stg.TicketError) as info:
        keras_stg.save_ticket(stripped, str(path), **recipe)
    assert message in str(info.value)
    assert os.listdir(tmp_path) == []


def test_trained_weights_name_the_sparse_export(tmp_path):
    gated = _gated(helpers.lenet, seed=2)
    stripped = gated.strip()
    stripped.weights[1].assign(stripped.weights[1].numpy() * 1.5)
    with pytest.raises(keras_stg.TicketError) as info:
        keras_stg.save_ticket(stripped, str(tmp_path / "s.ticket"), seed=2)
    text = str(info.value)
    assert "Kernel 'fc2/kernel'" in text and "kept weights differ, the first at flat index" in text
    assert "python -m export.tflite --model M --out model.tflite --sparse" in text


@pytest.mark.parametrize("mode", ["post_training", "joint"])
def test_only_slt_tickets(mode, tmp_path):
    gated = keras_stg.wrap(helpers.lenet(), mode=mode, seed=0)
    with pytest.raises(keras_stg.TicketError) as info:
        keras_stg.save_ticket(gated, str(tmp_path / "m.ticket"))
    assert str(info.value) == (
        f"Only slt tickets (random weights drawn from a seed) can be saved as tickets; "
        f"'gated_lenet_300_100' is mode='{mode}', whose weights are not regenerable from a "
        f"seed: ship it with `python -m export.tflite --model M --out model.tflite --sparse` "
        f"instead.")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("options, message", [
    ({"init": "kaiming_normal"}, "init='kaiming_normal' cannot be saved as a ticket: its draws "
                                 "need log and cos"),
    ({"init": None}, "'gated_lenet_300_100' was wrapped with init=None"),
])
def test_recipes_that_do_not_regenerate_are_refused(options, message, tmp_path):
    gated = keras_stg.wrap(helpers.lenet(), seed=0, **options)
    with pytest.raises(keras_stg.TicketError) as info:
        keras_stg.save_ticket(gated, str(tmp_path / "m.ticket"))
    assert message in str(info.value)


def test_gated_model_reads_its_recipe(tmp_path):
    gated = _gated(helpers.lenet, seed=4)
    with pytest.raises(keras_stg.TicketError) as info:
        keras_stg.save_ticket(gated, str(tmp_path / "m.ticket"), seed=4)
    assert "reads the recipe of a GatedModel from its config; drop seed=" in str(info.value)
    # Without a seed `wrap` draws with seed 0: the ticket records it, checked bit for bit.
    unseeded = keras_stg.wrap(helpers.lenet())
    helpers.random_masks(unseeded, 0.3)
    info = keras_stg.save_ticket(unseeded, str(tmp_path / "u.ticket"))
    assert info["recipe"]["seed"] == 0
    assert _bits(keras_stg.load_ticket(str(tmp_path / "u.ticket"))) == _bits(unseeded.strip())


def test_excluded_kernels_and_biases_are_stored(tmp_path):
    model = models.lenet_300_100((28, 28, 1), use_bias=True)
    gated = _gated(lambda: model, exclude="fc3", seed=1)
    model.get_layer("fc1").bias.assign(np.linspace(-1, 1, 300).astype("float32"))
    model.get_layer("fc2").bias.assign(np.full(100, 0.25, "float32"))
    path = str(tmp_path / "b.ticket")
    keras_stg.save_ticket(gated, path)
    stores = {w["path"]: w["store"] for w in _header(open(path, "rb").read())["weights"]}
    assert stores == {"fc1/kernel": "kernel", "fc1/bias": "raw", "fc2/kernel": "kernel",
                      "fc2/bias": "fill", "fc3/kernel": "raw", "fc3/bias": "zeros"}
    assert _bits(keras_stg.load_ticket(path)) == _bits(gated.strip())


def test_ticket_info_and_metadata(tmp_path):
    gated = _gated(helpers.lenet, keep=0.1, seed=3)
    path = str(tmp_path / "m.ticket")
    keras_stg.save_ticket(gated, path, metadata={"dataset": "mnist", "accuracy": 0.98})
    info = ticket.ticket_info(path)
    assert info["metadata"] == {"dataset": "mnist", "accuracy": 0.98}
    assert info["model"] == "lenet_300_100" and info["kernel_weights"] == 266_200
    assert info["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert info["header_bytes"] <= 2048
    assert info["bytes"] <= 1.05 * info["entropy_bound_bytes"] + 2048
    with pytest.raises(keras_stg.TicketError, match="`metadata` must be JSON-serializable"):
        keras_stg.save_ticket(gated, path, metadata={"x": object()})


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-10], "is truncated: "),
    (lambda d: d[:30], "is truncated: "),
    (lambda d: d + b"\0", "has 1 bytes after its end"),
    (lambda d: d[:-100] + bytes([d[-100] ^ 1]) + d[-99:], "is corrupt: its checksum does not "
                                                          "match its contents"),
    (lambda d: d[:40] + bytes([d[40] ^ 0x10]) + d[41:], "is corrupt: its checksum"),
    (lambda d: d[:9] + bytes([d[9] ^ 1]) + d[10:], "is corrupt: its checksum"),
    (lambda d: b"PK\x03\x04" + d[4:], "is not a keras-stg ticket"),
    (lambda d: b"", "is not a keras-stg ticket"),
    (lambda d: _rewrite(d, version=99), "has ticket format version 99; this keras-stg reads "
                                        "version 1"),
])
def test_damaged_files_are_clear_errors(damage, message, lenet_ticket, tmp_path):
    _, data, _ = lenet_ticket
    path = tmp_path / "bad.ticket"
    path.write_bytes(damage(data))
    with pytest.raises(keras_stg.TicketError) as info:
        keras_stg.load_ticket(str(path))
    assert message in str(info.value) and repr(str(path)) in str(info.value)
    with pytest.raises(keras_stg.TicketError):
        ticket.ticket_info(str(path))


def test_other_algorithms_are_refused(lenet_ticket):
    _, data, _ = lenet_ticket
    header = _header(data)
    header["generator"] = "philox4x64-10:other-conversions"
    with pytest.raises(keras_stg.TicketError) as info:
        keras_stg.load_ticket(_rewrite(data, header=header))
    assert ("written with the generator 'philox4x64-10:other-conversions'; this keras-stg has "
            in str(info.value))
    header = _header(data)
    header["coder"] = "rans"
    with pytest.raises(keras_stg.TicketError, match="written with the coder 'rans'"):
        keras_stg.load_ticket(_rewrite(data, header=header))


def test_unimportable_layer_class(lenet_ticket):
    _, data, _ = lenet_ticket
    header = _header(data)
    layer = next(l for l in header["model"]["config"]["layers"] if l["name"] == "fc2")
    layer.update(module="no_such_module", class_name="GatedDense",
                 registered_name="my_package>GatedDense")
    damaged = _rewrite(data, header=header)
    with pytest.raises(keras_stg.TicketError) as info:
        keras_stg.load_ticket(damaged)
    assert str(info.value) == (
        "the ticket needs the layer class 'GatedDense' (module 'no_such_module'), which is "
        "not importable here. Import the module that defines it (its class decorated with "
        "@keras.saving.register_keras_serializable()) before load_ticket, or pass "
        "custom_objects={'my_package>GatedDense': GatedDense}.")
    # With the class given, the same ticket loads.
    loaded = keras_stg.load_ticket(
        damaged, custom_objects={"my_package>GatedDense": keras.layers.Dense})
    assert _bits(loaded) == _bits(lenet_ticket[2])


def test_corrupt_mask_behind_a_valid_checksum(lenet_ticket):
    """A mask that decodes to another count of ones is refused, never a wrong model."""
    _, data, _ = lenet_ticket
    header = _header(data)
    header["weights"][0]["mask"]["ones"] += 1
    with pytest.raises(keras_stg.TicketError, match="the mask of 'fc1/kernel' is corrupt"):
        keras_stg.load_ticket(_rewrite(data, header=header))


def test_missing_file_and_bad_paths(tmp_path):
    with pytest.raises(keras_stg.TicketError, match="does not exist"):
        keras_stg.load_ticket(str(tmp_path / "none.ticket"))
    gated = _gated(helpers.lenet)
    with pytest.raises(keras_stg.TicketError) as info:
        keras_stg.save_ticket(gated, str(tmp_path / "m.bin"))
    assert str(info.value) == (f"Ticket files end in '.ticket'; got {str(tmp_path / 'm.bin')!r}. "
                               f"E.g. {str(tmp_path / 'm')}.ticket.")
    with pytest.raises(keras_stg.TicketError, match="takes a keras_stg.GatedModel or a keras"):
        keras_stg.save_ticket("model.keras", str(tmp_path / "m.ticket"))


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.ticket"
    path.write_bytes(b"the old ticket")
    joint = keras_stg.wrap(helpers.lenet(), mode="joint", seed=0)
    with pytest.raises(keras_stg.TicketError):
        keras_stg.save_ticket(joint, str(path))
    assert path.read_bytes() == b"the old ticket"

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        keras_stg.save_ticket(_gated(helpers.lenet), str(path))
    assert os.listdir(tmp_path) == ["m.ticket"] and path.read_bytes() == b"the old ticket"


def test_mask_descriptions_are_exact():
    rng = np.random.default_rng(0)
    unit = np.broadcast_to(rng.random((1, 7)) < 0.5, (10, 7))
    block = np.repeat(rng.random((3, 5)) < 0.5, 4, axis=0)[:10]
    channel = ((rng.random(6) < 0.5)[:, None] & (rng.random(9) < 0.5)[None, :])[None, None]
    channel = np.broadcast_to(channel, (3, 3, 6, 9))
    weight = rng.random((20, 30)) < 0.1
    cases = [(unit, {"repeat": [10, 1]}, 7), (block, {"repeat": [4, 1]}, 15),
             (channel, {"repeat": [3, 3, 1, 1], "factors": [2, 3]}, 15), (weight, {}, 600)]
    for mask, expected, bits in cases:
        description, coded = ticket._describe_mask(mask)
        assert {k: description[k] for k in ("repeat", "factors") if k in description} == expected
        assert description["bits"] == bits
        description.update(offset=0, length=len(coded))
        entry = {"shape": list(mask.shape), "mask": description, "path": "k"}
        decoded = ticket._mask(entry, coded, {"sections": {"masks": [0, len(coded)]}})
        np.testing.assert_array_equal(decoded, mask)
    for constant in (np.zeros((4, 4), bool), np.ones((4, 4), bool)):
        description, coded = ticket._describe_mask(constant)
        assert coded == b"" and description == {"kept": int(constant.sum())}


# ----------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    """A training run folder: gated.keras of a LeNet ticket, stripped.keras, metrics.json."""
    keras.utils.set_random_seed(0)
    run = tmp_path_factory.mktemp("run")
    gated = _gated(lambda: models.lenet_300_100((28, 28, 1)), keep=0.1, seed=9)
    gated(np.zeros((1, 28, 28, 1), "float32"))
    gated.save(str(run / "gated.keras"))
    gated.strip().save(str(run / "stripped.keras"))
    (run / "metrics.json").write_text(json.dumps({"config": {"dataset": "mnist"}}))
    return run


def test_ticket_cli_writes_and_reports(lenet_run, tmp_path, capsys, shared_data):
    from export import ticket as ticket_cli

    out, report = str(tmp_path / "lenet.ticket"), str(tmp_path / "r.json")
    ticket_cli.main(["--model", str(lenet_run), "--out", out, "--report", report,
                     "--data-dir", shared_data, "--num-samples", "32"])
    printed = capsys.readouterr().out
    assert "ticket export" in printed and "weights bit for bit: True" in printed
    saved = json.load(open(report))
    assert saved["parity"]["max_abs_diff"] == 0 and saved["parity"]["weights_bit_equal"]
    assert saved["parity_data"] == "mnist" and saved["parity"]["samples"] == 32
    size = saved["size"]
    assert size["bytes"] == os.path.getsize(out)
    assert size["bytes"] <= 1.05 * size["entropy_bound_bytes"] + 2048
    assert size["dense_float32_bytes"] == 4 * 266_200
    assert ticket.ticket_info(out)["metadata"] == {"dataset": "mnist"}

    # A stripped model with its recipe on the command line.
    ticket_cli.main(["--model", str(lenet_run / "stripped.keras"), "--out", out, "--seed", "9",
                     "--num-samples", "4"])
    assert "max abs diff 0" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--out", "{d}/m.tflite"], "must end with '.ticket'"),
    (["--model", "{run}/stripped.keras"], "is a stripped model, which does not record how its "
                                          "weights were drawn: pass --seed"),
    (["--seed", "9"], "--seed, --init and --density describe a stripped model"),
    (["--model", "{run}/stripped.keras", "--seed", "8"], "does not regenerate this model"),
    (["--model", "{d}/x.ticket"], "does not exist"),
    (["--report", "{d}/r.txt"], "must end with '.json'"),
])
def test_ticket_cli_errors(argv, message, lenet_run, tmp_path, capsys):
    from export import ticket as ticket_cli

    args = {"--model": str(lenet_run), "--out": str(tmp_path / "m.ticket")}
    extra = []
    for i in range(0, len(argv), 2):
        value = argv[i + 1].format(d=tmp_path, run=lenet_run)
        if argv[i] in args:
            args[argv[i]] = value
        else:
            extra += [argv[i], value]
    with pytest.raises(SystemExit) as exit_info:
        ticket_cli.main([a for kv in args.items() for a in kv] + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_tflite_and_onnx_take_a_ticket(lenet_ticket, tmp_path):
    from export import _common, onnx, tflite

    path, _, stripped = lenet_ticket
    report = tflite.export(path, str(tmp_path / "m.tflite"), sparse=True, latency_runs=0,
                           num_samples=8, verbose=False)
    assert report["model"] == path and report["parity"]["max_abs_diff"] <= 1e-5
    assert report["weights"] == _common.weight_stats(stripped)
    report = onnx.export(path, str(tmp_path / "m.onnx"), latency_runs=0, num_samples=8,
                         verbose=False)
    assert report["parity"]["max_abs_diff"] <= 1e-5


@pytest.mark.e2e
def test_ticket_then_tflite_commands(lenet_run, tmp_path, shared_data):
    """The real commands: a run folder to a ticket, the ticket to a sparse TFLite file."""
    out, report = str(tmp_path / "lenet.ticket"), str(tmp_path / "r.json")
    proc = subprocess.run(
        [sys.executable, "-m", "export.ticket", "--model", str(lenet_run), "--out", out,
         "--report", report, "--data-dir", shared_data, "--num-samples", "16", "--tflite"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    size = json.load(open(report))["size"]
    assert size["sparse_tflite_bytes"] >= 8 * size["bytes"]
    assert "sparse TFLite" in proc.stdout
    tfl, tfl_report = str(tmp_path / "m.tflite"), str(tmp_path / "t.json")
    proc = subprocess.run(
        [sys.executable, "-m", "export.tflite", "--model", out, "--out", tfl, "--sparse",
         "--data-dir", shared_data, "--num-samples", "16", "--runs", "2", "--report",
         tfl_report], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.load(open(tfl_report))
    assert saved["parity_data"] == "mnist" and saved["parity"]["max_abs_diff"] <= 1e-5
    bad = subprocess.run(
        [sys.executable, "-m", "export.ticket", "--model", out, "--out", out],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is already a ticket" in bad.stderr
    assert "Traceback" not in bad.stderr
