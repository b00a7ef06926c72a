"""`GateConfig`: every option of a gated model, validated, with its defaults in one place.

`keras_stg.wrap(model, config)` takes one; `keras_stg.wrap(model, target_sparsity=0.9,
...)` builds one from keywords. `config.resolve()` fixes every automatic choice,
and the model keeps (`gated.config`) and saves the resolved one, so what a model
does is what its config says.

The automatic choices, all made in `resolve`:

- `penalty`: `TargetSparsity(target_sparsity)` when a target is given, else
  `FixedPenalty(1.0)`.
- `init="auto"`: `"signed_constant"` (signed Kaiming constant) in `slt` mode,
  else None (a trained model keeps its weights).
- `init_density="auto"`: `1 - target_sparsity` with a target, else None.
- `init_mu="auto"`: `"random"` (a random mask at the target, as edge-popup's
  random scores start) in `slt` mode with a target and per-weight gates; else
  0.5 (every gate open: a trained network starts whole).
- `polish="auto"`: 0.25 (the last quarter of the gate phase trains through the
  binary mask) in `slt` mode with per-weight gates, else 0.
- `sigma="auto"`: 0.25 in `slt` mode with per-weight gates, else 0.5 (the paper's).
- `channel_multiple="auto"`: LiteRT's output-channel tile on this machine
  (`keras_stg.latency.channel_tile`, measured once and cached).
- `TargetSparsity(ramp=None)`: no ramp when the gates start random (the mask is
  at the target from the first step), else a ramp over 40% of the gate phase
  (the steps before the mask freezes with `finetune`, else all of `fit`).
"""

import dataclasses
from typing import Optional, Union

from keras_stg import granularity as granularity_lib
from keras_stg import penalty as penalty_lib

#: Training modes: what trains besides the gates.
MODES = ("slt", "post_training", "joint")
#: `polish="auto"` in `slt` mode with per-weight gates: the last quarter of the gate phase.
AUTO_POLISH = 0.25
#: `sigma="auto"` in `slt` mode with per-weight gates; elsewhere the paper's `PAPER_SIGMA`.
AUTO_SIGMA = 0.25
PAPER_SIGMA = 0.5
#: What `target_sparsity` (and the penalty) counts: kernel weights, multiply-adds, or
#: milliseconds of LiteRT latency (`keras_stg.latency`).
COSTS = ("params", "flops", "latency")


@dataclasses.dataclass
class GateConfig:
    """Options of a gated model.

    Attributes:
        mode: `"slt"` (weights frozen at their random initial values: the
            strong lottery ticket), `"post_training"` (trained weights frozen)
            or `"joint"` (weights and gates train together).
        granularity: `"weight"` (one gate per kernel entry), `"unit"` (one per
            output neuron/channel, bias included), `"block4"`/`"block16"`, or a
            `keras_stg.granularity.Granularity`.
        penalty: a `keras_stg.FixedPenalty` or `keras_stg.TargetSparsity`
            schedule of the expected-L0 penalty's weight; None: automatic.
        target_sparsity: shortcut for `penalty=TargetSparsity(target_sparsity)`;
            may not be given with a `penalty` of another target.
        sigma: noise scale of the gates (0.5 in the paper). A gate with
            `mu < 0` is closed in the binary mask but open during training
            with probability `Phi((mu + 0.5) / sigma)`, so with a large
            `sigma` the relaxed network trains much denser than the mask it
            yields, the more so the sparser the target. `"auto"`: 0.25 in
            `slt` mode with per-weight gates (where three seeds on two
            networks measured it, `benchmarks/RESULTS.md`, issue 18), else 0.5.
        include / exclude: layer names or regexes (full match on name or path)
            to gate / leave ungated; default every supported layer.
        init: re-draw the gated kernels with `keras_stg.initializers.get(init)`
            (`"signed_constant"`, `"kaiming_normal"`, ...), None to keep them,
            or `"auto"`.
        init_density: scale-fan of `init` (edge-popup's "scale fan-in"): the
            new weights are scaled by `1/sqrt(init_density)` so that a ticket
            keeping that share of each layer's inputs has the activation scale
            of the dense network. A number in (0, 1], None (no scaling) or
            `"auto"`. On deep nets without normalisation the scale compounds
            over the layers, so it is opt-in (default None).
        init_mu: initial gate locations: a number (0.5: fully open), `"random"`
            (needs a target: `mu ~ N(sigma * Phi^-1(1 - target), sigma)`
            clipped to the bound, a random mask at the target) or `"auto"`.
        mu_bound: gate locations are kept in `[-mu_bound, mu_bound]` so that
            closed gates can reopen (see `StochasticGate`); None: unbounded.
        seed: int; makes the init and the gate noise deterministic.
        fused: `"auto"` trains weight-level gates with fused CPU kernels when
            no GPU is visible and the model is not XLA-compiled (compiled with
            the system C++ compiler on first use, see `keras_stg.fused`);
            True requires them; False never uses them. Same math either way.
        finetune: `joint` mode with a target: the share of each `fit`'s steps
            at its end (rounded to a step, at least one to each phase; to an
            epoch when `fit` cannot tell the epoch's length; a 1-epoch `fit`
            only trains the gates) during which the mask is frozen at exactly
            the target (the largest `mu` kept) and only the weights train.
            0: gates train to the end.
        polish: the share of the gate phase's last steps (of each `fit`'s,
            or of those before the mask freezes with `finetune`; rounded to a
            step, to an epoch when `fit` cannot tell the epoch's length)
            during which the gates train through their binary mask: the
            forward pass uses `1[mu > 0]`, the gradient reaches `mu` straight
            through, and the gates' learning rate decays to 0 along a half
            cosine. With a target the polish starts from the mask set to
            exactly the target (`GatedModel.snap_to_target`: the gates the
            freeze would flip are moved just past 0). The network the last
            steps fit is then the one exported, and the mask settles instead
            of flipping the gates near 0 to the end. 0: the relaxed gates
            train to the end (the paper's method).
            `"auto"`: 0.25 in `slt` mode with per-weight gates (where three
            seeds on two networks measured it, `benchmarks/RESULTS.md`, issue
            18), else 0.
        gate_lr: the gate locations train at `gate_lr` times the optimizer's
            learning rate (the weights keep it): in `joint` mode the weights
            want a small rate while the gates, bounded by `mu_bound`, must be
            able to cross it in the steps there are.
        cost: what the sparsity, its target and the penalty count: `"params"`
            (kernel weights), `"flops"` (multiply-adds per example: each kernel
            weight counts once per output position of its layer, so a gate weighs
            the multiply-adds it controls) or `"latency"` (milliseconds of batch-1
            LiteRT latency on this machine, per-layer costs measured once and
            cached: see `keras_stg.latency`; `"unit"` and `"channel"` gates only,
            the ones that make a model faster).
        channel_multiple: `granularity="channel"`: `freeze_mask` (the `finetune`
            phase) keeps each group's channels in multiples of this many (8 suits
            the 8-float vectors of XNNPACK and onnxruntime on AVX2: a shrunk layer
            of 9 channels can run slower than one of 16), or `"auto"`: the
            output-channel tile LiteRT computes in on this machine, measured once
            and cached (`keras_stg.latency.channel_tile`; a layer keeping 24 of 32
            channels runs as slowly as one keeping 32 when the tile is 16).
        cost_table: `cost="latency"`: the measured costs (`keras_stg.latency.measure`);
            None measures them when the model is wrapped. Saved with the model.
    """

    mode: str = "slt"
    granularity: Union[str, granularity_lib.Granularity] = "weight"
    penalty: Optional[penalty_lib.Penalty] = None
    target_sparsity: Optional[float] = None
    sigma: object = "auto"
    include: object = None
    exclude: object = None
    init: Optional[str] = "auto"
    init_density: object = None
    init_mu: object = "auto"
    mu_bound: Optional[float] = 1.0
    seed: Optional[int] = None
    fused: object = "auto"
    finetune: float = 0.0
    polish: object = "auto"
    gate_lr: float = 1.0
    cost: str = "params"
    cost_table: Optional[dict] = None
    channel_multiple: object = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(
                f"Unknown mode {self.mode!r}. Use one of {', '.join(repr(m) for m in MODES)}: "
                "'slt' (random weights frozen), 'post_training' (trained weights "
                "frozen) or 'joint' (weights and gates train together)."
            )
        self.granularity = granularity_lib.get(self.granularity)
        if self.penalty is not None:
            self.penalty = penalty_lib.get(self.penalty)
            target = self.penalty.target_sparsity
            if self.target_sparsity is not None and self.target_sparsity != target:
                raise ValueError(
                    f"`target_sparsity={self.target_sparsity!r}` and `penalty={self.penalty!r}` "
                    "disagree; give the target in one of them.")
            self.target_sparsity = target
        elif self.target_sparsity is not None:
            penalty_lib.TargetSparsity(self.target_sparsity)  # validates it
            self.target_sparsity = float(self.target_sparsity)
        if self.sigma != "auto" and (isinstance(self.sigma, bool) or not (
                isinstance(self.sigma, (int, float)) and self.sigma > 0)):
            raise ValueError(f"`sigma` must be a number > 0 (0.5 in the paper) or 'auto', "
                             f"got {self.sigma!r}.")
        if self.init not in ("auto", None):
            from keras_stg import initializers

            initializers.get(self.init)  # validates the name
        if self.init_density not in ("auto", None) and not (
            isinstance(self.init_density, (int, float)) and not isinstance(self.init_density, bool)
            and 0 < self.init_density <= 1
        ):
            raise ValueError(
                f"`init_density` must be in (0, 1], 'auto' or None, got {self.init_density!r}: "
                "the share of weights the ticket keeps, e.g. 0.1 for 90% sparsity."
            )
        if self.init_mu == "random" and self.target_sparsity is None:
            raise ValueError(
                "init_mu='random' starts the mask at `target_sparsity`, but no "
                "target is given. Pass `target_sparsity=`, or a number as `init_mu` "
                "(0.5 opens every gate).")
        if self.init_mu not in ("auto", "random") and (
                isinstance(self.init_mu, bool) or not isinstance(self.init_mu, (int, float))):
            raise ValueError(
                f"`init_mu` must be a number, 'random' or 'auto', got {self.init_mu!r}.")
        if self.mu_bound is not None and not (
                isinstance(self.mu_bound, (int, float)) and self.mu_bound > 0):
            raise ValueError(f"`mu_bound` must be > 0 or None, got {self.mu_bound!r}.")
        if self.cost not in COSTS:
            raise ValueError(f"Unknown cost {self.cost!r}; use 'params' (kernel weights), "
                             "'flops' (multiply-adds) or 'latency' (LiteRT milliseconds).")
        if self.cost == "latency" and self.granularity.name not in ("unit", "channel"):
            raise ValueError(
                f"cost='latency' with granularity={self.granularity.name!r}: zeros inside "
                "kernels run as dense compute in LiteRT on x86 and on the Edge TPU, so they "
                "save no time. Use granularity='channel' (or 'unit'), whose closed channels "
                "shrink removes, or cost='flops'.")
        if self.channel_multiple != "auto" and (isinstance(self.channel_multiple, bool) or not (
                isinstance(self.channel_multiple, int) and self.channel_multiple >= 1)):
            raise ValueError(f"`channel_multiple` must be an integer >= 1 or 'auto' (the "
                             f"runtime's channel tile on this machine), got "
                             f"{self.channel_multiple!r}.")
        if self.channel_multiple != 1 and self.granularity.name != "channel":
            raise ValueError(
                f"`channel_multiple={self.channel_multiple!r}` rounds the channels a channel "
                f"group keeps; it needs granularity='channel', not "
                f"{self.granularity.name!r}. keras_stg.shrink(model, channel_multiple=...) "
                "rounds any other ticket's kept channels up.")
        if self.cost_table is not None and self.cost != "latency":
            raise ValueError(f"`cost_table` holds latency costs; it needs cost='latency', "
                             f"not {self.cost!r}.")
        if self.fused not in ("auto", True, False):
            raise ValueError(f"`fused` must be 'auto', True or False, got {self.fused!r}.")
        if isinstance(self.finetune, bool) or not (
                isinstance(self.finetune, (int, float)) and 0 <= self.finetune < 1):
            raise ValueError(
                "`finetune` must be a share of the training steps in [0, 1), got "
                f"{self.finetune!r}.")
        if self.polish != "auto" and (isinstance(self.polish, bool) or not (
                isinstance(self.polish, (int, float)) and 0 <= self.polish < 1)):
            raise ValueError(
                "`polish` must be a share of the gate phase's steps in [0, 1) (e.g. 0.25: "
                f"the last quarter trains on the binary mask) or 'auto', got {self.polish!r}.")
        if isinstance(self.gate_lr, bool) or not (
                isinstance(self.gate_lr, (int, float)) and self.gate_lr > 0):
            raise ValueError(
                f"`gate_lr` multiplies the optimizer's learning rate for the gates; it must "
                f"be a number > 0, got {self.gate_lr!r}.")
        if self.finetune and self.mode != "joint":
            raise ValueError(
                f"`finetune={self.finetune}` fine-tunes the weights under the frozen mask, but "
                f"mode={self.mode!r} trains no weights. Use mode='joint', or finetune=0.")
        if self.finetune and self.target_sparsity is None:
            raise ValueError(
                "`finetune` freezes the mask at exactly `target_sparsity`, but no target is "
                "given. Pass `target_sparsity=`, or finetune=0.")

    def resolve(self):
        """A copy with every automatic choice made (see the module docstring)."""
        target = self.target_sparsity
        init = self.init
        if init == "auto":
            init = "signed_constant" if self.mode == "slt" else None
        init_density = self.init_density
        if init_density == "auto":
            init_density = None if target is None else 1.0 - target
        init_mu = self.init_mu
        if init_mu == "auto":
            random_start = (self.mode == "slt" and target is not None
                            and self.granularity.name == "weight")
            init_mu = "random" if random_start else 0.5
        if init_mu != "random":
            init_mu = float(init_mu)
        slt_weights = self.mode == "slt" and self.granularity.name == "weight"
        polish = self.polish
        if polish == "auto":
            polish = AUTO_POLISH if slt_weights else 0.0
        sigma = self.sigma
        if sigma == "auto":
            sigma = AUTO_SIGMA if slt_weights else PAPER_SIGMA
        penalty = self.penalty
        if penalty is None:
            penalty = (penalty_lib.TargetSparsity(target) if target is not None
                       else penalty_lib.FixedPenalty(1.0))
        penalty = penalty.resolve(random_start=init_mu == "random")
        from keras_stg import latency

        channel_multiple = latency.resolve_multiple(self.channel_multiple)
        return dataclasses.replace(
            self, penalty=penalty, init=init, init_density=init_density, init_mu=init_mu,
            sigma=float(sigma), finetune=float(self.finetune), polish=float(polish),
            gate_lr=float(self.gate_lr), channel_multiple=channel_multiple,
            mu_bound=None if self.mu_bound is None else float(self.mu_bound))

    # ------------------------------------------------------------ serialize

    def get_config(self):
        import keras

        config = dataclasses.asdict(self)
        config["granularity"] = granularity_lib.serialize(self.granularity)
        config["penalty"] = (None if self.penalty is None
                             else keras.saving.serialize_keras_object(self.penalty))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.setdefault("polish", 0.0)  # saved before it existed: trained without it
        config.setdefault("sigma", PAPER_SIGMA)
        config["granularity"] = granularity_lib.deserialize(config["granularity"])
        if config.get("penalty") is not None:
            config["penalty"] = penalty_lib.get(config["penalty"])
        return cls(**config)


#: Keywords of `wrap` and `GatedModel` that configure the penalty (the short form).
PENALTY_KEYWORDS = ("lam", "target_sparsity", "controller_rate", "target_ramp",
                    "controller_horizon", "controller_error")


def from_keywords(lam=None, target_sparsity=None, controller_rate=None, target_ramp=None,
                  controller_horizon=3.0, controller_error=None, penalty=None, **options):
    """A `GateConfig` from `wrap`'s keyword form, where the penalty is given by its parts:
    `lam` (the fixed weight, or the controller's start with a target), `target_sparsity`
    and the controller's `controller_rate` (None: `keras_stg.penalty.DEFAULT_RATE`),
    `target_ramp`, `controller_horizon` and `controller_error` (None:
    `keras_stg.penalty.DEFAULT_ERROR`)."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(GateConfig)})
    if unknown:
        raise TypeError(f"Unknown option(s) {', '.join(unknown)}; see keras_stg.GateConfig.")
    if penalty is not None:
        shortcut = {"lam": lam, "controller_rate": controller_rate,
                    "target_ramp": target_ramp, "controller_horizon": controller_horizon != 3.0,
                    "controller_error": controller_error}
        given = [k for k, v in shortcut.items() if v not in (None, False)]
        if given:
            raise ValueError(
                f"Give the penalty either as `penalty=` or by its parts, not both "
                f"(got penalty= and {', '.join(given)}=).")
    else:
        if controller_error is None:
            controller_error = penalty_lib.DEFAULT_ERROR
        if controller_rate is None:
            controller_rate = penalty_lib.DEFAULT_RATE
        penalty_lib.check_controller(controller_rate, target_ramp, controller_horizon,
                                     controller_error)
    if penalty is not None:
        pass
    elif target_sparsity is not None:
        penalty = penalty_lib.TargetSparsity(
            target_sparsity, lam=1.0 if lam is None else lam, rate=controller_rate,
            ramp=target_ramp, horizon=controller_horizon, error=controller_error)
    elif lam is not None:
        penalty = penalty_lib.FixedPenalty(lam)
    return GateConfig(penalty=penalty, target_sparsity=target_sparsity, **options)
