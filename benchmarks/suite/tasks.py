"""Everything a benchmark training run needs: the `Setup` of a command line and the trainers
of ours and edge-popup."""

import os
import time

from benchmarks.suite.common import EP_MOMENTUM, QUICK, REPO, TASKS, TASK_CONFIGS


class Setup:
    """Everything a training run needs, derived once from the arguments."""

    def __init__(self, args):
        from keras_stg.experiments.config import Config

        defaults = Config()
        self.quick = args.quick
        self.data_dir = args.data_dir
        self.epochs = args.epochs
        self.limit = args.limit
        self.batch_override = args.batch_size
        self._configs = {}
        # The `cost` part times one batch of this size (the overhead benchmark's).
        self.batch_size = args.batch_size or defaults.batch_size
        self.learning_rate = defaults.learning_rate
        self.seed = args.seed
        self.verbose = 0 if args.quick else 2
        self.ep_lr = args.ep_lr
        self.ep_wd = args.ep_wd
        # Set by `main`: the command line and "started at, load, library state"
        # of this run, recorded in every task entry it creates.
        self.command = self.run_info = None

    def config(self, task, part="slt"):
        """The task's `Config` from configs/ (`part`: "slt" or "joint"; the slt
        one when the task has no joint config), read once."""
        from keras_stg.experiments import config

        slt, joint = TASK_CONFIGS[task]
        name = joint if part == "joint" and joint else slt
        if name not in self._configs:
            self._configs[name] = config.load(os.path.join(REPO, "configs", name + ".yaml"))
        return self._configs[name]

    def batch_for(self, task, part="slt"):
        return self.batch_override or self.config(task, part).batch_size

    def scale_fan(self, task):
        return bool(self.config(task).scale_fan)

    def epochs_for(self, task):
        if self.epochs is not None:
            return self.epochs
        return QUICK["epochs"] if self.quick else TASKS[task][3]

    def limits(self, task):
        """(training examples, test examples) of every run; None means all.

        `--limit` shortens training only: every method is still scored on the
        full test split."""
        if not self.quick:
            return self.limit, None
        return QUICK["limit"][TASKS[task][0]], QUICK["test_limit"]

    def title(self, task):
        """The task's name in the rows, with the training-set limit if any."""
        limit = self.limits(task)[0]
        return TASKS[task][2] + (f" (first {limit} training examples)"
                                 if limit and not self.quick else "")

    def datasets(self, task, part="slt"):
        from keras_stg.experiments import data

        _, dataset, _, _ = TASKS[task]
        limit, test_limit = self.limits(task)
        train = data.dataset(dataset, "train", self.batch_for(task, part), self.data_dir,
                             seed=self.seed, limit=limit)
        test = data.dataset(dataset, "test", 1000, self.data_dir, limit=test_limit)
        return train, test, int(train.cardinality())

    def build(self, task):
        from keras_stg.experiments import data, models

        model, dataset, _, _ = TASKS[task]
        shape, classes, _, _ = data.DATASETS[dataset]
        if model == "lenet_300_100":
            return models.lenet_300_100(input_shape=shape, classes=classes)
        return getattr(models, model)(input_shape=shape, classes=classes)


def _loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def train_ours(setup, task, sparsity, mode, train, test, prepare=None, learning_rate=None):
    """Our method with the library defaults; returns accuracy, sparsity, time, model.

    `prepare(model)`, if given, runs on the freshly built model before it is wrapped.
    The gates' start (`init_mu`) and the target ramp follow the task's config.
    Adam runs at `learning_rate` (default: the mode's task config's). In `slt` mode the
    weights get scale-fan when the task's config asks for it.
    """
    import keras

    import keras_stg

    keras.backend.clear_session()
    keras.utils.set_random_seed(setup.seed)
    model = setup.build(task)
    if prepare is not None:
        prepare(model)
    cfg = setup.config(task, "joint" if mode == "joint" else "slt")
    gated = keras_stg.wrap(model, mode=mode, target_sparsity=sparsity, seed=setup.seed,
                           init_density="auto" if mode == "slt" and cfg.scale_fan else None,
                           init_mu=cfg.init_mu, target_ramp=cfg.target_ramp,
                           finetune=cfg.finetune)
    gated.compile(optimizer=keras.optimizers.Adam(learning_rate or cfg.learning_rate),
                  loss=_loss(), metrics=["accuracy"])
    start = time.time()
    gated.fit(train, epochs=setup.epochs_for(task), verbose=setup.verbose)
    wall = time.time() - start
    acc = gated.evaluate(test, verbose=0, return_dict=True)["accuracy"]
    return {"accuracy": float(acc), "sparsity": gated.sparsity(), "wall_time_s": wall}, gated


def train_edge_popup(setup, task, sparsity, train, test, steps_per_epoch):
    import keras

    from benchmarks.edge_popup import EdgePopupModel, init_like_ours, sgd_cosine

    keras.backend.clear_session()
    keras.utils.set_random_seed(setup.seed)
    model = init_like_ours(setup.build(task), sparsity, seed=setup.seed,
                           scale_fan=setup.scale_fan(task))
    ep = EdgePopupModel(model, density=1.0 - sparsity, weight_decay=setup.ep_wd,
                        seed=setup.seed)
    epochs = setup.epochs_for(task)
    ep.compile(optimizer=sgd_cosine(setup.ep_lr, epochs * steps_per_epoch, EP_MOMENTUM),
               loss=_loss(), metrics=["accuracy"])
    start = time.time()
    ep.fit(train, epochs=epochs, verbose=setup.verbose)
    wall = time.time() - start
    acc = ep.evaluate(test, verbose=0, return_dict=True)["accuracy"]
    return {"accuracy": float(acc), "sparsity": ep.sparsity(), "wall_time_s": wall}


def task_available(setup, task):
    """None if the task's data can be loaded, else the reason it is skipped."""
    from keras_stg.experiments import data

    dataset = TASKS[task][1]
    try:
        data.load(dataset, "test", setup.data_dir)
    except Exception as e:  # DataError, or tensorflow-datasets failing offline
        return f"{dataset} not available ({str(e).splitlines()[0][:160]})"
    return None
