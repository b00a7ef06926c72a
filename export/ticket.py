"""Ship an `slt` ticket as its seed and entropy-coded mask: a `.ticket` file.

Usage:
    python -m export.ticket --model M --out model.ticket [--report FILE]
        [--seed N [--init NAME] [--density D]] [--tflite]
        [--samples DATA] [--data-dir D] [--num-samples N]

`M` is a gated `.keras` file or a training run's output folder (its
`gated.keras`): the init recipe comes from the gated model's config. A stripped
`.keras` file does not record how its weights were drawn: give `--seed` (and
`--init`, `--density` as the model was wrapped); its kept weights are checked
against that recipe bit for bit. Only `slt` tickets regenerate from a seed;
`post_training` and `joint` models are refused (ship them with
`python -m export.tflite --sparse`).

The ticket is decoded again before it is written (`keras_stg.load_ticket`) and
compared with the source model: every weight bit for bit and the outputs on
the parity samples (max abs diff 0), or nothing is written. The report (also
JSON with `--report`) gives the ticket's bytes against the entropy bound of
its masks (sum over kernels of `n * H(keep rate)`), the header, mask and
stored-weight bytes, the dense float32 size of the parameters, save and load
times, and with `--tflite` the sparse and dense float TFLite files of the same
model for comparison.
"""

import os
import time

import numpy as np

from export import _common
from export._common import ExportError


def export(model, out, report=None, seed=None, init=None, density=None, tflite=False,
           samples=None, data_dir=None, num_samples=_common.DEFAULT_SAMPLES, verbose=True):
    """Writes the ticket of `model` to `out` and returns the report dict.

    Args:
        model: gated `.keras` file, training run folder, `keras_stg.GatedModel`,
            or a stripped `.keras` file / plain Keras model with `seed`.
        out: output path ending in `.ticket`; written atomically.
        report: optional `.json` path for the report.
        seed, init, density: the recipe of a stripped model (see
            `keras_stg.save_ticket`); refused with a gated model.
        tflite: also convert the model to sparse and dense float TFLite and
            report their sizes.
        samples: dataset name / `.npy` / array for the parity check (default:
            the training run's dataset, else Gaussian noise).
        data_dir: folder with the raw dataset files.
        num_samples: parity samples.
    """
    from keras_stg import ticket as ticket_lib

    out = _common.check_out_path(out, ticket_lib.SUFFIX)
    report = _common.check_report_path(report)
    samples = _common.check_data_arg(samples, "Samples")
    if isinstance(model, (str, os.PathLike)):
        if _common.resolve_model_path(model).endswith(ticket_lib.SUFFIX):
            raise ExportError(f"Model {os.fspath(model)!r} is already a ticket; pass the "
                              "gated .keras file or the training run's folder.")
    keras_model, gated, source = _common.load_model(model)
    _common.input_shape(keras_model)
    options = {"seed": seed, "init": init, "density": density, "tflite": bool(tflite)}
    result = {"format": "ticket", "out": out, "model": source or keras_model.name,
              "options": options}
    if gated is None and seed is None:
        raise ExportError(
            f"{source or keras_model.name!r} is a stripped model, which does not record how its "
            "weights were drawn: pass --seed (and --init, --density as it was wrapped), or "
            "the gated model (gated.keras or the training run's folder).")
    metadata = {}
    dataset = _common.run_dataset(source)
    if dataset is not None:
        metadata["dataset"] = dataset

    start = time.perf_counter()
    try:
        if gated is not None:
            if any(v is not None for v in (seed, init, density)):
                raise ExportError(
                    "--seed, --init and --density describe a stripped model; a gated model's "
                    "recipe is read from its config. Leave them out.")
            data, _ = ticket_lib.encode(gated, metadata=metadata or None)
        else:
            data, _ = ticket_lib.encode(keras_model, seed=seed, init=init, density=density,
                                        metadata=metadata or None)
    except ticket_lib.TicketError as e:
        raise ExportError(str(e)) from None
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = ticket_lib.load_ticket(data)
    load_s = time.perf_counter() - start

    info = ticket_lib.ticket_info(data)
    bound = info["entropy_bound_bytes"]
    dense = 4 * sum(int(np.prod(v.shape)) for v in keras_model.weights)
    size = {
        "bytes": info["bytes"], "header_bytes": info["header_bytes"],
        "mask_bytes": info["mask_bytes"], "weight_bytes": info["weight_bytes"],
        "entropy_bound_bytes": bound,
        "ratio_to_bound": info["bytes"] / bound if bound else None,
        "coded_bound_bytes": info["coded_bound_bytes"],
        "dense_float32_bytes": dense, "ratio_vs_dense_float32": info["bytes"] / dense,
    }
    if tflite:
        from export import tflite as tflite_lib

        sparse = tflite_lib.convert(keras_model, sparse=True)
        size.update(sparse_tflite_bytes=len(sparse),
                    sparse_tflite_gzip_bytes=_common.gzip_size(sparse),
                    dense_float_tflite_bytes=len(tflite_lib.convert(keras_model)),
                    ratio_vs_sparse_tflite=info["bytes"] / len(sparse))
    result["size"] = size
    result["granularity"] = info.get("granularity")
    result["recipe"] = info["recipe"]
    result["weights"] = _common.weight_stats(keras_model)
    result["kernels"] = info["kernels"]
    result["save_s"], result["load_s"] = save_s, load_s

    x, y, origin = _common.parity_samples(keras_model, samples, None, source, data_dir,
                                          num_samples)
    reference = np.asarray(keras_model.predict(x, batch_size=32, verbose=0))
    result["parity_data"] = origin
    result["parity"] = _common.parity(
        reference, np.asarray(loaded.predict(x, batch_size=32, verbose=0)), y)
    differ = [v.path for v, w in zip(keras_model.weights, loaded.weights)
              if not _bit_equal(v, w)]
    result["parity"]["weights_bit_equal"] = not differ
    if differ or result["parity"]["max_abs_diff"] != 0:
        raise ExportError(
            f"The ticket does not reproduce {keras_model.name!r} exactly (weights differing: "
            f"{differ[:5]}, max abs diff {result['parity']['max_abs_diff']:.3g}); nothing was "
            "written. Please report this.")

    _common.atomic_write_bytes(out, data)
    if report:
        _common.write_report(report, result)
    if verbose:
        print(format_report(result))
    return result


def _bit_equal(a, b):
    a, b = np.asarray(a.numpy()), np.asarray(b.numpy())
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def format_report(result):
    """A short human-readable rendering of the ticket report."""
    s, w, p = result["size"], result["weights"], result["parity"]
    lines = [
        f"ticket export: {result['out']}",
        f"  size        {s['bytes']:,} B = header {s['header_bytes']:,} B + masks "
        f"{s['mask_bytes']:,} B + stored weights {s['weight_bytes']:,} B; entropy bound "
        f"{s['entropy_bound_bytes']:,.0f} B"
        + (f" (ticket / bound {s['ratio_to_bound']:.4f})" if s["ratio_to_bound"] else ""),
        f"  against     dense float32 {s['dense_float32_bytes']:,} B "
        f"(ratio {s['ratio_vs_dense_float32']:.4f})"
        + (f"; sparse TFLite {s['sparse_tflite_bytes']:,} B (gzip "
           f"{s['sparse_tflite_gzip_bytes']:,} B), {s['sparse_tflite_bytes'] / s['bytes']:.1f}x "
           f"the ticket; dense float TFLite {s['dense_float_tflite_bytes']:,} B"
           if "sparse_tflite_bytes" in s else ""),
        f"  weights     {w['kernel_nonzero']:,} of {w['kernel_weights']:,} kernel weights "
        f"non-zero, sparsity {w['sparsity']:.4f}; recipe {result['recipe']}",
        f"  parity      {p['samples']} samples ({result['parity_data']}): max abs diff "
        f"{p['max_abs_diff']:.3g}, weights bit for bit: {p['weights_bit_equal']}",
        f"  time        save {result['save_s']:.3f} s, load {result['load_s']:.3f} s",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = _common.cli_parser(
        "ticket", "Save an slt ticket as its seed and entropy-coded mask.", ".ticket")
    parser.add_argument("--seed", type=int,
                        help="a stripped model's seed (a gated model's comes from its config)")
    parser.add_argument("--init",
                        help="a stripped model's init (default signed_constant)")
    parser.add_argument("--density", type=float,
                        help="a stripped model's scale-fan init_density (default none)")
    parser.add_argument("--tflite", action="store_true",
                        help="also report the sizes of the sparse and dense float TFLite files")
    _common.add_common_args(
        parser, samples_help="parity samples: a dataset name or a .npy file (default: the "
                             "training run's dataset)")
    args = parser.parse_args(argv)

    def work(a):
        if a.num_samples < 1:
            raise ExportError("--num-samples must be >= 1.")
        return export(a.model, a.out, report=a.report, seed=a.seed, init=a.init,
                      density=a.density, tflite=a.tflite, samples=a.samples,
                      data_dir=a.data_dir, num_samples=a.num_samples)

    _common.run_cli(parser, args, work)


if __name__ == "__main__":
    main()
