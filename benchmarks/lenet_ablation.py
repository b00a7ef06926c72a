"""Controller and training ablation on LeNet-300-100 / MNIST (slt mode).

Usage:
    python -m benchmarks.lenet_ablation [--target 0.9] [--density 0.1] [--batch 64]
        [--relative 1] [--hmult 3] [--shape cosine] [--sigma 0.5] [--bound 1] ...

Development script behind the defaults of `keras_stg.wrap`: it trains one
gated LeNet-300-100 for 20 epochs with a variant of the lambda controller
(a `keras_stg.TargetSparsity` subclass: `--relative`: step
`rate*(1+|lam|)*error` instead of `rate*error`; `--hmult`: look-ahead in
epochs; `--shape`: target ramp cubic/cosine/linear), init
(`--density`: scale-fan) and optimisation (`--batch`, `--lr`, `--cosine`,
`--late`), prints one JSON line (test accuracy with the binary mask, final
sparsity, per-epoch validation accuracy, sparsity and lambda) and appends it
to `--log`. The library's controller also clamps the look-ahead to the steps
left in `fit`; this script does not. Runs of it are tabled in RESULTS.md.
"""
import argparse, json, os, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras
import keras_stg
from keras_stg import initializers as init_lib
from keras_stg.experiments import data, models
p = argparse.ArgumentParser(description="LeNet-300-100 controller ablation")
p.add_argument("--data-dir", default=os.environ.get("KERAS_STG_DATA", "../shared/data"))
p.add_argument("--log", default="benchmarks/lenet_ablation.jsonl")
p.add_argument("--target", type=float, default=0.9)
p.add_argument("--density", type=float, default=None)
p.add_argument("--sigma", type=float, default=0.5)
p.add_argument("--lr", type=float, default=0.01)
p.add_argument("--cosine", action="store_true")
p.add_argument("--rate", type=float, default=0.01)
p.add_argument("--ramp", type=float, default=0.5)
p.add_argument("--bound", type=float, default=1.0)
p.add_argument("--epochs", type=int, default=20)
p.add_argument("--init", default="signed_constant")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--tag", default="")
p.add_argument("--relative", type=int, default=1)
p.add_argument("--hmult", type=float, default=1.0)
p.add_argument("--late", type=float, default=0)
p.add_argument("--batch", type=int, default=128)
p.add_argument("--shape", default="cubic")
p.add_argument("--init-mu", type=float, default=0.5)
a = p.parse_args()
keras.utils.set_random_seed(a.seed)
train = data.dataset("mnist", "train", a.batch, a.data_dir, seed=a.seed)
test = data.dataset("mnist", "test", 1000, a.data_dir)
m = models.lenet_300_100(input_shape=(28, 28, 1))
from keras import ops
import math


class Variant(keras_stg.TargetSparsity):
    """The controller variant of the flags: gain, look-ahead and ramp shape."""

    def gain(self, lam):
        return (1.0 + ops.abs(lam)) if a.relative else 1.0

    def lookahead(self, state, iteration):  # not clamped to the end of fit
        return a.hmult * ops.cast(state.epoch_steps, "float32")

    def ramp_shape(self, t):
        if a.shape == "cubic":
            return 1.0 - (1.0 - t) ** 3
        if a.shape == "cosine":
            return 0.5 * (1.0 - ops.cos(math.pi * t))
        return t


penalty = Variant(a.target, rate=a.rate, ramp=a.ramp)
g = keras_stg.wrap(m, penalty=penalty, sigma=a.sigma, seed=a.seed, init=None,
                   init_mu=a.init_mu, mu_bound=a.bound)
init_lib.get(a.init)(g, seed=a.seed, density=a.density)
steps = -(-60000 // a.batch) * a.epochs
lr = keras.optimizers.schedules.CosineDecay(a.lr, steps) if a.cosine else a.lr
class Late(keras.optimizers.schedules.LearningRateSchedule):
    def __call__(self, step):
        import math
        start = (1 - a.late) * steps
        t = keras.ops.clip((keras.ops.cast(step, "float32") - start) / (a.late * steps), 0.0, 1.0)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + keras.ops.cos(math.pi * t)))
if a.late:
    lr = Late()
g.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
t = time.time()
h = g.fit(train, epochs=a.epochs, verbose=0, validation_data=test)
r = g.evaluate(test, verbose=0, return_dict=True)
out = dict(vars(a), acc=r["accuracy"], sparsity=g.sparsity(), time=time.time()-t,
           val=[round(v,4) for v in h.history["val_accuracy"]], sp=[round(v,4) for v in h.history["sparsity"]], lam=[round(v,3) for v in h.history["lam"]])
print(json.dumps(out))
os.makedirs(os.path.dirname(os.path.abspath(a.log)), exist_ok=True)
with open(a.log, "a") as f: f.write(json.dumps(out) + "\n")
