"""The networks, data and methods of `benchmarks.structured` (structured pruning).

Every method trains with Adam and one cosine learning-rate schedule over the
same total epochs `E` (a method that prunes in the middle continues the
schedule where it stands), batch 128, the same data order and the same initial
weights:

- `dense`: the model trained for `E` epochs.
- `ours`: `keras_stg.wrap(model, mode="joint", granularity="channel",
  cost=COST, target_sparsity=t, ...)` with the options of a `Recipe` (gate
  start, noise scale, the share of the training steps at the end during which
  the mask is frozen at the target while the weights fine-tune, the gates' learning-rate
  multiple), then `strip` and `shrink`. `COST` is `"flops"` (`t` the share of
  multiply-adds removed) or `"latency"` (`t` the share of the LiteRT latency
  removed, per-layer costs measured on this CPU).
- `l1`: Li et al. 2017, "Pruning Filters for Efficient ConvNets": `E - F`
  epochs dense (`F = E // 2`), then in every channel group the same share of
  channels with the smallest L1 norm of their producers' kernels is removed, the
  share set so that the shrunk model's multiply-adds are `1 - t` of the dense
  ones; `shrink`, then `F` epochs of fine-tuning.
- `slimming`: Liu et al. 2017, "Learning Efficient Convolutional Networks
  through Network Slimming": `E - F` epochs with an L1 penalty `lambda *
  sum |gamma|` on every BatchNormalization scale, then the channels whose
  group's mean `|gamma|` is under one global threshold are removed (at least one
  kept per group), the threshold set so that the shrunk model's multiply-adds
  are `1 - t` of the dense ones; `shrink`, then `F` epochs of fine-tuning.

All methods prune on the same channel groups (`keras_stg.channel_groups`: a
residual `Add` ties its branches), keep each group's channels in multiples of
`Budget.channel_multiple` (8 by default: what the runtimes' vector kernels
want) and shrink with `keras_stg.shrink`.
"""

import dataclasses
import math

import numpy as np

LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class Net:
    title: str
    input_shape: tuple
    pad: int  # zero pixels added around the 28x28 images
    build: object  # () -> keras.Model (logits)
    #: Our recipe's `finetune` for this net, chosen on validation images (3 seeds, RESULTS.md).
    finetune: float


def _resnet20():
    from keras_stg.experiments import models

    return models.resnet20((28, 28, 1))


def _mobilenet_v2():
    import keras

    return keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 1), alpha=0.35, classes=10,
        classifier_activation=None)


def _mobilenet_v3_small():
    import keras

    return keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 1), alpha=0.75, classes=10,
        classifier_activation=None, include_preprocessing=False)


NETS = {
    "resnet20": Net("ResNet-20", (28, 28, 1), 0, _resnet20, 0.9),
    "mobilenet_v2": Net("MobileNetV2 (alpha 0.35, 32x32)", (32, 32, 1), 2, _mobilenet_v2, 0.8),
    # Its finetune is MobileNetV2's, not chosen on its own validation images.
    "mobilenet_v3_small": Net("MobileNetV3Small (alpha 0.75, 32x32)", (32, 32, 1), 2,
                              _mobilenet_v3_small, 0.8),
}


#: BatchNormalization momentum of every network: Keras' default (0.99, and 0.999 in
#: MobileNetV2) leaves the moving statistics far from the data after a few hundred steps.
BN_MOMENTUM = 0.9


def fresh(net, seed):
    """The network with the initial weights every method starts from."""
    import keras

    keras.utils.set_random_seed(seed)
    model = NETS[net].build()
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BN_MOMENTUM
    return model


def data(net, data_dir, limit, test_limit, validation=False):
    """Fashion-MNIST `(x, y, x_test, y_test)`, normalized, padded to the network's input
    size: the first `limit` training images and the first `test_limit` test images, or
    with `validation` the last `test_limit` training images (disjoint from the first
    `limit`) in place of the test images."""
    from keras_stg.experiments import data as data_lib

    pad = NETS[net].pad
    train = data_lib.load("fashion_mnist", "train", data_dir)
    if validation:
        if limit + test_limit > len(train[0]):
            raise ValueError(f"--validation takes the last {test_limit} of the "
                             f"{len(train[0])} training images, which overlap the first "
                             f"{limit} it trains on: lower --limit or --test-limit.")
        test = train[0][-test_limit:], train[1][-test_limit:]
    else:
        test = data_lib.load("fashion_mnist", "test", data_dir)
    out = []
    for (x, y), n in ((train, limit), (test, test_limit)):
        x = data_lib.normalize(x[:n], "fashion_mnist").reshape(-1, 28, 28, 1)
        if pad:
            x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        out += [x, np.asarray(y[:n])]
    return out


def macs(model):
    """Kernel weights and multiply-adds per example of a plain Keras model."""
    from keras_stg import _compat
    from keras_stg import layer_table

    layer_table.record_shapes(model)  # layers called inside another (attention projections)
    params = total = 0
    for layer in _compat.all_layers(model):
        for kernel in layer_table.kernels(layer) or ():
            n = math.prod(getattr(layer, kernel.role).shape)
            params += n
            total += n * layer_table.positions(layer)
    return params, total


# ----------------------------------------------------------------- training


def _schedule(total_steps, start_step=0):
    import keras

    class Cosine(keras.optimizers.schedules.LearningRateSchedule):
        """Cosine decay from LEARNING_RATE to 0 over `total` steps, entered at `start`."""

        def __init__(self, total, start):
            self.total, self.start = float(max(1, total)), float(start)

        def __call__(self, step):
            t = keras.ops.minimum(keras.ops.cast(step, "float32") + self.start, self.total)
            return LEARNING_RATE * 0.5 * (1.0 + keras.ops.cos(math.pi * t / self.total))

        def get_config(self):
            return {"total": self.total, "start": self.start}

    return Cosine(total_steps, start_step)


def compile_model(model, total_steps=1, start_step=0):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(_schedule(total_steps, start_step)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def accuracy(model, x, y):
    compile_model(model)
    return float(model.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)["accuracy"])


@dataclasses.dataclass
class Budget:
    epochs: int
    batch_size: int
    steps_per_epoch: int
    verbose: int = 0
    seed: int = 0
    channel_multiple: int = 1

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch

    @property
    def finetune_epochs(self):
        return max(1, self.epochs // 2)


def _fit(model, x, y, budget, epochs, start_epoch=0):
    import keras

    compile_model(model, budget.total_steps, start_epoch * budget.steps_per_epoch)
    keras.utils.set_random_seed(budget.seed + 1 + start_epoch)  # the data order
    model.fit(x, y, batch_size=budget.batch_size, epochs=epochs, verbose=budget.verbose,
              shuffle=True)
    return model


def train_dense(net, x, y, budget):
    return _fit(fresh(net, budget.seed), x, y, budget, budget.epochs)


@dataclasses.dataclass
class Recipe:
    """Our options beyond the target and the cost (`benchmarks.structured` flags)."""

    init_mu: object = 0.5
    sigma: float = 0.1
    finetune: float = 0.8  # `benchmarks.structured` uses the net's (`Net.finetune`)
    gate_lr: float = 10.0
    #: What ranks the channels when the mask freezes: "mu" (the gates' locations, the
    #: library's `freeze_mask`), or "taylor", "taylor_cost" or "random"
    #: (`TaylorGatedModel`'s `rank`).
    score: str = "mu"


def train_ours(net, target, x, y, budget, cost="flops", recipe=Recipe()):
    """Our channel gates, joint mode; returns `(shrunk model, gated sparsity)`."""
    import keras

    import keras_stg

    options = dict(mode="joint", granularity="channel", cost=cost, target_sparsity=target,
                   finetune=recipe.finetune, seed=budget.seed, init_mu=recipe.init_mu,
                   gate_lr=recipe.gate_lr, sigma=recipe.sigma,
                   channel_multiple=budget.channel_multiple)
    if recipe.score in ("taylor", "taylor_cost", "random"):
        gated = keras_stg.wrapping.draw_init(
            _taylor_model_class()(fresh(net, budget.seed), **options))
        gated.rank = recipe.score
    elif recipe.score == "mu":
        gated = keras_stg.wrap(fresh(net, budget.seed), **options)
    else:
        raise ValueError("Recipe.score is 'mu', 'taylor', 'taylor_cost' or 'random', got "
                         f"{recipe.score!r}")
    compile_model(gated, budget.total_steps)
    keras.utils.set_random_seed(budget.seed + 1)
    gated.fit(x, y, batch_size=budget.batch_size, epochs=budget.epochs, verbose=budget.verbose,
              shuffle=True)
    small = keras_stg.shrink(gated.strip(), channel_multiple=gated.config.channel_multiple)
    return small, gated.sparsity()


def _taylor_model_class():
    import keras
    from keras import ops

    import keras_stg

    class TaylorGatedModel(keras_stg.GatedModel):
        """Channel gates whose gate phase trains the dense network (every gate open,
        no noise) and sums, per channel, the squared gradient of the loss with
        respect to its binary gate (straight through, the first-order Taylor
        importance of Molchanov et al. 2019, "Importance Estimation for Neural
        Network Pruning"). `freeze_mask` keeps the channels with the largest score
        (by `channel_multiple` blocks, as the library's freeze ranks `mu`), the
        score per `rank`: "taylor" (the sums), "taylor_cost" (the sums over each
        channel's marginal cost) or "random" (a uniform draw from the seed: the
        random-channel control). The gates' locations do not train."""

        #: "taylor", "taylor_cost" or "random" (see the class docstring).
        rank = "taylor"

        def __init__(self, model, **options):
            super().__init__(model, **options)
            if self._plan is None:
                raise ValueError("TaylorGatedModel needs channel gates.")
            self._taylor = [keras.Variable(np.zeros(g.mu.shape, "float32"), trainable=False,
                                           name=f"taylor_{i}") for i, g in enumerate(self.gates)]

        def masked_values(self, training=False):
            if training and not self._mask_frozen:
                mapping, expected, hard = self._polish_kernels()
                self._step.expected_density, self._step.hard_density = expected, hard
                return mapping
            return super().masked_values(training)

        def apply_gradients(self, gradients, variables):
            if not self._mask_frozen:
                index = {id(g.mu): i for i, g in enumerate(self.gates)}
                kept = []
                for grad, var in zip(gradients, variables):
                    i = index.get(id(var))
                    if i is not None and grad is not None:
                        self._taylor[i].assign_add(ops.square(grad))
                        grad = ops.zeros_like(grad)
                    kept.append(grad)
                gradients = kept
            super().apply_gradients(gradients, variables)

        def marginal_costs(self):
            """Per gate: the cost one of its channels adds to the model with every
            channel open (in the units of the penalty's `cost`)."""
            ones = [np.ones(g.mu.shape, "float32") for g in self.gates]
            full = float(ops.convert_to_numpy(self._plan.kept(self.targets, ones,
                                                              self._unit_cost)))
            out = []
            for i in range(len(ones)):
                less = list(ones)
                less[i] = np.concatenate([[0.0], ones[i][1:]]).astype("float32")
                out.append(full - float(ops.convert_to_numpy(
                    self._plan.kept(self.targets, less, self._unit_cost))))
            return out

        def scores(self):
            """Per gate, the score `freeze_mask` ranks its channels by."""
            if self.rank == "random":
                rng = np.random.default_rng(self.config.seed)
                return [rng.random(g.mu.shape).astype("float32") for g in self.gates]
            sums = [np.asarray(ops.convert_to_numpy(t.value)) for t in self._taylor]
            if self.rank == "taylor":
                return sums
            if self.rank == "taylor_cost":
                return [s / max(c, 1e-12) for s, c in zip(sums, self.marginal_costs())]
            raise ValueError(f"rank is 'taylor', 'taylor_cost' or 'random', got {self.rank!r}")

        def freeze_mask(self):
            if not self._mask_frozen:
                for gate, score in zip(self.gates, self.scores()):
                    gate.mu.assign(score)
            super().freeze_mask()

    return TaylorGatedModel


def __getattr__(name):
    if name == "TaylorGatedModel":  # built on first use: importing this module stays light
        return _taylor_model_class()
    raise AttributeError(name)


# ----------------------------------------------------------- the baselines


def l1_scores(model):
    """Per prunable channel group: the L1 norm of every channel's producer kernels."""
    import keras_stg

    out = []
    for group in keras_stg.channel_groups(model):
        if group.prunable:
            out.append((group, sum(
                np.abs(m.layer.kernel.numpy()[..., m.offset:m.offset + group.size])
                .reshape(-1, group.size).sum(0)
                for m in group.members if m.role == "producer")))
    return out


def gamma_scores(model):
    """Per prunable channel group: the mean `|gamma|` of its BatchNormalization members
    (groups without one score 0 and are pruned first; none in our networks)."""
    import keras

    import keras_stg

    out = []
    for group in keras_stg.channel_groups(model):
        if not group.prunable:
            continue
        gammas = [np.abs(m.layer.gamma.numpy()[m.offset:m.offset + group.size])
                  for m in group.members if m.role == "per_channel"
                  and isinstance(m.layer, keras.layers.BatchNormalization) and m.layer.scale]
        out.append((group, np.mean(gammas, axis=0) if gammas else np.zeros(group.size)))
    return out


def _closed(scores, level, uniform, multiple=1):
    """Channels to close per group: the lowest-scoring `level` share of each group
    (uniform), or the lowest-scoring `level` share of all channels (global; ties in
    model order); then each group's best closed channels reopen until it keeps a
    multiple of `multiple` channels (at least `multiple`, or the whole group)."""
    if uniform:
        drops = [np.argsort(s, kind="stable")[:int(level * group.size)] for group, s in scores]
    else:
        flat = np.concatenate([s for _, s in scores])
        owner = np.concatenate([np.full(len(s), i) for i, (_, s) in enumerate(scores)])
        index = np.concatenate([np.arange(len(s)) for _, s in scores])
        drop = np.argsort(flat, kind="stable")[:int(level * flat.size)]
        drops = [index[drop[owner[drop] == i]] for i in range(len(scores))]
    closed = []
    for (group, s), mine in zip(scores, drops):
        kept = group.size - len(mine)
        want = min(group.size, max(multiple, -(-kept // multiple) * multiple))
        if want > kept:  # reopen the best-scoring closed channels
            mine = mine[np.argsort(-s[mine], kind="stable")][want - kept:]
        closed.append(np.sort(mine))
    return closed


def prune_to_macs(model, scores_fn, target, uniform, steps=8, multiple=1):
    """Closes the lowest-scoring channels (`scores_fn(model)`) so that the shrunk model has
    about `1 - target` of the multiply-adds (bisection on the share or the global
    quantile; the level nearest the target), channels kept in multiples of `multiple`;
    returns the shrunk model."""
    import keras_stg

    _, dense_macs = macs(model)
    weights = [v.numpy() for v in model.weights]
    scores = scores_fn(model)

    def pruned(level):
        for v, w in zip(model.weights, weights):
            v.assign(w)
        for (group, _), channels in zip(scores, _closed(scores, level, uniform, multiple)):
            group.zero(channels)
        return model

    low, high, best = 0.0, 1.0, (float("inf"), 1.0)
    for _ in range(steps):
        level = (low + high) / 2
        removed = 1 - macs(keras_stg.shrink(pruned(level), check=False,
                                            channel_multiple=multiple))[1] / dense_macs
        best = min(best, (abs(removed - target), level))
        if removed < target:
            low = level
        else:
            high = level
    # The level whose multiply-adds are nearest the target (whole blocks of channels
    # make the reachable levels coarse).
    small = keras_stg.shrink(pruned(best[1]), channel_multiple=multiple)
    for v, w in zip(model.weights, weights):
        v.assign(w)
    return small


def _prune_and_finetune(model, x, y, budget, target, scores_fn, uniform, steps):
    phase1 = budget.epochs - budget.finetune_epochs
    if phase1 > 0:
        _fit(model, x, y, budget, phase1)
    small = prune_to_macs(model, scores_fn, target, uniform, steps, budget.channel_multiple)
    return _fit(small, x, y, budget, budget.finetune_epochs, start_epoch=phase1)


def train_l1(net, target, x, y, budget, steps=8):
    return _prune_and_finetune(fresh(net, budget.seed), x, y, budget, target, l1_scores,
                               uniform=True, steps=steps)


def random_scores(seed):
    """`scores_fn` drawing one random score per channel of every prunable group."""
    import keras_stg

    def scores(model):
        rng = np.random.default_rng(seed)
        return [(group, rng.random(group.size)) for group in keras_stg.channel_groups(model)
                if group.prunable]

    return scores


def train_uniform(net, target, x, y, budget, steps=8):
    """The uniform-width control (Liu et al. 2019, "Rethinking the Value of Network
    Pruning"): every prunable channel group cut by the same share so that the network
    keeps about `1 - target` of the multiply-adds, then that smaller network trained
    from a fresh initialization for every epoch of the budget. Its channel counts are
    not rounded to the budget's `channel_multiple`: multiples of 8 would leave a
    16-channel group at 8 or 16 and the uniform share far from the target."""
    import keras

    small = prune_to_macs(fresh(net, budget.seed), random_scores(budget.seed), target,
                          uniform=True, steps=steps)
    keras.utils.set_random_seed(budget.seed)
    small = keras.models.clone_model(small)  # fresh initial weights in the smaller shapes
    return _fit(small, x, y, budget, budget.epochs)


def train_slimming(net, target, x, y, budget, lam=1e-4, steps=8):
    import keras

    model = fresh(net, budget.seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and layer.scale:
            layer.gamma.regularizer = keras.regularizers.L1(lam)
    return _prune_and_finetune(model, x, y, budget, target, gamma_scores, uniform=False,
                               steps=steps)
