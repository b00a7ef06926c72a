"""The gate math of stochastic gates, in pure `keras.ops`.

A gate with location `mu` and noise scale `sigma` is the clipped Gaussian
relaxation of a Bernoulli variable (Yamada et al. 2020; Tsayag and Lindenbaum,
arXiv 2603.08914):

    z = clip(mu + 0.5 + sigma * eps, 0, 1),    eps ~ N(0, 1)

Its probability of being non-zero, summed over gates, is the expected L0 norm
`sum Phi((mu + 0.5) / sigma)` (Phi the standard normal CDF), a differentiable
sparsity penalty. At inference the gate is deterministic and strictly binary,
`m = 1[clip(mu + 0.5, 0, 1) > 0.5] = 1[mu > 0]`: with frozen weights a
fractional gate would secretly rescale a weight.
"""

import math

from keras import ops
from keras import random

_SQRT_HALF = 1.0 / math.sqrt(2.0)


def relaxed_gate(mu, sigma, seed=None, eps=None):
    """Samples the training-time gate `clip(mu + 0.5 + sigma * eps, 0, 1)`.

    Args:
        mu: Tensor of gate locations.
        sigma: Python float or scalar tensor, the noise scale.
        seed: A `keras.random.SeedGenerator`; a new `eps` is drawn per call.
        eps: the standard normal noise, shaped like `mu`, instead of `seed`.

    Returns:
        A tensor shaped like `mu` with values in [0, 1].
    """
    if eps is None:
        eps = random.normal(ops.shape(mu), dtype=mu.dtype, seed=seed)
    return ops.clip(mu + 0.5 + sigma * eps, 0.0, 1.0)


def binary_mask(mu, dtype=None):
    """The inference mask `1[clip(mu + 0.5, 0, 1) > 0.5]`, i.e. `1[mu > 0]`."""
    return ops.cast(ops.greater(mu, 0.0), dtype or mu.dtype)


def straight_through_mask(mu):
    """The binary mask `1[mu > 0]` forward, the identity to `mu` backward.

    The gradient of a loss with respect to the mask reaches `mu` unchanged
    (the straight-through estimator); the value is exactly binary.
    """
    return binary_mask(mu) + (mu - ops.stop_gradient(mu))


def open_probability(mu, sigma):
    """`P(z > 0) = Phi((mu + 0.5) / sigma)` per gate."""
    return 0.5 * (1.0 + ops.erf((mu + 0.5) / sigma * _SQRT_HALF))


def expected_l0(mu, sigma):
    """The expected number of non-zero gates, `sum Phi((mu + 0.5) / sigma)`."""
    return ops.sum(open_probability(mu, sigma))


def fractional_count(mu):
    """How many gates sit strictly inside (0, 1) at inference (-0.5 < mu < 0.5)."""
    inside = ops.logical_and(ops.greater(mu, -0.5), ops.less(mu, 0.5))
    return ops.sum(ops.cast(inside, "int32"))
