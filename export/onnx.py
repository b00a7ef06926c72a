"""Export a ticket to ONNX.

Usage:
    python -m export.onnx --model M --out model.onnx [--opset N] [--shrink [--channel-multiple N]]
        [--int8 --calibration DATA] [--report FILE] [--samples DATA] [--data-dir D]

`M` is a gated or stripped `.keras` file, a `.ticket`
(`keras_stg.save_ticket`) or a training run's output folder.

The model's inference function is traced once (`tf.function`, dynamic batch),
frozen to constants and converted by tf2onnx (`tf2onnx.convert.from_keras`
does not understand Keras 3 models). Two things Keras' own
`model.export(format="onnx")` gets wrong today are fixed here:

- Exact GELU (keras-hub ViT, Swin) lowers to TensorFlow's `Erfc`, which
  tf2onnx cannot convert; it is mapped to `1 - Erf(x)` (ONNX `Erf`, opset 9+),
  equal to within float rounding (about 1e-7 on GELU outputs).
- Tensors a layer captures as eager constants (keras-hub position ids) would
  become extra graph inputs; they are frozen into constants.

`--int8`: static int8 quantization by onnxruntime (`quantize_static`, QDQ
format, int8 activations and per-channel int8 weights), calibrated on
`--calibration` (a dataset name or a `.npy` file, as for `export.tflite`).
The input and output stay float32.

The file is written atomically and a report is printed (and written as JSON
with `--report`): file and gzip size, kernel weights and sparsity, parity
with the Keras model on real samples and the median batch-1 latency in
onnxruntime on this CPU.
"""


import numpy as np

from export import _common
from export._common import ExportError

#: Default ONNX opset (onnxruntime 1.31 runs 7 to 23).
DEFAULT_OPSET = 17
MIN_OPSET = 9


def _erfc_handler(ctx, node, name, args):
    """tf2onnx handler: `Erfc(x)` -> `Sub(1, Erf(x))`."""
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
    erf = ctx.make_node("Erf", [node.input[0]], name=utils.make_name(f"{node.name}_erf"))
    outputs = list(node.output)
    ctx.remove_node(node.name)
    ctx.make_node("Sub", [one.output[0], erf.output[0]], outputs=outputs, name=node.name)


def _grouped_as_depthwise(model):
    """`model` with every grouped `Conv1D`/`Conv2D` of one input channel per group (a
    depthwise convolution, `filters = m * groups` with depth multiplier m) replaced by the
    equal `DepthwiseConv1D`/`DepthwiseConv2D`, every other layer shared. Keras runs a
    grouped convolution as an XLA-compiled function, which tf2onnx cannot read; other
    grouped convolutions are an `ExportError` naming the layer."""
    import keras

    from keras_stg import _compat

    depthwise = {keras.layers.Conv1D: keras.layers.DepthwiseConv1D,
                 keras.layers.Conv2D: keras.layers.DepthwiseConv2D}
    grouped = [layer for layer in model._flatten_layers()
               if getattr(layer, "groups", 1) != 1 and isinstance(layer, tuple(depthwise))]
    if not grouped:
        return model
    odd = [layer for layer in grouped if int(layer.kernel.shape[-2]) != 1]
    if odd:
        layer = odd[0]
        raise ExportError(
            f"ONNX export cannot convert the grouped convolution {layer.name!r} "
            f"(groups={layer.groups}, {int(layer.kernel.shape[-2])} input channels per "
            "group): tf2onnx cannot read Keras' grouped convolutions, and only those with "
            "one input channel per group (depthwise) are rewritten for it. Export TFLite "
            "(python -m export.tflite) instead.")
    replaced = []

    def clone(layer):
        if not any(layer is g for g in grouped):
            return layer
        config = layer.get_config()
        cls = next(d for c, d in depthwise.items() if isinstance(layer, c))
        new = cls(
            kernel_size=config["kernel_size"], strides=config["strides"],
            padding=config["padding"], depth_multiplier=config["filters"] // config["groups"],
            data_format=config["data_format"], dilation_rate=config["dilation_rate"],
            activation=config["activation"], use_bias=config["use_bias"],
            name=config["name"], dtype=config.get("dtype"))
        replaced.append((layer, new))
        return new

    lowered = _compat.clone_model(model, clone_function=clone, recursive=True)
    for old, new in replaced:
        kernel = np.asarray(old.kernel.numpy())  # (*spatial, 1, C * m): output c * m + k
        shape = kernel.shape[:-2] + (old.groups, kernel.shape[-1] // old.groups)
        values = [kernel.reshape(shape)]
        if old.use_bias:
            values.append(np.asarray(old.bias.numpy()))
        new.set_weights(values)
    return lowered


def _frozen_graph(model):
    """`(graph_def, input names, output names)` of the model's inference function."""
    import tensorflow as tf

    model = _grouped_as_depthwise(model)
    concrete, frozen = _common.frozen_inference(
        model, lower_control_flow=False, aggressive_inlining=True)
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    # Eager tensors the layers captured (not variables) are still placeholders.
    captured = {
        internal.name.split(":")[0]: external
        for external, internal in concrete.graph.captures
        if external.dtype != tf.resource and hasattr(external, "numpy")
    }
    for node in graph_def.node:
        if node.op == "Placeholder" and node.name in captured:
            value = captured[node.name].numpy()
            shapes = node.attr["_output_shapes"] if "_output_shapes" in node.attr else None
            node.op = "Const"
            node.attr.clear()
            if shapes is not None:
                node.attr["_output_shapes"].CopyFrom(shapes)
            node.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    inputs = [t.name for t in frozen.inputs if t.name.split(":")[0] not in captured]
    outputs = [t.name for t in frozen.outputs]
    return graph_def, inputs, outputs


def convert(model, opset=DEFAULT_OPSET):
    """Converts a Keras model (single input, dynamic batch) to ONNX bytes."""
    import tf2onnx

    try:  # tf2onnx 1.17 still uses NumPy 1 aliases; Keras ships the patch.
        from keras_stg import _compat

        _compat.tf2onnx_patch()()
    except ImportError:  # pragma: no cover
        pass
    graph_def, inputs, outputs = _frozen_graph(model)
    try:
        proto, _ = tf2onnx.convert.from_graph_def(
            graph_def, name=model.name, input_names=inputs, output_names=outputs,
            opset=opset, custom_op_handlers={"Erfc": (_erfc_handler, [])},
        )
    except Exception as e:
        raise ExportError(f"ONNX conversion of {model.name!r} failed: {e}") from e
    import onnx

    unsupported = [n.op_type for n in proto.graph.node if n.domain not in ("", "ai.onnx")
                   or not onnx.defs.has(n.op_type)]
    if unsupported:
        raise ExportError(
            f"ONNX conversion of {model.name!r} left ops tf2onnx could not map: "
            f"{sorted(set(unsupported))}."
        )
    return proto.SerializeToString()


def quantize_int8(data, representative):
    """Static int8 quantization of ONNX bytes `data` (QDQ, int8 activations, per-channel
    int8 weights), calibrated on the float32 inputs `representative` (N, ...);
    returns the quantized model's bytes."""
    import os
    import tempfile

    import onnx
    from onnxruntime import quantization as q

    rep = np.asarray(representative, np.float32)
    if rep.ndim == 0 or len(rep) == 0:
        raise ExportError("int8 quantization needs calibration samples.")
    name = onnx.load_from_string(data).graph.input[0].name

    class _Reader(q.CalibrationDataReader):
        def __init__(self):
            self._samples = iter(rep[i:i + 1] for i in range(len(rep)))

        def get_next(self):
            sample = next(self._samples, None)
            return None if sample is None else {name: sample}

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        with open(src, "wb") as f:
            f.write(data)
        try:
            # onnxruntime's own pre-processing (shape inference, graph fusion) first, as
            # its quantizer asks: fused ops are quantized as one.
            from onnxruntime.quantization.shape_inference import quant_pre_process

            prepared = os.path.join(tmp, "prepared.onnx")
            quant_pre_process(src, prepared)
            q.quantize_static(prepared, dst, _Reader(), quant_format=q.QuantFormat.QDQ,
                              activation_type=q.QuantType.QInt8,
                              weight_type=q.QuantType.QInt8, per_channel=True)
        except Exception as e:
            raise ExportError(f"onnxruntime int8 quantization failed: {e}") from e
        with open(dst, "rb") as f:
            return f.read()


class Runner:
    """Runs an ONNX model in onnxruntime on the CPU (one intra-op thread)."""

    def __init__(self, data, num_threads=1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]

    def __call__(self, x):
        return self.session.run(None, {self.input.name: np.asarray(x, np.float32)})[0]

    def latency_ms(self, shape, runs=_common.DEFAULT_RUNS):
        sample = np.zeros((1,) + tuple(1 if d is None else d for d in shape), np.float32)
        feed = {self.input.name: sample}
        return _common.median_latency_ms(lambda: self.session.run(None, feed), runs)


def export(
    model,
    out,
    opset=DEFAULT_OPSET,
    shrink=False,
    channel_multiple=None,
    int8=False,
    calibration=None,
    report=None,
    samples=None,
    data_dir=None,
    num_samples=_common.DEFAULT_SAMPLES,
    latency_runs=_common.DEFAULT_RUNS,
    verbose=True,
):
    """Exports `model` to the `.onnx` file `out` and returns the report dict.

    Args:
        model: gated or stripped `.keras` file, training run folder,
            `keras_stg.GatedModel` or plain Keras model.
        out: output path ending in `.onnx`; written atomically.
        opset: ONNX opset version (>= 9).
        shrink: remove pruned units and channels first (`keras_stg.shrink`).
        channel_multiple: with `shrink`, keep each layer's channels in multiples of
            this many (None: the gated model's `channel_multiple`, else 1).
        int8: static int8 quantization (see the module docstring); needs
            `calibration`: a dataset name, `.npy` path or array of inputs.
        report: optional `.json` path for the report.
        samples: dataset name / `.npy` / array for the parity check (default:
            the training run's dataset, else Gaussian noise).
        data_dir: folder with the raw dataset files.
        num_samples: parity samples; latency_runs: timed runs (0 skips).
    """
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= 23:
        raise ExportError(f"--opset must be an integer from {MIN_OPSET} to 23, got {opset!r}.")
    if int8 and opset < 13:
        raise ExportError(f"--int8 needs --opset 13 or higher (per-channel QDQ), got {opset}.")
    if int8 and calibration is None:
        raise ExportError(
            "--int8 needs calibration data for static quantization: pass --calibration with "
            "a dataset name (e.g. mnist, with --data-dir) or a .npy file of input samples.")
    calibration = _common.check_data_arg(calibration, "Calibration data")
    channel_multiple = _common.check_channel_multiple(channel_multiple, shrink)
    out, report, samples, keras_model, gated, source, result = _common.start(
        model, out, ".onnx", report, samples, "onnx",
        {"opset": opset, "shrink": bool(shrink), "int8": bool(int8)})
    target = (_common.shrink_model(keras_model, gated, result, channel_multiple) if shrink
              else keras_model)
    shape = _common.input_shape(target)
    x, y, origin = _common.parity_samples(keras_model, samples, calibration, source, data_dir,
                                          num_samples)

    data = dense = convert(target, opset)
    if int8:
        from export.tflite import DEFAULT_CALIBRATION

        representative, _ = _common.load_samples(
            calibration, keras_model, "train", DEFAULT_CALIBRATION, data_dir,
            what="Calibration data")
        data = quantize_int8(dense, representative)
    runner = Runner(data)
    _common.evaluate(result, keras_model, runner, (x, y, origin), data, dense)
    result["runtime"] = "onnxruntime CPUExecutionProvider, 1 thread"
    if latency_runs:
        result["latency_ms"] = runner.latency_ms(shape, latency_runs)

    return _common.finish(out, data, result, report, verbose)


def main(argv=None):
    parser = _common.cli_parser("onnx", "Export a gated or stripped Keras model to ONNX.", ".onnx")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help="ONNX opset version (default %(default)s)")
    _common.add_shrink_args(parser)
    parser.add_argument("--int8", action="store_true",
                        help="static int8 quantization (QDQ; needs --calibration)")
    parser.add_argument("--calibration", metavar="DATA",
                        help="calibration data: a dataset name (mnist, fashion_mnist, ...) or a .npy file")
    _common.add_common_args(
        parser, samples_help="parity samples: a dataset name or a .npy file (default: the "
                             "calibration data's test split, else the training run's dataset)",
        runs_help="timed onnxruntime runs for the median latency")
    args = parser.parse_args(argv)

    def work(a):
        _common.check_counts(a)
        return export(a.model, a.out, opset=a.opset, shrink=a.shrink,
                      channel_multiple=a.channel_multiple, int8=a.int8,
                      calibration=a.calibration, report=a.report, samples=a.samples,
                      data_dir=a.data_dir, num_samples=a.num_samples, latency_runs=a.runs)

    _common.run_cli(parser, args, work)


if __name__ == "__main__":
    main()
