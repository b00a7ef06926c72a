"""Edge TPU readiness check of a `.tflite` file, without the Edge TPU compiler.

`edgetpu_compiler` only installs from Coral's own apt repository, so the
exporter produces the compiler-ready file and checks Coral's documented rules
itself (https://coral.ai/docs/edgetpu/models-intro/):

- only builtin ops, no Flex (SELECT_TF_OPS) or custom ops;
- only ops the Edge TPU supports (others fall back to the CPU, or split the
  graph at the first unsupported op);
- every tensor is 8-bit quantized (int8 / uint8; int32 only for biases and
  shape operands), with quantization parameters; no float tensors;
- input and output tensors are int8 or uint8;
- static shapes: no dynamic dimension anywhere, batch 1;
- activation tensors: only the 3 innermost dimensions may be larger than 1;
- no sparse (CSR) tensors: export dense int8, zeros only help compression.

`check(path_or_bytes)` returns a list of `Problem`s (empty: ready);
`readiness(...)` a JSON-able summary; `compiler_command(path)` the exact
command to compile the file on a machine that has the compiler.
"""

import dataclasses
import os
import shlex

#: Builtin ops the Edge TPU compiler maps to the TPU (Coral's supported-ops table).
SUPPORTED_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D",
    "EXPAND_DIMS", "FULLY_CONNECTED", "GATHER", "HARD_SWISH", "L2_NORMALIZATION",
    "LOGISTIC", "LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN",
    "MINIMUM", "MUL", "PACK", "PAD", "PADV2", "PRELU", "QUANTIZE", "REDUCE_MAX",
    "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT",
    "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "TANH", "TRANSPOSE",
    "TRANSPOSE_CONV",
})

_INT8_TYPES = ("INT8", "UINT8")


@dataclasses.dataclass
class Problem:
    """One op or tensor that breaks an Edge TPU rule."""

    kind: str       # "op" or "tensor"
    index: int      # operator or tensor index in subgraph 0
    name: str       # op name or tensor name
    rule: str       # which rule, in words

    def __str__(self):
        return f"{self.kind} #{self.index} {self.name}: {self.rule}"


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover - older installs
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def _names(enum):
    return {v: k for k, v in vars(enum).items() if not k.startswith("_")}


def _load(model):
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    with open(os.fspath(model), "rb") as f:
        return f.read()


def check(model):
    """Every op and tensor of a `.tflite` (path or bytes) that breaks a rule.

    Returns:
        A list of `Problem`, empty if the file is ready for `edgetpu_compiler`.
    """
    schema = _schema()
    data = _load(model)
    try:
        fb = schema.ModelT.InitFromPackedBuf(data, 0)
    except Exception as e:
        return [Problem("file", 0, "model", f"not a readable TFLite flatbuffer ({e})")]
    op_names = _names(schema.BuiltinOperator)
    type_names = _names(schema.TensorType)
    problems = []
    if len(fb.subgraphs) != 1:
        problems.append(Problem("file", 0, "model", f"{len(fb.subgraphs)} subgraphs; the "
                                "Edge TPU compiler maps only single-subgraph models"))
    graph = fb.subgraphs[0]
    constant = set()
    for i, t in enumerate(graph.tensors):
        buf = fb.buffers[t.buffer] if t.buffer < len(fb.buffers) else None
        if buf is not None and (buf.data is not None and len(buf.data) or buf.size):
            constant.add(i)
    int32_ok = set()  # biases and shape / axis operands may be int32
    for k, op in enumerate(graph.operators):
        code = fb.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        name = op_names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
            kind = "Flex (SELECT_TF_OPS) op" if str(custom).startswith("Flex") else "custom op"
            problems.append(Problem("op", k, str(custom), f"{kind}; the Edge TPU runs builtin ops only"))
        elif name not in SUPPORTED_OPS:
            problems.append(Problem("op", k, name, "not supported by the Edge TPU (runs on the CPU "
                                    "and splits the graph there)"))
        inputs = [i for i in (op.inputs if op.inputs is not None else []) if i >= 0]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV",
                    "SPLIT"):  # SPLIT's first operand is its axis
            int32_ok.update(i for i in inputs if i in constant)
        else:
            int32_ok.update(i for i in inputs[1:] if i in constant)
    io = set(graph.inputs) | set(graph.outputs)
    for i, t in enumerate(graph.tensors):
        tname = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        ttype = type_names.get(t.type, str(t.type))
        shape = [] if t.shape is None else [int(d) for d in t.shape]
        signature = None if t.shapeSignature is None else [int(d) for d in t.shapeSignature]
        if t.sparsity is not None:
            problems.append(Problem("tensor", i, tname, "sparse (CSR) encoding; export dense int8 "
                                    "for the Edge TPU (drop --sparse)"))
        if ttype == "INT32":
            if i not in int32_ok:
                problems.append(Problem("tensor", i, tname, "int32 activation tensor; only 8-bit "
                                        "tensors run on the Edge TPU"))
        elif ttype not in _INT8_TYPES:
            problems.append(Problem("tensor", i, tname, f"{ttype.lower()} tensor; the Edge TPU needs "
                                    "full int8 quantization (representative dataset, "
                                    "TFLITE_BUILTINS_INT8)"))
        elif t.quantization is None or t.quantization.scale is None or not len(t.quantization.scale):
            problems.append(Problem("tensor", i, tname, "8-bit tensor without quantization parameters"))
        if i in io and ttype not in _INT8_TYPES:
            where = "input" if i in graph.inputs else "output"
            problems.append(Problem("tensor", i, tname, f"model {where} is {ttype.lower()}; the "
                                    "Edge TPU needs int8 or uint8 inputs and outputs"))
        if signature is not None and any(d < 0 for d in signature):
            problems.append(Problem("tensor", i, tname, f"dynamic shape {signature}; pin every "
                                    "dimension (batch 1)"))
        if i in graph.inputs and shape and shape[0] != 1:
            problems.append(Problem("tensor", i, tname, f"batch size {shape[0]}; the Edge TPU "
                                    "needs batch 1"))
        if i not in constant and len(shape) > 3 and any(d > 1 for d in shape[:-3]):
            problems.append(Problem("tensor", i, tname, f"shape {shape}: only the 3 innermost "
                                    "dimensions may be larger than 1"))
    return problems


def compiler_command(path, out_dir=None):
    """The exact `edgetpu_compiler` command for a ready `.tflite` file."""
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    return f"edgetpu_compiler --show_operations --out_dir {shlex.quote(out_dir)} {shlex.quote(os.fspath(path))}"


def readiness(model, path=None):
    """`{"ready", "problems", "command"}` for a `.tflite` file (path or bytes)."""
    problems = check(model)
    target = path if path is not None else (model if not isinstance(model, (bytes, bytearray)) else "model.tflite")
    return {
        "ready": not problems,
        "problems": [str(p) for p in problems],
        "command": compiler_command(target),
    }
