"""The constraint that keeps gate locations bounded."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_stg")
class _Bound(keras.constraints.Constraint):
    """Clips gate locations to `[-bound, bound]`.

    `fused_lib` (set by `GatedModel` when it trains with the fused CPU
    kernels, see `keras_stg.fused`) clips float32 tensors in one pass instead
    of TensorFlow's two.
    """

    def __init__(self, bound):
        self.bound = float(bound)
        self.fused_lib = None

    def __call__(self, w):
        if self.fused_lib is not None and w.dtype == "float32":
            return self.fused_lib.stg_clip(w, bound=self.bound)
        return ops.clip(w, -self.bound, self.bound)

    def get_config(self):
        return {"bound": self.bound}


Bound = _Bound
