"""Edge export of strong lottery tickets: pruned TFLite/LiteRT and ONNX files.

Commands:

    python -m export.tflite --model M --out model.tflite [--sparse]
        [--int8 --calibration DATA] [--edgetpu] [--shrink [--channel-multiple N]]
        [--report FILE]
    python -m export.onnx --model M --out model.onnx [--opset N]
        [--int8 --calibration DATA] [--shrink [--channel-multiple N]] [--report FILE]
    python -m export.ticket --model M --out model.ticket [--report FILE]

`M` is a gated or stripped `.keras` file, or a training run's output folder
(`python -m keras_stg.train ... --out DIR`); `export.tflite` and `export.onnx`
also take a `.ticket` (`keras_stg.save_ticket`). The same exports are functions:

```python
from export import tflite, onnx

report = tflite.export("runs/lenet", "lenet.tflite", sparse=True)
report = onnx.export("runs/lenet/stripped.keras", "lenet.onnx")
```

Submodules: `tflite`, `onnx` (`--shrink` removes pruned units and channels
physically with `keras_stg.shrink`), `edgetpu` (Edge TPU readiness check), `ticket` (an `slt` ticket as its seed and
entropy-coded mask). Importing this package has no side effects; TensorFlow is
imported only when an export runs.
"""

__all__ = ["edgetpu", "onnx", "ticket", "tflite"]
