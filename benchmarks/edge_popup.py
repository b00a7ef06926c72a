"""Edge-popup (Ramanujan et al. 2020, "What's Hidden in a Randomly Weighted Neural Network?").

A baseline for the benchmarks, not part of the library. Every kernel of a
frozen random network gets a score of the same shape. The forward pass keeps,
in each layer, the top `k` share of the weights by `|score|` (the mask is
recomputed every step: one top-k per layer and step) and the backward pass is
straight-through: the gradient of the masked kernel times the weight reaches
the score as if the mask were the identity of `|score|`.

Faithful to allenai/hidden-networks (`SubnetConv`, `GetSubnet`):
- scores initialised Kaiming-uniform with `a = sqrt(5)` (`U(-1/sqrt(fan_in), +)`),
- per-layer mask keeping `round(k * n)` weights with the largest `|score|`,
- SGD, momentum 0.9, cosine learning-rate decay (lr 0.1), L2 weight decay on
  the scores added to the gradient before momentum (PyTorch's `weight_decay`),
- weights frozen (bit-identical after training), no bias; `init_like_ours`
  gives them the very weights our `slt` run starts from (signed Kaiming
  constant, the paper's best init, with the library's scale-fan if any).

It subclasses the library's `keras_stg.MaskedModel`, as `keras_stg.GatedModel`
does: the kernels are substituted with `keras.StatelessScope` for the duration
of the wrapped model's call, so any Keras 3 model works without cloning, and
the two methods share the same forward code and training step.

Example:

```python
model = init_like_ours(keras_stg.experiments.models.lenet_300_100((28, 28, 1)), sparsity=0.5, seed=0)
ep = EdgePopupModel(model, density=0.5, seed=0)
ep.compile(optimizer=sgd_cosine(0.1, steps), loss=..., metrics=["accuracy"])
ep.fit(train, epochs=20)
```
"""

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_stg.masking import MaskedModel


def topk_mask(scores, density):
    """Binary mask (same shape as `scores`) keeping the `round(density*n)` largest `|scores|`.

    Exact, ties included, without the full sort of the reference
    implementation. When the layer is small or the smaller side (the kept
    weights, or the pruned ones) is a small share of it, one partial `top_k`
    over that side and a scatter of its indices; otherwise the `keep`-th
    largest `|score|` is found by bisection on its float32 bit pattern (non-negative floats order like
    their bits: 31 counting passes over the layer, `_kth_largest_bits`) and
    the mask is `|score| > kth` plus, of the scores equal to it, the first
    ones in memory order up to the count. `python -m benchmarks.edge_popup_speed`
    times the three ways (full sort, `top_k`, this).
    """
    n = math.prod(scores.shape)
    keep = kept_count(n, density)
    a = tf.abs(scores)
    if keep == n:
        return tf.ones_like(a)
    flat = tf.reshape(a, [-1])
    if n < BISECT_MIN or min(keep, n - keep) <= TOPK_SHARE * n:
        return topk_scatter_mask(scores, density)
    bits = tf.bitcast(flat, tf.int32)
    kth = _kth_largest_bits(bits, keep)
    at_least = bits >= kth

    def break_ties():
        # Of the scores equal to the k-th largest, keep as many as the count needs.
        tied = bits == kth
        need = keep - tf.math.count_nonzero(bits > kth, dtype=tf.int32)
        first = tf.cumsum(tf.cast(tied, tf.int32)) <= need
        return tf.logical_or(bits > kth, tf.logical_and(tied, first))

    exact = tf.math.count_nonzero(at_least, dtype=tf.int32) == keep
    mask = tf.cond(exact, lambda: at_least, break_ties)
    return tf.reshape(tf.cast(mask, a.dtype), scores.shape)


def topk_scatter_mask(scores, density):
    """`topk_mask` by one partial `tf.math.top_k` over the smaller side and a scatter
    of its indices (exact; its cost grows with the smaller side)."""
    n = math.prod(scores.shape)
    keep = kept_count(n, density)
    flat = tf.reshape(tf.abs(scores), [-1])
    if keep == n:
        return tf.ones(scores.shape, flat.dtype)
    if keep <= n - keep:
        idx = tf.math.top_k(flat, k=keep, sorted=False).indices
        mask = tf.scatter_nd(idx[:, None], tf.ones([keep], flat.dtype), [n])
    else:
        # The n - keep smallest are pruned.
        idx = tf.math.top_k(-flat, k=n - keep, sorted=False).indices
        mask = 1.0 - tf.scatter_nd(idx[:, None], tf.ones([n - keep], flat.dtype), [n])
    return tf.reshape(mask, scores.shape)


def sort_mask(scores, density):
    """`topk_mask` as the reference implementation computes it: a full sort of the
    layer's `|scores|` (kept for `benchmarks.edge_popup_speed`)."""
    n = math.prod(scores.shape)
    keep = kept_count(n, density)
    a = tf.abs(scores)
    order = tf.argsort(tf.reshape(a, [-1]), direction="DESCENDING", stable=True)
    mask = tf.scatter_nd(order[:keep, None], tf.ones([keep], a.dtype), [n])
    return tf.reshape(mask, scores.shape)


#: `topk_mask` uses `top_k` when the smaller side is at most this share of the layer,
TOPK_SHARE = 0.05
#: or when the layer has fewer weights than this (31 passes cost more than `top_k` there).
BISECT_MIN = 131072


def _kth_largest_bits(bits, keep):
    """Bit pattern of the `keep`-th largest of non-negative float32 values given as `bits`.

    The largest `t` with `count(bits >= t) >= keep`: 31 bisection steps over
    [0, +inf], each one comparison and count over the layer (NaN scores,
    which no finite training produces, would count as the largest).
    """
    def step(lo, hi):
        mid = lo + (hi - lo) // 2
        ok = tf.math.count_nonzero(bits >= mid, dtype=tf.int32) >= keep
        return tf.where(ok, mid, lo), tf.where(ok, hi, mid)

    lo = tf.constant(0, tf.int32)  # count(bits >= 0) = n >= keep
    hi = tf.constant(0x7F800001, tf.int32)  # above +inf: count 0 < keep
    lo, _ = tf.while_loop(lambda lo, hi: hi - lo > 1, step, (lo, hi), maximum_iterations=31)
    return lo


def kept_count(n, density):
    """Number of weights a layer of `n` weights keeps at `density` (at least 1)."""
    return max(1, min(n, int(round(density * n))))


class EdgePopupModel(MaskedModel):
    """Edge-popup supermask over the kernels of a (frozen) Keras 3 model.

    A `keras_stg.MaskedModel`: substitution, freezing and the training step
    are the library's; this class adds the scores, their top-k mask with a
    straight-through gradient, and weight decay on the scores.

    Args:
        model: a built Keras 3 model; its weights are frozen (set them first,
            e.g. with `init_like_ours`).
        density: `k`, the share of each layer's weights kept (1 - sparsity).
        weight_decay: L2 coefficient on the scores (added to their gradient).
        seed: seed of the score initialisation.
    """

    def __init__(self, model, density=0.5, weight_decay=1e-4, seed=0, **kwargs):
        if not 0 < density <= 1:
            raise ValueError(f"`density` must be in (0, 1], got {density!r}.")
        kwargs.setdefault("name", f"edge_popup_{model.name}")
        super().__init__(model, freeze=True, **kwargs)
        self.density = float(density)
        #: How the mask is computed (`topk_mask`; `benchmarks.edge_popup_speed` swaps it).
        self.mask_fn = topk_mask
        self.weight_decay = float(weight_decay)
        rng = np.random.default_rng(seed)
        self.scores = []
        for i, t in enumerate(self.targets):
            bound = 1.0 / math.sqrt(t.fan_in)  # kaiming_uniform_(a=sqrt(5))
            value = rng.uniform(-bound, bound, tuple(t.variable.shape)).astype("float32")
            self.scores.append(
                self.add_weight(
                    name=f"score_{i}",
                    shape=tuple(t.variable.shape),
                    initializer=keras.initializers.Constant(value),
                    trainable=True,
                )
            )
        self.freeze_base()

    def masks(self):
        """Binary masks as NumPy arrays, one per kernel."""
        return [ops.convert_to_numpy(topk_mask(s.value, self.density)).astype(bool)
                for s in self.scores]

    def sparsity(self):
        """Share of kernel weights removed (exactly `1 - k` up to rounding per layer)."""
        total = sum(math.prod(s.shape) for s in self.scores)
        kept = sum(kept_count(math.prod(s.shape), self.density) for s in self.scores)
        return 1.0 - kept / total

    def masked_values(self, training=False):
        mapping = []
        for target, score in zip(self.targets, self.scores):
            s = score.value
            a = tf.abs(s)
            mask = self.mask_fn(s, self.density)
            # Straight-through: forward value `mask`, gradient of `|s|`.
            m = mask + a - tf.stop_gradient(a)
            kernel = target.variable.value
            mapping.append((target.variable, kernel * ops.cast(m, kernel.dtype)))
        return mapping

    def transform_gradients(self, gradients, variables):
        if not self.weight_decay:
            return gradients
        return [g + self.weight_decay * v.value for g, v in zip(gradients, variables)]


def init_like_ours(model, sparsity, seed=0, scale_fan=False):
    """Draws, in place, the frozen weights our `slt` run at `sparsity` starts from.

    `keras_stg.wrap(model, mode="slt", target_sparsity=sparsity, seed=seed,
    init_density="auto" if scale_fan else None)` re-draws the kernels with the
    library's default init (signed Kaiming constant, scaled by
    `1/sqrt(1 - sparsity)` with `scale_fan`, edge-popup's "scale fan-in"); the
    wrapper is dropped and the model keeps those weights, marked
    non-trainable. Whatever the library's defaults become, both methods then
    search the very same random network.
    """
    import keras_stg

    keras_stg.wrap(model, mode="slt", target_sparsity=sparsity, seed=seed,
                   init_density="auto" if scale_fan else None)
    return model


def sgd_cosine(learning_rate, total_steps, momentum=0.9):
    """SGD with momentum and cosine decay to 0 over `total_steps` (edge-popup's optimizer)."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, int(total_steps)))
    return keras.optimizers.SGD(schedule, momentum=momentum)
