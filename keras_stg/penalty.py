"""Penalty schedules: how the weight `lambda` of the expected-L0 penalty moves during `fit`.

The training loss of a gated model is `task loss + lambda * expected density`
(the expected share of gated weights kept). A schedule decides `lambda`:

- `FixedPenalty(lam)`: a constant; the sparsity is whatever `lam` buys.
- `TargetSparsity(target)`: `lambda` is the Lagrange multiplier of the
  constraint "binary-mask sparsity = target", moved every step by a
  predictive integral controller; the sparsity target can ramp up over the
  start of `fit`.

A schedule holds hyperparameters only. The state it acts on (the current
`lam`, the controller's memory, the length of the running `fit`) are
variables of the `GatedModel`, saved with it, so a resumed run continues
where it stopped. To try a variant, subclass and override a hook
(`ramp_shape`, `gain`, `lookahead`); see `benchmarks/lenet_ablation.py`.

Schedules are Keras-serializable: `GatedModel.get_config` stores them and
`keras.models.load_model` rebuilds them (register your subclass with
`keras.saving.register_keras_serializable`).
"""

import math

import keras
from keras import ops

#: Bound of the adaptive lambda, so a bad start cannot blow it up.
LAM_MAX = 1e3

#: How `TargetSparsity` measures its error (`error=`): "absolute", the target sparsity
#: minus the predicted sparsity; "log_ratio", the log of the predicted kept share over
#: the target's kept share (bounded by `LOG_RATIO_MAX`).
ERRORS = ("absolute", "log_ratio")
DEFAULT_ERROR = "log_ratio"
#: `TargetSparsity`'s gain per step (`rate=`, `controller_rate=`); 0.01 before 2026-12-05.
DEFAULT_RATE = 0.05
#: Bound of the "log_ratio" error: a kept share more than e**2 (7.4x) off the target's
#: (or a predicted share <= 0 from extrapolating the velocity) counts as that much.
LOG_RATIO_MAX = 2.0


class Penalty:
    """Base class: a fixed `initial_lam` and no updates."""

    #: The sparsity the schedule drives the mask to, or None.
    target_sparsity = None

    def __init__(self, lam=1.0):
        if isinstance(lam, bool) or not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(
                f"`lam` must be a number >= 0, got {lam!r}. Use `lam=0` for no "
                "sparsity penalty, or `target_sparsity=` to adapt it automatically."
            )
        self.lam = float(lam)

    def resolve(self, random_start):
        """This schedule with its automatic settings fixed (`random_start`: the gates
        start as a random mask at the target)."""
        return self

    def update(self, state, hard_density, iteration):
        """Called once per training step; `state` is the `GatedModel` (see `TargetSparsity`)."""

    def get_config(self):
        return {"lam": self.lam}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="keras_stg")
class FixedPenalty(Penalty):
    """`lambda = lam` throughout (0: no penalty, the gates follow the task loss alone)."""


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_controller(rate, ramp, horizon, error=DEFAULT_ERROR):
    """Raises ValueError naming the first of `TargetSparsity`'s controller settings out of range."""
    if not (_number(rate) and rate > 0):
        raise ValueError(f"`controller_rate` must be > 0, got {rate!r}.")
    if ramp is not None and not (_number(ramp) and 0 <= ramp <= 1):
        raise ValueError(f"`target_ramp` must be in [0, 1] or None (auto), got {ramp!r}.")
    if not (_number(horizon) and horizon >= 0):
        raise ValueError(f"`controller_horizon` must be >= 0 (epochs), got {horizon!r}.")
    if error not in ERRORS:
        raise ValueError(f"`controller_error` must be one of {', '.join(map(repr, ERRORS))}, "
                         f"got {error!r}.")


@keras.saving.register_keras_serializable(package="keras_stg")
class TargetSparsity(Penalty):
    """Adapts `lambda` every step so that the binary mask's sparsity settles at `target`.

    The target is an equality constraint, so lambda is its Lagrange multiplier
    and may turn negative: on a frozen random network the task loss alone
    prunes many weights (most random weights hurt), and a target below that
    natural sparsity needs a reward for keeping weights.

    Two things keep the controller from overshooting. (1) The binary mask lags
    lambda by epochs (a gate flips only once `mu` crosses 0), so the error is
    taken on the sparsity predicted `horizon` epochs ahead from its smoothed
    velocity: lambda stops growing while the mask is already on its way to the
    target, and starts falling before the mask overshoots. (2) The step is
    `rate * gain(lambda) * error` with `gain = 1 + |lambda|`: additive near 0
    (so it can change sign), relative when lambda is large (so it rises and
    unwinds in an epoch or two whatever the scale the task needs).

    The error is the log of the predicted kept share over the target's
    (`error="log_ratio"`, the default) or the target sparsity minus the
    predicted one (`"absolute"`, the only one before 2026-12-05). Near a high
    target the absolute error is small whatever the relative miss: at 99%, a
    mask stuck at 98% keeps twice the weights but the error is 0.01, and a mask
    past the target gives an error of at most the target's kept share. The log
    ratio weighs a miss by the share the target keeps (about
    `absolute / (1 - target)` for small misses), so lambda reaches the scale
    the task needs within the run and turns negative within tens of steps when
    the mask runs past the target (where the task gradient has vanished and Adam
    closes gates at its full step whatever lambda's size).

    Args:
        target: sparsity in (0, 1) (share of gated weights removed).
        lam: starting value of lambda.
        rate: gain of the controller per step (`DEFAULT_RATE`).
        ramp: share of the gate phase's steps (all of `fit`'s, or those before
            the mask freezes with `finetune`) over which the target rises (`ramp_shape`)
            from 0 to `target`; 0: no ramp. None: 0 when the gates start as a
            random mask at the target (nothing to ramp), else 0.4.
        horizon: the controller acts on the sparsity predicted this many
            epochs ahead (0: on the current sparsity), at most to the end of
            the gate phase.
        error: "log_ratio" (default) or "absolute" (see above). A controller
            saved without it (older models) loads as "absolute", as it trained.
    """

    def __init__(self, target, lam=1.0, rate=DEFAULT_RATE, ramp=None, horizon=3.0,
                 error=DEFAULT_ERROR):
        super().__init__(lam)
        if isinstance(target, bool) or not (isinstance(target, (int, float)) and 0 < target < 1):
            raise ValueError(
                f"`target_sparsity` must be strictly between 0 and 1 (a fraction of "
                f"weights to remove, e.g. 0.9), got {target!r}."
            )
        check_controller(rate, ramp, horizon, error)
        self.target = float(target)
        self.error = error
        self.rate = float(rate)
        self.ramp = None if ramp is None else float(ramp)
        self.horizon = float(horizon)

    @property
    def target_sparsity(self):
        return self.target

    def resolve(self, random_start):
        if self.ramp is not None:
            return self
        config = self.get_config()
        config["ramp"] = 0.0 if random_start else 0.4
        return type(self).from_config(config)

    # -------------------------------------------------------------- hooks

    def ramp_shape(self, t):
        """Share of the target reached at ramp progress `t` in [0, 1]: a half cosine,
        slow at first (while fully open gates are still far from their threshold) and
        flattening into the target, so the controller does not chase a moving goal."""
        return 0.5 * (1.0 - ops.cos(math.pi * t))

    def gain(self, lam):
        return 1.0 + ops.abs(lam)

    def error_of(self, target, predicted):
        """The controller's error: > 0 while the predicted sparsity is below `target`."""
        if self.error == "absolute":
            return target - predicted
        kept, goal = 1.0 - predicted, 1.0 - target
        ratio = ops.log(ops.maximum(kept, 1e-12)) - ops.log(ops.maximum(goal, 1e-12))
        return ops.clip(ratio, -LOG_RATIO_MAX, LOG_RATIO_MAX)

    def lookahead(self, state, iteration):
        """Steps ahead the controller predicts the sparsity (at most to the end of the
        gate phase, `state.total_steps`)."""
        horizon = self.horizon * ops.cast(state.epoch_steps, "float32")
        remaining = ops.cast(state.total_steps, "float32") - iteration
        return ops.where(state.total_steps > 0, ops.clip(remaining, 0.0, horizon), horizon)

    # ---------------------------------------------------------------- law

    def target_at(self, state, iteration):
        """The sparsity target of step `iteration` (1-based) of the running `fit`."""
        target = ops.convert_to_tensor(self.target, "float32")
        if not self.ramp:
            return target
        ramp = ops.cast(state.total_steps, "float32") * self.ramp
        t = iteration / ops.maximum(ramp, 1.0)
        t = ops.where(ramp > 0, ops.minimum(t, 1.0), 1.0)
        return target * self.ramp_shape(t)

    def update(self, state, hard_density, iteration):
        """One controller step.

        `state` is the `GatedModel`: its variables `lam`, `last_sparsity`,
        `sparsity_velocity`, `total_steps` and `epoch_steps` (the last two set
        by `fit`). `hard_density` is the mask at the start of step `iteration`
        (1-based): depending only on what the step started from, the update
        runs beside the step's backward pass instead of after it.
        """
        sparsity = 1.0 - hard_density
        last = ops.convert_to_tensor(state.last_sparsity)
        step_change = ops.where(last < 0, 0.0, sparsity - last)
        velocity = 0.99 * state.sparsity_velocity + 0.01 * step_change
        state.sparsity_velocity.assign(velocity)
        state.last_sparsity.assign(sparsity)
        predicted = sparsity + self.lookahead(state, iteration) * velocity
        error = self.error_of(self.target_at(state, iteration), predicted)
        lam = ops.convert_to_tensor(state.lam)
        lam = lam + self.rate * self.gain(lam) * error
        state.lam.assign(ops.clip(lam, -LAM_MAX, LAM_MAX))

    def get_config(self):
        return {"target": self.target, "lam": self.lam, "rate": self.rate, "ramp": self.ramp,
                "horizon": self.horizon, "error": self.error}

    @classmethod
    def from_config(cls, config):
        # Saved before `error` existed: those models' controller was the absolute one.
        return cls(**{"error": "absolute", **config})


def get(identifier):
    """A `Penalty` from an instance or its serialized form."""
    if isinstance(identifier, Penalty):
        return identifier
    if isinstance(identifier, dict):
        penalty = keras.saving.deserialize_keras_object(identifier)
        if isinstance(penalty, Penalty):
            return penalty
    raise ValueError(
        f"`penalty` must be a keras_stg.FixedPenalty, keras_stg.TargetSparsity or another "
        f"keras_stg.penalty.Penalty, got {identifier!r}."
    )
