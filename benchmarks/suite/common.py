"""Constants of the benchmark suite: tasks, their configs, the baselines' settings, --quick."""

import os
import time



REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BEGIN = "<!-- benchmarks.run:begin -->"
END = "<!-- benchmarks.run:end -->"
PARTS = ("frontier", "joint", "cost", "export", "seeds")
#: The parts a plain `python -m benchmarks.run` runs (`seeds` takes hours: ask for it).
DEFAULT_PARTS = PARTS[:4]
#: Markers of the `seeds` part's own generated section of RESULTS.md.
SEEDS_BEGIN = "<!-- benchmarks.seeds:begin -->"
SEEDS_END = "<!-- benchmarks.seeds:end -->"
#: `--only report`: no training, only the table, plots and section from results.json.
REPORT = "report"

#: name -> (model, dataset, title, default epochs)
TASKS = {
    "lenet_mnist": ("lenet_300_100", "mnist", "LeNet-300-100 / MNIST", 20),
    "conv4_fashion": ("conv4", "fashion_mnist", "Conv-4 / Fashion-MNIST", 20),
    "conv4_cifar10": ("conv4", "cifar10", "Conv-4 / CIFAR-10", 20),
    "conv4h_fashion": ("conv4", "fashion_mnist", "Conv-4 (half width) / Fashion-MNIST", 20),
}
#: Keyword arguments of a task's model builder besides shape and classes.
TASK_MODEL_ARGS = {"conv4h_fashion": {"width_factor": 0.5}}
#: The tasks a plain `python -m benchmarks.run` runs.
DEFAULT_TASKS = ("lenet_mnist", "conv4_fashion", "conv4_cifar10")
#: name -> (slt config, joint config or None) in configs/: ours runs with the
#: batch size, learning rate and scale-fan setting of the task's config (the
#: settings we recommend for it); the baselines get the same batch size, and
#: edge-popup the very same frozen weights.
TASK_CONFIGS = {
    "lenet_mnist": ("lenet_300_100_mnist_slt", "lenet_300_100_mnist_joint"),
    "conv4_fashion": ("conv4_fashion_mnist_slt", "conv4_fashion_mnist_joint"),
    "conv4_cifar10": ("conv4_cifar10_slt", None),
    "conv4h_fashion": ("conv4_fashion_mnist_slt", "conv4_fashion_mnist_joint"),
}
FRONTIER_SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.98)
JOINT_SPARSITIES = (0.9, 0.95)

# Edge-popup's paper settings (allenai/hidden-networks, configs/smallscale).
EP_LR = 0.1
# Adam learning rate of both joint-training methods (ours trains weights and
# gates with it, tfmot the weights): the usual rate for training weights.
JOINT_LR = 1e-3
EP_MOMENTUM = 0.9
EP_WEIGHT_DECAY = 1e-4

# --quick: train/test examples per task, epochs, sparsities.
QUICK = {"limit": {"lenet_300_100": 1024, "conv4": 256}, "test_limit": 500, "epochs": 1,
         "sparsities": (0.5, 0.9)}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _atomic_write_text(path, text):
    from keras_stg import _files

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _files.atomic_write_text(path, text)
