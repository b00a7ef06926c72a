"""Shared pieces of the exporters: model loading, sample data, atomic writes, reports."""

import argparse
import gzip
import json
import os
import statistics
import time

import numpy as np

#: Default number of real samples the parity check runs.
DEFAULT_SAMPLES = 64
#: Default number of timed runs of the latency measurement (after warm-up).
DEFAULT_RUNS = 50


class ExportError(ValueError):
    """A problem with the user's request (paths, options, model, data).

    The command-line tools turn it into `error: <message>` and exit status 2,
    without a traceback.
    """

    exit_code = 2


class ReadinessError(ExportError):
    """The exported file breaks target rules (e.g. Edge TPU); `report` has the details."""

    exit_code = 1

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------- paths


def check_out_path(out, ext):
    """Raises `ExportError` if `out` does not end with `ext` or its folder is missing."""
    if not isinstance(out, (str, os.PathLike)):
        raise ExportError(f"Output path must be a file path, got {out!r}.")
    out = os.fspath(out)
    if not out.lower().endswith(ext):
        raise ExportError(
            f"Output file {out!r} must end with {ext!r}; e.g. --out "
            f"{os.path.splitext(out)[0] or 'model'}{ext}."
        )
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ExportError(f"Output folder {parent!r} does not exist; create it first.")
    if os.path.isdir(out):
        raise ExportError(f"Output path {out!r} is a folder; give a file name ending in {ext}.")
    return out


def check_report_path(report):
    if report is None:
        return None
    report = os.fspath(report)
    if not report.lower().endswith(".json"):
        raise ExportError(f"Report file {report!r} must end with '.json'.")
    parent = os.path.dirname(os.path.abspath(report))
    if not os.path.isdir(parent):
        raise ExportError(f"Report folder {parent!r} does not exist; create it first.")
    return report


def resolve_model_path(path):
    """The `.keras` or `.ticket` file behind `path` (a file or a training run's folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("gated.keras", "stripped.keras"):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise ExportError(
            f"Folder {path!r} holds no gated.keras or stripped.keras; pass a "
            "training run's --out folder or a .keras file."
        )
    if not os.path.exists(path):
        raise ExportError(
            f"Model {path!r} does not exist; pass a gated or stripped .keras file, "
            "a .ticket file or a training run's output folder."
        )
    if not path.endswith((".keras", ".ticket")):
        raise ExportError(
            f"Model {path!r} is not a .keras or .ticket file; pass a gated or stripped "
            ".keras file (GatedModel.save / keras_stg.train --out), a ticket "
            "(keras_stg.save_ticket) or a run folder."
        )
    return path


def atomic_write(path, write):
    """`keras_stg._files.atomic_write`, imported on use (importing keras_stg
    loads TensorFlow, and importing `export` must not)."""
    from keras_stg import _files

    _files.atomic_write(path, write)


def atomic_write_bytes(path, data):
    from keras_stg import _files

    _files.atomic_write_bytes(path, data)


def write_report(path, report):
    text = json.dumps(report, indent=2, default=_json_default)
    atomic_write(path, lambda tmp: open(tmp, "w", encoding="utf-8").write(text + "\n"))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# -------------------------------------------------------------------- models


def load_model(model):
    """Returns `(plain keras.Model, GatedModel or None, source path or None)`.

    `model` is a `keras_stg.GatedModel`, a plain `keras.Model`, a `.keras` file
    (gated or stripped), a `.ticket` file (`keras_stg.load_ticket`: the stripped
    model) or a training run's output folder. Gated models are stripped
    (`kernel * mask`, pruned weights exact zeros).
    """
    import keras

    import keras_stg

    source = None
    if isinstance(model, (str, os.PathLike)):
        source = resolve_model_path(model)
        try:
            if source.endswith(".ticket"):
                model = keras_stg.load_ticket(source)
            else:
                model = keras.models.load_model(source)
        except Exception as e:  # Corrupt file, unknown custom layer, ...
            raise ExportError(f"Could not load {source!r}: {e}") from None
    if isinstance(model, keras_stg.GatedModel):
        return model.strip(), model, source
    if not isinstance(model, keras.Model):
        raise ExportError(
            f"Expected a keras.Model, a keras_stg.GatedModel or a path, got "
            f"{type(model).__name__}."
        )
    return model, None, source


def input_shape(model):
    """The model's single input shape without the batch axis (a tuple)."""
    shapes = model.input_shape if hasattr(model, "input_shape") else None
    if shapes is None or (isinstance(shapes, list) and len(shapes) != 1):
        raise ExportError(
            f"Model {model.name!r} must have exactly one input tensor to be exported "
            f"(found {shapes!r})."
        )
    if isinstance(shapes, list):
        shapes = shapes[0]
    return tuple(shapes[1:])


def frozen_inference(model, batch_size=None, **freeze_kwargs):
    """`(concrete function, frozen function)` of `model(x, training=False)` on float32
    inputs of the model's shape (batch `batch_size`, None: dynamic), the variables
    folded in as constants: what both exporters convert."""
    import tensorflow as tf

    from keras_stg import _compat

    spec = tf.TensorSpec((batch_size,) + input_shape(model), tf.float32, name="input")
    function = tf.function(lambda x: model(x, training=False))
    concrete = function.get_concrete_function(spec)
    return concrete, _compat.freeze(concrete, **freeze_kwargs)


def check_static(model, why):
    """Raises `ExportError` if a non-batch input dimension is dynamic."""
    shape = input_shape(model)
    if any(d is None for d in shape):
        raise ExportError(
            f"Model {model.name!r} has a dynamic input shape {(None,) + shape}; {why} "
            "needs static shapes. Rebuild the model with a fixed input shape, e.g. "
            "keras.Input((224, 224, 3)), and load its weights."
        )


def run_dataset(source):
    """The dataset name recorded in a training run's metrics.json (or in a ticket's
    metadata), or None."""
    if source is None:
        return None
    if source.endswith(".ticket"):
        from keras_stg.ticket import TicketError, ticket_info

        try:
            return ticket_info(source).get("metadata", {}).get("dataset")
        except TicketError:
            return None
    path = os.path.join(os.path.dirname(os.path.abspath(source)), "metrics.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["config"]["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def weight_stats(model):
    """Kernel weight count, non-zeros and sparsity of every gateable kernel."""
    from keras_stg.targets import all_layers, kernel_targets

    total = nonzero = 0
    seen = set()
    for layer in all_layers(model):
        found = kernel_targets(layer)
        if not found:
            continue
        for _, variable in found:
            if variable is None or id(variable) in seen:
                continue
            seen.add(id(variable))
            value = np.asarray(variable.numpy())
            total += value.size
            nonzero += int(np.count_nonzero(value))
    params = int(sum(int(np.prod(v.shape)) for v in model.weights))
    return {
        "kernel_weights": total,
        "kernel_nonzero": nonzero,
        "sparsity": (1.0 - nonzero / total) if total else 0.0,
        "parameters": params,
    }


# ---------------------------------------------------------------------- data


def is_dataset_name(value):
    from keras_stg.experiments import data

    return isinstance(value, str) and value in data.DATASETS


def check_data_arg(value, what):
    """Raises `ExportError` unless `value` is a dataset name, an existing .npy or an array."""
    if value is None or isinstance(value, np.ndarray):
        return value
    from keras_stg.experiments import data

    value = os.fspath(value)
    if value in data.DATASETS:
        return value
    if value.endswith(".npy"):
        if not os.path.isfile(value):
            raise ExportError(f"{what} file {value!r} does not exist.")
        return value
    raise ExportError(
        f"{what} {value!r} is neither a dataset name ({', '.join(sorted(data.DATASETS))}) "
        "nor a .npy file of input samples."
    )


def _fit_to_shape(x, shape, what):
    """Reshapes / repeats channels / resizes `x` (N, ...) to samples of `shape`."""
    x = np.asarray(x, dtype=np.float32)
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    if any(d is None for d in shape):
        return x
    n = x.shape[0]
    if int(np.prod(x.shape[1:])) == int(np.prod(shape)):
        return x.reshape((n,) + tuple(shape))
    if x.ndim == 4 and len(shape) == 3:
        import tensorflow as tf

        if x.shape[-1] != shape[-1]:
            if shape[-1] % x.shape[-1]:
                raise ExportError(
                    f"{what} has {x.shape[-1]} channels; the model takes {shape[-1]}."
                )
            x = np.repeat(x, shape[-1] // x.shape[-1], axis=-1)
        if tuple(x.shape[1:3]) != tuple(shape[:2]):
            x = tf.image.resize(x, shape[:2]).numpy()
        return x.astype(np.float32)
    raise ExportError(
        f"{what} samples have shape {tuple(x.shape[1:])}, which does not fit the "
        f"model input {tuple(shape)}."
    )


def load_samples(spec, model, split, n, data_dir=None, seed=0, what="Data"):
    """Input samples (and labels or None) fitted to the model's input shape.

    Args:
        spec: a dataset name of `keras_stg.experiments.data` (normalised like training),
            a `.npy` file or an array of inputs, or None.
        split: dataset split (`"train"` for calibration, `"test"` for parity).
        n: number of samples (None: all).
    """
    shape = input_shape(model)
    labels = None
    if spec is None:
        return None, None
    if isinstance(spec, np.ndarray):
        x = spec
    elif is_dataset_name(spec):
        from keras_stg.experiments import data

        try:
            images, labels = data.load(spec, split, data_dir)
        except (ValueError, data.DataError) as e:
            raise ExportError(f"Could not load dataset {spec!r}: {e}") from None
        if n is not None:
            images, labels = images[:n], labels[:n]
        x = data.normalize(images, spec)
    else:
        try:
            x = np.load(os.fspath(spec), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ExportError(f"Could not read {spec!r} as a NumPy .npy array: {e}") from None
        if not np.issubdtype(x.dtype, np.number):
            raise ExportError(f"{spec!r} holds {x.dtype} values; expected numbers.")
    if n is not None:
        x = x[:n]
    if len(x) == 0:
        raise ExportError(f"{what} {spec!r} holds no samples.")
    x = _fit_to_shape(x, shape, f"{what} {spec!r}" if not isinstance(spec, np.ndarray) else what)
    return x, (None if labels is None else np.asarray(labels[: len(x)]))


def random_samples(model, n, seed=0):
    shape = tuple(1 if d is None else d for d in input_shape(model))
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n,) + shape).astype(np.float32)


def parity_samples(model, samples, calibration, source, data_dir, n):
    """Samples for the parity check and where they come from.

    Order: `samples`, the calibration data's test split, the dataset of the
    training run the model came from, and only then Gaussian noise (named as
    such in the report).
    """
    note = ""
    for spec, origin in (
        (samples, "samples"),
        (calibration, "calibration"),
        (run_dataset(source), "training run's dataset"),
    ):
        if spec is None:
            continue
        try:
            x, y = load_samples(spec, model, "test", n, data_dir, what="Samples")
        except Exception as e:  # noqa: BLE001
            if origin != "training run's dataset":
                raise
            # Found automatically: fall back to noise rather than fail the export.
            note = f"; {spec} not loadable: {str(e).splitlines()[0][:120]}"
            continue
        name = spec if isinstance(spec, str) else f"array ({origin})"
        return x, y, name
    return random_samples(model, n), None, f"random normal (pass samples for real data{note})"


# ------------------------------------------------------------------- metrics


def gzip_size(data):
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def median_latency_ms(run_once, runs=DEFAULT_RUNS, warmup=5):
    """Median wall time of `run_once()` in milliseconds."""
    for _ in range(warmup):
        run_once()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        run_once()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def parity(reference, outputs, labels=None):
    reference = np.asarray(reference, np.float32).reshape(len(reference), -1)
    outputs = np.asarray(outputs, np.float32).reshape(len(outputs), -1)
    result = {
        "samples": int(len(reference)),
        "max_abs_diff": float(np.max(np.abs(reference - outputs))),
    }
    if reference.shape[-1] > 1:
        ref_top = reference.argmax(-1)
        out_top = outputs.argmax(-1)
        result["top1_agreement"] = float(np.mean(ref_top == out_top))
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            result["keras_accuracy"] = float(np.mean(ref_top == labels))
            result["export_accuracy"] = float(np.mean(out_top == labels))
    return result


def size_entry(data, baseline):
    """File and gzip sizes of `data` against the dense float export `baseline`."""
    size, gz = len(data), gzip_size(data)
    base, base_gz = len(baseline), gzip_size(baseline)
    return {
        "bytes": size,
        "gzip_bytes": gz,
        "dense_float_bytes": base,
        "dense_float_gzip_bytes": base_gz,
        "ratio_vs_dense_float": size / base,
        "gzip_ratio_vs_dense_float": gz / base,
    }


def format_report(report):
    """A short human-readable rendering of a report dict."""
    lines = [f"{report['format']} export: {report['out']}"]
    s = report.get("size", {})
    if s:
        lines.append(
            f"  size        {s['bytes']:,} B (gzip {s['gzip_bytes']:,} B); dense float "
            f"{s['dense_float_bytes']:,} B (gzip {s['dense_float_gzip_bytes']:,} B); "
            f"ratio {s['ratio_vs_dense_float']:.3f} (gzip {s['gzip_ratio_vs_dense_float']:.3f})"
        )
    w = report.get("weights", {})
    if w:
        lines.append(
            f"  weights     {w['kernel_nonzero']:,} of {w['kernel_weights']:,} kernel weights "
            f"non-zero, sparsity {w['sparsity']:.4f}"
        )
    sh = report.get("shrink")
    if sh:
        lines.append(
            f"  shrink      parameters {sh['parameters_before']:,} -> {sh['parameters_after']:,}; "
            + ", ".join(f"{k} {a}->{b}" for k, (a, b) in sh["units"].items())
        )
    p = report.get("parity", {})
    if p:
        text = f"  parity      {p['samples']} samples ({report.get('parity_data')}): max abs diff {p['max_abs_diff']:.3g}"
        if "top1_agreement" in p:
            text += f", top-1 agreement {p['top1_agreement']:.4f}"
        if "keras_accuracy" in p:
            text += f", accuracy keras {p['keras_accuracy']:.4f} / export {p['export_accuracy']:.4f}"
        lines.append(text)
    lat = report.get("latency_ms")
    if lat is not None:
        text = f"  latency     median {lat:.4f} ms (batch 1, {report.get('runtime')})"
        if report.get("dense_float_latency_ms") is not None:
            text += f"; dense float {report['dense_float_latency_ms']:.4f} ms"
        lines.append(text)
    e = report.get("edgetpu")
    if e:
        lines.append(f"  edgetpu     {'READY' if e['ready'] else 'NOT READY'}; compile with: {e['command']}")
        for problem in e["problems"]:
            lines.append(f"    - {problem}")
    return "\n".join(lines)


# ------------------------------------------------------------ the pipeline
# Both exporters run: `start` (check every argument, load the model), optionally
# `shrink_model`, their own conversion and target checks, `evaluate` (size,
# weights, parity against the Keras model) and `finish` (write, report).


def start(model, out, ext, report, samples, fmt, options):
    """Checks the output, report and samples arguments, then loads the model.

    Returns `(out, report, samples, keras_model, gated, source, result)`; `result`
    is the report dict begun with the format, output, model and options.
    """
    out = check_out_path(out, ext)
    report = check_report_path(report)
    samples = check_data_arg(samples, "Samples")
    if isinstance(model, (str, os.PathLike)):
        resolve_model_path(model)
    keras_model, gated, source = load_model(model)
    input_shape(keras_model)
    result = {"format": fmt, "out": out, "model": source or keras_model.name,
              "options": options}
    if gated is not None:
        result["granularity"] = str(gated.granularity)
    return out, report, samples, keras_model, gated, source, result


def shrink_model(keras_model, gated, result, channel_multiple=None):
    """`keras_stg.shrink` of the model to convert; its info goes into `result`.
    `channel_multiple` None: the gated model's own (`GateConfig.channel_multiple`), else 1."""
    import sys

    from keras_stg.shrinking import ShrinkError, shrink

    if gated is not None and gated.granularity.name not in ("unit", "channel"):
        print(f"note: {keras_model.name!r} was gated with granularity "
              f"{gated.granularity.name!r}; --shrink removes whole units and channels, "
              "which 'unit' and 'channel' gates produce.", file=sys.stderr)
    if channel_multiple is None:
        channel_multiple = gated.config.channel_multiple if gated is not None else 1
    from keras_stg import latency

    channel_multiple = latency.resolve_multiple(channel_multiple)
    try:
        target, info = shrink(keras_model, return_info=True, channel_multiple=channel_multiple)
    except ShrinkError as e:
        raise ExportError(str(e)) from None
    info["channel_multiple"] = channel_multiple
    result["shrink"] = info
    result["weights_after_shrink"] = weight_stats(target)
    return target


def check_channel_multiple(value, shrink):
    """Refuses a bad `--channel-multiple` before any work."""
    if value is None:
        return None
    if value == "auto":
        pass
    elif isinstance(value, str) and value.isdigit():
        value = int(value)
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ExportError(f"--channel-multiple must be an integer >= 1 or 'auto' (LiteRT's "
                          f"channel tile on this machine), got {value!r}.")
    if not shrink:
        raise ExportError("--channel-multiple rounds the channels --shrink keeps; add --shrink.")
    return value


def add_shrink_args(parser):
    parser.add_argument("--shrink", action="store_true",
                        help="physically remove pruned units and channels (unit and channel "
                             "gates)")
    parser.add_argument("--channel-multiple", default=None, metavar="N",
                        help="with --shrink: keep each layer's channels in multiples of N, "
                             "or 'auto': LiteRT's output-channel tile on this machine "
                             "(default: the gated model's channel_multiple, else 1)")


def evaluate(result, keras_model, run, samples, data, baseline):
    """Size against `baseline`, weight statistics and parity of `run` (the exported
    file's runner) against the Keras model on `samples = (x, labels, origin)`."""
    x, y, origin = samples
    reference = np.asarray(keras_model.predict(x, batch_size=32, verbose=0))
    result["size"] = size_entry(data, baseline)
    result["weights"] = weight_stats(keras_model)
    result["parity_data"] = origin
    result["parity"] = parity(reference, run(x), y)


def finish(out, data, result, report=None, verbose=True):
    """Writes the exported bytes and the report (both atomically), prints it."""
    atomic_write_bytes(out, data)
    if report:
        write_report(report, result)
    if verbose:
        print(format_report(result))
    return result


def cli_parser(module, description, suffix):
    """The parser of `python -m export.<module>`, with its `--model` and `--out`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet TensorFlow C++ logs
    parser = argparse.ArgumentParser(prog=f"python -m export.{module}", description=description)
    parser.add_argument("--model", required=True,
                        help="gated or stripped .keras file, a .ticket, or a training run's "
                             "output folder")
    parser.add_argument("--out", required=True, help=f"output file, ending in {suffix}")
    return parser


def add_common_args(parser, samples_help, runs_help=None):
    """The arguments every export command takes, after its own (`--runs` only with
    a `runs_help`: the commands that time a runtime)."""
    parser.add_argument("--samples", metavar="DATA", help=samples_help)
    parser.add_argument("--data-dir", default=None,
                        help="folder with the raw dataset files (default $KERAS_STG_DATA)")
    parser.add_argument("--num-samples", type=int, default=DEFAULT_SAMPLES,
                        help="parity samples to compare (default %(default)s)")
    if runs_help is not None:
        parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                            help=runs_help + " (default %(default)s)")
    parser.add_argument("--report", metavar="FILE", help="also write the report as JSON here")


def check_counts(args):
    if args.num_samples < 1 or args.runs < 0:
        raise ExportError("--num-samples must be >= 1 and --runs >= 0.")


def run_cli(parser, args, work):
    """Runs `work(args)`; user errors exit with status 2 and one clear message."""
    try:
        return work(args)
    except ExportError as e:
        parser.exit(e.exit_code, f"{parser.prog}: error: {e}\n")
