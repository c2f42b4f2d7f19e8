"""TF32 rounding on hand-picked bit patterns and a float64 oracle; checked fp16 conversion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.quantize.numerics import (
    FP16_MAX,
    Fp16Conversion,
    fp16_overflow,
    round_to_tf32,
    to_fp16_checked,
)

RNG = np.random.default_rng(5)


def _bits(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint32).view(np.float32)


# (input bits, expected bits): worked out by hand on the 13 dropped mantissa bits.
TF32_CASES = [
    (0x3F800000, 0x3F800000),  # 1.0 is representable
    (0x3F800FFF, 0x3F800000),  # below half an ulp: down
    (0x3F801000, 0x3F800000),  # exact tie, kept lsb 0: stays even (down)
    (0x3F801001, 0x3F802000),  # just above the tie: up
    (0x3F803000, 0x3F804000),  # exact tie, kept lsb 1: up to even
    (0xBF803000, 0xBF804000),  # negative ties behave symmetrically
    (0x3FFFF000, 0x40000000),  # 1.1111111111 + tie: carry into the exponent -> 2.0
    (0x3FFFFFFF, 0x40000000),  # just below 2.0 rounds to 2.0
    (0x7F7FFFFF, 0x7F800000),  # largest float32 rounds past the largest TF32: +Inf
    (0x7F7FE000, 0x7F7FE000),  # largest TF32 value itself
    (0x7F800000, 0x7F800000),  # +Inf
    (0xFF800000, 0xFF800000),  # -Inf
    (0x7FC00001, 0x7FC00001),  # quiet NaN keeps its payload
    (0x7F800001, 0x7F800001),  # NaN whose rounding would give Inf stays NaN
    (0xFFFFFFFF, 0xFFFFFFFF),  # all-ones NaN (the add would wrap) stays NaN
    (0x00001000, 0x00000000),  # subnormal tie, lsb 0: down to zero
    (0x00003000, 0x00004000),  # subnormal tie, lsb 1: up
    (0x80000000, 0x80000000),  # -0.0
]


@pytest.mark.parametrize(("given", "expected"), TF32_CASES, ids=lambda v: f"{v:#010x}")
def test_round_to_tf32_bit_patterns(given: int, expected: int) -> None:
    result = round_to_tf32(_bits([given]))
    assert result.dtype == np.float32
    assert int(result.view(np.uint32)[0]) == expected


def test_round_to_tf32_matches_a_float64_oracle_and_keeps_shape() -> None:
    x = (RNG.normal(size=(64, 33)) * np.exp2(RNG.integers(-30, 30, size=(64, 33)))).astype(
        np.float32
    )
    result = round_to_tf32(x)
    assert result.shape == x.shape
    assert np.all((result.view(np.uint32) & 0x1FFF) == 0)
    wide = x.astype(np.float64)
    exponent = np.floor(np.log2(np.abs(wide)))
    ulp = np.exp2(exponent - 10)  # spacing of a 10-bit mantissa in [2**e, 2**(e+1))
    oracle = np.round(wide / ulp) * ulp  # np.round is half-to-even; wide/ulp is exact
    np.testing.assert_array_equal(result.astype(np.float64), oracle)
    assert round_to_tf32(np.float32(1.0)).shape == ()


def test_round_to_tf32_refuses_other_dtypes() -> None:
    with pytest.raises(ValueError, match="float32"):
        round_to_tf32(np.ones(3, dtype=np.float64))


def test_to_fp16_checked_counts_by_hand() -> None:
    w = np.array(
        [1e5, -7e4, np.inf, 65504.0, 1e-6, -3e-5, 1e-8, 2.0**-26, 0.0, np.nan, 0.5],
        dtype=np.float32,
    )
    half, report = to_fp16_checked(w)
    assert half.dtype == np.float16 and half.shape == w.shape
    assert isinstance(report, Fp16Conversion)
    assert report.elements == 11
    assert report.overflow == 3  # 1e5, -7e4 and +Inf
    assert half[:3].tolist() == [FP16_MAX, -FP16_MAX, FP16_MAX]  # clamped, not infinite
    assert report.subnormal == 2  # 1e-6 and -3e-5 are below 2**-14 = 6.1e-5
    assert report.flushed_to_zero == 2  # 1e-8 and 2**-26 are below 2**-25
    assert report.nan == 1 and np.isnan(half[9])
    assert report.max_abs == pytest.approx(1e5)
    assert not report.lossless_range
    text = report.describe()
    assert "3 of 11" in text and "flush to 0" in text and "subnormal" in text


def test_to_fp16_checked_relative_error_by_hand() -> None:
    w = np.array([1.0, 1.0 + 2.0**-12, 2.0], dtype=np.float32)  # middle value rounds to 1.0
    half, report = to_fp16_checked(w)
    assert half.tolist() == [1.0, 1.0, 2.0]
    expected = 2.0**-12 / math.sqrt(1.0 + (1.0 + 2.0**-12) ** 2 + 4.0)
    assert report.relative_error == pytest.approx(expected, rel=1e-12)
    assert report.lossless_range and report.overflow == report.subnormal == 0
    assert "fits" in report.describe()
    _, zeros = to_fp16_checked(np.zeros(4, dtype=np.float32))
    assert zeros.relative_error == 0.0 and zeros.max_abs == 0.0
    with pytest.raises(ValueError, match="float"):
        to_fp16_checked(np.ones(2, dtype=np.int32))


def test_fp16_overflow_counts_activations() -> None:
    x = np.array([65504.0, 65505.0, -7e4, np.inf, -np.inf, np.nan, 1.0], dtype=np.float32)
    assert fp16_overflow(x) == 4
    assert fp16_overflow(np.ones((3, 3), dtype=np.float16)) == 0
    assert fp16_overflow(np.array([1, 2], dtype=np.int8)) == 0
