"""Initialisations for strong lottery tickets, regenerable bit for bit from a seed.

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

The draws come from `keras_stg._random`: kernel `i` of the model's gated
kernels (in `find_targets` order) reads its own Philox stream keyed by
`(seed, i)`. `signed_constant` takes each sign from one bit and computes the
magnitude in float64 before the cast; the uniform ones scale `2u - 1` (`u`
from 53 bits) by a float64 bound. These use only exact or correctly rounded
IEEE operations, so `kernel_values` gives the same bits on every platform and
a ticket can be shipped as its seed and mask (`keras_stg.save_ticket`).
`kaiming_normal` needs `log` and `cos`, whose last bit differs between math
libraries: it is drawn the same way but is not in `EXACT`.

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

from keras_stg import _random
from keras_stg.targets import find_targets

_GAIN = math.sqrt(2.0)

#: Initialisation name -> (how it draws: "sign", "uniform" or "normal", its gain).
RECIPES = {
    "signed_constant": ("sign", _GAIN),
    "kaiming_normal": ("normal", _GAIN),
    "kaiming_uniform": ("uniform", _GAIN),
    "uniform": ("uniform", 1.0 / math.sqrt(3.0)),
}
#: The initialisations whose values are bit-exact on every platform.
EXACT = ("signed_constant", "kaiming_uniform", "uniform")


def _check_density(density):
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"`density` must be in (0, 1], got {density!r}.")


def std(gain, fan_in, density=None):
    """`gain / sqrt(fan_in) * (1 / sqrt(density))` in float64 (correctly rounded steps)."""
    _check_density(density)
    scale = 1.0 if density is None else 1.0 / math.sqrt(density)
    return float(gain) / math.sqrt(fan_in) * scale


def kernel_values(kind, seed, index, shape, fan_in, gain, density=None, dtype="float32"):
    """The values of gated kernel `index` (NumPy, `dtype`): what the initialisations assign.

    Args:
        kind: `"sign"`, `"uniform"` or `"normal"` (`RECIPES` maps names to kinds).
        seed: the model's seed, an integer in [0, 2**64).
        index: the kernel's position among the model's gated kernels.
        shape, fan_in: the kernel's shape and fan-in.
        gain, density: as in the initialisations.
    """
    n = math.prod(shape)
    scale = std(gain, fan_in, density)
    if kind == "sign":
        raw = _random.words(seed, index, n)
        values = np.where(_random.signs(raw), -scale, scale)
    elif kind == "uniform":
        u = _random.unit(_random.words(seed, index, n))
        values = (2.0 * u - 1.0) * (scale * math.sqrt(3.0))
    elif kind == "normal":  # Box-Muller on two words per value
        u = _random.unit(_random.words(seed, index, 2 * n))
        radius = np.sqrt(-2.0 * np.log1p(-u[0::2]))  # 1 - u is in (0, 1]
        values = radius * np.cos(2.0 * math.pi * u[1::2]) * scale
    else:
        raise ValueError(f"Unknown kind {kind!r}; use 'sign', 'uniform' or 'normal'.")
    return np.asarray(values.reshape(shape), dtype=dtype)


def _targets(model, include, exclude):
    from keras_stg.masking import MaskedModel

    if isinstance(model, MaskedModel):
        return model.targets
    return find_targets(model, include, exclude)[0]


def _apply(model, name, seed, gain, density, include, exclude):
    _check_density(density)
    kind, default_gain = RECIPES[name]
    gain = default_gain if gain is None else gain
    for index, target in enumerate(_targets(model, include, exclude)):
        shape = tuple(target.variable.shape)
        target.variable.assign(kernel_values(kind, seed, index, shape, target.fan_in, gain,
                                             density, target.variable.dtype))
    return model


def signed_constant(model, seed=0, gain=_GAIN, density=None, include=None, exclude=None):
    """Signed Kaiming constant: every weight is `+-gain/sqrt(fan_in)`."""
    return _apply(model, "signed_constant", seed, gain, density, include, exclude)


def kaiming_normal(model, seed=0, gain=_GAIN, density=None, include=None, exclude=None):
    """Kaiming normal: `N(0, gain^2/fan_in)` (not bit-exact across platforms, see above)."""
    return _apply(model, "kaiming_normal", seed, gain, density, include, exclude)


def kaiming_uniform(model, seed=0, gain=_GAIN, density=None, include=None, exclude=None):
    """Kaiming uniform: `U(-b, b)` with `b = gain*sqrt(3/fan_in)`."""
    return _apply(model, "kaiming_uniform", seed, gain, density, include, exclude)


def uniform(model, seed=0, density=None, include=None, exclude=None):
    """The paper's uniform: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`."""
    return _apply(model, "uniform", seed, None, density, include, exclude)


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
