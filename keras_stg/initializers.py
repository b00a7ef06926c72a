"""Initialisations for strong lottery tickets, deterministic from a seed.

In `slt` mode the weights never train, so their initial distribution decides
what subnetworks exist. Each function re-draws the gated kernels of a model (or
of the model wrapped by a `GatedModel`) in place, with fan-in computed per
layer type, and returns the model. Biases are left as they are (Keras
initialises them to zero).

- `signed_constant`: `+-gain/sqrt(fan_in)` with random signs (edge-popup's best).
- `kaiming_normal`: `N(0, gain^2/fan_in)`.
- `kaiming_uniform`: `U(-b, b)`, `b = gain * sqrt(3/fan_in)` (same variance).
- `uniform`: the paper's uniform, `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.

`ClippedNormal` and `random_mu` initialise gate locations instead.

`density` rescales every kernel by `1/sqrt(density)` ("scale-fan" in
edge-popup): a ticket that keeps a share `density` of each layer's inputs then
has activations of the dense network's scale.

Example:

```python
model = keras_stg.initializers.signed_constant(model, seed=0)
```
"""

import math
import statistics

import keras
import numpy as np
from keras import ops

from keras_stg.targets import find_targets

_GAIN = math.sqrt(2.0)


def _targets(model, include, exclude):
    from keras_stg.masking import MaskedModel

    if isinstance(model, MaskedModel):
        return model.targets
    return find_targets(model, include, exclude)[0]


def _apply(model, seed, draw, gain, density, include, exclude):
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"`density` must be in (0, 1], got {density!r}.")
    rng = np.random.default_rng(seed)
    scale = 1.0 if density is None else 1.0 / math.sqrt(density)
    for target in _targets(model, include, exclude):
        shape = tuple(target.variable.shape)
        std = gain / math.sqrt(target.fan_in) * scale
        value = draw(rng, shape, std).astype(target.variable.dtype)
        target.variable.assign(value)
    return model


def signed_constant(model, seed=0, gain=_GAIN, density=None, include=None, exclude=None):
    """Signed Kaiming constant: every weight is `+-gain/sqrt(fan_in)`."""
    def draw(rng, shape, std):
        return np.where(rng.random(shape) < 0.5, -std, std)

    return _apply(model, seed, draw, gain, density, include, exclude)


def kaiming_normal(model, seed=0, gain=_GAIN, density=None, include=None, exclude=None):
    """Kaiming normal: `N(0, gain^2/fan_in)`."""
    def draw(rng, shape, std):
        return rng.standard_normal(shape) * std

    return _apply(model, seed, draw, gain, density, include, exclude)


def kaiming_uniform(model, seed=0, gain=_GAIN, density=None, include=None, exclude=None):
    """Kaiming uniform: `U(-b, b)` with `b = gain*sqrt(3/fan_in)`."""
    def draw(rng, shape, std):
        bound = std * math.sqrt(3.0)
        return rng.uniform(-bound, bound, shape)

    return _apply(model, seed, draw, gain, density, include, exclude)


def uniform(model, seed=0, density=None, include=None, exclude=None):
    """The paper's uniform: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`."""
    return kaiming_uniform(model, seed, 1.0 / math.sqrt(3.0), density, include, exclude)


INITIALIZERS = {
    "signed_constant": signed_constant,
    "kaiming_normal": kaiming_normal,
    "kaiming_uniform": kaiming_uniform,
    "uniform": uniform,
}


def get(name):
    """Looks an initialisation up by name."""
    if name not in INITIALIZERS:
        raise ValueError(
            f"Unknown init {name!r}. Use one of {sorted(INITIALIZERS)}, or None "
            "to keep the model's current weights."
        )
    return INITIALIZERS[name]


# ------------------------------------------------------ gate locations


@keras.saving.register_keras_serializable(package="keras_stg")
class ClippedNormal(keras.initializers.Initializer):
    """`N(mean, stddev)` draws clipped to `[-bound, bound]` (no clipping if None)."""

    def __init__(self, mean=0.0, stddev=1.0, bound=None, seed=None):
        self.mean = float(mean)
        self.stddev = float(stddev)
        self.bound = None if bound is None else float(bound)
        self.seed = seed
        self._normal = keras.initializers.RandomNormal(self.mean, self.stddev, seed=seed)

    def __call__(self, shape, dtype=None):
        values = self._normal(shape, dtype)
        if self.bound is None:
            return values
        return ops.clip(values, -self.bound, self.bound)

    def get_config(self):
        return {"mean": self.mean, "stddev": self.stddev, "bound": self.bound, "seed": self.seed}


def random_mu(density, sigma, bound, seed):
    """An initializer of gate locations whose binary mask keeps a random `density` share.

    `mu ~ N(sigma * Phi^-1(density), sigma)`, clipped to `[-bound, bound]`:
    `P(mu > 0) = density`, so the mask starts at the target sparsity, a
    random subnetwork in every layer, as edge-popup's random scores do; the
    gates then move weights in and out of it while the controller holds the
    target.
    """
    density = min(max(density, 1e-6), 1.0 - 1e-6)
    mean = sigma * statistics.NormalDist().inv_cdf(density)
    return ClippedNormal(mean, sigma, bound, seed)
