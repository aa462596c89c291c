"""G.711 mu-law against the formula of ITU-T G.711 (independent of audioop's code)."""

import numpy as np
import pytest

from audio import pcm_to_ulaw, ulaw_to_pcm

BIAS = 33  # G.711 mu-law works on 14-bit magnitudes with a bias of 33
CLIP = 8159  # largest 14-bit magnitude before the bias


def g711_decode(code: int) -> int:
    """Code -> linear value on the 16-bit scale (the 14-bit value times 4)."""
    u = ~code & 0xFF
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    magnitude = ((2 * mantissa + BIAS) << exponent) - BIAS
    return 4 * (-magnitude if sign else magnitude)


def g711_encode(sample: int) -> int:
    """16-bit sample -> code, via its 14-bit value (arithmetic shift: floor division by 4)."""
    v = sample >> 2
    sign = 0x80 if v < 0 else 0
    magnitude = min(-v if v < 0 else v, CLIP) + BIAS  # 33 .. 8192
    exponent = magnitude.bit_length() - 6  # segment: 32..63 -> 0, ..., 4096..8191 -> 7
    if exponent > 7:  # only 8192 (clipped full scale): the top code of the segment
        exponent, mantissa = 7, 0x0F
    else:
        mantissa = (magnitude >> (exponent + 1)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def test_decode_matches_formula_for_all_256_codes():
    decoded = np.frombuffer(ulaw_to_pcm(bytes(range(256))), "<i2")
    assert decoded.tolist() == [g711_decode(c) for c in range(256)]
    assert decoded[0xFF] == 0 and decoded[0x7F] == 0  # the two zero codes
    assert decoded[0x00] == -32124 and decoded[0x80] == 32124  # full scale


def test_encode_matches_formula_for_all_65536_inputs():
    samples = np.arange(-32768, 32768, dtype="<i2")
    encoded = pcm_to_ulaw(samples.tobytes())
    expected = bytes(g711_encode(int(s)) for s in samples)
    assert encoded == expected


def test_every_code_survives_a_decode_encode_round_trip():
    codes = bytes(range(256))
    back = pcm_to_ulaw(ulaw_to_pcm(codes))
    # 0x7F (negative zero) encodes back as 0xFF (positive zero); every other code is exact
    assert [b for b, c in zip(back, codes) if b != c] == [0xFF]


def test_odd_byte_count_is_a_clear_error():
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm_to_ulaw(b"\x00\x01\x02")


def test_empty_input_gives_empty_output():
    assert ulaw_to_pcm(b"") == b""
    assert pcm_to_ulaw(b"") == b""
