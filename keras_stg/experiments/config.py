"""Experiment configuration: a dataclass mapped 1:1 onto a YAML file.

Every key of a YAML file in `configs/` is a field of `Config`; unknown keys and
values of the wrong type are errors that name the key.
"""

import dataclasses
import typing

import yaml

from keras_stg.config import COSTS, MODES


@dataclasses.dataclass
class Config:
    """One experiment. Every field can be set in YAML or with `--set key=value`.

    Attributes:
        name: experiment name (used for output folders).
        dataset: `mnist`, `fashion_mnist`, `cifar10` or `cifar100`.
        model: `lenet_300_100`, `conv4`, `conv6`, `resnet50`, `wide_resnet50`,
            `vit` or `swin_t` (see `keras_stg.experiments.models.MODELS`).
        model_args: extra keyword arguments of the model builder (e.g.
            `{patch_size: 4}` for `vit`, `{width_factor: 2}` for ResNets).
        image_size: resize images to `image_size` x `image_size` (ImageNet-style
            backbones); None keeps the dataset's size.
        channels: repeat grayscale channels up to this count (e.g. 3).
        mode: `slt`, `post_training` or `joint`.
        granularity: `weight`, `unit`, `block4`, ...
        exclude: layer names or regexes left ungated (e.g. `[fc3]`).
        target_sparsity: sparsity the adaptive lambda aims for (None: fixed lam).
        target_ramp: share of the gate phase's steps over which the target ramps up
            (null: 0 when the gates start random, else 0.4).
        controller_horizon: the lambda controller's look-ahead, in epochs.
        controller_rate: the lambda controller's gain per step (null: the
            library's default, `keras_stg.penalty.DEFAULT_RATE`).
        controller_error: the lambda controller's error, `absolute` or `log_ratio`
            (null: the library's default); see `keras_stg.TargetSparsity`.
        finetune: `joint` mode: share of the training steps at the end during
            which the mask is frozen at the target and only the weights train
            (0: none).
        polish: share of the gate phase's last steps that train the gates
            through their binary mask, their rate decaying to 0 (0: none;
            `auto`: 0.25 in `slt` mode with `weight` gates, else 0); see
            `keras_stg.GateConfig`.
        cost: what `target_sparsity` counts: `params` (kernel weights) or
            `flops` (multiply-adds per example).
        channel_multiple: `channel` gates: the mask frozen for `finetune` keeps each
            group's channels in multiples of this many.
        gate_lr: the gates' learning rate as a multiple of `learning_rate`
            (`joint` mode: the weights keep `learning_rate`).
        lam: fixed lambda, or the adaptive lambda's start.
        sigma: gate noise scale (`auto`: 0.25 in `slt` mode with `weight` gates,
            else 0.5, the paper's); see `keras_stg.GateConfig`.
        init_mu: initial gate locations: a number (0.5: every gate fully
            open), `random` (a random mask at the target sparsity) or `auto`
            (`random` in `slt` mode with a target and weight gates, else 0.5).
        init: SLT initialisation (`signed_constant`, `kaiming_normal`, ...);
            used in `slt` mode only.
        scale_fan: scale the `init` weights by `1/sqrt(1 - target_sparsity)`
            (edge-popup's scale-fan; `wrap(init_density="auto")`). Helps
            shallow MLPs; on deep nets without normalisation it blows up the
            activations of the initial, dense network.
        epochs, batch_size, learning_rate: optimisation (Adam on the gates,
            and on the weights too in `joint` mode).
        pretrain_epochs: `post_training` only: first train the dense model
            for this many epochs with plain `keras.Model.fit` (Adam,
            `pretrain_learning_rate`), then freeze it and learn the gates.
        pretrain_learning_rate: learning rate of that pre-training.
        pretrained: `post_training` only: path of a trained `.keras` model to
            gate instead of pre-training one (same architecture and input).
        seed: seed of init, gate noise and the data order.
        limit: use only the first `limit` training examples (quick runs).
        test_limit: use only the first `test_limit` test examples.
        eval_batch_size: batch size of evaluation.
    """

    name: str = "experiment"
    dataset: str = "mnist"
    model: str = "lenet_300_100"
    model_args: dict = dataclasses.field(default_factory=dict)
    image_size: typing.Optional[int] = None
    channels: typing.Optional[int] = None
    mode: str = "slt"
    granularity: str = "weight"
    exclude: typing.Optional[list] = None
    target_sparsity: typing.Optional[float] = 0.9
    target_ramp: typing.Optional[float] = None
    controller_horizon: float = 3.0
    controller_rate: typing.Optional[float] = None
    controller_error: typing.Optional[str] = None
    finetune: float = 0.0
    polish: typing.Union[float, str] = "auto"
    cost: str = "params"
    gate_lr: float = 1.0
    channel_multiple: int = 1
    lam: float = 1.0
    sigma: typing.Union[float, str] = "auto"
    init_mu: typing.Union[float, str] = "auto"
    init: typing.Optional[str] = "signed_constant"
    scale_fan: bool = False
    epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 0.01
    pretrain_epochs: int = 0
    pretrain_learning_rate: float = 0.001
    pretrained: typing.Optional[str] = None
    seed: int = 0
    limit: typing.Optional[int] = None
    test_limit: typing.Optional[int] = None
    eval_batch_size: int = 1000

    def gate_config(self):
        """The `keras_stg.GateConfig` of this experiment (the YAML keys of the gates)."""
        from keras_stg import config as gate_config

        return gate_config.from_keywords(
            mode=self.mode, granularity=self.granularity, lam=self.lam,
            target_sparsity=self.target_sparsity, target_ramp=self.target_ramp,
            controller_horizon=self.controller_horizon, controller_rate=self.controller_rate,
            controller_error=self.controller_error, sigma=self.sigma, exclude=self.exclude,
            init=self.init if self.mode == "slt" else None, init_mu=self.init_mu,
            init_density="auto" if self.scale_fan else None, seed=self.seed,
            finetune=self.finetune, polish=self.polish, cost=self.cost, gate_lr=self.gate_lr,
            channel_multiple=self.channel_multiple)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            setattr(self, field.name, _check_type(field.name, field.type, getattr(self, field.name)))
        from keras_stg.experiments import data, models

        def choice(key, options):
            if getattr(self, key) not in options:
                raise ValueError(
                    f"Config key {key!r} must be one of {', '.join(sorted(options))}, "
                    f"got {getattr(self, key)!r}.")

        choice("dataset", data.DATASETS)
        choice("model", models.MODELS)
        choice("mode", MODES)
        choice("cost", COSTS)
        if self.controller_error is not None:
            from keras_stg.penalty import ERRORS

            choice("controller_error", ERRORS)
        if isinstance(self.init_mu, str) and self.init_mu not in ("auto", "random"):
            raise ValueError(
                f"Config key 'init_mu' must be a number, 'auto' or 'random', got {self.init_mu!r}.")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"Config key {key!r} must be >= 1, got {getattr(self, key)!r}.")
        for key in ("limit", "test_limit", "image_size", "channels"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"Config key {key!r} must be >= 1 or null, got {getattr(self, key)!r}.")
        if self.pretrain_epochs < 0:
            raise ValueError("Config key 'pretrain_epochs' must be >= 0.")
        if self.mode != "post_training" and (self.pretrain_epochs or self.pretrained):
            raise ValueError(
                "Config keys 'pretrain_epochs' and 'pretrained' apply to mode "
                f"'post_training' only; this config has mode {self.mode!r}.")
        if self.mode == "post_training" and not self.pretrain_epochs and not self.pretrained:
            raise ValueError(
                "Mode 'post_training' gates a trained model: set 'pretrain_epochs' "
                "(train the dense model first) or 'pretrained' (path of a trained "
                ".keras model).")
        if self.pretrain_epochs and self.pretrained:
            raise ValueError("Set either 'pretrain_epochs' or 'pretrained', not both.")


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "a mapping",
               list: "a list"}


def _check_type(key, annotation, value):
    """Checks (and lightly coerces) `value` against a field's annotation."""
    choices = [annotation]
    optional = False
    if typing.get_origin(annotation) is typing.Union:
        if value is None and type(None) in typing.get_args(annotation):
            return None
        choices = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(choices) < len(typing.get_args(annotation))
    for choice in choices:
        if choice is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if choice is list and isinstance(value, (str, tuple)):
            return [value] if isinstance(value, str) else list(value)
        if isinstance(value, choice) and not (
                choice in (int, float) and isinstance(value, bool)):
            return value
    names = " or ".join(_TYPE_NAMES.get(c, c.__name__) for c in choices)
    raise ValueError(
        f"Config key {key!r} must be {names}{' or null' if optional else ''}, got {value!r}.")


def _parse_value(text):
    return yaml.safe_load(text)


def load(path=None, overrides=()):
    """Reads a YAML file and `key=value` overrides into a `Config`.

    Unknown keys are an error that names the key and lists the valid ones.
    """
    data = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}.")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}.")
        key, value = item.split("=", 1)
        data[key.strip()] = _parse_value(value)
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"Unknown config key {unknown[0]!r}"
            + (f" in {path}" if path else "")
            + f". Valid keys: {', '.join(sorted(known))}."
        )
    try:
        return Config(**data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path else str(e)) from None
