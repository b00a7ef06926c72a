"""`keras_stg.penalty`: fixed and target-sparsity schedules of the penalty weight."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_stg
from keras_stg import penalty as penalty_lib
from tests.helpers import mlp


class _State:
    """The variables a schedule acts on, as a GatedModel holds them."""

    def __init__(self, lam=0.5, total=100.0, epoch=10.0):
        self.lam = keras.Variable(lam)
        self.total_steps = keras.Variable(total)
        self.epoch_steps = keras.Variable(epoch)
        self.last_sparsity = keras.Variable(-1.0)
        self.sparsity_velocity = keras.Variable(0.0)


def test_target_ramps_along_a_half_cosine_then_holds():
    schedule = keras_stg.TargetSparsity(0.8, ramp=0.5)
    state = _State(total=100.0)
    values = [float(schedule.target_at(state, ops.convert_to_tensor(float(i))))
              for i in (0, 25, 50, 75, 100)]
    np.testing.assert_allclose(values, [0.0, 0.4, 0.8, 0.8, 0.8], atol=1e-6)
    flat = keras_stg.TargetSparsity(0.8, ramp=0.0)
    assert float(flat.target_at(state, 1.0)) == pytest.approx(0.8)


@pytest.mark.parametrize("density, direction", [(1.0, 1), (0.0, -1)])
def test_controller_raises_lambda_below_the_target_and_lowers_it_above(density, direction):
    schedule = keras_stg.TargetSparsity(0.5, ramp=0.0)
    state = _State(lam=0.5)
    for step in range(1, 4):
        schedule.update(state, ops.convert_to_tensor(density), float(step))
    assert direction * (float(state.lam.numpy()) - 0.5) > 0
    assert float(state.last_sparsity.numpy()) == 1.0 - density


def test_lambda_is_bounded():
    schedule = keras_stg.TargetSparsity(0.99, rate=1.0, ramp=0.0, horizon=0.0)
    state = _State(lam=penalty_lib.LAM_MAX)
    schedule.update(state, ops.convert_to_tensor(1.0), 1.0)
    assert float(state.lam.numpy()) == penalty_lib.LAM_MAX


def test_fixed_penalty_keeps_lambda_through_fit():
    gated = keras_stg.wrap(mlp(), lam=0.3, seed=0)
    gated.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).standard_normal((32, 6)).astype("float32")
    gated.fit(x, np.zeros((32, 3), "float32"), epochs=2, verbose=0)
    assert float(gated.lam.numpy()) == pytest.approx(0.3)
    assert gated.penalty == keras_stg.FixedPenalty(0.3)


@keras.saving.register_keras_serializable(package="tests")
class Linear(keras_stg.TargetSparsity):
    """A variant: a linear ramp and a constant gain."""

    def ramp_shape(self, t):
        return t

    def gain(self, lam):
        return 1.0


def test_a_subclassed_schedule_trains_saves_and_loads(tmp_path):
    schedule = Linear(0.6, ramp=0.5)
    assert float(schedule.target_at(_State(total=100.0), 25.0)) == pytest.approx(0.3)
    gated = keras_stg.wrap(mlp(), penalty=schedule, init_mu=0.5, seed=0)
    gated.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).standard_normal((32, 6)).astype("float32")
    gated.fit(x, np.zeros((32, 3), "float32"), epochs=2, batch_size=8, verbose=0)
    assert float(gated.lam.numpy()) != 1.0  # the controller ran
    path = str(tmp_path / "linear.keras")
    gated.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.penalty) is Linear and loaded.penalty == schedule
    assert float(loaded.lam.numpy()) == float(gated.lam.numpy())


@pytest.mark.parametrize("make, message", [
    (lambda: keras_stg.FixedPenalty(-1), "`lam` must be a number >= 0"),
    (lambda: keras_stg.TargetSparsity(1.0), "strictly between 0 and 1"),
    (lambda: keras_stg.TargetSparsity(0.5, rate=0), "`controller_rate` must be > 0"),
    (lambda: keras_stg.TargetSparsity(0.5, ramp=2), "`target_ramp` must be in \\[0, 1\\]"),
    (lambda: keras_stg.TargetSparsity(0.5, horizon=-1), "`controller_horizon` must be >= 0"),
    (lambda: keras_stg.TargetSparsity(0.5, error="relative"),
     "`controller_error` must be one of 'absolute', 'log_ratio', got 'relative'"),
    (lambda: keras_stg.wrap(mlp(), target_sparsity=0.5, controller_error="abs"),
     "`controller_error` must be one of"),
])
def test_bad_schedules_name_the_setting(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_log_ratio_error_weighs_a_miss_by_the_share_the_target_keeps():
    ratio = keras_stg.TargetSparsity(0.99, error="log_ratio")
    absolute = keras_stg.TargetSparsity(0.99, error="absolute")
    # A mask at 98% keeps twice the target's weights: log 2 against 0.01.
    assert float(ratio.error_of(0.99, 0.98)) == pytest.approx(np.log(2.0), rel=1e-5)
    assert float(absolute.error_of(0.99, 0.98)) == pytest.approx(0.01, rel=1e-5)
    # Same sign as the absolute error: positive below the target, negative past it.
    assert float(ratio.error_of(0.5, 0.6)) == pytest.approx(np.log(0.4 / 0.5), rel=1e-5)
    # Bounded, also for a predicted sparsity past 1 (extrapolated velocity).
    assert float(ratio.error_of(0.5, 1.2)) == -penalty_lib.LOG_RATIO_MAX
    assert float(ratio.error_of(0.999, 0.0)) == penalty_lib.LOG_RATIO_MAX
    assert keras_stg.TargetSparsity(0.5).error == penalty_lib.DEFAULT_ERROR == "log_ratio"


@pytest.mark.parametrize("error, within", [("log_ratio", 60), ("absolute", None)])
def test_a_mask_past_a_high_target_turns_lambda_negative_only_with_the_log_ratio(error, within):
    """At a 95% target a mask at 99.9% (the gates closing on their own) must get a reward
    for keeping weights soon; the absolute error (at most 0.05) takes hundreds of steps."""
    schedule = keras_stg.TargetSparsity(0.95, lam=1.0, rate=0.01, ramp=0.0, horizon=0.0,
                                        error=error)
    state = _State(lam=1.0, total=10_000.0, epoch=500.0)
    steps = None
    for step in range(1, 201):
        schedule.update(state, ops.convert_to_tensor(0.001), float(step))
        if float(state.lam.numpy()) < 0:
            steps = step
            break
    if within is None:
        assert steps is None
    else:
        assert steps is not None and steps <= within


def test_controller_error_travels_through_wrap_save_and_config(tmp_path):
    from keras_stg.experiments.config import Config

    gated = keras_stg.wrap(mlp(), target_sparsity=0.5, controller_error="absolute", seed=0)
    assert gated.penalty.error == "absolute"
    path = str(tmp_path / "g.keras")
    gated.save(path)
    assert keras.models.load_model(path).penalty.error == "absolute"
    # A controller saved before `error` existed trained with the absolute error.
    config = keras_stg.TargetSparsity(0.5).get_config()
    del config["error"]
    assert keras_stg.TargetSparsity.from_config(config).error == "absolute"
    with pytest.raises(ValueError, match="not both"):
        keras_stg.wrap(mlp(), penalty=keras_stg.TargetSparsity(0.5), controller_error="absolute")
    with pytest.raises(ValueError, match="controller_error"):
        Config(controller_error="ratio")
