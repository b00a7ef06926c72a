"""`GatedModel`: any Keras 3 model with a stochastic gate on every kernel.

The wrapped model is not rewritten or cloned. For each forward pass the gated
kernels `W * z` are substituted for the kernel variables with
`keras.StatelessScope`, which works the same for Sequential, Functional and
nested subclassed models (keras-hub backbones). Updates the wrapped model makes
to its own state during the call (BatchNormalization moving statistics,
dropout seed generators) are collected by the scope and applied afterwards,
and losses its layers add are passed on.

Modes:
- `"slt"`: strong lottery ticket. Weights stay frozen at their (random)
  initial values; only the gates train.
- `"post_training"`: a trained model's weights stay frozen; only gates train.
- `"joint"`: weights and gates train together.

Normalization policy: gates are never put on normalization layers. In the two
frozen modes their affine parameters (gamma, beta) stay frozen with the other
weights, while BatchNormalization's moving mean and variance keep being
updated during `fit`, so inference statistics describe the masked network and
not the dense one they were first computed on. In `"joint"` mode every
parameter trains as usual. Frozen weights are bit-identical after `fit`.
"""

import contextlib
import math
import statistics
import threading

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_stg import fused as fused_lib
from keras_stg import gates as gate_math
from keras_stg import granularity as granularity_lib
from keras_stg.layers import ClippedNormal, StochasticGate
from keras_stg.targets import find_targets

MODES = ("slt", "post_training", "joint")

def _replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _fusable_adam(optimizer):
    """Whether `optimizer` is Keras' Adam (or AdamW) with its own update rule."""
    return (
        isinstance(optimizer, keras.optimizers.Adam)
        and type(optimizer).update_step is keras.optimizers.Adam.update_step
        and not optimizer.amsgrad
    )


@contextlib.contextmanager
def _fused_gate_adam(optimizer, gate_variables):
    """While the update is traced, Adam moves gate locations with one fused op.

    Keras' Adam updates a variable with about ten elementwise TensorFlow ops,
    each a pass over memory; on a gate tensor as large as its kernel that is
    most of the optimizer's time. Inside this context, `optimizer.update_step`
    updates float32 gate locations with TensorFlow's fused
    `ResourceApplyAdam` kernel instead: one pass over the gates, the
    optimizer's own moment slots and step count, the same Adam formula (equal
    to Keras' update within float32 rounding; `tests/test_fused.py`). All
    else `apply_gradients` does (loss-scale, gradient clipping, weight decay,
    EMA, gradient accumulation, constraints, the step counter) is unchanged.
    Any other variable, optimizer (SGD, AMSGrad, an Adam subclass with its
    own rule), a sparse gradient or a distributed replica variable goes the
    usual Keras way.
    """
    if not gate_variables or not _fusable_adam(optimizer) or "update_step" in vars(optimizer):
        yield
        return
    # The TensorFlow backend hands `update_step` the variables' `tf.Variable`s.
    gates = {id(v.value) for v in gate_variables}
    keras_update = optimizer.update_step

    def update_step(gradient, variable, learning_rate):
        if (
            id(variable) not in gates
            or tf.as_dtype(variable.dtype) != tf.float32
            or isinstance(gradient, tf.IndexedSlices)
        ):
            return keras_update(gradient, variable, learning_rate)
        index = optimizer._get_variable_index(variable)
        m, v = optimizer._momentums[index], optimizer._velocities[index]
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

    optimizer.update_step = update_step
    try:
        yield
    finally:
        del optimizer.update_step


def _scale_for_replicas(value):
    # Keras divides each replica's loss by the replica count and sums the
    # gradients; a quantity computed once per model must be scaled the same way.
    n = _replicas()
    return value if n == 1 else value * (1.0 / n)


#: Bound of the adaptive lambda, so a bad start cannot blow it up.
_LAM_MAX = 1e3


def _check_args(mode, lam, target_sparsity, sigma, controller_rate):
    if mode not in MODES:
        raise ValueError(
            f"Unknown mode {mode!r}. Use one of {', '.join(repr(m) for m in MODES)}: "
            "'slt' (random weights frozen), 'post_training' (trained weights "
            "frozen) or 'joint' (weights and gates train together)."
        )
    if lam is not None and not (isinstance(lam, (int, float)) and lam >= 0):
        raise ValueError(
            f"`lam` must be a number >= 0, got {lam!r}. Use `lam=0` for no "
            "sparsity penalty, or `target_sparsity=` to adapt it automatically."
        )
    if target_sparsity is not None and not (
        isinstance(target_sparsity, (int, float)) and 0 < target_sparsity < 1
    ):
        raise ValueError(
            f"`target_sparsity` must be strictly between 0 and 1 (a fraction of "
            f"weights to remove, e.g. 0.9), got {target_sparsity!r}."
        )
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"`sigma` must be a number > 0, got {sigma!r}.")
    if not controller_rate > 0:
        raise ValueError(f"`controller_rate` must be > 0, got {controller_rate!r}.")


def call_with_values(model, inputs, mapping, substituted, training=False):
    """Calls `model` with the `(variable, value)` pairs of `mapping` substituted.

    State the model updates inside the call (BatchNormalization moving
    statistics, dropout seeds) is applied afterwards, except to the variables
    whose `id` is in `substituted`. Returns `(outputs, losses the layers added)`.
    """
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
        outputs = model(inputs, training=training)
    for v in model.variables:
        if id(v) in substituted:
            continue
        new_value = scope.get_current_value(v)
        if new_value is not None:
            v.assign(new_value)
    return outputs, scope.losses


def _random_mu(density, sigma, bound, seed):
    """Random gate locations whose binary mask keeps a random `density` share.

    `mu ~ N(sigma * Phi^-1(density), sigma)`, clipped to `[-bound, bound]`:
    `P(mu > 0) = density`, so the mask starts at the target sparsity, a
    random subnetwork in every layer, as edge-popup's random scores do; the
    gates then move weights in and out of it while the controller holds the
    target.
    """
    density = min(max(density, 1e-6), 1.0 - 1e-6)
    mean = sigma * statistics.NormalDist().inv_cdf(density)
    return ClippedNormal(mean, sigma, bound, seed)


@keras.saving.register_keras_serializable(package="keras_stg")
class GatedModel(keras.Model):
    """A Keras model whose kernels are multiplied by learned stochastic gates.

    Build it with `keras_stg.wrap(model, ...)`; see there for the arguments.
    The object is a regular `keras.Model`: compile, fit, evaluate, predict,
    save to `.keras` and load back with `keras.models.load_model` (import
    `keras_stg` first so the class is registered).

    Besides the compiled metrics, `fit` and `evaluate` log `sparsity` (share
    of gated kernel weights removed by the binary mask), `expected_l0`
    (expected share kept under the relaxation, i.e. the expected L0 norm
    divided by the weight count) and `lam` (the current penalty weight).
    A training step logs the mask it started from (known without an extra
    pass over the gates); the logs that `fit` hands to callbacks at the end
    of an epoch (History, EarlyStopping, ModelCheckpoint, TensorBoard) hold
    the mask after the epoch's last step.

    Attributes:
        base_model: the wrapped model (its kernels are not modified).
        targets: list of `keras_stg.targets.GateTarget`, one per gated kernel.
        gates: list of `StochasticGate`, aligned with `targets`.
        skipped: layers with trainable weights that are not gated, with reasons.
    """

    def __init__(
        self,
        model,
        mode="slt",
        granularity="weight",
        lam=None,
        target_sparsity=None,
        sigma=0.5,
        include=None,
        exclude=None,
        init_mu="auto",
        mu_bound=1.0,
        seed=None,
        controller_rate=0.01,
        target_ramp=None,
        controller_horizon=3.0,
        fused="auto",
        finetune=0.0,
        **kwargs,
    ):
        kwargs.setdefault("name", f"gated_{model.name}")
        super().__init__(**kwargs)
        _check_args(mode, lam, target_sparsity, sigma, controller_rate)
        self.base_model = model
        self.mode = mode
        self.granularity = granularity_lib.get(granularity)
        self.sigma = float(sigma)
        self.target_sparsity = None if target_sparsity is None else float(target_sparsity)
        self.initial_lam = float(1.0 if lam is None else lam)
        self.include = include
        self.exclude = exclude
        self.init_mu = init_mu
        self.mu_bound = mu_bound
        self.seed = seed
        self.controller_rate = float(controller_rate)
        gate_init = self._gate_init()
        if target_ramp is None:
            # A random start is already at the target: nothing to ramp.
            target_ramp = 0.0 if gate_init == "random" else 0.4
        if not (isinstance(target_ramp, (int, float)) and 0 <= target_ramp <= 1):
            raise ValueError(
                f"`target_ramp` must be in [0, 1] or None (auto), got {target_ramp!r}.")
        self.target_ramp = float(target_ramp)
        if not controller_horizon >= 0:
            raise ValueError(
                f"`controller_horizon` must be >= 0 (epochs), got {controller_horizon!r}."
            )
        self.controller_horizon = float(controller_horizon)
        if isinstance(finetune, bool) or not (
                isinstance(finetune, (int, float)) and 0 <= finetune < 1):
            raise ValueError(
                f"`finetune` must be a share of the epochs in [0, 1), got {finetune!r}.")
        if finetune and mode != "joint":
            raise ValueError(
                f"`finetune={finetune}` fine-tunes the weights under the frozen mask, but "
                f"mode={mode!r} trains no weights. Use mode='joint', or finetune=0.")
        if finetune and target_sparsity is None:
            raise ValueError(
                "`finetune` freezes the mask at exactly `target_sparsity`, but no target is "
                "given. Pass `target_sparsity=`, or finetune=0.")
        self.finetune = float(finetune)
        # True while the mask is frozen (the fine-tuning phase): the forward
        # pass uses the binary mask and only the weights train.
        self._mask_frozen = False
        if fused not in ("auto", True, False):
            raise ValueError(f"`fused` must be 'auto', True or False, got {fused!r}.")
        self.fused = fused

        self.targets, self.skipped = find_targets(model, include, exclude)
        if not self.targets:
            raise ValueError(
                f"Model {model.name!r} has no kernel that stochastic gates can "
                "control. Supported layers: Dense, EinsumDense (and so "
                "MultiHeadAttention), Conv1D/2D/3D, Conv1D/2D/3DTranspose, "
                "DepthwiseConv1D/2D, SeparableConv1D/2D. Not gated: "
                + (", ".join(f"{s.path} ({s.reason})" for s in self.skipped) or "nothing")
            )
        self.gates = []
        self._n_weights = []
        for i, t in enumerate(self.targets):
            shape = tuple(t.variable.shape)
            gate_shape = self.granularity.gate_shape(shape, t.out_axes, t.in_axes)
            gate_seed = None if seed is None else int(seed) * 100003 + i
            if gate_init == "random":
                init = _random_mu(1.0 - self.target_sparsity, self.sigma, mu_bound, gate_seed)
            else:
                init = gate_init
            self.gates.append(
                StochasticGate(
                    sigma=self.sigma,
                    gate_shape=gate_shape,
                    init_mu=init,
                    mu_bound=mu_bound,
                    seed=gate_seed,
                    name=f"gate_{i}",
                )
            )
            self._n_weights.append(math.prod(shape))
        self._total_weights = float(sum(self._n_weights))
        # Training noise: one table of N(0, 1) draws, one entry per gate, made
        # from the seed; each step reads it at a random offset, so gate i sees
        # `table[(start + i + offset) mod size]`. Over steps that is an i.i.d.
        # draw from the table for every gate, and within a step the gates get
        # distinct table entries. Reading a table costs nothing; drawing 266k
        # fresh Gaussians costs more than LeNet-300-100's whole training step
        # on a CPU. The table is rebuilt from the seed, not saved.
        self._gate_sizes = [math.prod(g.gate_shape) for g in self.gates]
        self._gate_starts = [sum(self._gate_sizes[:i]) for i in range(len(self.gates))]
        self._noise_size = sum(self._gate_sizes)
        noise_seed = int(seed) if seed is not None else int(np.random.randint(2**31 - 1))
        with tf.init_scope():
            self._noise_table = tf.Variable(
                tf.random.stateless_normal([self._noise_size], seed=[noise_seed, 0x57A7]),
                trainable=False,
                name="gate_noise_table",
            )
        self.noise_seed = keras.random.SeedGenerator(noise_seed + 1)
        # `call` hands the expected and hard densities of its gate draw to
        # `train_step` through this; thread-local because MirroredStrategy
        # traces the replicas' steps in concurrent threads.
        object.__setattr__(self, "_step", threading.local())
        self.lam = self.add_weight(
            name="lam",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_lam),
            trainable=False,
            aggregation="only_first_replica",
        )
        # Total optimizer steps of the current `fit` and steps per epoch (set
        # by a callback), for the ramp of the sparsity target and the
        # controller's look-ahead; 0 means no ramp / no look-ahead.
        self.total_steps = self._state_weight("total_steps")
        self.epoch_steps = self._state_weight("epoch_steps")
        # Controller state: last hard sparsity and the smoothed change of it
        # per step (its velocity).
        self._last_sparsity = self._state_weight("last_sparsity", -1.0)
        self._velocity = self._state_weight("sparsity_velocity")
        self.mask_frozen = self._state_weight("mask_frozen")  # 1.0 once frozen (saved)
        # Values of the gated biases are gated too for unit-like granularities.
        self._gated_bias = [
            t.bias is not None
            and self.granularity.gates_bias
            and math.prod(t.bias.shape) == math.prod(g.gate_shape)
            for t, g in zip(self.targets, self.gates)
        ]
        self._substituted = {id(t.variable) for t in self.targets}
        self._substituted |= {
            id(t.bias) for t, b in zip(self.targets, self._gated_bias) if b
        }
        self.frozen = []
        if mode != "joint":
            for v in model.trainable_variables:
                v.trainable = False
                self.frozen.append(v)

    def _state_weight(self, name, value=0.0):
        return self.add_weight(
            name=name,
            shape=(),
            initializer=keras.initializers.Constant(value),
            dtype="float32",
            trainable=False,
            aggregation="only_first_replica",
        )

    def _gate_init(self):
        """`init_mu` resolved: a float or "random"."""
        init_mu = self.init_mu
        if init_mu == "auto":
            # Where a random start was measured to help (benchmarks/RESULTS.md):
            # per-weight gates of a frozen random net. Unit gates on LeNet did
            # better from the whole network (55.2% against 53.1% at 50%).
            random_start = (self.mode == "slt" and self.target_sparsity is not None
                            and self.granularity.name == "weight")
            init_mu = "random" if random_start else 0.5
        if init_mu == "random":
            if self.target_sparsity is None:
                raise ValueError(
                    "init_mu='random' starts the mask at `target_sparsity`, but no "
                    "target is given. Pass `target_sparsity=`, or a number as `init_mu` "
                    "(0.5 opens every gate).")
            return "random"
        if isinstance(init_mu, bool) or not isinstance(init_mu, (int, float)):
            raise ValueError(
                f"`init_mu` must be a number, 'random' or 'auto', got {init_mu!r}.")
        return float(init_mu)

    # ------------------------------------------------------------------ forward

    def _fused_lib(self):
        """The fused CPU kernels if this model should use them, else None."""
        if self.fused is False or getattr(self, "jit_compile", False) is True:
            return None  # XLA cannot compile custom ops
        if self.fused == "auto" and tf.config.list_logical_devices("GPU"):
            return None  # GPU steps are fused by XLA; the kernels are CPU-only
        lib = fused_lib.load()
        if lib is None and self.fused is True:
            raise RuntimeError(
                "GatedModel(fused=True) but the fused gate kernels are unavailable: "
                f"{fused_lib.error() or 'disabled by KERAS_STG_FUSED=0'}. "
                "Use fused='auto' to fall back to the pure-TensorFlow path."
            )
        return lib

    def _weight_shaped(self, target, gate):
        return (
            tuple(gate.gate_shape) == tuple(target.variable.shape)
            and target.variable.dtype == "float32"
            and gate.mu.dtype == "float32"
        )

    def _relaxed_kernels(self):
        """`(mapping, expected density, hard density)` for a training step.

        The mapping holds the kernels times fresh relaxed gates; the hard
        density is the share of weights the binary mask keeps at the `mu` of
        this draw (the fused kernels count it in the same pass).
        """
        table = self._noise_table
        offset = keras.random.randint(
            (), 0, self._noise_size, dtype="int64", seed=self.noise_seed
        )
        lib = self._fused_lib()
        rolled = None
        mapping = []
        expected = 0.0
        kept = 0.0
        for target, gate, gated_bias, start, size, n in zip(
            self.targets, self.gates, self._gated_bias, self._gate_starts,
            self._gate_sizes, self._n_weights,
        ):
            kernel = target.variable
            if lib is not None and self._weight_shaped(target, gate):
                begin = tf.math.floormod(offset + start, self._noise_size)
                value, l0, gate_kept = lib.stg_weight_gate(
                    kernel.value, gate.mu.value, table, begin,
                    sigma=gate.sigma, kernel_grad=bool(kernel.trainable),
                )
                mapping.append((kernel, value))
                expected = expected + l0
                kept = kept + ops.cast(gate_kept, "float32")
                continue
            if rolled is None:
                rolled = tf.roll(table, -offset, axis=0)
            eps = tf.reshape(rolled[start:start + size], gate.gate_shape)
            z = gate_math.relaxed_gate(gate.mu, gate.sigma, eps=eps)
            self._append_gated(mapping, target, gate, gated_bias, z)
            expected = expected + gate.expected_l0() * (n / size)
            kept = kept + self._kept_weights(target, gate)
        return mapping, expected / self._total_weights, kept / self._total_weights

    def _append_gated(self, mapping, target, gate, gated_bias, z):
        kernel = target.variable
        shape = tuple(kernel.shape)
        z_full = self.granularity.expand(z, shape, target.out_axes, target.in_axes)
        value = kernel.value
        mapping.append((kernel, value * ops.cast(z_full, value.dtype)))
        if gated_bias:
            bias = target.bias.value
            mapping.append(
                (target.bias, bias * ops.cast(ops.reshape(z, bias.shape), bias.dtype))
            )

    def effective_kernels(self, training=False):
        """`(variable, value)` pairs: every gated kernel (and bias) times its gate."""
        if training:
            return self._relaxed_kernels()[0]
        mapping = []
        for target, gate, gated_bias in zip(self.targets, self.gates, self._gated_bias):
            self._append_gated(mapping, target, gate, gated_bias, gate.gate(False))
        return mapping

    def call(self, inputs, training=False):
        if training and not self._mask_frozen:
            mapping, expected, hard = self._relaxed_kernels()
            self._step.expected_density, self._step.hard_density = expected, hard
        else:
            mapping = self.effective_kernels(training=False)
        outputs, losses = call_with_values(
            self.base_model, inputs, mapping, self._substituted, training
        )
        for loss in losses:
            self.add_loss(loss)
        return outputs

    # ------------------------------------------------------------- gate state

    def _expected_density(self):
        """Expected share of gated kernel weights kept under the relaxation."""
        total = 0.0
        for gate, n in zip(self.gates, self._n_weights):
            per_gate = n / math.prod(gate.gate_shape)
            total = total + gate.expected_l0() * per_gate
        return total / self._total_weights

    def _kept_weights(self, target, gate):
        mask = gate_math.binary_mask(gate.mu)
        return ops.cast(
            self.granularity.kept_weights(
                mask, tuple(target.variable.shape), target.out_axes, target.in_axes
            ),
            "float32",
        )

    def _hard_density(self):
        kept = 0.0
        for target, gate in zip(self.targets, self.gates):
            kept = kept + self._kept_weights(target, gate)
        return kept / self._total_weights

    def _gate_logs(self, hard_density=None, expected_density=None):
        if hard_density is None:
            hard_density = self._hard_density()
        if expected_density is None:
            expected_density = self._expected_density()
        return {
            "sparsity": 1.0 - hard_density,
            "expected_l0": expected_density,
            "lam": ops.convert_to_tensor(self.lam),
        }

    def freeze_mask(self):
        """Fixes the mask at exactly `target_sparsity`; from now on only the weights train.

        The kept weights are those with the largest `mu` over the whole model
        (the mask the gates already hold, give or take the controller's last
        fraction of a percent), so the frozen mask removes `target_sparsity` of
        the gated weights to the nearest gate; each gate is saturated at
        `+-mu_bound`. Training after this uses the binary mask in the forward
        pass, no penalty and no lambda updates: the
        weights fine-tune under the mask they will be exported with (as
        magnitude pruning does after its schedule ends). Idempotent.
        """
        mus = [ops.convert_to_numpy(g.mu).ravel() for g in self.gates]
        per_gate = [n / m.size for n, m in zip(self._n_weights, mus)]
        flat = np.concatenate(mus)
        weight = np.concatenate([np.full(m.size, w) for m, w in zip(mus, per_gate)])
        order = np.argsort(-flat, kind="stable")
        keep_weights = (1.0 - self.target_sparsity) * self._total_weights
        kept_before = np.cumsum(weight[order]) - weight[order]
        keep = np.zeros(flat.size, bool)
        keep[order[kept_before < keep_weights - 0.5 * weight[order]]] = True
        # Saturate the frozen gates, so that no gate reads as fractional.
        bound = self.mu_bound or 1.0
        new = np.where(keep, bound, -bound).astype("float32")
        start = 0
        for gate, m in zip(self.gates, mus):
            gate.mu.assign(new[start:start + m.size].reshape(gate.mu.shape))
            gate.mu.trainable = False
            start += m.size
        self._mask_frozen = True
        self.mask_frozen.assign(1.0)

    def current_target(self, iteration=None):
        """The sparsity target of this step: ramps up, then holds.

        Over the first `target_ramp` share of the `fit` call's steps the target
        rises as `target * (1 - cos(pi * t)) / 2`: slowly at first, while the
        gates (when they start fully open) are still far from their threshold,
        and flattening into the target so that the controller does not chase
        a moving goal when the mask has to settle.

        `iteration` is the 1-based step count (default: the optimizer's).
        """
        target = ops.convert_to_tensor(self.target_sparsity, "float32")
        if self.target_ramp == 0:
            return target
        ramp = ops.cast(self.total_steps, "float32") * self.target_ramp
        if iteration is None:
            iteration = ops.cast(self.optimizer.iterations, "float32")
        t = iteration / ops.maximum(ramp, 1.0)
        t = ops.where(ramp > 0, ops.minimum(t, 1.0), 1.0)
        return target * 0.5 * (1.0 - ops.cos(math.pi * t))

    def _update_lambda(self, hard_density, iteration):
        """Predictive integral control of lambda towards the current target.

        The sparsity target is an equality constraint, so lambda is its
        Lagrange multiplier and may turn negative: on a frozen random network
        the task loss alone prunes many weights (most random weights hurt), and
        a target below that natural sparsity needs a reward for keeping weights.

        Two things keep it from overshooting. (1) The binary mask lags lambda
        by epochs (a gate flips only once `mu` crosses 0), so the error is
        taken on the sparsity predicted `controller_horizon` epochs ahead from
        its smoothed velocity: lambda stops growing while the mask is already
        on its way to the target, instead of winding up, and starts falling
        before the mask overshoots. (2) The step is
        `rate * (1 + |lambda|) * error`: additive near 0 (so it can change
        sign), relative when lambda is large (so it rises and unwinds in an
        epoch or two whatever the scale the task needs).

        `hard_density` is the mask at the start of step `iteration` (1-based).
        Depending only on what the step started from, the update runs beside
        the step's backward pass and optimizer update instead of after them.
        """
        sparsity = 1.0 - hard_density
        last = ops.convert_to_tensor(self._last_sparsity)
        step_change = ops.where(last < 0, 0.0, sparsity - last)
        velocity = 0.99 * self._velocity + 0.01 * step_change
        self._velocity.assign(velocity)
        self._last_sparsity.assign(sparsity)
        # Look ahead at most to the end of `fit`: the mask that matters is the
        # final one.
        horizon = self.controller_horizon * ops.cast(self.epoch_steps, "float32")
        remaining = ops.cast(self.total_steps, "float32") - iteration
        horizon = ops.where(self.total_steps > 0, ops.clip(remaining, 0.0, horizon), horizon)
        predicted = sparsity + horizon * velocity
        error = self.current_target(iteration) - predicted
        lam = ops.convert_to_tensor(self.lam)
        lam = lam + self.controller_rate * (1.0 + ops.abs(lam)) * error
        self.lam.assign(ops.clip(lam, -_LAM_MAX, _LAM_MAX))

    # ----------------------------------------------------------- train / test

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._step.expected_density = self._step.hard_density = None
        # Read before the update, so that nothing below waits for it.
        iteration = ops.cast(self.optimizer.iterations, "float32") + 1.0
        lib = self._fused_lib()
        for gate in self.gates:
            if gate.mu.constraint is not None:
                gate.mu.constraint.fused_lib = lib
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            # The penalty is a per-model quantity: scale it like a per-replica
            # loss so that summing replica gradients counts it once.
            expected_density = self._step.expected_density
            hard_density = self._step.hard_density
            if expected_density is None:  # a subclass overrode `call`
                expected_density = self._expected_density()
                hard_density = self._hard_density()
            if not self._mask_frozen:
                penalty = ops.cast(self.lam, "float32") * expected_density
                loss = loss + _scale_for_replicas(ops.cast(penalty, loss.dtype))
            self._loss_tracker.update_state(
                loss * _replicas(),
                sample_weight=tf.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0],
            )
            scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_weights
        gradients = tape.gradient(scaled_loss, variables)
        fused_mu = [g.mu for g in self.gates] if lib and not self._mask_frozen else ()
        with _fused_gate_adam(self.optimizer, fused_mu):
            self.optimizer.apply_gradients(zip(gradients, variables))
        if self.target_sparsity is not None and not self._mask_frozen:
            self._update_lambda(hard_density, iteration)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs.update(self._gate_logs(hard_density, expected_density))
        return logs

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`; also tells the sparsity schedule how long training runs."""
        callbacks = [_FitState(self)] + list(callbacks or [])
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def test_step(self, data):
        logs = super().test_step(data)
        logs.update(self._gate_logs())
        return logs

    # ----------------------------------------------------------------- export

    def masks(self):
        """Binary masks, one NumPy array per gated kernel, broadcast to its shape."""
        out = []
        for target, gate in zip(self.targets, self.gates):
            shape = tuple(target.variable.shape)
            m = self.granularity.expand(
                gate_math.binary_mask(gate.mu), shape, target.out_axes, target.in_axes
            )
            out.append(np.broadcast_to(ops.convert_to_numpy(m), shape).astype(bool))
        return out

    def sparsity(self):
        """Share of gated kernel weights removed by the binary mask (a float)."""
        return float(ops.convert_to_numpy(1.0 - self._hard_density()))

    def strip(self):
        """Returns a plain Keras model with `kernel * mask` and no gate state.

        Same architecture and layer names as the wrapped model; its outputs
        equal this model's inference outputs. See `keras_stg.strip`.
        """
        from keras_stg.strip import strip

        return strip(self)

    # ------------------------------------------------------------- serialize

    def get_config(self):
        config = {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.base_model),
            "mode": self.mode,
            "granularity": self.granularity.get_config(),
            "lam": self.initial_lam,
            "target_sparsity": self.target_sparsity,
            "sigma": self.sigma,
            "include": self.include,
            "exclude": self.exclude,
            "init_mu": self.init_mu,
            "mu_bound": self.mu_bound,
            "seed": self.seed,
            "controller_rate": self.controller_rate,
            "target_ramp": self.target_ramp,
            "controller_horizon": self.controller_horizon,
            "fused": self.fused,
            "finetune": self.finetune,
        }
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        return cls(model, **config)


class _FitState(keras.callbacks.Callback):
    """Stores `epochs * steps` of the running `fit` in the gated model, and
    puts the sparsity after each epoch into the epoch's logs.

    It runs before every other callback, which see the updated logs.
    """

    def __init__(self, gated):
        super().__init__()
        self._gated = gated

    def on_train_begin(self, logs=None):
        epochs = self.params.get("epochs") or 0
        steps = self.params.get("steps") or 0
        gated = self._gated
        gated.total_steps.assign(float(epochs * steps))
        gated.epoch_steps.assign(float(steps))
        # Fine-tuning: the last `finetune` share of the epochs, leaving at least
        # one epoch to each phase (a 1-epoch fit only trains the gates).
        self._freeze_epoch = None
        if gated.finetune and epochs >= 2:
            self._freeze_epoch = min(epochs - 1, max(1, epochs - round(gated.finetune * epochs)))
        if float(ops.convert_to_numpy(gated.mask_frozen)) and not gated._mask_frozen:
            self._freeze()  # a resumed run that had frozen its mask

    def on_epoch_begin(self, epoch, logs=None):
        if (self._freeze_epoch is not None and epoch >= self._freeze_epoch
                and not self._gated._mask_frozen):
            self._freeze()

    def _freeze(self):
        gated = self._gated
        gated.freeze_mask()
        # The step function changes (binary mask, no gate updates): trace it anew.
        gated.make_train_function(force=True)
        if self.params.get("verbose"):
            print(f"keras_stg: mask frozen at {100 * gated.sparsity():.2f}% sparsity; "
                  "fine-tuning the weights under it", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and "sparsity" in logs:
            logs["sparsity"] = self._gated.sparsity()
