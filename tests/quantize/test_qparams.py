"""The int8 contract's maths: scales, quantize/dequantize, bias, exact integer cores.

Oracles: the ONNX QuantizeLinear/DequantizeLinear reference kernels of the registry, hand-computed
values, and int64 NumPy arithmetic for the integer cores.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.ops.registry import Attrs, KernelContext, default_registry
from engine.quantize import qparams
from engine.quantize.qparams import QuantizationError

RNG = np.random.default_rng(11)
CTX = KernelContext(opset=21)


def _onnx_quantize(x: np.ndarray, scale: np.ndarray, axis: int = 1) -> np.ndarray:
    spec = default_registry().lookup("QuantizeLinear")
    assert spec is not None
    zero = np.zeros(np.shape(scale), dtype=np.int8)
    return spec.kernel([x, scale, zero], Attrs({"axis": axis}), CTX)[0]


def _onnx_dequantize(q: np.ndarray, scale: np.ndarray, axis: int = 1) -> np.ndarray:
    spec = default_registry().lookup("DequantizeLinear")
    assert spec is not None
    zero = np.zeros(np.shape(scale), dtype=np.int8)
    return spec.kernel([q, scale, zero], Attrs({"axis": axis}), CTX)[0]


# --------------------------------------------------------------------------- scales


def test_scale_from_threshold_by_hand() -> None:
    assert qparams.scale_from_threshold(127.0) == np.float32(1.0)
    assert qparams.scale_from_threshold(2.54) == np.float32(2.54) / np.float32(127)
    assert isinstance(qparams.scale_from_threshold(1.0), np.float32)
    tiny = qparams.scale_from_threshold(0.0)
    assert tiny == np.float32(1e-8) / np.float32(127) and tiny > 0
    array = qparams.scale_from_threshold(np.array([0.0, 127.0]))
    assert array.dtype == np.float32 and array[1] == 1.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(QuantizationError, match="threshold"):
            qparams.scale_from_threshold(bad)


def test_weight_scales_by_hand() -> None:
    w = np.array([[1.0, -3.0], [0.0, 0.0], [0.5, 2.0]], dtype=np.float32)
    rows = qparams.weight_scales(w, axis=0)
    expected = np.array([3.0, 1e-8, 2.0], dtype=np.float32) / np.float32(127)
    np.testing.assert_array_equal(rows, expected)
    assert rows.dtype == np.float32
    cols = qparams.weight_scales(w, axis=1)
    np.testing.assert_array_equal(cols, np.array([1.0, 3.0], dtype=np.float32) / np.float32(127))
    conv = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
    per_filter = np.abs(conv).reshape(4, -1).max(axis=1) / np.float32(127)
    np.testing.assert_array_equal(qparams.weight_scales(conv, 0), per_filter)
    with pytest.raises(QuantizationError, match="NaN"):
        qparams.weight_scales(np.array([[np.nan, 1.0]], dtype=np.float32))


def test_quantize_weight_maps_channel_max_to_127() -> None:
    w = RNG.normal(size=(6, 2, 3, 3)).astype(np.float32)
    w[2] = 0.0
    w_q, scales = qparams.quantize_weight(w, axis=0)
    assert w_q.dtype == np.int8 and scales.shape == (6,)
    peaks = np.abs(w_q.astype(np.int32)).reshape(6, -1).max(axis=1)
    assert list(peaks) == [127, 127, 0, 127, 127, 127]
    np.testing.assert_array_equal(w_q, _onnx_quantize(w, scales, axis=0))
    error = np.abs(qparams.dequantize(w_q, scales, axis=0) - w)
    assert np.all(error <= scales.reshape(-1, 1, 1, 1) / 2 * (1 + 1e-6))


# --------------------------------------------------------------------------- (de)quantize


def test_quantize_ties_round_to_even_and_saturate_by_hand() -> None:
    scale = np.float32(0.5)  # x / 0.5 is exact, so these are true ties
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, 63.25, 63.75, 64.0, -64.0, -64.5, -70.0])
    x = x.astype(np.float32)
    expected = [0, 2, 2, 0, -2, 126, 127, 127, -128, -128, -128]
    assert qparams.quantize(x, scale).tolist() == expected
    special = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)
    assert qparams.quantize(special, scale).tolist() == [0, 127, -128]


def test_quantize_equals_onnx_quantize_linear() -> None:
    scale = np.float32(0.037)
    x = (RNG.normal(size=(4, 3, 17)) * 3).astype(np.float32)
    ties = ((RNG.integers(-140, 140, size=200) + 0.5) * scale).astype(np.float32)
    for data in (x, ties, x * 50):
        ours = qparams.quantize(data, scale)
        assert ours.dtype == np.int8
        np.testing.assert_array_equal(ours, _onnx_quantize(data, scale))
    assert np.any(qparams.quantize(x * 50, scale) == 127)
    per_channel = RNG.uniform(0.01, 0.1, size=3).astype(np.float32)
    np.testing.assert_array_equal(
        qparams.quantize(x, per_channel, axis=1), _onnx_quantize(x, per_channel, axis=1)
    )


def test_dequantize_equals_onnx_dequantize_linear() -> None:
    q = RNG.integers(-128, 128, size=(2, 5, 4), dtype=np.int8)
    scale = np.float32(0.013)
    np.testing.assert_array_equal(qparams.dequantize(q, scale), _onnx_dequantize(q, scale))
    per_channel = RNG.uniform(0.01, 0.1, size=5).astype(np.float32)
    np.testing.assert_array_equal(
        qparams.dequantize(q, per_channel, axis=1), _onnx_dequantize(q, per_channel, axis=1)
    )
    with pytest.raises(QuantizationError, match="scalar"):
        qparams.dequantize(q, per_channel)


def test_quantize_bias_by_hand() -> None:
    bias = np.array([1.0, -2.5, 0.3125, 1e12, -1e12], dtype=np.float32)
    w_scales = np.array([0.25, 0.5, 0.25, 1e-3, 1e-3], dtype=np.float32)
    # products 0.125, 0.25, 0.125: 1/0.125 = 8, -2.5/0.25 = -10, 0.3125/0.125 = 2.5 -> 2 (even)
    expected = [8, -10, 2, 2**31 - 1, -(2**31)]
    result = qparams.quantize_bias(bias, np.float32(0.5), w_scales)
    assert result.dtype == np.int32 and result.tolist() == expected
    x_scale, w_scale = np.float32(0.1), np.float32(0.3)
    value = np.float64(7.0) / (np.float64(x_scale) * np.float64(w_scale))  # about 233.33
    assert qparams.quantize_bias(np.array([7.0]), x_scale, w_scale).tolist() == [round(value)]
    with pytest.raises(QuantizationError, match="does not match"):
        qparams.quantize_bias(bias, np.float32(0.5), w_scales[:2])


# --------------------------------------------------------------------------- requantize


def test_requantize_helpers_follow_the_contract() -> None:
    acc = np.array([[2**24 + 1, -7], [100, 2**31 - 1]], dtype=np.int32)
    combined = qparams.combined_scale(np.float32(0.02), np.array([0.5, 0.25], np.float32))
    assert combined.dtype == np.float32
    np.testing.assert_array_equal(combined, np.float32(0.02) * np.array([0.5, 0.25], np.float32))
    real = qparams.accumulator_to_real(acc, combined, channel_axis=1)
    assert real.dtype == np.float32
    assert real[0, 0] == np.float32(2**24) * combined[0]  # float32(2**24 + 1) rounds to even
    y_scale = np.float32(0.01)
    expected = np.clip(np.rint(real / y_scale), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(qparams.requantize(acc, combined, y_scale, 1), expected)
    biased = qparams.add_bias(acc, np.array([5, 2**31 - 1], np.int32), channel_axis=1)
    assert biased.tolist() == [[2**24 + 6, 2**31 - 8], [105, 2**31 - 1]]


# --------------------------------------------------------------------------- integer cores


def test_int_matmul_is_exact_where_float32_is_not() -> None:
    k = 3000
    a = RNG.integers(-128, 128, size=(5, k), dtype=np.int8)
    b = RNG.integers(-128, 128, size=(k, 7), dtype=np.int8)
    a[0] = -128
    b[:, 0] = -128  # acc = 3000 * 16384 > 2**24: float32 accumulation would round
    ours = qparams.int_matmul(a, b)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert ours.dtype == np.int32 and ours[0, 0] == k * 16384
    np.testing.assert_array_equal(ours, exact)
    batched_a = RNG.integers(-128, 128, size=(2, 3, 4, 9), dtype=np.int8)
    batched_b = RNG.integers(-128, 128, size=(1, 3, 9, 5), dtype=np.int8)
    np.testing.assert_array_equal(
        qparams.int_matmul(batched_a, batched_b),
        np.matmul(batched_a.astype(np.int64), batched_b.astype(np.int64)),
    )


def test_int_cores_refuse_non_int8_and_too_deep() -> None:
    with pytest.raises(QuantizationError, match="int8"):
        qparams.int_matmul(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int8))
    depth = qparams.MAX_INT32_DEPTH + 1
    with pytest.raises(QuantizationError, match="overflow"):
        qparams.int_matmul(np.zeros((1, depth), np.int8), np.zeros((depth, 1), np.int8))
    with pytest.raises(QuantizationError, match="group"):
        qparams.int_conv(np.zeros((1, 4, 3, 3), np.int8), np.zeros((2, 3, 1, 1), np.int8))


def test_int_conv_one_dimensional_by_hand() -> None:
    x = np.array([[[1, -2, 3, 127, -128]]], dtype=np.int8)  # (N=1, C=1, W=5)
    w = np.array([[[2, 1]]], dtype=np.int8)  # (M=1, C=1, K=2)
    # pads 1 on both sides, stride 2: windows [0,1], [-2,3], [127,-128]
    result = qparams.int_conv(x, w, strides=[2], pads=[1, 1])
    assert result.dtype == np.int32
    assert result.tolist() == [[[1, -1, 126]]]
