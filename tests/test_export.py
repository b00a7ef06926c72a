"""Edge export (issue 4): TFLite / ONNX parity, sparse size, int8, shrink, Edge TPU, CLI."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_stg
from export import _common, edgetpu, onnx, tflite
from keras_stg.experiments import models
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ticket(model, granularity="weight", keep=0.5, seed=0, skip=()):
    gated = keras_stg.wrap(model, mode="slt", granularity=granularity, seed=seed)
    return helpers.random_masks(gated, keep, seed, skip)


def _save_gated(gated, path):
    x = np.zeros((1,) + tuple(gated.base_model.input_shape[1:]), "float32")
    gated(x)  # built and called, so the file loads back complete
    gated.save(path)
    return path


def _op_names(data):
    schema = edgetpu._schema()
    fb = schema.ModelT.InitFromPackedBuf(data, 0)
    names = edgetpu._names(schema.BuiltinOperator)
    return {
        names[max(fb.operatorCodes[o.opcodeIndex].builtinCode,
                  fb.operatorCodes[o.opcodeIndex].deprecatedBuiltinCode)]
        for o in fb.subgraphs[0].operators
    }


# ------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", list(helpers.MODELS))
def test_float_parity_tflite_and_onnx(family):
    """Float TFLite and ONNX match the stripped Keras model within 1e-5."""
    gated = _ticket(helpers.MODELS[family](), keep=0.5)
    stripped = gated.strip()
    x, _ = helpers.batch(stripped, 3)
    reference = helpers.infer(stripped, x)
    assert helpers.max_diff(reference, helpers.infer(gated, x)) <= 1e-5

    data = tflite.convert(stripped)
    assert not any(op.startswith("FLEX") or op == "CUSTOM" for op in _op_names(data))
    runner = tflite.Runner(data)
    assert list(runner.input["shape"]) == [1] + list(stripped.input_shape[1:])
    assert helpers.max_diff(runner(x), reference) <= 1e-5

    proto = onnx.convert(stripped)
    session = onnx.Runner(proto)
    assert [i.name for i in session.session.get_inputs()] == [session.input.name]
    assert helpers.max_diff(session(x), reference) <= 1e-5
    if family == "vit":  # exact GELU went through our Erfc mapping
        import onnx as onnx_pkg

        ops = {n.op_type for n in onnx_pkg.load_from_string(proto).graph.node}
        assert "Erf" in ops and "Erfc" not in ops


def test_onnx_zeros_stay_zeros(tmp_path):
    """The pruned kernel entries are exact zeros in the ONNX initializers."""
    import onnx as onnx_pkg
    from onnx import numpy_helper

    gated = _ticket(models.lenet_300_100((784,)), keep=0.1)
    path = str(tmp_path / "lenet.onnx")
    report = onnx.export(gated, path, latency_runs=3, num_samples=4, verbose=False)
    weights = [numpy_helper.to_array(t) for t in onnx_pkg.load(path).graph.initializer]
    big = [w for w in weights if w.size >= 1000]
    assert big and all(np.mean(w == 0) > 0.8 for w in big)
    assert report["parity"]["max_abs_diff"] <= 1e-5
    assert report["latency_ms"] > 0


# --------------------------------------------------------------- size, int8


def test_sparse_export_size_and_report(tmp_path, shared_data):
    gated = _ticket(models.lenet_300_100((28, 28, 1)), keep=0.1)
    model_path = _save_gated(gated, str(tmp_path / "gated.keras"))
    out, report_path = str(tmp_path / "lenet.tflite"), str(tmp_path / "report.json")
    report = tflite.export(model_path, out, sparse=True, report=report_path, samples="mnist",
                           data_dir=shared_data, num_samples=32, latency_runs=5, verbose=False)
    data = open(out, "rb").read()
    assert "DENSIFY" in _op_names(data)
    size = report["size"]
    assert size["bytes"] == len(data)
    assert size["ratio_vs_dense_float"] < 0.17  # 90% zeros: CSR values + uint16 indices
    assert size["gzip_bytes"] < size["dense_float_bytes"]
    assert abs(report["weights"]["sparsity"] - gated.sparsity()) < 1e-6
    assert report["parity"]["max_abs_diff"] <= 1e-5
    assert report["parity_data"] == "mnist" and report["parity"]["samples"] == 32
    assert report["latency_ms"] > 0 and report["dense_float_latency_ms"] > 0
    assert json.load(open(report_path))["size"] == size
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_block_sparse_export_is_smaller():
    """1x4 blocks are encoded per block: smaller than random sparsity at equal density."""
    sizes = {}
    for granularity in ("weight", "block4"):
        keras.utils.set_random_seed(0)
        gated = _ticket(models.lenet_300_100((784,)), granularity=granularity, keep=0.1)
        sizes[granularity] = len(tflite.convert(gated.strip(), sparse=True))
    assert sizes["block4"] < 0.85 * sizes["weight"]


def _trained_mlp(shared_data, n=6000):
    from keras_stg.experiments import data

    keras.utils.set_random_seed(0)
    x, y = data.load("mnist", "train", shared_data)
    x = data.normalize(x[:n], "mnist").reshape(n, -1)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y[:n], batch_size=128, epochs=2, verbose=0)
    gated = keras_stg.wrap(model, mode="post_training", seed=0)
    for gate, target in zip(gated.gates, gated.targets):  # magnitude masks, 50% kept
        w = np.abs(target.variable.numpy())
        gate.mu.assign(np.where(w >= np.median(w), 0.5, -0.5).astype("float32"))
    return gated


def test_int8_top1_agreement(tmp_path, shared_data):
    gated = _trained_mlp(shared_data)
    out = str(tmp_path / "mlp_int8.tflite")
    report = tflite.export(gated, out, int8=True, calibration="mnist", data_dir=shared_data,
                           num_samples=1000, num_calibration=200, latency_runs=5, verbose=False)
    parity = report["parity"]
    assert parity["samples"] == 1000 and report["parity_data"] == "mnist"
    assert parity["top1_agreement"] >= 0.98
    assert parity["keras_accuracy"] > 0.7
    assert parity["keras_accuracy"] - parity["export_accuracy"] <= 0.01
    runner = tflite.Runner(open(out, "rb").read())
    assert runner.input["dtype"] == np.int8 and runner.output["dtype"] == np.int8
    assert report["size"]["bytes"] < 0.4 * report["size"]["dense_float_bytes"]


def test_onnx_int8_top1_agreement(tmp_path, shared_data):
    gated = _trained_mlp(shared_data)
    out = str(tmp_path / "mlp_int8.onnx")
    report = onnx.export(gated, out, int8=True, calibration="mnist", data_dir=shared_data,
                         num_samples=500, latency_runs=5, verbose=False)
    parity = report["parity"]
    assert report["options"]["int8"] and report["parity_data"] == "mnist"
    assert parity["top1_agreement"] >= 0.97  # a weak MLP (80%): near-ties flip

    assert parity["keras_accuracy"] - parity["export_accuracy"] <= 0.01
    import onnx as onnx_pkg

    ops = {n.op_type for n in onnx_pkg.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert report["size"]["bytes"] < 0.5 * report["size"]["dense_float_bytes"]


@pytest.mark.parametrize("argv,message", [
    (["--int8"], "--int8 needs calibration data"),
    (["--int8", "--calibration", "mnist", "--opset", "11"], "--int8 needs --opset 13"),
    (["--channel-multiple", "8"], "--channel-multiple rounds the channels --shrink keeps; add "
                                  "--shrink"),
    (["--shrink", "--channel-multiple", "0"], "--channel-multiple must be an integer >= 1"),
    (["--shrink", "--channel-multiple", "fast"], "must be an integer >= 1 or 'auto'"),
])
def test_onnx_int8_cli_errors(argv, message, lenet_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        onnx.main(["--model", lenet_file, "--out", str(tmp_path / "m.onnx")] + argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_channel_multiple_option_takes_a_number_or_auto():
    from export import _common

    assert _common.check_channel_multiple("16", shrink=True) == 16
    assert _common.check_channel_multiple("auto", shrink=True) == "auto"
    assert _common.check_channel_multiple(None, shrink=False) is None


def test_int8_sparse_runs_without_default_delegates():
    gated = _ticket(models.lenet_300_100((784,)), keep=0.1)
    stripped = gated.strip()
    x, _ = helpers.batch(stripped, 8)
    data = tflite.convert(stripped, sparse=True, int8=True, representative=x)
    runner = tflite.Runner(data)
    out = runner(x)
    assert out.shape == (8, 10) and np.all(np.isfinite(out))


# ------------------------------------------------------------------- shrink


def test_onnx_shrink_export_is_smaller_and_exact(tmp_path):
    gated = _ticket(models.lenet_300_100((784,)), granularity="unit", keep=0.5, skip=("fc3",))
    full = onnx.export(gated, str(tmp_path / "full.onnx"), num_samples=8, latency_runs=0,
                       verbose=False)
    small = onnx.export(gated, str(tmp_path / "small.onnx"), shrink=True, num_samples=8,
                        latency_runs=0, verbose=False)
    assert small["parity"]["max_abs_diff"] <= 1e-5
    assert small["shrink"]["units"]["fc1"][1] < 300
    assert small["size"]["bytes"] < 0.5 * full["size"]["bytes"]
    assert small["options"] == {"opset": onnx.DEFAULT_OPSET, "shrink": True, "int8": False}


def test_onnx_rewrites_grouped_depthwise_convolutions_and_names_other_groups(tmp_path):
    # Keras runs `Conv2D(groups=...)` as an XLA function tf2onnx cannot read: one input
    # channel per group (with a depth multiplier too) exports as DepthwiseConv2D.
    model = helpers.grouped_depthwise()
    x, _ = helpers.batch(model, n=4)
    out = onnx.Runner(onnx.convert(model))(x)
    assert helpers.max_diff(out, helpers.infer(model, x)) <= 1e-5
    assert [type(layer).__name__ for layer in model.layers].count("DepthwiseConv2D") == 0
    inputs = keras.Input((12, 4))  # the same in one dimension, with a depth multiplier
    y = keras.layers.Conv1D(8, 3, groups=4, padding="same", activation="relu")(inputs)
    sequence = keras.Model(inputs, keras.layers.Conv1D(8, 5, groups=8, use_bias=False)(y))
    x1, _ = helpers.batch(sequence, n=4)
    out = onnx.Runner(onnx.convert(sequence))(x1)
    assert helpers.max_diff(out, helpers.infer(sequence, x1)) <= 1e-5
    path = tmp_path / "g.onnx"
    with pytest.raises(_common.ExportError, match="grouped convolution 'grouped' \\(groups=2, "
                       "4 input channels per group\\).*export.tflite"):
        onnx.export(helpers.grouped_depthwise(four_per_group=True), str(path), num_samples=4,
                    latency_runs=0, verbose=False)
    assert not path.exists()


def test_shrink_export_of_a_residual_network(tmp_path):
    model = helpers.tiny_resnet50()
    helpers.zero_channel_groups(model, share=0.5, seed=0)
    out = str(tmp_path / "r.tflite")
    report = tflite.export(model, out, shrink=True, num_samples=8, latency_runs=5,
                           verbose=False)
    assert report["parity"]["max_abs_diff"] <= 1e-5
    assert report["shrink"]["parameters_after"] < 0.6 * report["shrink"]["parameters_before"]
    assert report["size"]["ratio_vs_dense_float"] < 0.7
    assert report["shrink"]["units"]["conv2_block1_0_conv"][1] < 16


def test_shrink_export_is_smaller_and_exact(tmp_path):
    gated = _ticket(models.conv4((16, 16, 1)), granularity="unit", keep=0.5, skip=("fc3",))
    out = str(tmp_path / "c.tflite")
    report = tflite.export(gated, out, shrink=True, num_samples=8, latency_runs=20,
                           verbose=False)
    assert report["parity"]["max_abs_diff"] <= 1e-5
    assert report["size"]["ratio_vs_dense_float"] < 0.4
    assert report["shrink"]["units"]["conv1"][1] < 64
    assert report["weights_after_shrink"]["kernel_weights"] < report["weights"]["kernel_weights"]
    assert report["latency_ms"] > 0


# ------------------------------------------------------------------ Edge TPU


@pytest.mark.parametrize("family", ["lenet", "conv4", "tiny_mobilenet_v2"])
def test_edgetpu_ready(family, tmp_path):
    build = {"lenet": helpers.lenet, "conv4": lambda: models.conv4((32, 32, 3)),
             "tiny_mobilenet_v2": helpers.tiny_mobilenet_v2}[family]
    gated = _ticket(build(), keep=0.5)
    shape = tuple(gated.base_model.input_shape[1:])
    calib = str(tmp_path / "calib.npy")
    np.save(calib, np.random.default_rng(0).standard_normal((16,) + shape).astype("float32"))
    out = str(tmp_path / "m_edgetpu.tflite")
    report = tflite.export(gated, out, edgetpu=True, calibration=calib, num_samples=8,
                           latency_runs=0, baseline=False, verbose=False)
    assert report["edgetpu"]["ready"], report["edgetpu"]["problems"]
    assert report["edgetpu"]["command"].startswith("edgetpu_compiler")
    data = open(out, "rb").read()
    assert edgetpu.check(data) == []
    runner = tflite.Runner(data)
    assert runner.input["dtype"] == np.int8 and list(runner.input["shape"])[0] == 1


def test_edgetpu_check_lists_every_offender(tmp_path, capsys):
    # A float file: every float tensor, the float input and output are listed.
    float_data = tflite.convert(models.lenet_300_100((784,)))
    problems = edgetpu.check(float_data)
    assert len(problems) >= 5
    assert any("model input is float32" in str(p) for p in problems)
    assert any("model output is float32" in str(p) for p in problems)
    # An int8 file with an op the Edge TPU lacks (GELU): export fails, nothing written.
    inputs = keras.Input((16,))
    x = keras.layers.Dense(8, activation="gelu", name="fc")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    path = str(tmp_path / "gelu.keras")
    model.save(path)
    calib = str(tmp_path / "calib.npy")
    np.save(calib, np.random.default_rng(0).standard_normal((16, 16)).astype("float32"))
    out = str(tmp_path / "gelu.tflite")
    with pytest.raises(SystemExit) as exit_info:
        tflite.main(["--model", path, "--out", out, "--edgetpu", "--calibration", calib])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "GELU" in err and "not supported by the Edge TPU" in err
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


# ----------------------------------------------------------------- CLI, I/O


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = str(tmp_path_factory.mktemp("lenet") / "gated.keras")
    return _save_gated(_ticket(models.lenet_300_100((28, 28, 1)), keep=0.2), path)


@pytest.mark.parametrize("argv, message", [
    (["--out", "{d}/m.tfl"], "must end with '.tflite'"),
    (["--model", "{d}/missing.keras"], "does not exist"),
    (["--int8"], "--int8 needs calibration data"),
    (["--edgetpu", "--sparse", "--calibration", "mnist"], "cannot be combined with --edgetpu"),
    (["--int8", "--calibration", "imagenet"], "neither a dataset name"),
    (["--int8", "--calibration", "{d}/none.npy"], "does not exist"),
    (["--model", "{d}"], "holds no gated.keras or stripped.keras"),
    (["--report", "{d}/r.txt"], "must end with '.json'"),
])
def test_tflite_cli_errors(argv, message, lenet_file, tmp_path, capsys):
    args = {"--model": lenet_file, "--out": str(tmp_path / "m.tflite")}
    extra = []
    i = 0
    while i < len(argv):
        if argv[i] in args and i + 1 < len(argv):
            args[argv[i]] = argv[i + 1].format(d=tmp_path)
            i += 2
        else:
            extra.append(argv[i].format(d=tmp_path))
            i += 1
    full = [a for kv in args.items() for a in kv] + extra
    with pytest.raises(SystemExit) as exit_info:
        tflite.main(full)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_edgetpu_dynamic_shape_error(tmp_path, capsys):
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    path = str(tmp_path / "dyn.keras")
    model.save(path)
    with pytest.raises(SystemExit) as exit_info:
        tflite.main(["--model", path, "--out", str(tmp_path / "d.tflite"), "--edgetpu",
                     "--calibration", "mnist"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "dynamic input shape" in err and "fixed input shape" in err
    assert not os.path.exists(tmp_path / "d.tflite")


def test_onnx_cli(lenet_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        onnx.main(["--model", lenet_file, "--out", str(tmp_path / "m.onnx"), "--opset", "3"])
    assert exit_info.value.code == 2
    assert "--opset must be an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        onnx.main(["--model", lenet_file, "--out", str(tmp_path / "m.tflite")])
    assert "must end with '.onnx'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    report = str(tmp_path / "r.json")
    onnx.main(["--model", lenet_file, "--out", str(tmp_path / "m.onnx"), "--report", report,
               "--num-samples", "4", "--runs", "3"])
    out = capsys.readouterr().out
    assert "onnx export" in out and "max abs diff" in out
    saved = json.load(open(report))
    assert saved["parity"]["max_abs_diff"] <= 1e-5 and saved["weights"]["sparsity"] > 0.7


def test_run_dir_and_subprocess_cli(lenet_file, tmp_path, shared_data):
    """A training run folder works as --model; the real command prints a report."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(lenet_file, run / "gated.keras")
    (run / "metrics.json").write_text(json.dumps({"config": {"dataset": "mnist"}}))
    out, report = str(tmp_path / "m.tflite"), str(tmp_path / "r.json")
    proc = subprocess.run(
        [sys.executable, "-m", "export.tflite", "--model", str(run), "--out", out, "--sparse",
         "--data-dir", shared_data, "--num-samples", "16", "--runs", "5", "--report", report],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tflite export" in proc.stdout and "ratio" in proc.stdout
    saved = json.load(open(report))
    assert saved["parity_data"] == "mnist" and saved["parity"]["max_abs_diff"] <= 1e-5
    assert os.path.getsize(out) == saved["size"]["bytes"]
    bad = subprocess.run(
        [sys.executable, "-m", "export.tflite", "--model", str(run), "--out", out + ".bin"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "must end with '.tflite'" in bad.stderr


def test_failed_conversion_writes_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise _common.ExportError("conversion failed")

    monkeypatch.setattr(tflite, "convert", fail)
    gated = _ticket(models.lenet_300_100((784,)), keep=0.5)
    with pytest.raises(_common.ExportError):
        tflite.export(gated, str(tmp_path / "m.tflite"), report=str(tmp_path / "r.json"),
                      verbose=False)
    assert os.listdir(tmp_path) == []


def test_op_without_builtin_kernel_is_a_clear_error(tmp_path):
    import tensorflow as tf

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(tf.math.bessel_i0)(inputs))
    with pytest.raises(_common.ExportError, match="BesselI0.*Flex"):
        tflite.export(model, str(tmp_path / "m.tflite"), verbose=False)
    assert os.listdir(tmp_path) == []


def test_import_has_no_side_effects():
    code = ("import sys, os; import export; from export import tflite, onnx, edgetpu; "
            "print('tensorflow' in sys.modules, os.environ.get('TF_USE_LEGACY_KERAS'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "None"]


def test_a_failed_shrink_check_writes_nothing(tmp_path, monkeypatch, capsys):
    from keras_stg import shrinking

    model = helpers.tiny_resnet50()
    helpers.zero_channel_groups(model, share=0.5, seed=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    real = shrinking._shrink_graph

    def wrong(model, multiple=1):  # a shrunk model whose outputs are off
        small, units, unprunable = real(model, multiple)
        bias = small.get_layer("predictions").bias
        bias.assign(bias.numpy() + np.arange(bias.shape[0], dtype="float32"))
        return small, units, unprunable

    monkeypatch.setattr(shrinking, "_shrink_graph", wrong)
    out = tmp_path / "m.tflite"
    with pytest.raises(SystemExit) as exit_info:
        tflite.main(["--model", path, "--out", str(out), "--shrink", "--runs", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Shrinking changed the outputs" in err and "export without --shrink" in err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["m.keras"]
