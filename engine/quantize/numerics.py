"""Reduced-precision float numerics: TF32 rounding and checked float16 conversion.

TF32 keeps float32's 8-bit exponent and a 10-bit mantissa. :func:`round_to_tf32` emulates the
rounding of GEMM inputs in TF32 mode on the CPU; the CUDA backend matches it with
``cvt.rn.tf32.f32`` (round to nearest even). Float16 has a 5-bit exponent: the largest finite
value is 65504, normal numbers start at 2**-14 and subnormals reach down to 2**-24.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Largest finite float16 value.
FP16_MAX = 65504.0
#: Smallest positive normal float16 value (2**-14); below it values are subnormal.
FP16_MIN_NORMAL = 2.0**-14
#: Smallest positive subnormal float16 value (2**-24); values below about half of it become 0.
FP16_MIN_SUBNORMAL = 2.0**-24

_TF32_DROPPED_BITS = 13  # float32 has 23 mantissa bits, TF32 keeps 10
_EXPONENT_MASK = np.uint32(0x7F800000)


def round_to_tf32(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to TF32 (10-bit mantissa), round to nearest, ties to even.

    Works on the float32 bit pattern: adds ``0xFFF`` plus the lowest kept mantissa bit, then clears
    the 13 dropped bits. A carry out of the mantissa increments the exponent (1.11...1 rounds to
    2.0; the largest finite floats round to infinity, as TF32 conversion does). NaN (payload kept)
    and ±Inf pass through unchanged; subnormals round on the same bit grid.
    """
    values = np.asarray(x)
    if values.dtype != np.float32:
        raise ValueError(f"round_to_tf32 expects float32 values, got {values.dtype}")
    bits = np.ascontiguousarray(values).reshape(-1).view(np.uint32)  # 1-D: wrapping adds
    kept_lsb = (bits >> np.uint32(_TF32_DROPPED_BITS)) & np.uint32(1)
    rounded = (bits + np.uint32(0xFFF) + kept_lsb) & np.uint32(0xFFFFE000)
    special = (bits & _EXPONENT_MASK) == _EXPONENT_MASK
    result = np.where(special, bits, rounded).astype(np.uint32).view(np.float32)
    return result.reshape(values.shape)


@dataclass(frozen=True)
class Fp16Conversion:
    """What converting a float tensor (typically a weight) to float16 did to it.

    ``overflow``: elements with |w| > 65504 (±Inf included), clamped to ±65504 rather than
    becoming infinite. ``subnormal``: nonzero elements whose float16 value is subnormal
    (|w16| < 2**-14, precision lost). ``flushed_to_zero``: nonzero elements that became 0
    (|w| below about 2**-25). ``nan``: NaN elements (kept as NaN). ``max_abs``: largest finite
    |w|. ``relative_error``: ||w16 - w||_2 / ||w||_2 over the finite elements (0 for a zero
    tensor), in float64.
    """

    elements: int
    overflow: int
    subnormal: int
    flushed_to_zero: int
    nan: int
    max_abs: float
    relative_error: float

    @property
    def lossless_range(self) -> bool:
        """True when no element overflowed, flushed to zero or was NaN."""
        return self.overflow == 0 and self.flushed_to_zero == 0 and self.nan == 0

    def describe(self) -> str:
        """One line for the build log, e.g. '3 of 4096 values > 65504 clamped to ±65504'."""
        parts = []
        if self.overflow:
            parts.append(f"{self.overflow} of {self.elements} values > 65504 clamped to ±65504")
        if self.subnormal:
            parts.append(f"{self.subnormal} become fp16 subnormals (|w| < 2**-14)")
        if self.flushed_to_zero:
            parts.append(f"{self.flushed_to_zero} nonzero values flush to 0 (|w| < 2**-24)")
        if self.nan:
            parts.append(f"{self.nan} NaN values")
        if not parts:
            parts.append("fp16 range fits")
        return (
            f"{'; '.join(parts)} (max |w| {self.max_abs:.6g}, rel. error {self.relative_error:.3g})"
        )


def to_fp16_checked(w: np.ndarray) -> tuple[np.ndarray, Fp16Conversion]:
    """(float16 copy of w, report): values beyond ±65504 (and ±Inf) are clamped to ±65504,
    NaN stays NaN, everything else rounds to nearest even."""
    values = np.asarray(w)
    if values.dtype.kind != "f":
        raise ValueError(f"to_fp16_checked expects a float array, got {values.dtype}")
    wide = values.astype(np.float64)
    finite = np.isfinite(wide)
    nan = np.isnan(wide)
    magnitude = np.abs(wide)
    overflow = (magnitude > FP16_MAX) & ~nan
    clamped = np.where(overflow, np.sign(wide) * FP16_MAX, wide)
    half = clamped.astype(np.float16)
    half_abs = np.abs(half.astype(np.float64))
    nonzero = (wide != 0) & ~nan & ~overflow
    flushed = nonzero & (half_abs == 0)
    subnormal = nonzero & (half_abs > 0) & (half_abs < FP16_MIN_NORMAL)
    reference = wide[finite]
    error = half.astype(np.float64)[finite] - reference
    norm = float(np.linalg.norm(reference))
    relative = float(np.linalg.norm(error)) / norm if norm > 0 else 0.0
    report = Fp16Conversion(
        elements=int(values.size),
        overflow=int(np.count_nonzero(overflow)),
        subnormal=int(np.count_nonzero(subnormal)),
        flushed_to_zero=int(np.count_nonzero(flushed)),
        nan=int(np.count_nonzero(nan)),
        max_abs=float(magnitude[finite].max()) if np.any(finite) else 0.0,
        relative_error=relative,
    )
    return half, report


def fp16_overflow(x: np.ndarray) -> int:
    """Number of activation values that do not fit float16: |x| > 65504, ±Inf included
    (NaN not counted)."""
    values = np.asarray(x)
    if values.dtype.kind != "f":
        return 0
    return int(np.count_nonzero(np.abs(values) > FP16_MAX))


__all__ = [
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "FP16_MIN_SUBNORMAL",
    "Fp16Conversion",
    "fp16_overflow",
    "round_to_tf32",
    "to_fp16_checked",
]
