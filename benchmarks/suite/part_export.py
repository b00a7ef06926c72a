"""The `export` part: TFLite sizes of our 90% LeNet ticket through the export stage."""

import os

from benchmarks.suite.common import log


def part_export(setup, results, save):
    """TFLite sizes of our 90% LeNet ticket through the export stage, if it exists."""
    try:
        from export import tflite as export_tflite
    except Exception as e:
        results["export"] = {"ok": False, "reason": f"export stage not available "
                             f"(import export.tflite failed: {type(e).__name__}: {e})"}
        log(results["export"]["reason"])
        save()
        return
    path = os.path.join(setup.out, "lenet_mnist_slt_0.90_stripped.keras")
    if not os.path.exists(path):
        results["export"] = {"ok": False, "reason": "no 90% LeNet ticket to export: run the "
                             "frontier part with lenet_mnist and 0.9 first"}
        log(results["export"]["reason"])
        save()
        return
    import keras
    import numpy as np

    import keras_stg  # noqa: F401  (registers the library's classes)

    model = keras.models.load_model(path)
    try:
        sizes = _export_sizes(export_tflite, model, setup)
        kernels = [w for layer in model.layers if hasattr(layer, "kernel")
                   for w in [np.asarray(layer.kernel)]]
        sparsity = 1.0 - sum(int((k != 0).sum()) for k in kernels) / sum(k.size for k in kernels)
        results["export"] = {"ok": True, "model": "LeNet-300-100 / MNIST, slt",
                             "sizes": sizes, "sparsity": sparsity}
        log("export sizes: " + ", ".join(f"{k} {v['bytes']} B" for k, v in sizes.items()))
    except Exception as e:
        results["export"] = {"ok": False, "reason": f"export stage failed "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"}
        log(results["export"]["reason"])
    save()


def _export_sizes(module, model, setup):
    """Bytes (and gzip bytes) of the dense, sparse and int8 TFLite files of `model`.

    Uses the export stage's `convert(model, sparse=, int8=, representative=)`,
    calibrated on 256 MNIST training images.
    """
    import gzip

    from keras_stg.experiments import data

    images, _ = data.load("mnist", "train", setup.data_dir)
    representative = data.normalize(images[:256], "mnist")
    sizes = {}
    for variant, kwargs in (("dense", {}), ("sparse", {"sparse": True}),
                            ("int8", {"int8": True, "representative": representative})):
        blob = module.convert(model, **kwargs)
        sizes[variant] = {"bytes": len(blob),
                          "gzip_bytes": len(gzip.compress(blob, compresslevel=9, mtime=0))}
    return sizes
