"""Export a ticket to a TFLite / LiteRT file: float, sparse, int8, Edge TPU, shrunk.

Usage:
    python -m export.tflite --model M --out model.tflite [--sparse]
        [--int8 --calibration DATA] [--edgetpu] [--shrink [--channel-multiple N]]
        [--report FILE]
        [--samples DATA] [--data-dir D]

`M` is a gated or stripped `.keras` file, a `.ticket`
(`keras_stg.save_ticket`) or a training run's output folder.
`DATA` is a dataset name of `keras_stg.experiments.data` (`mnist`, `fashion_mnist`, ...;
read from `--data-dir` or `$KERAS_STG_DATA`) or a `.npy` file of input
samples shaped like the model input.

- `--sparse`: weights with >= 30% zeros are stored in TFLite's sparse (CSR)
  encoding (`Optimize.EXPERIMENTAL_SPARSITY`); they run through a DENSIFY op,
  except 1x4 (float) / 1x16 (int8) blocks in FULLY_CONNECTED, which run sparse.
- `--int8`: full-integer post-training quantization (int8 weights, activations,
  input and output) calibrated on `--calibration` (its train split).
- `--edgetpu`: what the Edge TPU compiler needs (full int8, int8 input and
  output, static batch 1, builtin int8 ops only, dense weights), then a
  readiness check of the written file that lists every op or tensor breaking
  a rule and fails (exit status 1) if any does. Prints the `edgetpu_compiler`
  command to run where the compiler is installed.
- `--shrink`: remove pruned units and channels physically first (see
  `keras_stg.shrink`); `--channel-multiple N` keeps each layer's channels in
  multiples of N.

Every export is restricted to builtin ops (no Flex / SELECT_TF_OPS, which
Android builds without Flex and the Edge TPU cannot run), pinned to batch 1,
written atomically, and reported: file and gzip size against the dense float
export, kernel weights and sparsity, parity with the Keras model on real
samples (max abs diff; top-1 agreement and accuracy for int8) and the median
batch-1 latency in the LiteRT interpreter.
"""

import logging

import numpy as np

from export import _common
from export._common import ExportError

#: Calibration samples used by default for int8 quantization.
DEFAULT_CALIBRATION = 256


def convert(model, sparse=False, int8=False, representative=None, batch_size=1,
            input_type="int8"):
    """Converts a Keras model to `.tflite` bytes (builtin ops only).

    Args:
        model: a plain Keras model (single input).
        sparse: sparse (CSR) encoding of weights with >= 30% zeros.
        int8: full-integer quantization; needs `representative`.
        representative: float32 array of calibration inputs (N, ...).
        batch_size: static batch size of the input (None: dynamic).
        input_type: `"int8"` or `"uint8"` input/output type for int8 models.
    """
    import tensorflow as tf

    kwargs = {}
    optimizations = []
    if int8:
        if representative is None or len(representative) == 0:
            raise ExportError("int8 quantization needs calibration samples.")
        rep = np.asarray(representative, np.float32)
        n = batch_size or 1

        def representative_dataset():
            for i in range(0, len(rep) - n + 1, n):
                yield [rep[i:i + n]]

        optimizations.append(tf.lite.Optimize.DEFAULT)
        kwargs["representative_dataset"] = representative_dataset
        supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = tf.uint8 if input_type == "uint8" else tf.int8
        kwargs["inference_input_type"] = io_type
        kwargs["inference_output_type"] = io_type
    else:
        supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if sparse:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    # The inference function, traced once and frozen (weights as constants):
    # much faster to convert than a SavedModel round trip
    # (`model.export(format="litert")`), and with the op sets chosen here.
    # No `trackable_obj`: the function holds no variables any more, and passing
    # the model makes the converter save and reload a SavedModel (4x slower).
    _, frozen = _common.frozen_inference(model, batch_size)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # its "provide trackable_obj" notice does not apply
    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
        converter.target_spec.supported_ops = supported_ops
        if optimizations:
            converter.optimizations = optimizations
        for key, value in kwargs.items():
            setattr(converter, key, value)
        return converter.convert()
    except Exception as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        detail = next((line for line in lines if " op " in line or "ops" in line),
                      lines[0] if lines else type(e).__name__)
        raise ExportError(
            f"TFLite conversion of {model.name!r} with builtin ops only failed: "
            f"{detail.strip()}. Flex (SELECT_TF_OPS) is left off on purpose: Android builds "
            "without Flex and the Edge TPU cannot run those ops; replace the layer using it."
        ) from e
    finally:
        absl.setLevel(level)


# ------------------------------------------------------------------ runtime


class Runner:
    """Runs a `.tflite` model one sample at a time in the LiteRT interpreter.

    Models use the default delegates (XNNPACK). If they fail to prepare, as
    XNNPACK does on int8 models with sparse weights, or with `xnnpack=False`,
    the plain builtin kernels are used (`BUILTIN_WITHOUT_DEFAULT_DELEGATES`).
    """

    def __init__(self, data, num_threads=1, xnnpack=True):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.resolver = "default (XNNPACK)"
        try:
            if not xnnpack:
                raise ValueError("builtin kernels asked for")
            self.interpreter = Interpreter(model_content=data, num_threads=num_threads)
            self.interpreter.allocate_tensors()
            self._prepare()
            self._invoke_zero()
        except (RuntimeError, ValueError):
            self.interpreter = Interpreter(
                model_content=data, num_threads=num_threads,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
            self.interpreter.allocate_tensors()
            self.resolver = "builtin kernels, no delegates"
            self._prepare()

    def _prepare(self):
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def _invoke_zero(self):
        self.interpreter.set_tensor(self.input["index"], np.zeros(self.input["shape"], self.input["dtype"]))
        self.interpreter.invoke()

    def _quantize(self, x):
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return x.astype(np.float32)
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)

    def _dequantize(self, y):
        if self.output["dtype"] == np.float32:
            return y.astype(np.float32)
        scale, zero = self.output["quantization"]
        return (y.astype(np.float32) - zero) * scale

    def __call__(self, x):
        """Outputs for a float batch `x`, one invoke per sample."""
        outputs = []
        for sample in np.asarray(x, np.float32):
            self.interpreter.set_tensor(self.input["index"], self._quantize(sample[None]))
            self.interpreter.invoke()
            outputs.append(self._dequantize(self.interpreter.get_tensor(self.output["index"]))[0])
        return np.stack(outputs)

    def latency_ms(self, runs=_common.DEFAULT_RUNS):
        sample = np.zeros(self.input["shape"], self.input["dtype"])
        interp, index = self.interpreter, self.input["index"]

        def once():
            interp.set_tensor(index, sample)
            interp.invoke()

        return _common.median_latency_ms(once, runs)


# ------------------------------------------------------------------- export


def export(
    model,
    out,
    sparse=False,
    int8=False,
    calibration=None,
    edgetpu=False,
    shrink=False,
    channel_multiple=None,
    report=None,
    samples=None,
    data_dir=None,
    num_samples=_common.DEFAULT_SAMPLES,
    num_calibration=DEFAULT_CALIBRATION,
    latency_runs=_common.DEFAULT_RUNS,
    baseline=True,
    verbose=True,
):
    """Exports `model` to the `.tflite` file `out` and returns the report dict.

    Args:
        model: gated or stripped `.keras` file, training run folder,
            `keras_stg.GatedModel` or plain Keras model.
        out: output path ending in `.tflite`; written atomically.
        sparse, int8, edgetpu, shrink: see the module docstring.
        channel_multiple: with `shrink`, keep each layer's channels in multiples of
            this many (None: the gated model's `channel_multiple`, else 1).
        calibration: dataset name, `.npy` path or array of inputs for int8.
        report: optional `.json` path for the report (written atomically).
        samples: dataset name / `.npy` / array for the parity check (default:
            the calibration data's test split, else the training run's
            dataset, else Gaussian noise).
        data_dir: folder with the raw dataset files (default `$KERAS_STG_DATA`).
        num_samples, num_calibration: how many parity / calibration samples.
        latency_runs: timed interpreter runs (median reported); 0 skips it.
        baseline: also convert the dense float model for size and latency
            comparison (always done when it is the same file).

    Raises:
        ExportError: bad paths or options, unsupported model, readiness
            failure (`--edgetpu`); nothing is written then.
    """
    # ---- argument checks, before any work
    if edgetpu:
        if sparse:
            raise ExportError(
                "--sparse cannot be combined with --edgetpu: the Edge TPU has no sparse "
                "tensors. Export dense int8 (zeros still shrink the gzip size)."
            )
        int8 = True
    if int8 and calibration is None:
        raise ExportError(
            f"{'--edgetpu' if edgetpu else '--int8'} needs calibration data for full-integer "
            "quantization: pass --calibration with a dataset name (e.g. mnist, with "
            "--data-dir) or a .npy file of input samples."
        )
    calibration = _common.check_data_arg(calibration, "Calibration data")
    channel_multiple = _common.check_channel_multiple(channel_multiple, shrink)
    options = {"sparse": bool(sparse), "int8": bool(int8), "edgetpu": bool(edgetpu),
               "shrink": bool(shrink)}
    out, report, samples, keras_model, gated, source, result = _common.start(
        model, out, ".tflite", report, samples, "tflite", options)
    if edgetpu:
        _common.check_static(keras_model, "--edgetpu")
    target = (_common.shrink_model(keras_model, gated, result, channel_multiple) if shrink
              else keras_model)

    representative = None
    if int8:
        representative, _ = _common.load_samples(
            calibration, keras_model, "train", num_calibration, data_dir, what="Calibration data")
    x, y, origin = _common.parity_samples(keras_model, samples, calibration, source, data_dir,
                                          num_samples)

    # ---- conversion
    data = convert(target, sparse=sparse, int8=int8, representative=representative,
                   input_type="int8")
    plain = not (sparse or int8 or shrink)
    dense = data if plain else (convert(keras_model) if baseline else None)

    if edgetpu:
        from export import edgetpu as edgetpu_lib

        check = edgetpu_lib.readiness(data, path=out)
        result["edgetpu"] = check
        if not check["ready"]:
            raise _common.ReadinessError(
                f"The --edgetpu conversion of {keras_model.name!r} breaks "
                f"{len(check['problems'])} Edge TPU rule(s); nothing was written:\n  "
                + "\n  ".join(check["problems"]),
                report=result,
            )

    # ---- report
    runner = Runner(data)
    _common.evaluate(result, keras_model, runner, (x, y, origin), data,
                     dense if dense is not None else data)
    result["runtime"] = f"LiteRT interpreter, 1 thread, {runner.resolver}"
    if latency_runs:
        result["latency_ms"] = runner.latency_ms(latency_runs)
        if dense is not None and not plain:
            result["dense_float_latency_ms"] = Runner(dense).latency_ms(latency_runs)
            result["latency_ratio_vs_dense_float"] = result["latency_ms"] / result["dense_float_latency_ms"]

    return _common.finish(out, data, result, report, verbose)


def main(argv=None):
    parser = _common.cli_parser(
        "tflite", "Export a gated or stripped Keras model to a TFLite/LiteRT file.", ".tflite"
    )
    parser.add_argument("--sparse", action="store_true",
                        help="sparse (CSR) encoding of weights with >= 30%% zeros")
    parser.add_argument("--int8", action="store_true",
                        help="full-integer int8 quantization (needs --calibration)")
    parser.add_argument("--calibration", metavar="DATA",
                        help="calibration data: a dataset name (mnist, fashion_mnist, ...) or a .npy file")
    parser.add_argument("--edgetpu", action="store_true",
                        help="Coral Edge TPU ready int8 file, checked; implies --int8")
    _common.add_shrink_args(parser)
    _common.add_common_args(
        parser, samples_help="parity samples (default: the calibration data's test split, "
                             "else the training run's dataset)",
        runs_help="timed interpreter runs for the median latency")
    args = parser.parse_args(argv)

    def work(a):
        _common.check_counts(a)
        result = export(a.model, a.out, sparse=a.sparse, int8=a.int8, calibration=a.calibration,
                        edgetpu=a.edgetpu, shrink=a.shrink,
                        channel_multiple=a.channel_multiple, report=a.report, samples=a.samples,
                        data_dir=a.data_dir, num_samples=a.num_samples, latency_runs=a.runs)
        if a.edgetpu:
            print(f"Compile for the Edge TPU with:\n  {result['edgetpu']['command']}")
        return result

    _common.run_cli(parser, args, work)


if __name__ == "__main__":
    main()
