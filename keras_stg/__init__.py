"""keras-stg: strong lottery tickets with stochastic gates for Keras 3.

Public API:
    wrap(model, ...)      -> GatedModel, whose `fit` learns binary masks
    strip(gated)          -> plain keras.Model with kernel * mask
    summary(gated)        -> per-layer sparsity table
    StochasticGate        -> gate layer for hand-built models
    init                  -> strong-lottery-ticket initialisations
    granularity           -> gate granularities (weight, unit, block)
"""

from keras_stg import granularity
from keras_stg import init
from keras_stg.layers import StochasticGate
from keras_stg.model import GatedModel
from keras_stg.strip import strip
from keras_stg.summary import layer_stats, summary
from keras_stg.wrap import wrap

__version__ = "0.1.0"

__all__ = [
    "GatedModel",
    "StochasticGate",
    "granularity",
    "init",
    "layer_stats",
    "strip",
    "summary",
    "wrap",
]
