"""Experiment configuration: a dataclass mapped 1:1 onto a YAML file."""

import dataclasses
import typing

import yaml


@dataclasses.dataclass
class Config:
    """One experiment. Every field can be set in YAML or with `--set key=value`.

    Attributes:
        name: experiment name (used for output folders).
        dataset: `mnist`, `fashion_mnist`, `cifar10` or `cifar100`.
        model: `lenet_300_100`, `conv4` or `conv6`.
        mode: `slt`, `post_training` or `joint`.
        granularity: `weight`, `unit`, `block4`, ...
        target_sparsity: sparsity the adaptive lambda aims for (None: fixed lam).
        lam: fixed lambda, or the adaptive lambda's start.
        sigma: gate noise scale.
        init: SLT initialisation (`signed_constant`, `kaiming_normal`, ...).
        epochs, batch_size, learning_rate: optimisation (Adam on the gates).
        seed: seed of init, gate noise and shuffling.
        limit: use only the first `limit` training examples (quick runs).
    """

    name: str = "experiment"
    dataset: str = "mnist"
    model: str = "lenet_300_100"
    mode: str = "slt"
    granularity: str = "weight"
    target_sparsity: typing.Optional[float] = 0.9
    lam: float = 1.0
    sigma: float = 0.5
    init: typing.Optional[str] = "signed_constant"
    epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 0.01
    seed: int = 0
    limit: typing.Optional[int] = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type is int and not isinstance(value, int):
                raise ValueError(f"Config key {field.name!r} must be an integer, got {value!r}.")
            if field.type is float and isinstance(value, int):
                setattr(self, field.name, float(value))
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("Config keys 'epochs' and 'batch_size' must be >= 1.")


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
    return Config(**data)
