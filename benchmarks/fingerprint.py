"""A fingerprint of short, seeded training runs: run it on two commits and compare.

Usage:
    python -m benchmarks.fingerprint > after.json      # on each checkout, then diff

Trains LeNet-300-100 for two epochs on 512 fixed random images in each mode
(`slt` with a target, `joint` with a target and fine-tuning, `post_training`
with unit gates and a fixed lambda) and edge-popup at k=0.1, and prints one
JSON line: the sums of |mu| (|scores|) and |kernels|, the final lambda and
sparsity, and the per-epoch losses. A refactor that keeps the training step
keeps every number to the last digit.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_stg  # noqa: E402
from benchmarks.edge_popup import EdgePopupModel, init_like_ours, sgd_cosine  # noqa: E402
from keras_stg.experiments import models  # noqa: E402

RUNS = {
    "slt": {"mode": "slt", "target_sparsity": 0.9},
    "joint": {"mode": "joint", "target_sparsity": 0.8, "finetune": 0.5},
    "post_training": {"mode": "post_training", "lam": 0.3, "granularity": "unit"},
}


def _data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((512, 28, 28, 1)).astype("float32"),
            rng.integers(0, 10, 512))


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def main():
    x, y = _data()
    out = {}
    for name, options in RUNS.items():
        keras.utils.set_random_seed(0)
        gated = keras_stg.wrap(models.lenet_300_100((28, 28, 1)), seed=1, **options)
        gated.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_loss())
        history = gated.fit(x, y, batch_size=64, epochs=2, verbose=0, shuffle=False)
        out[name] = {"mu": float(sum(np.abs(g.mu.numpy()).sum() for g in gated.gates)),
                     "kernels": float(sum(np.abs(t.variable.numpy()).sum()
                                          for t in gated.targets)),
                     "lam": float(gated.lam.numpy()), "sparsity": gated.sparsity(),
                     "loss": history.history["loss"]}
    keras.utils.set_random_seed(0)
    model = init_like_ours(models.lenet_300_100((28, 28, 1)), 0.9, seed=0)
    ep = EdgePopupModel(model, density=0.1, weight_decay=1e-4, seed=0)
    ep.compile(optimizer=sgd_cosine(0.1, 16), loss=_loss())
    history = ep.fit(x, y, batch_size=64, epochs=2, verbose=0, shuffle=False)
    out["edge_popup"] = {"scores": float(sum(np.abs(s.numpy()).sum() for s in ep.scores)),
                         "loss": history.history["loss"]}
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
