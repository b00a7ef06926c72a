"""`keras_stg.GateConfig`: validation, the automatic choices in one place, serialization."""

import keras
import numpy as np
import pytest

import keras_stg
from keras_stg import config as config_lib
from keras_stg import granularity
from tests.helpers import big_mlp


@pytest.mark.parametrize("options, init, init_mu, penalty", [
    ({}, "signed_constant", 0.5, keras_stg.FixedPenalty(1.0)),
    ({"target_sparsity": 0.9}, "signed_constant", "random",
     keras_stg.TargetSparsity(0.9, ramp=0.0)),
    ({"target_sparsity": 0.9, "granularity": "unit"}, "signed_constant", 0.5,
     keras_stg.TargetSparsity(0.9, ramp=0.4)),
    ({"mode": "joint", "target_sparsity": 0.9}, None, 0.5,
     keras_stg.TargetSparsity(0.9, ramp=0.4)),
    ({"mode": "post_training", "lam": 0.2}, None, 0.5, keras_stg.FixedPenalty(0.2)),
    ({"target_sparsity": 0.9, "init_mu": 0.5}, "signed_constant", 0.5,
     keras_stg.TargetSparsity(0.9, ramp=0.4)),
    ({"penalty": keras_stg.TargetSparsity(0.8, ramp=0.1)}, "signed_constant", "random",
     keras_stg.TargetSparsity(0.8, ramp=0.1)),
])
def test_resolve_makes_every_automatic_choice(options, init, init_mu, penalty):
    resolved = config_lib.from_keywords(**options).resolve()
    assert (resolved.init, resolved.init_mu, resolved.penalty) == (init, init_mu, penalty)
    assert resolved.resolve() == resolved  # nothing automatic is left


@pytest.mark.parametrize("options, polish", [
    ({}, 0.25), ({"target_sparsity": 0.9}, 0.25), ({"granularity": "unit"}, 0.0),
    ({"mode": "joint", "target_sparsity": 0.9}, 0.0), ({"mode": "post_training"}, 0.0),
    ({"polish": 0.1, "mode": "joint"}, 0.1), ({"polish": 0}, 0.0),
])
def test_polish_auto_polishes_slt_weight_gates_only(options, polish):
    assert config_lib.from_keywords(**options).resolve().polish == polish


@pytest.mark.parametrize("options, sigma", [
    ({}, 0.25), ({"target_sparsity": 0.99}, 0.25), ({"granularity": "unit"}, 0.5),
    ({"granularity": "block4"}, 0.5), ({"mode": "joint", "target_sparsity": 0.9}, 0.5),
    ({"mode": "post_training"}, 0.5), ({"sigma": 0.5}, 0.5),
    ({"sigma": 0.1, "mode": "joint"}, 0.1),
])
def test_sigma_auto_narrows_the_noise_of_slt_weight_gates_only(options, sigma):
    resolved = config_lib.from_keywords(**options).resolve()
    assert resolved.sigma == sigma
    gated = keras_stg.wrap(big_mlp(), seed=0, **options)
    assert {float(g.sigma) for g in gated.gates} == {sigma}


def test_a_config_saved_without_polish_loads_without_it():
    saved = keras_stg.GateConfig(target_sparsity=0.9).resolve().get_config()
    assert saved["polish"] == 0.25
    del saved["polish"]
    assert keras_stg.GateConfig.from_config(saved).resolve().polish == 0.0


def test_init_density_auto_follows_the_target():
    assert keras_stg.GateConfig(target_sparsity=0.75, init_density="auto").resolve() \
        .init_density == 0.25
    assert keras_stg.GateConfig(init_density="auto").resolve().init_density is None


def test_config_and_keyword_forms_build_the_same_model():
    config = keras_stg.GateConfig(penalty=keras_stg.TargetSparsity(0.9), seed=5)
    a = keras_stg.wrap(big_mlp(), config)
    b = keras_stg.wrap(big_mlp(), target_sparsity=0.9, seed=5)
    assert a.config == b.config
    for ga, gb, ta, tb in zip(a.gates, b.gates, a.targets, b.targets):
        np.testing.assert_array_equal(ga.mu.numpy(), gb.mu.numpy())
        np.testing.assert_array_equal(ta.variable.numpy(), tb.variable.numpy())


@pytest.mark.parametrize("call, error, message", [
    (lambda: keras_stg.wrap(big_mlp(), keras_stg.GateConfig(), seed=1), TypeError,
     "either a GateConfig or keyword options"),
    (lambda: keras_stg.wrap(big_mlp(), target_sparsity=0.9, colour="red"), TypeError,
     "Unknown option\\(s\\) colour"),
    (lambda: keras_stg.GateConfig(penalty=keras_stg.TargetSparsity(0.9), target_sparsity=0.5),
     ValueError, "disagree"),
    (lambda: config_lib.from_keywords(penalty=keras_stg.FixedPenalty(1.0), lam=2.0),
     ValueError, "either as `penalty=` or by its parts"),
    (lambda: keras_stg.GateConfig(penalty="strong"), ValueError, "`penalty` must be"),
    (lambda: keras_stg.GateConfig(mu_bound=0), ValueError, "`mu_bound` must be > 0"),
    (lambda: keras_stg.GateConfig(fused="yes"), ValueError, "`fused` must be"),
])
def test_bad_configs_name_the_problem(call, error, message):
    with pytest.raises(error, match=message):
        call()


class Rows(granularity.Granularity):
    """One gate per `rows` input rows of every output unit (a parametrized granularity)."""

    name = "rows"

    def __init__(self, rows=2):
        self.rows = rows

    def gate_shape(self, kernel_shape, out_axes, in_axes):
        return (-(-kernel_shape[0] // self.rows),) + tuple(kernel_shape[1:])

    def expand(self, gate, kernel_shape, out_axes, in_axes):
        return keras.ops.repeat(gate, self.rows, axis=0)[: kernel_shape[0]]

    def kept_weights(self, mask, kernel_shape, out_axes, in_axes):
        return keras.ops.sum(self.expand(mask, kernel_shape, out_axes, in_axes))

    def get_config(self):
        return {"rows": self.rows}


@pytest.fixture
def rows_registered():
    granularity.register_granularity("rows", Rows)
    yield
    granularity._REGISTRY.pop("rows")


def test_config_round_trips_with_a_custom_parametrized_granularity(tmp_path, rows_registered):
    config = keras_stg.GateConfig(granularity=Rows(5), target_sparsity=0.5, seed=0).resolve()
    again = keras_stg.GateConfig.from_config(config.get_config())
    assert again == config and again.granularity.rows == 5
    gated = keras_stg.wrap(big_mlp(), config)
    assert tuple(gated.gates[0].mu.shape) == (40, 100)
    gated.compile(optimizer="adam", loss="mse")
    path = str(tmp_path / "rows.keras")
    gated.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.granularity, Rows) and loaded.granularity.rows == 5
    x = np.random.default_rng(0).standard_normal((4, 200)).astype("float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), gated.predict(x, verbose=0))
