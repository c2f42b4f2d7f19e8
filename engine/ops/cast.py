"""Type conversion: Cast, CastLike and BitCast, including the low-precision float/int types.

Float-to-float8 casts saturate to the largest finite value by default (``saturate=1``), as
the ONNX spec says; float-to-E8M0 rounds the exponent as ``round_mode`` asks. Casts to and
from strings use Python's float/int formatting.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from engine.ops.common import elementwise_cost, spec
from engine.ops.registry import Attrs, KernelContext, KernelError, OpSpec, TensorSpec

_SATURATING_FLOATS = {
    ir.DataType.FLOAT8E4M3FN,
    ir.DataType.FLOAT8E4M3FNUZ,
    ir.DataType.FLOAT8E5M2,
    ir.DataType.FLOAT8E5M2FNUZ,
    ir.DataType.FLOAT4E2M1,
}


def _to_e8m0(x: np.ndarray, saturate: bool, round_mode: str) -> np.ndarray:
    """Round |x| to a power of two encoded as E8M0 (exponent byte, bias 127)."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.int32)
    mantissa = bits & 0x7FFFFF
    if round_mode == "up":
        exponent = exponent + (mantissa > 0)
    elif round_mode == "nearest":
        exponent = exponent + (mantissa >= 0x400000)
    elif round_mode != "down":
        raise KernelError(f"round_mode must be up, down or nearest, got {round_mode!r}")
    special = ((bits >> 23) & 0xFF) == 0xFF
    is_nan = special & (mantissa != 0)
    if saturate:
        exponent = np.clip(exponent, 0, 254)
        exponent = np.where(special & ~is_nan, 254, exponent)
    else:
        exponent = np.where(exponent > 254, 255, exponent)
    exponent = np.where(is_nan, 255, exponent)
    return exponent.astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


def cast_array(
    x: np.ndarray, target: ir.DataType, saturate: bool = True, round_mode: str = "up"
) -> Any:
    """Convert ``x`` to the ONNX type ``target`` with ONNX's Cast semantics."""
    if target == ir.DataType.STRING:
        if x.dtype == object:
            return x
        return np.vectorize(lambda v: str(v), otypes=[object])(x) if x.size else x.astype(object)
    dtype = target.numpy()
    if x.dtype == object:
        return (
            np.array([float(v) for v in x.ravel()], dtype=np.float64).reshape(x.shape).astype(dtype)
        )
    if target == ir.DataType.FLOAT8E8M0:
        return _to_e8m0(x.astype(np.float32), saturate, round_mode)
    if target in _SATURATING_FLOATS and saturate and x.dtype.kind in "fV":
        wide = x.astype(np.float32)
        info = ml_dtypes.finfo(dtype)
        return np.clip(wide, float(info.min), float(info.max)).astype(dtype)
    if x.dtype.kind == "V" or x.dtype.name.startswith(("float8", "float4", "bfloat")):
        return x.astype(np.float32).astype(dtype)
    return x.astype(dtype)


def _cast(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    target = ir.DataType(attrs.int("to"))
    saturate = bool(attrs.int("saturate", 1))
    return [cast_array(inputs[0], target, saturate, attrs.str("round_mode", "up") or "up")]


def _cast_like(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x, like = inputs
    target = ir.DataType.STRING if like.dtype == object else ir.DataType.from_numpy(like.dtype)
    saturate = bool(attrs.int("saturate", 1))
    return [cast_array(x, target, saturate, attrs.str("round_mode", "up") or "up")]


def _bitcast(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    dtype = ir.DataType(attrs.int("to")).numpy()
    if np.dtype(dtype).itemsize != x.dtype.itemsize:
        raise KernelError(f"BitCast needs equal widths: {x.dtype} -> {np.dtype(dtype)}")
    return [x.copy().view(dtype)]


def _cast_rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    return [TensorSpec(specs[0].shape, ir.DataType(attrs.int("to")))]


def _cast_like_rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    return [TensorSpec(specs[0].shape, specs[1].dtype)]


OPS: list[OpSpec] = [
    spec("Cast", _cast, _cast_rule, elementwise_cost(1), "elementwise"),
    spec("CastLike", _cast_like, _cast_like_rule, elementwise_cost(1), "elementwise"),
    spec("BitCast", _bitcast, _cast_rule, elementwise_cost(0), "elementwise"),
]
