"""keras-stg: strong lottery tickets with stochastic gates for Keras 3.

Public API:
    wrap(model, config | **options) -> GatedModel, whose `fit` learns binary masks
    GateConfig                        -> every option of a gated model, validated
    FixedPenalty, TargetSparsity      -> schedules of the expected-L0 penalty
    strip(gated)                      -> plain keras.Model with kernel * mask
    shrink(model)                     -> plain keras.Model with pruned units removed
    channel_groups(model)             -> channels coupled through residuals, concats, SE
    inline(model)                     -> custom block layers opened into their sublayers
    summary(gated), layer_stats(gated)-> per-layer sparsity report
    StochasticGate                    -> gate layer for hand-built models
    save_ticket, load_ticket          -> an slt ticket as its seed and entropy-coded mask
    register_layer                    -> teach keras_stg a layer type (layer_table)
    initializers, granularity         -> ticket initialisations, gate granularities
"""

from keras_stg import granularity
from keras_stg import initializers
from keras_stg.config import GateConfig
from keras_stg.dependency import ChannelGroup, channel_groups
from keras_stg.gate import StochasticGate
from keras_stg.gated_model import GatedModel, UnreachableTargetError
from keras_stg.inlining import InlineError, inline
from keras_stg.layer_table import register_layer
from keras_stg.masking import MaskedModel
from keras_stg.penalty import FixedPenalty, TargetSparsity
from keras_stg.report import layer_stats, summary
from keras_stg.shrinking import ShrinkCheckError, ShrinkError, shrink
from keras_stg.stripping import strip
from keras_stg.ticket import TicketError, load_ticket, save_ticket
from keras_stg.wrapping import wrap

__version__ = "0.2.0"

__all__ = [
    "ChannelGroup",
    "FixedPenalty",
    "GateConfig",
    "GatedModel",
    "InlineError",
    "MaskedModel",
    "ShrinkCheckError",
    "ShrinkError",
    "StochasticGate",
    "TargetSparsity",
    "TicketError",
    "UnreachableTargetError",
    "granularity",
    "initializers",
    "channel_groups",
    "inline",
    "layer_stats",
    "load_ticket",
    "register_layer",
    "save_ticket",
    "shrink",
    "strip",
    "summary",
    "wrap",
]
