"""Variants of our method that the `seeds` part compares with each other and edge-popup.

Each is a hypothesis of issue 18 about the gap to edge-popup. `VARIANTS` names
them; `part_seeds` builds each (its gated model, optimizer or epochs) from the
library's `train_ours`. Every method pins its sparsity controller's error
and rate (`CONTROLLER_ERRORS`, `CONTROLLER_RATES`), so a row keeps its meaning
when the library defaults change.

- `ours`: `keras_stg.wrap` with the library defaults up to 2026-12-05
  (`controller_error="absolute"`, `controller_rate=0.01`) and the task
  config's batch, learning rate and scale-fan (as the `frontier` part). The
  variants below differ from it in one thing each, `ours_rate` in two.
- `ours_layer`: the same share of weights kept in every layer, as edge-popup
  has it: one sparsity controller (the library's `TargetSparsity` law) per
  layer, each with its own lambda on that layer's expected density, instead of
  one global budget (`LayerwiseGatedModel`).
- `ours_sgd`: SGD with momentum 0.9 and cosine decay on the gate locations
  (edge-popup's optimizer) instead of Adam.
- `ours_ratio`: the sparsity controller's error taken as the log of the
  predicted kept share over the target's (`controller_error="log_ratio"`,
  the library default since 2026-12-05).
- `ours_rate`: `ours_ratio` with five times the controller's rate
  (`controller_rate=0.05`), so that runs of about a thousand steps bring the
  mask to the target: the library defaults of 2026-12-05.
- `ours_sigma`: `ours_rate` with the gates' noise scale at 0.25 instead of the
  library's 0.5 (`sigma=0.25`): on a run of a thousand steps the gate locations
  cross the noise's width in half the steps.
- `ours_polish`: `ours_rate` with `wrap(polish=0.25)` (`polish="auto"`, the
  library defaults of session 19, 2026-12-06, before `sigma="auto"`): the last quarter of
  the steps trains the gates through the binary mask itself (forward
  `1[mu > 0]`, the gradient of `mu` straight through), with the gates' rate
  decayed to 0 along a half cosine over that quarter: the network the test set
  sees is the one the last steps fit, and the mask settles, as in edge-popup;
  the relaxed gates train a network of half-open gates that the binary mask
  then replaces.
- `ours_erk`: `ours_polish` with each layer's expected-L0 penalty scaled by
  the inverse of its Erdos-Renyi density `(fan_in + fan_out) / (fan_in * fan_out)`
  (Evci et al. 2020; kernel dimensions summed over their product for a
  convolution), normalized so that the scales average 1 over the weights: a
  small layer with few inputs and outputs (a classifier head) is pressed less
  than a wide one, so the global budget does not starve it (layer collapse).
- `ours_psigma`: `ours_polish` with the gates' noise scale at 0.25 instead of
  0.5 (`sigma="auto"`, the library defaults since session 20, 2026-12-06): at
  a kept share of a few percent, the relaxed network (gates open with
  probability `Phi((mu + 0.5) / sigma)`) is many times denser than the
  binary mask; less noise narrows the gap.
- `ours_phalf`: `ours_psigma` with half of the gate phase on the binary mask
  (`polish=0.5`) instead of the last quarter: more steps fit the very network
  the test set sees.
- `ours_time`: `ours` for as many epochs as fit in
  edge-popup's time at the same sparsity and seed (its measured training
  time over ours, times the epochs).
- `ours_ptime`: `ours_psigma` (the library defaults) for as many epochs as fit
  in edge-popup's time at the same sparsity and seed, timed against the
  `ours_psigma` row of that point: the equal-wall-clock frontier of the
  current method.
"""

import math

import keras
from keras import ops

import keras_stg
from keras_stg import gate_math
from keras_stg.wrapping import draw_init


class _LayerState:
    """The controller state `TargetSparsity.update` reads and writes, for one layer."""

    def __init__(self, model, index, lam):
        self.lam = model.add_weight(name=f"lam_{index}", shape=(), trainable=False,
                                    initializer=keras.initializers.Constant(lam))
        self.last_sparsity = model.add_weight(name=f"last_sparsity_{index}", shape=(),
                                              trainable=False,
                                              initializer=keras.initializers.Constant(-1.0))
        self.sparsity_velocity = model.add_weight(name=f"sparsity_velocity_{index}", shape=(),
                                                  trainable=False, initializer="zeros")
        self.total_steps = model.total_steps
        self.epoch_steps = model.epoch_steps


class LayerwiseGatedModel(keras_stg.GatedModel):
    """A `GatedModel` (weight granularity) whose sparsity target holds in every layer.

    The penalty is `sum_l lambda_l * n_l / N * expected density_l`, and each
    `lambda_l` is moved every step by the model's `TargetSparsity` law on
    that layer's binary-mask sparsity; with all `lambda_l` equal it is the
    library's global penalty.
    """

    def __init__(self, model, **options):
        super().__init__(model, **options)
        if self._plan is not None or self.target_sparsity is None:
            raise ValueError("LayerwiseGatedModel needs weight-like gates and a target_sparsity.")
        self._layer_states = [_LayerState(self, i, self.penalty.lam)
                              for i in range(len(self.gates))]
        total = float(sum(self._n_weights))
        self._layer_share = [n / total for n in self._n_weights]

    def _layer_densities(self):
        expected, hard = [], []
        for target, gate, n in zip(self.targets, self.gates, self._n_weights):
            expected.append(gate_math.expected_l0(gate.mu, gate.sigma)
                            / float(math.prod(gate.gate_shape)))
            hard.append(self._kept_weights(target, gate) / float(n))
        return expected, hard

    def extra_loss(self):
        self._step_densities()  # the global figures still go to the logs
        if self._mask_frozen:
            return None
        expected, _ = self._layer_densities()
        return sum(ops.cast(s.lam, "float32") * share * e
                   for s, share, e in zip(self._layer_states, self._layer_share, expected))

    def after_step(self, iteration):
        if self._mask_frozen:
            return
        _, hard = self._layer_densities()
        for state, h in zip(self._layer_states, hard):
            self.penalty.update(state, h, iteration)


def erk_scales(targets):
    """Per gated kernel: 1 / its Erdos-Renyi-kernel density, normalized to a weighted
    mean of 1 over the kernels' weights."""
    inverse = [math.prod(shape) / sum(shape) for shape in
               (tuple(int(d) for d in t.variable.shape) for t in targets)]
    sizes = [math.prod(tuple(t.variable.shape)) for t in targets]
    mean = sum(n * d for n, d in zip(sizes, inverse)) / sum(sizes)
    return [d / mean for d in inverse]


class ErkGatedModel(keras_stg.GatedModel):
    """A `GatedModel` (weight granularity) whose penalty weighs each layer's expected
    kept weights by `erk_scales`; the controller still holds the global sparsity."""

    def __init__(self, model, **options):
        super().__init__(model, **options)
        if self._plan is not None:
            raise ValueError("ErkGatedModel needs weight-like gates.")
        self._erk = erk_scales(self.targets)

    def extra_loss(self):
        self._step_densities()  # the unweighted figures still go to the logs
        if self._mask_frozen:
            return None
        weighted = sum(gate.expected_l0() * (n / float(math.prod(gate.gate_shape)) * cost * s)
                       for gate, n, cost, s in zip(self.gates, self._n_weights,
                                                   self._unit_cost, self._erk))
        return ops.cast(self.lam, "float32") * weighted / self._total_cost


#: Share of the gate phase `ours_polish` trains on the binary mask (`wrap(polish=...)`).
POLISH = 0.25


def wrap_erk(model, **options):
    """`keras_stg.wrap` building an `ErkGatedModel` (same options, same init)."""
    return draw_init(ErkGatedModel(model, **options))


def wrap_layerwise(model, **options):
    """`keras_stg.wrap` building a `LayerwiseGatedModel` (same options, same init)."""
    return draw_init(LayerwiseGatedModel(model, **options))


#: method -> (label, short description of what differs from `ours`)
VARIANTS = {
    "ours": ("ours, absolute controller", "library defaults up to 2026-12-05"),
    "ours_layer": ("ours, per-layer budget", "one sparsity controller per layer"),
    "ours_sgd": ("ours, SGD on gates", "SGD momentum 0.9, cosine decay on the gates"),
    "ours_time": ("ours, edge-popup's time", "as many epochs as edge-popup's training time"),
    "ours_ptime": ("ours (default), edge-popup's time",
                   "the library defaults for as many epochs as edge-popup's training time"),
    "ours_ratio": ("ours, log-ratio controller",
                   "controller error log(kept share / target's kept share)"),
    "ours_rate": ("ours, log ratio, rate 0.05",
                  "the log-ratio controller at controller_rate 0.05 instead of 0.01: the "
                  "library defaults of 2026-12-05"),
    "ours_sigma": ("ours, sigma 0.25", "the library defaults with sigma 0.25 instead of 0.5"),
    "ours_polish": ("ours, binary-mask polish",
                    "the log-ratio controller at rate 0.05, the last quarter of the steps on "
                    "the binary mask (straight-through): the library defaults of session 19 "
                    "(2026-12-06)"),
    "ours_psigma": ("ours, polish, sigma 0.25 (default)",
                    "the binary-mask polish with sigma 0.25 instead of 0.5: the library "
                    "defaults since session 20 (2026-12-06)"),
    "ours_phalf": ("ours, polish half",
                   "the library defaults with half of the steps on the binary mask instead "
                   "of the last quarter"),
    "ours_erk": ("ours, ERK-weighted penalty",
                 "the binary-mask polish with each layer's penalty over its Erdos-Renyi "
                 "density"),
}
#: The controller error (`keras_stg.wrap`'s `controller_error`) of each method of ours.
CONTROLLER_ERRORS = {"ours": "absolute", "ours_layer": "absolute", "ours_sgd": "absolute",
                     "ours_time": "absolute", "ours_ratio": "log_ratio", "ours_rate": "log_ratio",
                     "ours_sigma": "log_ratio", "ours_polish": "log_ratio",
                     "ours_erk": "log_ratio", "ours_psigma": "log_ratio",
                     "ours_phalf": "log_ratio", "ours_ptime": "log_ratio"}
#: The controller rate (`controller_rate`) of each method of ours.
CONTROLLER_RATES = dict.fromkeys(CONTROLLER_ERRORS, 0.01) | {"ours_rate": 0.05,
                                                             "ours_sigma": 0.05,
                                                             "ours_polish": 0.05,
                                                             "ours_erk": 0.05,
                                                             "ours_psigma": 0.05,
                                                             "ours_phalf": 0.05,
                                                             "ours_ptime": 0.05}
#: The gates' noise scale (`sigma`) of each method of ours (the library's 0.5 unless named).
SIGMAS = dict.fromkeys(CONTROLLER_ERRORS, 0.5) | {"ours_sigma": 0.25, "ours_psigma": 0.25,
                                                  "ours_phalf": 0.25, "ours_ptime": 0.25}
#: The binary-mask polish (`wrap(polish=...)`) of each method of ours: 0 but where named
#: (the library's "auto" would polish every `slt` method since 2026-12-06).
POLISHES = dict.fromkeys(CONTROLLER_ERRORS, 0.0) | {"ours_polish": POLISH, "ours_erk": POLISH,
                                                    "ours_psigma": POLISH, "ours_phalf": 0.5,
                                                    "ours_ptime": POLISH}
#: The method that runs the library's current defaults (issue 18's targets are read on it).
DEFAULT_METHOD = "ours_psigma"
#: Methods trained for edge-popup's time -> the method of ours whose row times them.
TIMED = {"ours_time": "ours", "ours_ptime": DEFAULT_METHOD}


def controller_error(method):
    """The sparsity controller error `method` trains with."""
    return CONTROLLER_ERRORS[method]


def wrap_for(method):
    """`keras_stg.wrap` (or `wrap_layerwise`, `wrap_erk`) as `method` builds its gated model."""
    build = {"ours_layer": wrap_layerwise, "ours_erk": wrap_erk}.get(method, keras_stg.wrap)
    pinned = {"controller_error": controller_error(method),
              "controller_rate": CONTROLLER_RATES[method], "sigma": SIGMAS[method],
              "polish": POLISHES[method]}
    return lambda model, **options: build(model, **pinned, **options)

#: SGD learning rate of `ours_sgd` on the gate locations (`--gate-sgd-lr`).
GATE_SGD_LR = 1.0
