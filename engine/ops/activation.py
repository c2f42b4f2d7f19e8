"""Activation functions: the elementwise nonlinearities CNNs and transformers use.

Each keeps the input dtype; float16 inputs are computed in float32 where the math needs
it (exp/tanh/erf) and rounded back once, as a fused GPU kernel would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

from engine.ops.common import (
    broadcast_rule,
    elementwise_cost,
    same_as_input,
    spec,
    unary_with_attrs,
)
from engine.ops.registry import Attrs, KernelContext, OpSpec

_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875


def _wide(x: np.ndarray) -> np.ndarray:
    """Low-precision floats computed in float32; others as they are."""
    return x.astype(np.float32) if x.dtype.itemsize < 4 and x.dtype.kind in "fV" else x


def _relu(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    return np.maximum(x, np.zeros((), x.dtype))


def _leaky_relu(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    alpha = attrs.float("alpha", 0.01)
    return np.where(x >= 0, x, x * x.dtype.type(alpha))


def _elu(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    alpha = attrs.float("alpha", 1.0)
    wide = _wide(x)
    return np.where(wide >= 0, wide, alpha * np.expm1(np.minimum(wide, 0)))


def _celu(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    alpha = attrs.float("alpha", 1.0)
    wide = _wide(x)
    return np.maximum(0, wide) + np.minimum(0, alpha * np.expm1(np.minimum(wide, 0) / alpha))


def _selu(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    alpha = attrs.float("alpha", _SELU_ALPHA)
    gamma = attrs.float("gamma", _SELU_GAMMA)
    wide = _wide(x)
    return gamma * np.where(wide > 0, wide, alpha * np.expm1(np.minimum(wide, 0)))


def _sigmoid(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    return special.expit(_wide(x))


def _tanh(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    return np.tanh(_wide(x))


def _hard_sigmoid(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    alpha = attrs.float("alpha", 0.2)
    beta = attrs.float("beta", 0.5)
    return np.clip(_wide(x) * alpha + beta, 0, 1)


def _hard_swish(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    wide = _wide(x)
    return wide * np.clip(wide / 6 + 0.5, 0, 1)


def _softplus(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    return np.logaddexp(0, _wide(x))


def _softsign(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    return x / (1 + np.abs(x))


def _mish(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    wide = _wide(x)
    return wide * np.tanh(np.logaddexp(0, wide))


def _gelu(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    wide = _wide(x)
    if attrs.str("approximate", "none") == "tanh":
        inner = np.sqrt(2 / np.pi) * (wide + 0.044715 * wide**3)
        return 0.5 * wide * (1 + np.tanh(inner))
    return 0.5 * wide * (1 + special.erf(wide / np.sqrt(2)))


def _thresholded_relu(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    alpha = attrs.float("alpha", 1.0)
    return np.where(x > alpha, x, 0)


def _shrink(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    lambd = attrs.float("lambd", 0.5)
    bias = attrs.float("bias", 0.0)
    wide = _wide(x)
    return np.where(wide < -lambd, wide + bias, np.where(wide > lambd, wide - bias, 0))


def _swish(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    alpha = attrs.float("alpha", 1.0)
    wide = _wide(x)
    return wide * special.expit(alpha * wide)


def _prelu(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x, slope = inputs
    if ctx.opset < 7 and slope.ndim == 1 and x.ndim > 2:
        # Before opset 7 a 1-D slope applied per channel (axis 1), not numpy-broadcast.
        slope = slope.reshape((-1,) + (1,) * (x.ndim - 2))
    return [np.where(x >= 0, x, x * slope).astype(x.dtype)]


def _clip(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    if ctx.opset < 11:
        low = attrs.float("min", float(np.finfo(np.float32).min))
        high = attrs.float("max", float(np.finfo(np.float32).max))
        return [np.clip(x, low, high).astype(x.dtype)]
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    result = x
    if low is not None:
        result = np.maximum(result, low)
    if high is not None:
        result = np.minimum(result, high)
    return [np.asarray(result).astype(x.dtype, copy=False)]


OPS: list[OpSpec] = [
    unary_with_attrs("Relu", _relu, flops=1),
    unary_with_attrs("LeakyRelu", _leaky_relu, flops=2),
    unary_with_attrs("Elu", _elu, flops=8),
    unary_with_attrs("Celu", _celu, flops=8),
    unary_with_attrs("Selu", _selu, flops=8),
    unary_with_attrs("Sigmoid", _sigmoid, flops=8),
    unary_with_attrs("Tanh", _tanh, flops=8),
    unary_with_attrs("HardSigmoid", _hard_sigmoid, flops=3),
    unary_with_attrs("HardSwish", _hard_swish, flops=4),
    unary_with_attrs("Softplus", _softplus, flops=8),
    unary_with_attrs("Softsign", _softsign, flops=3),
    unary_with_attrs("Mish", _mish, flops=16),
    unary_with_attrs("Gelu", _gelu, flops=16),
    unary_with_attrs("ThresholdedRelu", _thresholded_relu, flops=1),
    unary_with_attrs("Shrink", _shrink, flops=2),
    unary_with_attrs("Swish", _swish, flops=9),
    spec("PRelu", _prelu, broadcast_rule(), elementwise_cost(2), "activation"),
    spec("Clip", _clip, same_as_input(0), elementwise_cost(2), "activation"),
]
