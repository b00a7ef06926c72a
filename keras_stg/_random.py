"""The random stream of ticket weights: counter-based, keyed, the same on every platform.

A strong lottery ticket is its random weights and a mask, so its weights must be
regenerable from the seed alone, bit for bit, anywhere. Each gated kernel gets
its own stream of 64-bit words from Philox4x64-10 (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011) keyed by `(seed, kernel index)`:
kernels are independent of each other and of the order they are drawn in, and
no process-global generator is involved.

The words come from NumPy's `Philox` bit generator through `random_raw`, the
raw stream, which NumPy keeps stable (its `Generator` methods, e.g.
`random()`, may change their algorithms between releases, so none is used).
The key is `[seed, index]` (two 64-bit words) and the counter starts at 0;
NumPy increments the counter before each block, so the words are those of the
counters 1, 2, 3, ... (four words per block). The conversions to values below
use integer operations and single IEEE float64 operations only (exact or
correctly rounded), so the values are the same on every platform.

`ALGORITHM` names all of this; the ticket format (`keras_stg.ticket`) pins it.
"""

import numpy as np

#: The stream and the conversions of this module; a ticket records it and a
#: reader with another one refuses the ticket.
ALGORITHM = "philox4x64-10:key=[seed,index]:counter=0:sign=bit63:unit=top53"

_MAX = 2**64


def _word(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if not 0 <= int(value) < _MAX:
        raise ValueError(f"`{name}` must be in [0, 2**64), got {value!r}.")
    return int(value)


def words(seed, index, n):
    """`n` 64-bit words (uint64) of the stream of kernel `index` under `seed`."""
    key = np.array([_word(seed, "seed"), _word(index, "index")], dtype=np.uint64)
    generator = np.random.Philox(key=key, counter=np.zeros(4, dtype=np.uint64))
    return np.asarray(generator.random_raw(int(n)), dtype=np.uint64)


def signs(raw):
    """True where the top bit of a word is set (probability 1/2 each)."""
    return (raw >> np.uint64(63)).astype(bool)


def unit(raw):
    """Float64 values in [0, 1): the top 53 bits of each word times 2^-53 (exact)."""
    return (raw >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)
