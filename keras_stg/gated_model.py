"""`GatedModel`: any Keras 3 model with a stochastic gate on every kernel.

A `keras_stg.masking.MaskedModel` (substitution, freezing and the training
step live there) whose mask is a tensor of stochastic gates per kernel,
trained with the expected-L0 penalty of a `keras_stg.penalty` schedule. Its
options are one `keras_stg.GateConfig`.

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

import dataclasses
import math
import threading

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_stg import config as config_lib
from keras_stg.channel_gates import ChannelPlan
from keras_stg import fused as fused_lib
from keras_stg import gate_math
from keras_stg import granularity as granularity_lib
from keras_stg import initializers
from keras_stg import layer_table
from keras_stg.gate import StochasticGate
from keras_stg.masking import MaskedModel
from keras_stg.noise import NoiseTable


class UnreachableTargetError(ValueError):
    """`target_sparsity` asks for more than the gates can remove; `reachable` is the
    largest share they can (the message says why and how to fix it)."""

    def __init__(self, message, reachable):
        super().__init__(message)
        self.reachable = reachable


_COST_NAMES = {"params": "kernel weights", "flops": "kernel multiply-adds",
               "latency": "modelled LiteRT latency"}


@keras.saving.register_keras_serializable(package="keras_stg")
class GatedModel(MaskedModel):
    """A Keras model whose kernels are multiplied by learned stochastic gates.

    Build it with `keras_stg.wrap(model, ...)`, or as `GatedModel(model,
    config)` with a `keras_stg.GateConfig` (the keyword form of `wrap` is
    accepted too). The object is a regular `keras.Model`: compile, fit,
    evaluate, predict, save to `.keras` and load back with
    `keras.models.load_model` (import `keras_stg` first so the class is
    registered).

    Besides the compiled metrics, `fit` and `evaluate` log `sparsity` (share
    of gated kernel weights removed by the binary mask), `expected_l0`
    (expected share kept under the relaxation, i.e. the expected L0 norm
    divided by the weight count) and `lam` (the current penalty weight).
    A training step logs the mask it started from (known without an extra
    pass over the gates); the logs that `fit` hands to callbacks at the end
    of an epoch (History, EarlyStopping, ModelCheckpoint, TensorBoard) hold
    the mask after the epoch's last step.

    Attributes:
        config: the resolved `GateConfig` (every automatic choice made).
        base_model: the wrapped model (its kernels are not modified).
        targets: list of `keras_stg.targets.GateTarget`, one per gated kernel.
        gates: list of `StochasticGate`, aligned with `targets`.
        skipped: layers with trainable weights that are not gated, with reasons.
        penalty: the penalty schedule (`config.penalty`).
    """

    def __init__(self, model, config=None, **kwargs):
        layer_kwargs = {k: kwargs.pop(k) for k in ("name", "trainable", "dtype") if k in kwargs}
        if config is None:
            config = config_lib.from_keywords(**kwargs)
        elif kwargs:
            raise TypeError(
                f"Pass either a GateConfig or keyword options, not both (got "
                f"{', '.join(sorted(kwargs))} beside the config).")
        elif isinstance(config, dict):
            config = config_lib.GateConfig.from_config(config)
        elif not isinstance(config, config_lib.GateConfig):
            raise TypeError(f"`config` must be a keras_stg.GateConfig, got {config!r}.")
        config = config.resolve()
        if getattr(config.granularity, "shared", False):
            # Channel groups are found in the graph: custom block layers are opened
            # into their sublayers first (the GatedModel then owns the opened copy).
            from keras_stg import inlining

            model = inlining.open_custom_blocks(model)
        layer_kwargs.setdefault("name", f"gated_{model.name}")
        super().__init__(model, freeze=config.mode != "joint", include=config.include,
                         exclude=config.exclude, **layer_kwargs)
        self.config = config
        # True while the mask is frozen (the fine-tuning phase): the forward
        # pass uses the binary mask and only the weights train.
        self._mask_frozen = False
        # True during the polish phase (`config.polish`): the gates train through
        # their binary mask, straight through, at a decaying rate.
        self._polishing = False

        self.gates = []
        self._n_weights = [math.prod(tuple(t.variable.shape)) for t in self.targets]
        # What one kernel weight of each target costs: 1 (params) or the
        # multiply-adds it takes part in per example (flops); the densities
        # below are shares of the total cost. Layers called inside another layer
        # (attention projections) get their shapes from one pass on zeros.
        if config.cost == "flops":
            layer_table.record_shapes(model)
        self._unit_cost = [float(layer_table.positions(t.layer)) if config.cost == "flops"
                           else 1.0 for t in self.targets]
        # The cost no gate removes (latency: the interpreter, ungated layers).
        self._fixed_cost = 0.0
        if config.cost == "latency":
            from keras_stg import latency

            if config.cost_table is None:
                table = latency.measure(model, self.targets)
                config = dataclasses.replace(config, cost_table=table)
                self.config = config
            self._unit_cost, self._fixed_cost = latency.unit_costs(config.cost_table,
                                                                   self.targets)
        self._total_cost = float(sum(n * c for n, c in zip(self._n_weights, self._unit_cost))
                                    + self._fixed_cost)
        # Channel gates (one per channel group, shared by its members) or one
        # gate tensor per kernel.
        plan = None
        if getattr(self.granularity, "shared", False):
            plan = ChannelPlan(model, self.targets)
            self._check_channel_plan(plan)
            gate_shapes = [(size,) for size in plan.sizes]
        else:
            gate_shapes = [self.granularity.gate_shape(tuple(t.variable.shape), t.out_axes,
                                                       t.in_axes) for t in self.targets]
        object.__setattr__(self, "_plan", plan)
        start_density = None
        if config.init_mu == "random":
            start_density = self._random_start_density()
        for i, gate_shape in enumerate(gate_shapes):
            gate_seed = None if config.seed is None else int(config.seed) * 100003 + i
            if config.init_mu == "random":
                init = initializers.random_mu(start_density, config.sigma,
                                              config.mu_bound, gate_seed)
            else:
                init = config.init_mu
            self.gates.append(
                StochasticGate(
                    sigma=config.sigma,
                    gate_shape=gate_shape,
                    init_mu=init,
                    mu_bound=config.mu_bound,
                    seed=gate_seed,
                    name=f"gate_{i}",
                )
            )
        noise_seed = (int(config.seed) if config.seed is not None
                      else int(np.random.randint(2**31 - 1)))
        noise = NoiseTable([g.gate_shape for g in self.gates], noise_seed)
        object.__setattr__(self, "noise", noise)  # holds a tf.Variable Keras must not save
        self.noise_seed = noise.seed_generator  # tracked: saved, so a resumed run continues
        # `call` hands the expected and hard densities of its gate draw to
        # `train_step` through this; thread-local because MirroredStrategy
        # traces the replicas' steps in concurrent threads.
        object.__setattr__(self, "_step", threading.local())
        self.lam = self.add_weight(
            name="lam",
            shape=(),
            initializer=keras.initializers.Constant(self.penalty.lam),
            trainable=False,
            aggregation="only_first_replica",
        )
        # Optimizer steps of the current `fit`'s gate phase (all of it, or up
        # to the step the mask freezes with `finetune`) and steps per epoch
        # (set by a callback), for the ramp of the sparsity target and the
        # controller's look-ahead; 0 means no ramp / no look-ahead.
        self.total_steps = self._state_weight("total_steps")
        self.epoch_steps = self._state_weight("epoch_steps")
        # Controller state: last hard sparsity and the smoothed change of it
        # per step (its velocity).
        self.last_sparsity = self._state_weight("last_sparsity", -1.0)
        self.sparsity_velocity = self._state_weight("sparsity_velocity")
        self.mask_frozen = self._state_weight("mask_frozen")  # 1.0 once frozen (saved)
        # The gates' learning-rate factor of the polish phase, set before every
        # polish step by `fit`; not saved (a new `fit` sets it again), so that
        # files saved before it existed load.
        object.__setattr__(self, "polish_rate", keras.Variable(
            1.0, trainable=False, dtype="float32", name="polish_rate"))
        # Values of the gated biases are gated too for unit-like granularities.
        self._gated_bias = [
            plan is None
            and t.bias is not None
            and self.granularity.gates_bias
            and math.prod(t.bias.shape) == math.prod(g.gate_shape)
            for t, g in zip(self.targets, self.gates)
        ]
        self.substituted |= {
            id(t.bias) for t, b in zip(self.targets, self._gated_bias) if b
        }
        if plan is not None:
            self.substituted |= plan.substituted(self.targets)
        self.freeze_base()

    def _share(self, kept):
        """The share of the model's cost that `kept` (gated cost kept) keeps."""
        return (kept + self._fixed_cost) / self._total_cost

    def _random_start_density(self):
        """Share of gates a random start opens so that the mask starts at the target.

        Per-kernel gates: `1 - target`. Channel gates: a kernel between two groups
        keeps (kept inputs) x (kept outputs), so opening a share `q` of every
        group keeps about `q^2` of it; `q` is found by bisection on the plan's count.
        """
        keep = 1.0 - self.target_sparsity
        plan = self._plan
        if plan is None:
            return keep
        low, high = 0.0, 1.0
        for _ in range(30):
            q = (low + high) / 2
            values = [np.full(size, q, "float32") for size in plan.sizes]
            kept = float(ops.convert_to_numpy(plan.kept(self.targets, values, self._unit_cost)))
            if self._share(kept) < keep:
                low = q
            else:
                high = q
        return (low + high) / 2

    def _check_channel_plan(self, plan):
        if not plan.groups:
            reasons = "; ".join(f"{'/'.join(l.name for l in g.producers)}: "
                                f"{g.reason or 'a producer is not gated'}"
                                for g in plan.skipped[:5])
            raise ValueError(
                f"granularity='channel' found no channel group of {self.base_model.name!r} to "
                f"gate ({reasons}). Use granularity='unit', or see keras_stg.channel_groups.")
        target = self.target_sparsity
        if target is not None:
            keep = self.config.channel_multiple
            reachable = plan.max_sparsity(self.targets, self._unit_cost, self._fixed_cost,
                                          keep=keep)
            if target > reachable - 0.01:
                raise UnreachableTargetError(
                    f"target_sparsity={target} cannot be reached with channel gates on "
                    f"{self.base_model.name!r}: keeping only the {keep} channel"
                    f"{'s' if keep > 1 else ''} (channel_multiple) every group keeps, so "
                    f"that no layer goes dead, removes {100 * reachable:.1f}% of the "
                    f"{_COST_NAMES[self.config.cost]} (the rest sit in unprunable groups "
                    "or are fixed cost, see keras_stg.channel_groups). Lower the target, "
                    "or gate fewer layers' weights with exclude=.", reachable)

    @property
    def groups(self):
        """The wrapped model's channel groups (`keras_stg.channel_groups`): with
        `granularity="channel"` the gated ones first (aligned with `gates`), then the
        ones left ungated, each with the reason."""
        if self._plan is not None:
            return self._plan.groups + self._plan.skipped
        from keras_stg.dependency import channel_groups

        return channel_groups(self.base_model)

    def target_gate(self, index):
        """The gate tensor controlling the outputs of target `index` (None if ungated)."""
        if self._plan is None:
            return self.gates[index]
        spec = self._plan.targets.get(index)
        if spec is None or spec.out is None or not spec.out.segments:
            return None
        return self.gates[spec.out.segments[0][0]]

    def _state_weight(self, name, value=0.0):
        return self.add_weight(
            name=name,
            shape=(),
            initializer=keras.initializers.Constant(value),
            dtype="float32",
            trainable=False,
            aggregation="only_first_replica",
        )

    # The config's fields, read-only.
    mode = property(lambda self: self.config.mode)
    granularity = property(lambda self: self.config.granularity)
    penalty = property(lambda self: self.config.penalty)
    target_sparsity = property(lambda self: self.config.target_sparsity)
    sigma = property(lambda self: self.config.sigma)
    mu_bound = property(lambda self: self.config.mu_bound)
    seed = property(lambda self: self.config.seed)

    def __repr__(self):
        if "config" not in vars(self):
            return super().__repr__()
        return f"<GatedModel {self.name!r} of {self.base_model.name!r}: {self.config}>"

    # ------------------------------------------------------------------ forward

    def _fused_lib(self):
        """The fused CPU kernels if this model should use them, else None."""
        fused = self.config.fused
        if fused is False or getattr(self, "jit_compile", False) is True:
            return None  # XLA cannot compile custom ops
        if fused == "auto" and tf.config.list_logical_devices("GPU"):
            return None  # GPU steps are fused by XLA; the kernels are CPU-only
        lib = fused_lib.load()
        if lib is None and fused is True:
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
        noise = self.noise
        offset = noise.offset()
        if self._plan is not None:
            rolled = noise.rolled(offset)
            zs = [gate_math.relaxed_gate(g.mu, g.sigma, eps=noise.slice(rolled, i))
                  for i, g in enumerate(self.gates)]
            mapping = self._plan.mapping(self.targets, zs)
            return mapping, self._expected_density(), self._hard_density()
        lib = self._fused_lib()
        rolled = None
        mapping = []
        expected = 0.0
        kept = 0.0
        for index, (target, gate, gated_bias, n, cost) in enumerate(zip(
            self.targets, self.gates, self._gated_bias, self._n_weights, self._unit_cost,
        )):
            kernel = target.variable
            if lib is not None and self._weight_shaped(target, gate):
                value, l0, gate_kept = lib.stg_weight_gate(
                    kernel.value, gate.mu.value, noise.table, noise.begin(offset, index),
                    sigma=gate.sigma, kernel_grad=bool(kernel.trainable),
                )
                mapping.append((kernel, value))
                expected = expected + l0 * cost
                kept = kept + ops.cast(gate_kept, "float32") * cost
                continue
            if rolled is None:
                rolled = noise.rolled(offset)
            eps = noise.slice(rolled, index)
            z = gate_math.relaxed_gate(gate.mu, gate.sigma, eps=eps)
            self._append_gated(mapping, target, gate, gated_bias, z)
            expected = expected + gate.expected_l0() * (n / noise.sizes[index] * cost)
            kept = kept + self._kept_weights(target, gate) * cost
        return mapping, self._share(expected), self._share(kept)

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

    def _polish_kernels(self):
        """`(mapping, expected density, hard density)` for a polish step: the
        kernels times the binary mask, whose gradient reaches `mu` straight through."""
        zs = [gate_math.straight_through_mask(g.mu) for g in self.gates]
        if self._plan is not None:
            mapping = self._plan.mapping(self.targets, zs)
        else:
            mapping = []
            for target, gate, gated_bias, z in zip(self.targets, self.gates, self._gated_bias, zs):
                self._append_gated(mapping, target, gate, gated_bias, z)
        return mapping, self._expected_density(), self._hard_density()

    def effective_kernels(self, training=False):
        """`(variable, value)` pairs: every gated kernel (and bias) times its gate."""
        if training:
            return self._relaxed_kernels()[0]
        if self._plan is not None:
            binary = self._plan.binary(self.gates)
            return self._plan.mapping(self.targets, binary, binary_inputs=binary)
        mapping = []
        for target, gate, gated_bias in zip(self.targets, self.gates, self._gated_bias):
            self._append_gated(mapping, target, gate, gated_bias, gate.gate(False))
        return mapping

    def masked_values(self, training=False):
        if training and not self._mask_frozen:
            mapping, expected, hard = (self._polish_kernels() if self._polishing
                                       else self._relaxed_kernels())
            self._step.expected_density, self._step.hard_density = expected, hard
            return mapping
        return self.effective_kernels(training=False)

    # ------------------------------------------------------------- gate state

    def _expected_density(self):
        """Expected share of gated kernel weights kept under the relaxation."""
        if self._plan is not None:
            p = [gate_math.open_probability(g.mu, g.sigma) for g in self.gates]
            return self._share(self._plan.kept(self.targets, p, self._unit_cost))
        total = 0.0
        for gate, n, cost in zip(self.gates, self._n_weights, self._unit_cost):
            per_gate = n / math.prod(gate.gate_shape) * cost
            total = total + gate.expected_l0() * per_gate
        return self._share(total)

    def _kept_weights(self, target, gate):
        mask = gate_math.binary_mask(gate.mu)
        return ops.cast(
            self.granularity.kept_weights(
                mask, tuple(target.variable.shape), target.out_axes, target.in_axes
            ),
            "float32",
        )

    def _hard_density(self):
        if self._plan is not None:
            kept = self._plan.kept(self.targets, self._plan.binary(self.gates), self._unit_cost)
            return self._share(kept)
        kept = 0.0
        for target, gate, cost in zip(self.targets, self.gates, self._unit_cost):
            kept = kept + self._kept_weights(target, gate) * cost
        return self._share(kept)

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
        keep = self._target_keep(mus)
        # Saturate the frozen gates, so that no gate reads as fractional.
        bound = self.mu_bound or 1.0
        self._assign_mus(np.where(keep, bound, -bound), mus)
        for gate in self.gates:
            gate.mu.trainable = False
        self._mask_frozen = True
        self.mask_frozen.assign(1.0)

    def snap_to_target(self, margin=1e-3):
        """Sets the binary mask to exactly `target_sparsity`, moving only the gates
        `freeze_mask` would flip, to just past 0 (`+-margin`); they stay trainable.
        The polish phase starts from it. Nothing happens without a target."""
        if self.target_sparsity is None:
            return
        mus = [ops.convert_to_numpy(g.mu).ravel() for g in self.gates]
        flat = np.concatenate(mus)
        keep = self._target_keep(mus)
        self._assign_mus(np.where(keep, np.maximum(flat, margin), np.minimum(flat, -margin)), mus)
        # The controller must not read the jump as the mask's velocity (its
        # look-ahead would then see the target overshot and open gates).
        self.last_sparsity.assign(1.0 - float(ops.convert_to_numpy(self._hard_density())))
        self.sparsity_velocity.assign(0.0)

    def _assign_mus(self, flat, mus):
        start = 0
        for gate, m in zip(self.gates, mus):
            gate.mu.assign(flat[start:start + m.size].astype("float32").reshape(gate.mu.shape))
            start += m.size

    def _target_keep(self, mus):
        """Which gates (flat, over `mus`) a mask at exactly the target keeps: those
        with the largest `mu` (see `freeze_mask`)."""
        flat = np.concatenate(mus)
        order = np.argsort(-flat, kind="stable")
        keep_weights = (1.0 - self.target_sparsity) * self._total_cost - self._fixed_cost
        keep = np.zeros(flat.size, bool)
        if self._plan is None:
            per_gate = [n / m.size * c for n, m, c in zip(self._n_weights, mus, self._unit_cost)]
            weight = np.concatenate([np.full(m.size, w) for m, w in zip(mus, per_gate)])
            kept_before = np.cumsum(weight[order]) - weight[order]
            keep[order[kept_before < keep_weights - 0.5 * weight[order]]] = True
        else:
            # A channel's weight depends on which channels around it stay: search
            # the number of largest-mu blocks (of `channel_multiple` channels of one
            # group, a group's best block first) whose mask is nearest the target
            # (with the later blocks that still fit, see below).
            # Every group keeps its best block: a closed group would zero every layer
            # after it (a dead network), so the search starts at one block per group.
            blocks = self._channel_blocks(mus)
            groups = len(mus)

            def kept_of(chosen):
                mask = np.zeros(flat.size, "float32")
                if chosen:
                    mask[np.concatenate(chosen)] = 1.0
                pieces = np.split(mask, np.cumsum([m.size for m in mus])[:-1])
                return float(ops.convert_to_numpy(
                    self._plan.kept(self.targets, pieces, self._unit_cost)))

            def kept(n):
                return kept_of(blocks[:n])

            low, high = groups, len(blocks)
            while low < high:
                mid = (low + high) // 2
                if kept(mid) < keep_weights:
                    low = mid + 1
                else:
                    high = mid
            chosen = blocks[:low]
            if low > groups:
                # The prefix just under the target, then every later block (in order,
                # a group's blocks only while none of its better ones was skipped)
                # that still fits: a coarse block (8 channels of a wide residual
                # group) that overshoots no longer ends the search, so the mask
                # lands nearer the target.
                under, cost = list(blocks[:low - 1]), kept(low - 1)
                offsets = np.cumsum([m.size for m in mus])
                skipped = set()
                for block in blocks[low - 1:]:
                    group = int(np.searchsorted(offsets, block[0], side="right"))
                    if group in skipped:
                        continue
                    more = kept_of(under + [block])
                    if more <= keep_weights:
                        under.append(block)
                        cost = more
                    else:
                        skipped.add(group)
                if abs(cost - keep_weights) < abs(kept(low) - keep_weights):
                    chosen = under
            if chosen:
                keep[np.concatenate(chosen)] = True
        return keep

    def _channel_blocks(self, mus):
        """Flat indices of the channel gates in the order `freeze_mask` keeps them: blocks
        of `channel_multiple` channels of one group (its channels by falling `mu`, the
        last block of a group may be shorter), every group's first block first, then the
        rest by their mean `mu`."""
        size = self.config.channel_multiple
        flat = np.concatenate(mus)
        blocks, scores, start = [], [], 0
        for m in mus:
            ranked = start + np.argsort(-m, kind="stable")
            for b in range(0, m.size, size):
                block = ranked[b:b + size]
                blocks.append(block)
                scores.append(np.inf if b == 0 else float(flat[block].mean()))
            start += m.size
        return [blocks[i] for i in np.argsort(-np.asarray(scores), kind="stable")]

    # ----------------------------------------------------------- train / test

    def before_step(self):
        self._step.expected_density = self._step.hard_density = None
        lib = self._fused_lib()
        for gate in self.gates:
            if gate.mu.constraint is not None:
                gate.mu.constraint.fused_lib = lib

    def _step_densities(self):
        expected, hard = self._step.expected_density, self._step.hard_density
        if expected is None:  # a subclass overrode `call`
            expected, hard = self._expected_density(), self._hard_density()
            self._step.expected_density, self._step.hard_density = expected, hard
        return expected, hard

    def extra_loss(self):
        """`lambda * expected density` (none while the mask is frozen)."""
        expected, _ = self._step_densities()
        if self._mask_frozen:
            return None
        return ops.cast(self.lam, "float32") * expected

    def apply_gradients(self, gradients, variables):
        gates = () if self._mask_frozen else [g.mu for g in self.gates]
        lr_scale = self.config.gate_lr
        if self._polishing:
            lr_scale = ops.cast(self.polish_rate, "float32") * lr_scale
        with fused_lib.gate_adam(self.optimizer, gates, fused=self._fused_lib() is not None,
                                 lr_scale=lr_scale):
            self.optimizer.apply_gradients(zip(gradients, variables))

    def after_step(self, iteration):
        if not self._mask_frozen:
            self.penalty.update(self, self._step_densities()[1], iteration)

    def step_logs(self):
        expected, hard = self._step_densities()
        return self._gate_logs(hard, expected)

    def current_target(self, iteration=None):
        """The penalty's sparsity target at step `iteration` (1-based; default the
        optimizer's), or None without a target."""
        if self.target_sparsity is None:
            return None
        if iteration is None:
            iteration = ops.cast(self.optimizer.iterations, "float32")
        return self.penalty.target_at(self, iteration)

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`; also tells the sparsity schedule how long training runs."""
        callbacks = [_FitState(self)] + list(callbacks or [])
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def test_step(self, data):
        logs = super().test_step(data)
        logs.update(self._gate_logs())
        return logs

    def masks(self):
        """Binary masks, one NumPy array per gated kernel, broadcast to its shape."""
        if self._plan is not None:
            binary = [ops.convert_to_numpy(m) for m in self._plan.binary(self.gates)]
            return self._plan.masks(self.targets, binary)
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
        from keras_stg.stripping import strip

        return strip(self)

    # ------------------------------------------------------------- serialize

    def get_config(self):
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.base_model),
            "config": self.config.get_config(),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        name = config.pop("name", None)
        model_config = config.pop("model")
        try:
            model = keras.saving.deserialize_keras_object(
                model_config, custom_objects=custom_objects
            )
        except (TypeError, ValueError) as e:
            class_name = (model_config.get("registered_name") or model_config.get("class_name")
                          if isinstance(model_config, dict) else None)
            # A ValueError, not a TypeError: Keras buries a TypeError raised in
            # `from_config` under its generic "could not be deserialized" message.
            raise ValueError(
                f"Could not rebuild the model that {name or 'this GatedModel'!r} wraps, of "
                f"class {class_name!r}. If it is a subclassed model, register its class "
                "before loading: decorate it with "
                "@keras.saving.register_keras_serializable(), or pass "
                f"custom_objects={{{class_name!r}: {class_name}}} to load_model. ({e})"
            ) from e
        if "config" in config:
            gate_config = config_lib.GateConfig.from_config(config["config"])
        else:  # saved before GateConfig: the options were flat keywords
            config["granularity"] = granularity_lib.deserialize(config["granularity"])
            # Its controller: the absolute error at rate 0.01, the only ones then.
            config.setdefault("controller_error", "absolute")
            config.setdefault("controller_rate", 0.01)
            config.setdefault("polish", 0.0)
            gate_config = config_lib.from_keywords(**config)
        return cls(model, gate_config, name=name)


def _last_share_start(share, units):
    """Where the last `share` of `units` steps (or epochs) begins, rounded, leaving
    at least one unit before and after it."""
    return min(units - 1, max(1, round((1.0 - share) * units)))


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
        # Fine-tuning: the last `finetune` share of the fit's steps (of its epochs
        # when their length is unknown), leaving at least one step (epoch) to
        # each phase; a 1-epoch fit only trains the gates.
        self._freeze_step = None
        self._epoch = 0
        if gated.config.finetune and epochs >= 2:
            units = epochs * steps if steps else epochs
            # a step, or an epoch when `steps` is unknown
            self._freeze_step = _last_share_start(gated.config.finetune, units)
        # The gates train until the mask freezes: the target's ramp and the
        # controller's look-ahead span that phase, not the whole `fit`, so the
        # mask reaches the target before `freeze_mask` fixes it.
        gate_steps = epochs * steps if self._freeze_step is None or not steps else self._freeze_step
        gated.total_steps.assign(float(gate_steps))
        gated.epoch_steps.assign(float(steps))
        # Polish: the last `polish` share of the gate phase (in steps, or in
        # epochs when `steps` is unknown), at least one unit, never all of it.
        self._polish = None
        if gated._polishing:
            self._set_polishing(False)  # a new `fit`: its gate phase starts relaxed
        if gated.config.polish and epochs:
            units = epochs * steps if steps else epochs
            end = self._freeze_step if self._freeze_step is not None else units
            if end >= 2:
                self._polish = (_last_share_start(gated.config.polish, end), end)
        if float(ops.convert_to_numpy(gated.mask_frozen)) and not gated._mask_frozen:
            self._freeze()  # a resumed run that had frozen its mask

    def on_epoch_begin(self, epoch, logs=None):
        # A freeze at an epoch's first step happens here, before the other
        # callbacks' `on_epoch_begin`; with epochs of unknown length, only here.
        self._epoch = epoch
        steps = self.params.get("steps")
        self._at_position(epoch * steps if steps else epoch)

    def on_train_batch_begin(self, batch, logs=None):
        steps = self.params.get("steps")
        if steps:
            self._at_position(self._epoch * steps + batch)

    def _at_position(self, position):
        """Freezes the mask, or starts and paces the polish, at `position` (a step of
        the fit, or an epoch when `steps` is unknown)."""
        if (self._freeze_step is not None and position >= self._freeze_step
                and not self._gated._mask_frozen):
            self._freeze()
        if self._polish is not None and not self._gated._mask_frozen:
            start, end = self._polish
            if position >= start:
                # A half cosine from the full rate at the polish's first step
                # towards 0 at the end of the gate phase.
                t = min(1.0, (position - start) / (end - start))
                self._gated.polish_rate.assign(0.5 * (1.0 + math.cos(math.pi * t)))
                if not self._gated._polishing:
                    self._gated.snap_to_target()
                    self._set_polishing(True)

    def _set_polishing(self, polishing):
        gated = self._gated
        gated._polishing = polishing
        if not polishing:
            gated.polish_rate.assign(1.0)
        # The step function changes (binary gates, a decaying gate rate): trace it anew.
        gated.make_train_function(force=True)
        if polishing and self.params.get("verbose"):
            print(f"\nkeras_stg: polishing the mask at {100 * gated.sparsity():.2f}% sparsity: "
                  "the gates train through their binary mask at a decaying rate", flush=True)

    def _freeze(self):
        gated = self._gated
        gated._polishing = False
        gated.freeze_mask()
        # The step function changes (binary mask, no gate updates): trace it anew
        # (`fit` looks the function up before every step).
        gated.make_train_function(force=True)
        if self.params.get("verbose"):
            print(f"\nkeras_stg: mask frozen at {100 * gated.sparsity():.2f}% sparsity; "
                  "fine-tuning the weights under it", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and "sparsity" in logs:
            logs["sparsity"] = self._gated.sparsity()
