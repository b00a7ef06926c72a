"""Fused CPU kernels for weight-level gates (`keras_stg/_ops/stg_ops.cc`).

The gate math of a weight-level gate (noise, shift, clip, the kernel product,
the expected-L0 penalty and their gradients) is a dozen elementwise
TensorFlow ops per gated kernel, each a separate pass over memory with its own
dispatch; on a CPU, for a small network, those passes are a large share of the
step (benchmarks/RESULTS.md, overhead). The fused kernels do it in one pass
forward and one backward.

They are compiled with the system C++ compiler against the installed
TensorFlow the first time a gated model trains on a CPU (seconds, once), and
cached in `$KERAS_STG_CACHE` (default `~/.cache/keras_stg`). If there is no
compiler, or the build fails, training falls back to the pure-TensorFlow path
(same math, same noise) with one warning. `KERAS_STG_FUSED=0` turns the
kernels off. Nothing is compiled or loaded at import time.

The two paths compute the same function: the tests compare values, penalty
and gradients, and whole training runs.
"""

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ops", "stg_ops.cc")
_LOCK = threading.Lock()
_STATE = {"tried": False, "lib": None, "error": None}
logger = logging.getLogger("keras_stg")


def enabled_by_env():
    """False if `KERAS_STG_FUSED` is set to 0/false/off/no."""
    return os.environ.get("KERAS_STG_FUSED", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir():
    root = os.environ.get("KERAS_STG_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_stg"
    )
    return os.path.join(root, "ops")


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which(
        "clang++"
    )


def _build(tf):
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    with open(_SOURCE, "rb") as f:
        source = f.read()
    flags = list(tf.sysconfig.get_compile_flags())
    link = list(tf.sysconfig.get_link_flags())
    base = ["-shared", "-fPIC", "-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-trapping-math",
            "-w"]
    key = hashlib.sha256(
        b"\0".join(
            [source, tf.__version__.encode(), cxx.encode(), sys.version.encode(),
             platform.machine().encode(), " ".join(base + flags + link).encode()]
        )
    ).hexdigest()[:16]
    out_dir = os.path.join(cache_dir(), key)
    target = os.path.join(out_dir, "stg_ops.so")
    if os.path.exists(target):
        return target
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        # Portable flags: TF 2.21's Eigen headers do not compile with
        # -march=native on AVX512-FP16 CPUs. The elementwise loops pick
        # AVX-512/AVX2 at run time instead (target_clones in stg_ops.cc).
        cmd = [cxx] + base + [_SOURCE, "-o", tmp] + flags + link
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                "compiling the fused gate kernels failed:\n" + proc.stderr.strip()[-2000:]
            )
        os.replace(tmp, target)
        return target
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _register_gradient(tf, lib):
    tf.no_gradient("StgClip")  # the bound constraint runs after the update, outside any tape

    @tf.RegisterGradient("StgWeightGate")
    def _grad(op, grad_value, grad_l0, grad_kept):  # noqa: ANN001, ARG001 - kept is a count
        kernel, mu, table, start = op.inputs
        kernel_grad = op.get_attr("kernel_grad")
        if grad_l0 is None:
            grad_l0 = tf.zeros([], tf.float32)
        if grad_value is None:
            grad_value = tf.zeros_like(kernel)
        dmu, dkernel = lib.stg_weight_gate_grad(
            grad_value, grad_l0, kernel, mu, table, start,
            sigma=op.get_attr("sigma"), kernel_grad=kernel_grad,
        )
        return [dkernel if kernel_grad else None, dmu, None, None]


def load():
    """The loaded op library, or None if unavailable (the reason is logged once)."""
    if not enabled_by_env():
        return None
    with _LOCK:
        if _STATE["tried"]:
            return _STATE["lib"]
        _STATE["tried"] = True
        import tensorflow as tf

        try:
            path = _build(tf)
            lib = tf.load_op_library(path)
            _register_gradient(tf, lib)
            _STATE["lib"] = lib
        except Exception as e:  # noqa: BLE001 - any failure means: use the TF path
            _STATE["error"] = str(e)
            logger.warning(
                "keras_stg: fused gate kernels unavailable, using the pure-TensorFlow "
                "gate path (same results, slower on CPU). Reason: %s", e
            )
        return _STATE["lib"]


def error():
    """Why `load()` returned None, if it was tried and failed."""
    return _STATE["error"]


# ------------------------------------------------------------ fused Adam


def fusable_adam(optimizer):
    """Whether `optimizer` is Keras' Adam (or AdamW) with its own update rule."""
    import keras

    return (
        isinstance(optimizer, keras.optimizers.Adam)
        and type(optimizer).update_step is keras.optimizers.Adam.update_step
        and not optimizer.amsgrad
    )


@contextlib.contextmanager
def gate_adam(optimizer, gate_variables, fused=True, lr_scale=1.0):
    """While the update is traced, the optimizer moves the gate locations its own way.

    `lr_scale`: the gates train at `lr_scale` (a number or a scalar tensor)
    times the optimizer's learning rate (any optimizer; the weights keep theirs).

    `fused`: Keras' Adam updates a variable with about ten elementwise
    TensorFlow ops, each a pass over memory; on a gate tensor as large as its
    kernel that is most of the optimizer's time. With `fused`, float32 gate
    locations are updated with TensorFlow's fused `ResourceApplyAdam` kernel
    instead: one pass over the gates, the optimizer's own moment slots and step
    count, the same Adam formula (equal to Keras' update within float32
    rounding; `tests/test_fused.py`). All else `apply_gradients` does is
    unchanged (`keras_stg._compat.update_step_override`). Any other variable,
    optimizer (SGD, AMSGrad, an Adam subclass with its own rule), a sparse
    gradient or a distributed replica variable goes the usual Keras way.
    """
    fused = bool(fused) and fusable_adam(optimizer)
    unscaled = isinstance(lr_scale, (int, float)) and lr_scale == 1.0
    if not gate_variables or (not fused and unscaled):
        yield
        return
    import tensorflow as tf
    from keras import ops

    from keras_stg import _compat

    # The TensorFlow backend hands `update_step` the variables' `tf.Variable`s.
    gates = {id(v.value) for v in gate_variables}

    def update_step(gradient, variable, learning_rate):
        if id(variable) not in gates:
            return update_step.keras_update(gradient, variable, learning_rate)
        if not unscaled:
            learning_rate = ops.cast(learning_rate, "float32") * lr_scale
        if (not fused or tf.as_dtype(variable.dtype) != tf.float32
                or isinstance(gradient, tf.IndexedSlices)):
            return update_step.keras_update(gradient, variable, learning_rate)
        m, v = _compat.adam_slots(optimizer, variable)
        step = ops.cast(optimizer.iterations + 1, "float32")
        beta_1 = ops.cast(optimizer.beta_1, "float32")
        beta_2 = ops.cast(optimizer.beta_2, "float32")
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=m.handle,
            v=v.handle,
            beta1_power=ops.power(beta_1, step),
            beta2_power=ops.power(beta_2, step),
            lr=ops.cast(learning_rate, "float32"),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=ops.cast(optimizer.epsilon, "float32"),
            grad=ops.cast(gradient, "float32"),
        )

    with _compat.update_step_override(optimizer, update_step):
        yield
