"""Entropy coding of binary masks: a range coder over bytes with a static model.

A mask of `n` bits with `k` ones is coded as its packed bytes (8 mask bits per
symbol, C order, the last byte padded with zeros). Every bit is modelled as
independent with `P(1) = k / n`, so a byte `s` has the probability
`p^popcount(s) (1-p)^(8-popcount(s))`: the coded size approaches the entropy
bound `n * H(k/n)` bits. The frequency table is computed from the integers
`(k, n)` with exact integer arithmetic (no floating point), so the encoder and
any decoder build the same table on every platform.

The coder is a carry-propagating range coder (the byte-oriented scheme of
LZMA's range encoder, G. N. N. Martin 1979) with a 48-bit range and
frequencies summing to 2^24: the truncation `range // 2^24` and the
quantization of the table each cost well under 0.1% of the bound; the flush
adds 6 bytes per mask.
"""

import bisect

import numpy as np

#: Frequencies of a table sum to 2^TOTAL_BITS.
TOTAL_BITS = 24
#: The range register holds RANGE_BITS bits; it is renormalised a byte at a time.
RANGE_BITS = 48

_TOTAL = 1 << TOTAL_BITS
_TOP = 1 << RANGE_BITS
_BOTTOM = 1 << (RANGE_BITS - 8)
_BYTES = RANGE_BITS // 8
_POPCOUNT = [bin(s).count("1") for s in range(256)]


class CodingError(ValueError):
    """Coded data that cannot be what the encoder wrote."""


def table(ones, n):
    """`(cumulative, frequencies)` of the 256 byte symbols for `ones` ones in `n` bits.

    Integer only: `f(s) = max(1, floor(2^24 * k^j (n-k)^(8-j) / n^8))` with
    `j = popcount(s)`; the remainder to 2^24 goes to the most frequent symbol.
    """
    if not 0 < ones < n:
        raise ValueError(f"A coded mask needs 0 < ones < n, got ones={ones}, n={n}.")
    zeros = n - ones
    denominator = n ** 8
    by_count = [max(1, (_TOTAL * ones ** j * zeros ** (8 - j)) // denominator)
                for j in range(9)]
    freq = [by_count[_POPCOUNT[s]] for s in range(256)]
    top = max(range(256), key=lambda s: (freq[s], -s))
    freq[top] += _TOTAL - sum(freq)
    cumulative = [0]
    for f in freq:
        cumulative.append(cumulative[-1] + f)
    return cumulative, freq


def encode(bits):
    """Range-codes a boolean array (any shape, read in C order); returns bytes.

    The decoder needs `bits.size` and the number of ones besides the bytes; an
    all-zero or all-one mask needs no bytes and is refused here.
    """
    bits = np.asarray(bits, dtype=bool).ravel()
    cumulative, freq = table(int(np.count_nonzero(bits)), bits.size)
    out = bytearray()
    low, span, cache, pending = 0, _TOP - 1, 0, 1

    def shift():
        # Moves the top byte of `low` out; 0xFF bytes wait in `pending` for a carry.
        nonlocal low, cache, pending
        if low < 0xFF << (RANGE_BITS - 8) or low >= _TOP:
            carry = low >> RANGE_BITS
            out.append((cache + carry) & 0xFF)
            out.extend(((0xFF + carry) & 0xFF,) * (pending - 1))
            pending = 0
            cache = (low >> (RANGE_BITS - 8)) & 0xFF
        pending += 1
        low = (low & (_BOTTOM - 1)) << 8

    for symbol in np.packbits(bits).tobytes():
        r = span >> TOTAL_BITS
        low += r * cumulative[symbol]
        span = r * freq[symbol]
        while span < _BOTTOM:
            span <<= 8
            shift()
    for _ in range(_BYTES + 1):  # flush: the cache and every byte of `low`
        shift()
    return bytes(out[1:])  # the first byte is the initial cache, always 0


def decode(data, n, ones):
    """Inverse of `encode`: a boolean vector of `n` bits holding `ones` ones.

    Raises `CodingError` when the decoded mask does not have `ones` ones or the
    data is too short or too long for it.
    """
    cumulative, freq = table(ones, n)
    symbols = -(-n // 8)
    data = bytes(data)
    size = len(data)
    code = int.from_bytes(data[:_BYTES].ljust(_BYTES, b"\0"), "big")
    at = _BYTES
    span = _TOP - 1
    out = bytearray(symbols)
    search = bisect.bisect_right
    for i in range(symbols):
        r = span >> TOTAL_BITS
        value = min(code // r, _TOTAL - 1)
        symbol = search(cumulative, value) - 1
        out[i] = symbol
        code -= r * cumulative[symbol]
        span = r * freq[symbol]
        while span < _BOTTOM:
            code = (code << 8) | (data[at] if at < size else 0)
            at += 1
            span <<= 8
    bits = np.unpackbits(np.frombuffer(bytes(out), dtype=np.uint8))[:n].astype(bool)
    if at != size or int(np.count_nonzero(bits)) != ones:
        raise CodingError(
            f"coded mask of {size} bytes does not decode to {ones} ones in {n} bits "
            f"(got {int(np.count_nonzero(bits))} ones from {at} bytes); the data is corrupt")
    return bits


def entropy_bits(ones, n):
    """`n * H(ones / n)` in bits: the bound for coding `n` independent bits at that rate."""
    if ones <= 0 or ones >= n:
        return 0.0
    p = ones / n
    return float(-n * (p * np.log2(p) + (1 - p) * np.log2(1 - p)))
