"""Reference sparse GEMM/conv from the compressed form against dense oracles: float32 within a
few ulps of the sum of |terms|, int8 (int32 accumulation) exactly; the convolution against the
engine's Conv reference kernel (one-node model on the reference interpreter) and int_conv."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from engine.backends.numpy_ref.interpreter import run_model
from engine.onnx_io import load
from engine.quantize.qparams import int_conv, int_matmul
from engine.sparsity.check import reduction_matrix
from engine.sparsity.compress import compress_2_4
from engine.sparsity.prune import prune_2_4, prune_weight
from engine.sparsity.sparse_kernels import sparse_conv, sparse_matmul

EPS32 = float(np.finfo(np.float32).eps)


def _assert_close_fp32(result: np.ndarray, a: np.ndarray, x: np.ndarray) -> None:
    """|result - a@x| within 4 float32 ulps of the sum of |terms| (a float32 GEMM's own error
    is bounded by K ulps of it; the float64 product is the reference)."""
    exact = a.astype(np.float64) @ x.astype(np.float64)
    scale = np.abs(a.astype(np.float64)) @ np.abs(x.astype(np.float64))
    assert result.dtype == np.float32
    assert np.all(np.abs(result - exact) <= 4 * EPS32 * scale + 1e-30)
    dense = (a.astype(np.float32) @ x.astype(np.float32)).astype(np.float64)
    k = a.shape[1]
    assert np.all(np.abs(result - dense) <= (k + 4) * EPS32 * scale + 1e-30)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 20), st.integers(1, 9), st.integers(0, 2**16))
def test_sparse_matmul_fp32_equals_dense(rows: int, groups: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = prune_2_4(rng.standard_normal((rows, 4 * groups)).astype(np.float32))
    x = rng.standard_normal((4 * groups, n)).astype(np.float32)
    _assert_close_fp32(sparse_matmul(compress_2_4(a), x), a, x)


def test_sparse_matmul_fp16_values_and_vector_input() -> None:
    rng = np.random.default_rng(2)
    a = prune_2_4(rng.standard_normal((32, 64)).astype(np.float16))
    x = rng.standard_normal(64).astype(np.float32)
    result = sparse_matmul(compress_2_4(a), x)
    assert result.shape == (32,)
    _assert_close_fp32(result[:, None], a.astype(np.float32), x[:, None])
    with pytest.raises(ValueError, match="K = 64"):
        sparse_matmul(compress_2_4(a), np.ones((60, 2), np.float32))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 24), st.integers(1, 9), st.integers(0, 2**16))
def test_sparse_matmul_int8_is_exact(rows: int, groups: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = prune_2_4(rng.integers(-128, 128, (rows, 4 * groups)).astype(np.int8))
    x = rng.integers(-128, 128, (4 * groups, n)).astype(np.int8)
    result = sparse_matmul(compress_2_4(a), x)
    assert result.dtype == np.int32
    np.testing.assert_array_equal(result, int_matmul(a, x))


def test_sparse_matmul_int8_extremes() -> None:
    a = np.zeros((16, 512), np.int8)
    a[:, 0::4] = -128
    a[:, 3::4] = -128
    x = np.full((512, 3), -128, np.int8)
    result = sparse_matmul(compress_2_4(a), x)
    np.testing.assert_array_equal(result, np.full((16, 3), 256 * 128 * 128, np.int32))
    np.testing.assert_array_equal(result, int_matmul(a, x))


def _conv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, attrs: dict) -> np.ndarray:
    """The engine's Conv reference kernel, through a one-node model."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)],
        "conv",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return run_model(model, {"x": x})["y"]


CONV_CASES = [
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 1, 0], "group": 2},
    {"kernel_shape": [2, 3], "dilations": [2, 1], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [1, 1]},
]


@pytest.mark.parametrize("attrs", CONV_CASES)
def test_sparse_conv_equals_the_conv_reference(attrs: dict) -> None:
    rng = np.random.default_rng(4)
    group = attrs.get("group", 1)
    weight = rng.standard_normal((8, 16 // group, *attrs["kernel_shape"])).astype(np.float32)
    pruned = prune_weight(weight, "Conv", attrs)
    bias = rng.standard_normal(8).astype(np.float32)
    x = rng.standard_normal((2, 16, 7, 6)).astype(np.float32)
    compressed = compress_2_4(reduction_matrix(pruned, "Conv", attrs))
    result = sparse_conv(compressed, attrs, x, bias)
    expected = _conv_reference(x, pruned, bias, attrs)
    assert result.shape == expected.shape and result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs", CONV_CASES[:2])
def test_sparse_conv_int8_is_exact(attrs: dict) -> None:
    rng = np.random.default_rng(5)
    group = attrs.get("group", 1)
    weight = rng.integers(-128, 128, (8, 32 // group, 3, 3)).astype(np.int8)
    pruned = prune_weight(weight, "Conv", attrs)
    x = rng.integers(-128, 128, (2, 32, 5, 5)).astype(np.int8)
    result = sparse_conv(compress_2_4(reduction_matrix(pruned, "Conv", attrs)), attrs, x)
    geometry = {key: attrs[key] for key in ("strides", "pads") if key in attrs}
    expected = int_conv(x, pruned, group=group, **geometry)
    assert result.dtype == np.int32
    np.testing.assert_array_equal(result, expected)


def test_sparse_conv_refuses_mismatched_channels() -> None:
    compressed = compress_2_4(prune_2_4(np.ones((8 * 9, 16), np.float32)))
    with pytest.raises(ValueError, match="input channels 12"):
        sparse_conv(compressed, {"kernel_shape": [3, 3]}, np.ones((1, 12, 4, 4), np.float32))
