"""`keras_stg._random`: the keyed Philox stream ticket weights are drawn from."""

import hashlib

import numpy as np
import pytest

from keras_stg import _random

M = 2**64 - 1
# Random123's known-answer vectors of Philox4x64-10 (kat_vectors): key, counter, output.
KAT = [
    ((0, 0), (0, 0, 0, 0),
     (0x16554d9eca36314c, 0xdb20fe9d672d0fdc, 0xd7e772cee186176b, 0x7e68b68aec7ba23b)),
    ((M, M), (M, M, M, M),
     (0x87b092c3013fe90b, 0x438c3c67be8d0224, 0x9cc7d7c69cd777b6, 0xa09caebf594f0ba0)),
    ((0x452821e638d01377, 0xbe5466cf34e90c6c),
     (0x243f6a8885a308d3, 0x13198a2e03707344, 0xa4093822299f31d0, 0x082efa98ec4e6c89),
     (0xa528f45403e61d95, 0x38c72dbd566e9788, 0xa5a1610e72fd18b5, 0x57bd43b5e52b7fe6)),
]


@pytest.mark.parametrize("key, counter, expected", KAT)
def test_numpy_philox_is_random123_philox4x64_10(key, counter, expected):
    # NumPy increments the counter before it computes a block: start one below.
    before = (int.from_bytes(b"".join(c.to_bytes(8, "little") for c in counter), "little")
              - 1) % 2**256
    words = [(before >> (64 * i)) & M for i in range(4)]
    generator = np.random.Philox(key=np.array(key, np.uint64),
                                 counter=np.array(words, np.uint64))
    assert tuple(int(w) for w in generator.random_raw(4)) == expected


def test_words_are_the_keyed_stream_from_counter_one():
    expected = np.random.Philox(key=np.array([2024, 5], np.uint64),
                                counter=np.zeros(4, np.uint64)).random_raw(8)
    np.testing.assert_array_equal(_random.words(2024, 5, 8), expected)
    # Checked in: the first 1000 words of kernel 5 under seed 2024.
    digest = hashlib.sha256(_random.words(2024, 5, 1000).astype("<u8").tobytes()).hexdigest()
    assert digest == "a6bd220369fcf354257c70b9015c981efc0cc6207f16bd09a7976aaba4f5ea87"
    # Another kernel or seed is another stream; a prefix does not depend on the length.
    assert not np.array_equal(_random.words(2024, 6, 8), expected)
    assert not np.array_equal(_random.words(2025, 5, 8), expected)
    np.testing.assert_array_equal(_random.words(2024, 5, 1000)[:8], expected)


def test_conversions_are_exact():
    raw = np.array([0, 2**63 - 1, 2**63, M], np.uint64)
    np.testing.assert_array_equal(_random.signs(raw), [False, False, True, True])
    np.testing.assert_array_equal(_random.unit(raw),
                                  [0.0, 0.5 - 2.0**-53, 0.5, 1.0 - 2.0**-53])


@pytest.mark.parametrize("seed, message", [
    (-1, "`seed` must be in [0, 2**64), got -1."),
    (2**64, "`seed` must be in [0, 2**64)"),
    (1.5, "`seed` must be an integer, got 1.5."),
    (True, "`seed` must be an integer, got True."),
])
def test_bad_seeds(seed, message):
    with pytest.raises(ValueError) as info:
        _random.words(seed, 0, 1)
    assert message in str(info.value)
