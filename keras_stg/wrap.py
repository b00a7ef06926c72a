"""`wrap`: put a stochastic gate on every kernel of a Keras 3 model."""

import keras

from keras_stg import init as init_lib
from keras_stg.model import GatedModel


def wrap(
    model,
    mode="slt",
    granularity="weight",
    lam=None,
    target_sparsity=None,
    sigma=0.5,
    include=None,
    exclude=None,
    init="auto",
    init_density=None,
    init_mu="auto",
    mu_bound=1.0,
    seed=None,
    controller_rate=0.01,
    target_ramp=None,
    controller_horizon=3.0,
    fused="auto",
    finetune=0.0,
):
    """Wraps a built Keras 3 model so that `fit` learns binary masks over its kernels.

    The returned `GatedModel` owns `model`: in the frozen modes it marks the
    model's variables non-trainable, and with an `init` it re-draws the kernels.

    Args:
        model: a built Keras 3 model (Sequential, Functional, or subclassed
            such as keras-hub backbones).
        mode: `"slt"` (default; weights frozen at their random initial values,
            the strong lottery ticket), `"post_training"` (trained weights
            frozen) or `"joint"` (weights and gates trained together).
        granularity: `"weight"` (one gate per kernel entry, default), `"unit"`
            (one gate per output neuron/channel), `"block4"`/`"block16"`, or a
            `keras_stg.granularity.Granularity`.
        lam: weight of the expected-L0 penalty (the penalty is the expected
            share of weights kept). Default 1.0. With `target_sparsity` it is
            the starting value of the adaptive lambda.
        target_sparsity: in (0, 1); lambda then adapts every step (and may go
            negative) so that the binary mask's sparsity settles at this value.
        sigma: noise scale of the gates (0.5 in the paper).
        include: layer names or regexes (full match on name or path) to gate;
            default every supported layer.
        exclude: layer names or regexes to leave ungated.
        init: `"auto"` (signed Kaiming constant in `slt` mode, the model's own
            weights otherwise), None (keep the weights), or a name from
            `keras_stg.init.INITIALIZERS`.
        init_density: scale-fan for `init` (edge-popup's "scale fan-in"): the
            new weights are scaled by `1/sqrt(init_density)` so that a ticket
            keeping that share of each layer's inputs has the activation
            scale of the dense network. `"auto"`: `1 - target_sparsity` when
            a target is given, else no scaling; None (default): no scaling.
            Best for LeNet-300-100 in our ablation; on deep nets
            without normalisation the scale compounds over the layers and the
            initial, still dense network's activations explode (Conv-4 at
            `"auto"` and target 0.9 starts at a loss of thousands), so it is
            opt-in.
        init_mu: initial gate locations. A number: every gate at it (0.5:
            fully open, the dense network). `"random"` (needs
            `target_sparsity`): `mu ~ N(sigma * Phi^-1(1 - target), sigma)`
            clipped to the bound, so the mask starts as a random subnetwork
            at the target sparsity, as edge-popup's random scores do, and the
            gates search from there. `"auto"` (default): `"random"` in `slt`
            mode with a target and per-weight gates (more accurate tickets than a dense start on
            LeNet-300-100 at 90% and 95%, see benchmarks/RESULTS.md), else
            0.5 (a trained network starts whole).
        mu_bound: gate locations are kept in `[-mu_bound, mu_bound]` so that
            closed gates can reopen (see `StochasticGate`); None: unbounded.
        seed: int; makes the init and the gate noise deterministic.
        controller_rate: gain of the adaptive-lambda controller (per step).
        target_ramp: share of `fit`'s steps over which the sparsity target
            rises (a half cosine) from 0 to `target_sparsity`; 0: no ramp.
            None (default): 0 when the gates start random (the mask is at the
            target from the first step), else 0.4.
        controller_horizon: the controller acts on the sparsity predicted
            this many epochs ahead (0: on the current sparsity).
        fused: `"auto"` (default) trains weight-level gates with fused CPU
            kernels when no GPU is visible and the model is not XLA-compiled
            (they are compiled with the system C++ compiler on first use, see
            `keras_stg.fused`), else with plain TensorFlow ops; True requires
            the kernels; False never uses them. Same math either way.
        finetune: `joint` mode: the share of the epochs at the end of each
            `fit` (rounded, leaving at least one epoch to each phase; a
            1-epoch `fit` does not freeze) during which the mask is frozen
            at exactly `target_sparsity` (the largest `mu` kept) and only the
            weights train, under the binary mask they will be exported with.
            0 (default) trains the gates to the end.

    Returns:
        A `keras_stg.GatedModel`.

    Example:

    ```python
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    gated = keras_stg.wrap(model, mode="slt", target_sparsity=0.9, seed=0)
    gated.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    gated.fit(train_ds, epochs=10)
    pruned = gated.strip()
    ```
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"keras_stg needs the TensorFlow backend, but Keras runs on "
            f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before "
            "importing keras."
        )
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"wrap() takes a keras.Model, got {type(model).__name__}. Wrap single "
            "layers in a keras.Sequential first."
        )
    if isinstance(model, GatedModel):
        raise ValueError("This model is already gated; call wrap() on the plain model.")
    if not model.built or not model.weights:
        raise ValueError(
            f"Model {model.name!r} is not built, so its kernels do not exist yet. "
            "Build it first: give it an input shape (keras.Input(...) or "
            "`input_shape=`), call `model.build(input_shape)`, or call it on a batch."
        )
    if init == "auto":
        init = "signed_constant" if mode == "slt" else None
    initializer = init_lib.get(init) if init is not None else None
    if init_density == "auto":
        init_density = None if target_sparsity is None else 1.0 - target_sparsity
    elif init_density is not None and not (
        isinstance(init_density, (int, float)) and 0 < init_density <= 1
    ):
        raise ValueError(
            f"`init_density` must be in (0, 1], 'auto' or None, got {init_density!r}: "
            "the share of weights the ticket keeps, e.g. 0.1 for 90% sparsity."
        )
    gated = GatedModel(
        model,
        mode=mode,
        granularity=granularity,
        lam=lam,
        target_sparsity=target_sparsity,
        sigma=sigma,
        include=include,
        exclude=exclude,
        init_mu=init_mu,
        mu_bound=mu_bound,
        seed=seed,
        controller_rate=controller_rate,
        target_ramp=target_ramp,
        controller_horizon=controller_horizon,
        fused=fused,
        finetune=finetune,
    )
    if initializer is not None:
        initializer(gated, seed=0 if seed is None else seed, density=init_density)
    return gated
