"""`keras_stg._coding`: the range coder of ticket masks."""

import numpy as np
import pytest

from keras_stg import _coding


@pytest.mark.parametrize("n, p", [(40_000, 0.1), (40_000, 0.02), (40_000, 0.5), (30_001, 0.9)])
def test_random_mask_codes_within_5_percent_of_the_entropy_bound(n, p):
    bits = np.random.default_rng(0).random(n) < p
    ones = int(bits.sum())
    data = _coding.encode(bits)
    bound = _coding.entropy_bits(ones, n) / 8
    assert len(data) <= 1.05 * bound
    assert len(data) <= bound + 0.002 * bound + 8  # in practice: 0.2% and the flush
    np.testing.assert_array_equal(_coding.decode(data, n, ones), bits)


@pytest.mark.parametrize("bits", [
    [True], [False, True], [True] * 7 + [False], [False] * 999 + [True],
    [True] * 5000 + [False], list(np.arange(77) % 3 == 0),
])
def test_edge_cases_round_trip(bits):
    bits = np.array(bits)
    if bits.all():
        with pytest.raises(ValueError, match="needs 0 < ones < n"):
            _coding.encode(bits)
        return
    data = _coding.encode(bits)
    np.testing.assert_array_equal(_coding.decode(data, bits.size, int(bits.sum())), bits)


def test_table_is_integer_and_sums_to_the_total():
    cumulative, freq = _coding.table(26_575, 266_200)
    assert cumulative[-1] == 2**_coding.TOTAL_BITS and min(freq) >= 1
    assert all(isinstance(f, int) for f in freq)
    assert freq[0] == max(freq) and freq[0] > freq[1] > freq[3]  # fewer ones, more likely
    assert _coding.table(26_575, 266_200) == (cumulative, freq)


def test_decode_checks_the_count_of_ones_and_the_length():
    """(The ticket's checksum catches corruption first; this is the second line.)"""
    bits = np.random.default_rng(1).random(10_000) < 0.1
    data = bytearray(_coding.encode(bits))
    data[len(data) // 2] ^= 0x40
    with pytest.raises(_coding.CodingError, match="does not decode to"):
        _coding.decode(bytes(data), bits.size, int(bits.sum()))
    with pytest.raises(_coding.CodingError, match="the data is corrupt"):
        _coding.decode(bytes(data[:-3]), bits.size, int(bits.sum()))


def test_entropy_bits():
    assert _coding.entropy_bits(0, 10) == 0.0 and _coding.entropy_bits(10, 10) == 0.0
    assert _coding.entropy_bits(5, 10) == pytest.approx(10.0)
    assert _coding.entropy_bits(26_620, 266_200) == pytest.approx(266_200 * 0.468996, rel=1e-5)
