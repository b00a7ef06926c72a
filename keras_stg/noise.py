"""The gates' training noise: one table of N(0, 1) draws read at a random offset per step.

Drawing fresh Gaussians for every gate is a random-number pass as large as the
gated kernels in every step; reading a table at an offset is a copy. The table
holds one entry per gate, made from the seed. Each step reads it at a random
offset, so gate `i` of gate tensor `j` sees `table[(start_j + i + offset) mod
size]`: over steps an i.i.d. draw from the table for every gate, and within a
step the gates get distinct entries. The table is rebuilt from the seed when a
model is loaded, not saved.
"""

import math

import keras
import tensorflow as tf


class NoiseTable:
    """Noise for gate tensors of the given shapes.

    Args:
        shapes: the gate tensors' shapes, in order.
        seed: int seed of the table and of the offsets.

    Attributes:
        table: the `tf.Variable` of draws (not a Keras variable: not saved).
        seed_generator: the `keras.random.SeedGenerator` of the offsets (saved
            with the model that owns it, so a resumed run continues its stream).
        starts, sizes: where each gate tensor's entries begin, and how many.
    """

    def __init__(self, shapes, seed):
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.size = sum(self.sizes)
        with tf.init_scope():
            self.table = tf.Variable(
                tf.random.stateless_normal([self.size], seed=[int(seed), 0x57A7]),
                trainable=False,
                name="gate_noise_table",
            )
        self.seed_generator = keras.random.SeedGenerator(int(seed) + 1)

    def offset(self):
        """A fresh random offset for this step."""
        return keras.random.randint((), 0, self.size, dtype="int64", seed=self.seed_generator)

    def begin(self, offset, index):
        """Where gate tensor `index` starts reading at `offset` (for the fused kernels)."""
        return tf.math.floormod(offset + self.starts[index], self.size)

    def rolled(self, offset):
        """The table rolled by `offset`; `slice(rolled, i)` is gate tensor i's noise."""
        return tf.roll(self.table, -offset, axis=0)

    def slice(self, rolled, index):
        start, size = self.starts[index], self.sizes[index]
        return tf.reshape(rolled[start:start + size], self.shapes[index])
