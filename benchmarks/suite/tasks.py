"""Everything a benchmark training run needs: the `Setup` of a command line and the trainers
of ours and edge-popup."""

import os
import time

from benchmarks.suite.common import EP_MOMENTUM, QUICK, REPO, TASK_CONFIGS, TASK_MODEL_ARGS, TASKS


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
        self.gate_sgd_lr = getattr(args, "gate_sgd_lr", None)
        flag = getattr(args, "scale_fan", None)
        self.scale_fan_override = None if flag is None else flag == "on"
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
        if self.scale_fan_override is not None:
            return self.scale_fan_override
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
        """`(train, test, steps per epoch)` of the task at this setup's seed. The training
        order is a function of the seed alone: `tf.data` draws a shuffle's order from
        its own seed and TensorFlow's global one, so the global seed is set to the
        run's first (a run used to see the order of the seed the process ran before)."""
        import keras

        from keras_stg.experiments import data

        keras.utils.set_random_seed(self.seed)
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
        return getattr(models, model)(input_shape=shape, classes=classes,
                                      **TASK_MODEL_ARGS.get(task, {}))


def _loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit(model, train, test, epochs, verbose, per_epoch):
    """Trains; returns the result dict (final test accuracy, wall time, and with
    `per_epoch` the test accuracy after every epoch, evaluated as Keras
    evaluates `validation_data`)."""
    start = time.time()
    history = model.fit(train, epochs=epochs, verbose=verbose,
                        validation_data=test if per_epoch else None)
    wall = time.time() - start
    acc = model.evaluate(test, verbose=0, return_dict=True)["accuracy"]
    r = {"accuracy": float(acc), "wall_time_s": wall, "epochs": epochs}
    if per_epoch:
        r["epoch_accuracy"] = [float(a) for a in history.history["val_accuracy"]]
    return r


def train_ours(setup, task, sparsity, mode, train, test, prepare=None, learning_rate=None,
               epochs=None, optimizer=None, wrap=None, per_epoch=False):
    """Our method with the library defaults; returns accuracy, sparsity, time, model.

    `prepare(model)`, if given, runs on the freshly built model before it is wrapped.
    The gates' start (`init_mu`) and the target ramp follow the task's config.
    Adam runs at `learning_rate` (default: the mode's task config's). In `slt` mode the
    weights get scale-fan when the task's config asks for it. Variants
    (`benchmarks.suite.variants`) replace `epochs`, the `optimizer` (a function of
    the total steps) or `wrap` (a function with `keras_stg.wrap`'s signature).
    """
    import keras

    import keras_stg

    keras.backend.clear_session()
    keras.utils.set_random_seed(setup.seed)
    model = setup.build(task)
    if prepare is not None:
        prepare(model)
    cfg = setup.config(task, "joint" if mode == "joint" else "slt")
    gated = (wrap or keras_stg.wrap)(
        model, mode=mode, target_sparsity=sparsity, seed=setup.seed,
        init_density="auto" if mode == "slt" and setup.scale_fan(task) else None,
        init_mu=cfg.init_mu, target_ramp=cfg.target_ramp, finetune=cfg.finetune)
    epochs = epochs or setup.epochs_for(task)
    opt = (optimizer(epochs * int(train.cardinality())) if optimizer is not None
           else keras.optimizers.Adam(learning_rate or cfg.learning_rate))
    gated.compile(optimizer=opt, loss=_loss(), metrics=["accuracy"])
    r = _fit(gated, train, test, epochs, setup.verbose, per_epoch)
    r["sparsity"] = gated.sparsity()
    return r, gated


def train_edge_popup(setup, task, sparsity, train, test, steps_per_epoch, per_epoch=False):
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
    r = _fit(ep, train, test, epochs, setup.verbose, per_epoch)
    r["sparsity"] = ep.sparsity()
    return r


def task_available(setup, task):
    """None if the task's data can be loaded, else the reason it is skipped."""
    from keras_stg.experiments import data

    dataset = TASKS[task][1]
    try:
        data.load(dataset, "test", setup.data_dir)
    except Exception as e:  # DataError, or tensorflow-datasets failing offline
        return f"{dataset} not available ({str(e).splitlines()[0][:160]})"
    return None
