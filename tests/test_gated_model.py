"""`keras_stg.GatedModel`: gate start, the penalty in training, mask freezing, saving."""

import keras
import numpy as np
import pytest

import keras_stg
from tests import helpers
from tests.helpers import big_mlp, mlp



def test_batchnorm_statistics_follow_masked_network_weights_frozen():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="d")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="o")(x))
    gated = keras_stg.wrap(model, mode="post_training", lam=0.0, seed=0)
    bn = model.get_layer("bn")
    gamma, mean = bn.gamma.numpy().copy(), bn.moving_mean.numpy().copy()
    x = np.random.default_rng(0).standard_normal((32, 4)).astype("float32") + 3.0
    gated.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    gated.fit(x, np.zeros(32, "int32"), epochs=2, verbose=0)
    np.testing.assert_array_equal(bn.gamma.numpy(), gamma)
    assert not np.allclose(bn.moving_mean.numpy(), mean)


def test_target_sparsity_controller_moves_lambda_both_ways():
    x = np.random.default_rng(0).standard_normal((64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    # All gates open (sparsity 0) with a high target: lambda must rise; all
    # closed (sparsity 1) with a low target: it must fall.
    for target, init_mu, direction in ((0.95, 0.5, 1), (0.05, -0.2, -1)):
        gated = keras_stg.wrap(
            mlp(), target_sparsity=target, lam=0.5, init_mu=init_mu, seed=0, target_ramp=0
        )
        gated.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        gated.fit(x, y, epochs=3, batch_size=16, verbose=0)
        assert direction * (float(gated.lam.numpy()) - 0.5) > 0, target


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_slt_with_a_target_starts_from_a_random_mask_at_the_target(target):
    gated = keras_stg.wrap(big_mlp(), target_sparsity=target, seed=4)
    assert gated.penalty.ramp == 0.0  # already at the target: nothing to ramp
    for gate in gated.gates:
        mu = gate.mu.numpy()
        assert -1.0 <= mu.min() and mu.max() <= 1.0  # inside the bound
        # A random subnetwork in every layer, near the target's density.
        assert abs((mu > 0).mean() - (1 - target)) < 0.03
        assert len(np.unique(mu)) > mu.size // 2
    assert abs(gated.sparsity() - target) < 0.01
    again = keras_stg.wrap(big_mlp(), target_sparsity=target, seed=4)
    for a, b in zip(gated.gates, again.gates):
        np.testing.assert_array_equal(a.mu.numpy(), b.mu.numpy())
    # Gate tensors are drawn independently of each other.
    a, b = (g.mu.numpy().ravel()[:1000] for g in gated.gates)
    assert not np.array_equal(a, b[: a.size])


@pytest.mark.parametrize("kwargs", [
    {"mode": "joint", "target_sparsity": 0.9},  # a trained or training network starts whole
    {"mode": "post_training", "target_sparsity": 0.9},
    {"lam": 1.0},  # no target to start at
    {"target_sparsity": 0.9, "init_mu": 0.5},
    {"target_sparsity": 0.5, "granularity": "unit"},  # measured better from the whole net
])
def test_dense_start_otherwise(kwargs):
    gated = keras_stg.wrap(big_mlp(), seed=0, **kwargs)
    assert gated.sparsity() == 0.0
    if "target_sparsity" in kwargs:
        assert gated.penalty == keras_stg.TargetSparsity(kwargs["target_sparsity"], ramp=0.4)
    else:
        assert gated.penalty == keras_stg.FixedPenalty(1.0)
    for gate in gated.gates:
        np.testing.assert_array_equal(gate.mu.numpy(), 0.5)


def test_random_start_on_request_and_ramp_override():
    gated = keras_stg.wrap(big_mlp(), mode="joint", target_sparsity=0.8, init_mu="random",
                           target_ramp=0.3, seed=0)
    assert abs(gated.sparsity() - 0.8) < 0.02
    assert gated.penalty.ramp == 0.3


def test_random_start_survives_save_and_load(tmp_path):
    gated = keras_stg.wrap(big_mlp(), target_sparsity=0.9, seed=1)
    gated.compile(optimizer="adam", loss="mse")
    path = str(tmp_path / "g.keras")
    gated.save(path)
    loaded = keras.models.load_model(path)
    # The resolved config is saved: the loaded model does what the first one did.
    assert loaded.config == gated.config
    assert loaded.config.init_mu == "random" and loaded.penalty.ramp == 0.0
    for a, b in zip(gated.gates, loaded.gates):
        np.testing.assert_array_equal(a.mu.numpy(), b.mu.numpy())
    assert loaded.sparsity() == gated.sparsity()


def test_freeze_mask_keeps_exactly_the_target_with_the_largest_mu():
    gated = keras_stg.wrap(big_mlp(), mode="joint", target_sparsity=0.7, init_mu="random",
                           seed=2, finetune=0.5)
    mus = np.concatenate([g.mu.numpy().ravel() for g in gated.gates])
    assert abs(gated.sparsity() - 0.7) > 1e-4  # the random start is only near the target
    gated.freeze_mask()
    kept = np.concatenate([g.mask().ravel() for g in gated.gates]).astype(bool)
    assert kept.sum() == round(0.3 * mus.size)
    assert mus[kept].min() >= mus[~kept].max()  # the largest mu are kept
    frozen = np.concatenate([g.mu.numpy().ravel() for g in gated.gates])
    np.testing.assert_array_equal(np.abs(frozen), 1.0)  # saturated at the bound
    assert not any(g.mu.trainable for g in gated.gates)
    assert float(gated.mask_frozen.numpy()) == 1.0
    gated.freeze_mask()  # idempotent
    again = np.concatenate([g.mask().ravel() for g in gated.gates]).astype(bool)
    np.testing.assert_array_equal(kept, again)


def test_the_controller_plans_for_the_gate_phase_not_the_whole_fit():
    # With `finetune` the mask freezes after the gate phase: the target's ramp must
    # end and the look-ahead stop there, so the gates reach the target before it.
    keras.utils.set_random_seed(0)
    x = np.random.normal(size=(64, 200)).astype("float32")
    y = np.random.randint(0, 10, size=64)
    for finetune, gate_steps in ((0.0, 16), (0.5, 8), (0.7, 5)):  # of 4 epochs x 4 steps
        gated = keras_stg.wrap(big_mlp(), mode="joint", target_sparsity=0.8, seed=0,
                               finetune=finetune, init_mu=0.5)
        gated.compile(optimizer="adam",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        gated.fit(x, y, batch_size=16, epochs=4, verbose=0)
        assert float(gated.total_steps.numpy()) == gate_steps
        # The ramp (0.4 of the gate phase) is over by the end of the gate phase
        # (with the whole fit as its span, 5 gate steps of 16 ended it at 0.55).
        assert float(gated.current_target(float(gate_steps))) == pytest.approx(0.8)
        assert float(gated.current_target(gate_steps * 0.2)) < 0.6


def test_finetune_freezes_the_mask_mid_epoch_at_its_share_of_the_steps():
    # 2 epochs of 8 steps, finetune 0.8: the gates train for round(0.2 * 16) = 3 steps.
    keras.utils.set_random_seed(0)
    x = np.random.normal(size=(128, 200)).astype("float32")
    y = np.random.randint(0, 10, size=128)
    gated = keras_stg.wrap(big_mlp(), mode="joint", target_sparsity=0.5, seed=0,
                           finetune=0.8, init_mu=0.5)
    gated.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    mus, frozen = [], []

    class Snapshot(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            mus.append(np.concatenate([g.mu.numpy().ravel() for g in gated.gates]))
            frozen.append(float(gated.mask_frozen.numpy()))

    gated.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[Snapshot()])
    assert len(mus) == 16
    moved = [not np.array_equal(a, b) for a, b in zip(mus, mus[1:])]
    assert frozen == [0.0] * 3 + [1.0] * 13  # frozen before step 4, in the first epoch
    assert moved[:2] == [True, True]  # steps 2 and 3 trained the gates
    assert not any(moved[3:])  # from step 4 on they stay where the freeze put them
    assert gated.sparsity() == pytest.approx(0.5, abs=0.01)
    assert float(gated.total_steps.numpy()) == 3


def test_finetune_freezes_the_mask_and_trains_the_weights_under_it(tmp_path):
    keras.utils.set_random_seed(0)
    x = np.random.normal(size=(256, 200)).astype("float32")
    y = np.random.randint(0, 10, size=256)
    gated = keras_stg.wrap(big_mlp(), mode="joint", target_sparsity=0.8, seed=0,
                           finetune=0.34)  # the last 1 of 3 epochs
    gated.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = {}

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen[epoch] = ([g.mu.numpy().copy() for g in gated.gates],
                           [t.variable.numpy().copy() for t in gated.targets],
                           float(gated.lam.numpy()))

    gated.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[Snapshot()])
    mus_1 = seen[1][0]
    mus_2, kernels_2, lam_2 = seen[2]
    assert any(not np.array_equal(a, b) for a, b in zip(mus_1, mus_2))  # gates trained
    # Frozen at the start of the last epoch at exactly 80%, then left alone.
    assert gated.sparsity() == pytest.approx(0.8, abs=1e-4)
    for a, g in zip(mus_2, gated.gates):
        np.testing.assert_array_equal(a, g.mu.numpy())
    assert float(gated.lam.numpy()) == lam_2
    # The weights kept training, and the stripped model is the frozen mask.
    assert any(not np.array_equal(a, t.variable.numpy())
               for a, t in zip(kernels_2, gated.targets))
    np.testing.assert_allclose(gated.strip().predict(x[:8], verbose=0),
                               gated.predict(x[:8], verbose=0), rtol=1e-5, atol=1e-5)
    assert gated.get_config()["config"]["finetune"] == 0.34
    # A saved and reloaded model (as a resumed run) stays frozen in its next fit.
    path = str(tmp_path / "frozen.keras")
    gated.save(path)
    loaded = keras.models.load_model(path)
    assert float(loaded.mask_frozen.numpy()) == 1.0
    before = [g.mu.numpy().copy() for g in loaded.gates]
    kernels = [t.variable.numpy().copy() for t in loaded.targets]
    loaded.fit(x, y, batch_size=32, epochs=1, verbose=0)
    for a, g in zip(before, loaded.gates):
        np.testing.assert_array_equal(a, g.mu.numpy())
    assert any(not np.array_equal(a, t.variable.numpy())
               for a, t in zip(kernels, loaded.targets))


class Unregistered(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)


def test_loading_a_wrap_of_an_unregistered_subclassed_model_names_the_fix(tmp_path):
    model = Unregistered(name="mine")
    model(np.zeros((1, 4), "float32"))
    gated = keras_stg.wrap(model, seed=0)
    gated(np.zeros((1, 4), "float32"))
    path = str(tmp_path / "u.keras")
    gated.save(path)
    with pytest.raises(ValueError, match="^Could not rebuild the model that 'gated_mine' wraps, "
                                         "of class 'Unregistered'.*register_keras_serializable"):
        keras.models.load_model(path)
    loaded = keras.models.load_model(path, custom_objects={"Unregistered": Unregistered})
    np.testing.assert_array_equal(loaded.masks()[0], gated.masks()[0])


def test_a_config_saved_before_gate_config_still_loads():
    """Files written by keras_stg 0.1 stored the options as flat keywords (and trained
    with the absolute controller error, the only one then, and without polish)."""
    gated = keras_stg.wrap(big_mlp(), target_sparsity=0.9, seed=1, controller_error="absolute",
                           controller_rate=0.01, polish=0.0, sigma=0.5)
    old = {"name": gated.name, "model": keras.saving.serialize_keras_object(big_mlp()),
           "mode": "slt", "granularity": "weight", "lam": 1.0, "target_sparsity": 0.9,
           "sigma": 0.5, "include": None, "exclude": None, "init_mu": "auto", "mu_bound": 1.0,
           "seed": 1, "controller_rate": 0.01, "target_ramp": 0.0, "controller_horizon": 3.0,
           "fused": "auto", "finetune": 0.0}
    loaded = keras_stg.GatedModel.from_config(old)
    assert loaded.config == gated.config


def test_flops_cost_weighs_each_weight_by_its_multiply_adds():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)  # 108 weights x 64
    outputs = keras.layers.Dense(2, name="fc")(keras.layers.Flatten()(x))  # 512 weights x 1
    model = keras.Model(inputs, outputs)
    params = keras_stg.wrap(model, seed=0, mode="post_training")
    flops = keras_stg.wrap(keras.models.clone_model(model), seed=0, mode="post_training",
                           cost="flops")
    for gated in (params, flops):
        gated.gates[0].mu.assign(np.full(gated.gates[0].mu.shape, -0.5, "float32"))  # conv off
    assert params.sparsity() == pytest.approx(108 / 620)
    assert flops.sparsity() == pytest.approx(108 * 64 / (108 * 64 + 512))
    assert flops.get_config()["config"]["cost"] == "flops"
    with pytest.raises(ValueError, match="Unknown cost 'macs'"):
        keras_stg.wrap(keras.models.clone_model(model), cost="macs")


def _attention_model(tokens=16, dim=32):
    inputs = keras.Input((tokens, dim))
    x = keras.layers.Dense(dim, name="embed")(inputs)
    x = keras.layers.Add()([x, keras.layers.MultiHeadAttention(4, dim // 4, name="mha")(x, x)])
    outputs = keras.layers.Dense(2, name="fc")(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_flops_cost_counts_layers_called_inside_another_layer(granularity):
    # MultiHeadAttention calls its four projections inside its own call: the
    # graph holds no node for them; one pass on zeros finds their shapes.
    gated = keras_stg.wrap(_attention_model(), granularity=granularity, cost="flops", seed=0)
    cost = dict(zip([t.name for t in gated.targets], gated._unit_cost))
    assert len(cost) == 6 and cost["fc"] == 1
    assert all(v == 16 for k, v in cost.items() if k != "fc")  # once per token
    macs = {r["name"]: r["macs"] for r in keras_stg.report.layer_stats(gated)}
    assert macs["mha/query"] == 32 * 32 * 16 and macs["embed"] == 32 * 32 * 16


def test_summary_counts_the_multiply_adds_of_a_keras_hub_vit():
    gated = keras_stg.wrap(helpers.vit(), seed=0)
    macs = [r["macs"] for r in keras_stg.report.layer_stats(gated)]
    # Hand count: 4x4x3x16 patch kernel at 16 patches; per block, q/k/v/output 16x16
    # and the MLP 16x32 and 32x16 at 17 tokens; the 16x10 head once.
    assert sum(macs) == 768 * 16 + 2 * 17 * (4 * 256 + 2 * 512) + 160


def test_flops_cost_with_channel_gates_lands_the_controller_on_multiply_adds():
    gated = keras_stg.wrap(helpers.tiny_mobilenet_v2(), mode="joint", granularity="channel",
                           target_sparsity=0.4, cost="flops", init_mu="random", seed=0,
                           finetune=0.5)
    gated.freeze_mask()
    stats = keras_stg.layer_stats(gated)
    kept = sum(r["kept_macs"] for r in stats) / sum(r["macs"] for r in stats)
    assert 1 - kept == pytest.approx(gated.sparsity(), abs=1e-6)
    assert gated.sparsity() == pytest.approx(0.4, abs=0.03)


def _polish_fit(gated, x, y, epochs=2, batch_size=16):
    """Fits `gated`, recording per step: polishing?, the gate-rate factor, the gates' mu."""
    gated.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = {"polishing": [], "rate": [], "mu": [], "same": [], "sparsity": [],
            "velocity": [], "last": []}
    probe = x[:8]

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen["polishing"].append(gated._polishing)
            seen["rate"].append(float(gated.polish_rate.numpy()))
            seen["sparsity"].append(gated.sparsity())
            seen["velocity"].append(float(gated.sparsity_velocity.numpy()))
            seen["last"].append(float(gated.last_sparsity.numpy()))
            # During the polish the training forward is the binary-mask network.
            seen["same"].append(bool(np.array_equal(
                keras.ops.convert_to_numpy(gated(probe, training=True)),
                keras.ops.convert_to_numpy(gated(probe, training=False)))))

        def on_train_batch_end(self, batch, logs=None):
            seen["mu"].append(np.concatenate([g.mu.numpy().ravel() for g in gated.gates]))

    gated.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[Record()])
    return seen


def test_polish_trains_the_gates_through_the_binary_mask_at_a_decaying_rate(tmp_path):
    # 2 epochs of 8 steps, polish 0.25: steps 13-16 (positions 12-15) polish.
    keras.utils.set_random_seed(0)
    x = np.random.normal(size=(128, 200)).astype("float32")
    y = np.random.randint(0, 10, size=128)
    gated = keras_stg.wrap(big_mlp(), target_sparsity=0.5, seed=0, polish=0.25)
    seen = _polish_fit(gated, x, y)
    assert seen["polishing"] == [False] * 12 + [True] * 4
    assert seen["same"] == [False] * 12 + [True] * 4  # relaxed (noisy) gates before
    # A half cosine over the 4 polish steps, from the full rate down.
    np.testing.assert_allclose(seen["rate"][12:], [0.5 * (1 + np.cos(np.pi * t / 4))
                                                   for t in range(4)], rtol=1e-6)
    assert seen["rate"][:12] == [1.0] * 12
    # The polish starts from the mask set to exactly the target (to one gate),
    # and the controller does not take the jump for the mask's velocity.
    assert seen["sparsity"][12] == pytest.approx(0.5, abs=1.0 / 2e4)
    assert seen["velocity"][12] == 0.0 and seen["last"][12] == seen["sparsity"][12]
    # The gates still train during the polish, less far as the rate decays
    # (Adam's step is about the rate).
    steps = [np.abs(b - a).max() for a, b in zip(seen["mu"], seen["mu"][1:])]
    assert all(s > 0 for s in steps)
    assert steps[-1] < 0.3 * steps[10]
    # Saved state is the same as without polish (files from before it load), and
    # the option itself is saved.
    plain = keras_stg.wrap(big_mlp(), target_sparsity=0.5, seed=0)
    assert [w.name for w in gated.weights] == [w.name for w in plain.weights]
    path = str(tmp_path / "polished.keras")
    gated.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.config.polish == 0.25
    np.testing.assert_array_equal(loaded.predict(x[:8], verbose=0), gated.predict(x[:8], verbose=0))


def test_polish_ends_at_the_freeze_and_channel_gates_polish_too():
    keras.utils.set_random_seed(0)
    x = np.random.normal(size=(128, 200)).astype("float32")
    y = np.random.randint(0, 10, size=128)
    # joint, finetune 0.5: the gate phase is the first 8 of 16 steps; its last
    # quarter (2 steps) polishes, then the frozen mask fine-tunes the weights.
    gated = keras_stg.wrap(big_mlp(), mode="joint", granularity="channel", target_sparsity=0.5,
                           seed=0, polish=0.25, finetune=0.5, init_mu=0.5)
    seen = _polish_fit(gated, x, y)
    assert seen["polishing"] == [False] * 6 + [True] * 2 + [False] * 8
    assert seen["same"][6:] == [True] * 10
    assert float(gated.mask_frozen.numpy()) == 1.0
    assert not gated._polishing  # the freeze ends the polish


def test_polish_must_be_a_share_of_the_steps():
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="`polish` must be a share"):
            keras_stg.wrap(big_mlp(), target_sparsity=0.5, polish=bad)
