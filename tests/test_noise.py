"""`keras_stg.noise`: the gates' table of training noise."""

import keras
import numpy as np

import keras_stg
from keras_stg.noise import NoiseTable


def _mlp():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((20,))
    x = keras.layers.Dense(32, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4)(x))


def test_noise_table_is_standard_normal_and_offsets_change():
    gated = keras_stg.wrap(_mlp(), seed=0, fused=False)
    table = gated.noise.table.numpy()
    assert table.shape == (20 * 32 + 32 * 4,)
    assert abs(table.mean()) < 0.1 and abs(table.std() - 1) < 0.1
    first = [v.numpy() for _, v in gated.effective_kernels(training=True)]
    second = [v.numpy() for _, v in gated.effective_kernels(training=True)]
    assert any(np.abs(a - b).max() > 0 for a, b in zip(first, second))
    # Same seed, same table: noise is reproducible across processes and loads.
    again = keras_stg.wrap(_mlp(), seed=0, fused=False)
    np.testing.assert_array_equal(again.noise.table.numpy(), table)
    # The offsets' seed generator is the model's (saved with it); the table is not.
    assert gated.noise_seed is gated.noise.seed_generator
    assert all(v is not gated.noise.table for v in gated.variables)


def test_slices_tile_the_table_and_wrap_around():
    noise = NoiseTable([(2, 3), (4,)], seed=1)
    table = noise.table.numpy()
    assert noise.starts == [0, 6] and noise.sizes == [6, 4] and noise.size == 10
    rolled = noise.rolled(8)
    np.testing.assert_array_equal(noise.slice(rolled, 0).numpy().ravel(),
                                  np.roll(table, -8)[:6])
    np.testing.assert_array_equal(noise.slice(rolled, 1).numpy(), np.roll(table, -8)[6:])
    assert int(noise.begin(8, 1)) == (8 + 6) % 10
    offsets = {int(noise.offset()) for _ in range(20)}
    assert len(offsets) > 1 and all(0 <= o < 10 for o in offsets)
