"""`StochasticGate`: a Keras layer holding a tensor of stochastic gates."""

import keras
from keras import ops

from keras_stg import gate_math
from keras_stg.constraints import Bound


@keras.saving.register_keras_serializable(package="keras_stg")
class StochasticGate(keras.layers.Layer):
    """Multiplies its input by stochastic gates `z = clip(mu + 0.5 + sigma*eps, 0, 1)`.

    During training a fresh `eps ~ N(0, 1)` is drawn per call; at inference the
    gate is the strictly binary mask `1[mu > 0]`. With `lam > 0` the layer adds
    `lam * mean Phi((mu + 0.5) / sigma)` (the expected L0 norm, normalised by
    the gate count) to the model's losses while training.

    Used on activations it selects features (the original STG). `keras_stg.wrap`
    uses the same layer on kernels, one per gated kernel, through `apply`.

    Args:
        sigma: noise scale of the relaxation (0.5 in the paper).
        lam: weight of the expected-L0 penalty added with `add_loss` (0: none).
        gate_shape: shape of the gate tensor; default the input shape without
            the batch axis. Must broadcast against the input.
        init_mu: initial gate location, a number (0.5 opens every gate
            fully) or a Keras initializer (e.g. `ClippedNormal`) for random
            locations.
        mu_bound: `mu` is kept in `[-mu_bound, mu_bound]` after every update.
            Adam scales even the vanishing penalty gradient of a closed gate to
            a full step, so unbounded closed gates sink for ever and can never
            reopen; bounded ones still open under the noise now and then and
            are revived if the task needs them. None: unbounded.
        seed: int seed of the noise.

    Example:

    ```python
    inputs = keras.Input((784,))
    x = keras_stg.StochasticGate(lam=0.1)(inputs)     # learns which pixels matter
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    ```
    """

    def __init__(
        self, sigma=0.5, lam=0.0, gate_shape=None, init_mu=0.5, mu_bound=1.0, seed=None, **kwargs
    ):
        super().__init__(**kwargs)
        if not sigma > 0:
            raise ValueError(f"`sigma` must be > 0, got {sigma!r}.")
        if lam < 0:
            raise ValueError(f"`lam` must be >= 0, got {lam!r}.")
        self.sigma = float(sigma)
        self.lam = float(lam)
        self.gate_shape = tuple(gate_shape) if gate_shape is not None else None
        if isinstance(init_mu, dict):
            init_mu = keras.saving.deserialize_keras_object(init_mu)
        if isinstance(init_mu, bool) or not (
            isinstance(init_mu, (int, float)) or callable(init_mu)
        ):
            raise ValueError(
                f"`init_mu` must be a number or a Keras initializer, got {init_mu!r}.")
        self.init_mu = init_mu if callable(init_mu) else float(init_mu)
        if mu_bound is not None and not mu_bound > 0:
            raise ValueError(f"`mu_bound` must be > 0 or None, got {mu_bound!r}.")
        self.mu_bound = None if mu_bound is None else float(mu_bound)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        if self.gate_shape is not None:
            self._build_gates(self.gate_shape)
            self.built = True

    def _build_gates(self, shape):
        self.mu = self.add_weight(
            name="mu",
            shape=shape,
            initializer=(
                self.init_mu if callable(self.init_mu)
                else keras.initializers.Constant(self.init_mu)
            ),
            constraint=None if self.mu_bound is None else Bound(self.mu_bound),
            trainable=True,
        )

    def build(self, input_shape):
        if self.gate_shape is None:
            self.gate_shape = tuple(input_shape[1:])
            if any(d is None for d in self.gate_shape):
                raise ValueError(
                    f"StochasticGate needs a static input shape without the batch "
                    f"axis, got {tuple(input_shape)}; pass `gate_shape=`."
                )
            self._build_gates(self.gate_shape)

    def gate(self, training=False, sigma=None):
        """The gate tensor: relaxed and noisy if `training`, else binary."""
        if training:
            return gate_math.relaxed_gate(self.mu, self.sigma if sigma is None else sigma,
                                      self.seed_generator)
        return gate_math.binary_mask(self.mu)

    def mask(self):
        """The binary inference mask as a NumPy array."""
        return ops.convert_to_numpy(gate_math.binary_mask(self.mu))

    def expected_l0(self, sigma=None):
        return gate_math.expected_l0(self.mu, self.sigma if sigma is None else sigma)

    def apply(self, tensor, training=False):
        """Returns `tensor * gate` without adding any loss (used by `wrap`)."""
        return tensor * ops.cast(self.gate(training), tensor.dtype)

    def call(self, inputs, training=False):
        if training and self.lam > 0:
            n = float(max(1, int(ops.size(self.mu))))
            self.add_loss(self.lam * self.expected_l0() / n)
        return self.apply(inputs, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        base_config = super().get_config()
        config = {
            "sigma": self.sigma,
            "lam": self.lam,
            "gate_shape": self.gate_shape,
            "init_mu": (
                keras.saving.serialize_keras_object(self.init_mu)
                if callable(self.init_mu) else self.init_mu
            ),
            "mu_bound": self.mu_bound,
            "seed": self.seed,
        }
        return {**base_config, **config}
