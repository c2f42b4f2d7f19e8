"""Reduced-precision emulation on the NumPy backend, checked against NumPy formulas.

fp16 layers: float16 inputs/weights, float32 arithmetic, float16 outputs. tf32 layers: inputs
rounded to a 10-bit mantissa, float32 accumulation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.builder import build
from engine.config import BuilderConfig, Precision
from engine.onnx_io import load
from engine.quantize.numerics import round_to_tf32
from engine.runtime import Engine

FP32, TF32, FP16 = Precision.FP32, Precision.TF32, Precision.FP16
BASE = BuilderConfig(tactic_sources=frozenset({"reference"}))
F16, F32, F64 = np.float16, np.float32, np.float64


def _model(
    nodes: list[onnx.NodeProto],
    weights: dict[str, np.ndarray],
    x_shape: list[int],
    y_shape: list[int],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _build(proto: onnx.ModelProto, precision: Precision) -> Engine:
    engine = build(
        load(proto),
        BASE.with_changes(precisions=frozenset({FP32, precision}), optimization_level="O0"),
    )
    compute = [layer for layer in engine.plan.layers if layer.role == "compute"]
    assert len(compute) == 1 and compute[0].precision == precision, compute
    return engine


def _off_grid(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 values, their float16 rounding): sixteenths in [-1, 1] (few significant bits,
    so float32 sums of their products are exact) nudged by a relative 2**-13, less than half a
    float16 step, so float16 rounding removes the nudge and only it."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 17, size=shape) * rng.choice([-1, 1], size=shape)
    grid = (k / 16).astype(F32)
    nudged = (grid * F32(1 + 2.0**-13)).astype(F32)
    assert np.all(nudged.astype(F16).astype(F32) == grid)
    assert np.all(nudged != grid)
    return nudged, grid


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """Plain float64 NCHW convolution, stride 1."""
    x = np.pad(x.astype(F64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, _, h, wd = x.shape
    m, _, kh, kw = w.shape
    out = np.zeros((n, m, h - kh + 1, wd - kw + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            patch = x[:, :, i : i + kh, j : j + kw]
            out[:, :, i, j] = np.einsum("nchw,mchw->nm", patch, w.astype(F64))
    return out + b.astype(F64).reshape(1, -1, 1, 1)


# ---------------------------------------------------------------------------- fp16 layers


def test_an_fp16_gemm_rounds_inputs_and_weights_then_the_output_to_float16() -> None:
    x, x16 = _off_grid((4, 32), 0)
    w, w16 = _off_grid((32, 8), 1)
    b, b16 = _off_grid((8,), 2)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm")
    engine = _build(_model([node], {"w": w, "b": b}, [4, 32], [4, 8]), FP16)
    got = engine.run({"x": x})["y"]
    # Exact: float32 (and float64) sums of these products have no rounding error.
    want = (x16.astype(F64) @ w16.astype(F64) + b16).astype(F16)
    assert got.dtype == F32
    np.testing.assert_array_equal(got, want.astype(F32))
    unrounded = (x.astype(F64) @ w.astype(F64) + b).astype(F16)
    assert np.any(unrounded != want), "the test data must tell input rounding apart"


def test_an_fp16_conv_rounds_inputs_and_weights_then_the_output_to_float16() -> None:
    x, x16 = _off_grid((1, 3, 6, 6), 3)
    w, w16 = _off_grid((4, 3, 3, 3), 4)
    b, b16 = _off_grid((4,), 5)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    engine = _build(_model([node], {"w": w, "b": b}, [1, 3, 6, 6], [1, 4, 6, 6]), FP16)
    got = engine.run({"x": x})["y"]
    want = _conv2d(x16, w16, b16, 1).astype(F16)
    np.testing.assert_array_equal(got, want.astype(F32))
    assert np.any(_conv2d(x, w, b, 1).astype(F16) != want)


def _sequential_fp16_sum(values: np.ndarray) -> np.ndarray:
    """A pure float16 accumulation along the last axis (each partial sum rounded to float16)."""
    return np.add.accumulate(values.astype(F16), axis=-1, dtype=F16)[..., -1]


def test_an_fp16_reduce_mean_accumulates_in_float32() -> None:
    n = 4096
    rng = np.random.default_rng(6)
    x = rng.uniform(0.5, 1.5, size=(2, n)).astype(F32)
    node = helper.make_node("ReduceMean", ["x"], ["y"], name="mean", axes=[-1], keepdims=1)
    proto = _model([node], {}, [2, n], [2, 1])
    proto.opset_import[0].version = 17
    engine = _build(proto, FP16)
    got = engine.run({"x": x})["y"]
    x16 = x.astype(F16)
    want = np.mean(x16.astype(F32), axis=-1, keepdims=True, dtype=F32).astype(F16)
    np.testing.assert_array_equal(got, want.astype(F32))
    exact = x16.astype(F64).mean(axis=-1, keepdims=True)
    np.testing.assert_array_equal(want, exact.astype(F16))
    pure_fp16 = (_sequential_fp16_sum(x16) / F16(n)).astype(F16).reshape(2, 1)
    error_engine = np.abs(got - exact).max()
    error_fp16 = np.abs(pure_fp16.astype(F64) - exact).max()
    assert error_engine <= 2.0**-11  # within half a float16 step of a value near 1
    assert error_fp16 > 50 * max(error_engine, 2.0**-24), (error_fp16, error_engine)


def test_an_fp16_softmax_accumulates_in_float32() -> None:
    n = 4096
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, n)).astype(F32)
    node = helper.make_node("Softmax", ["x"], ["y"], name="softmax", axis=-1)
    engine = _build(_model([node], {}, [2, n], [2, n]), FP16)
    got = engine.run({"x": x})["y"]
    h = x.astype(F16).astype(F32)
    e = np.exp(h - h.max(axis=-1, keepdims=True))
    want = (e / e.sum(axis=-1, keepdims=True, dtype=F32)).astype(F16)
    np.testing.assert_array_equal(got, want.astype(F32))
    h64 = h.astype(F64)
    e64 = np.exp(h64 - h64.max(axis=-1, keepdims=True))
    exact = e64 / e64.sum(axis=-1, keepdims=True)
    ulp = np.spacing(exact.astype(F16)).astype(F64)
    assert np.all(np.abs(got - exact) <= ulp)  # float16 rounding of a nearly exact value
    e16 = np.exp(h.astype(F16) - h.astype(F16).max(axis=-1, keepdims=True))
    pure_fp16 = (e16 / _sequential_fp16_sum(e16)[:, None]).astype(F16)
    rel_engine = np.abs(got - exact).sum() / exact.sum()
    rel_fp16 = np.abs(pure_fp16.astype(F64) - exact).sum() / exact.sum()
    assert rel_fp16 > 10 * rel_engine, (rel_fp16, rel_engine)


# ---------------------------------------------------------------------------- tf32 layers


def _mantissa_rich(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float32 values using all 23 mantissa bits (TF32 keeps 10)."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(-1.0, 1.0, size=shape).astype(F32)
    assert np.mean(round_to_tf32(values) != values) > 0.99
    return values


def test_a_tf32_matmul_multiplies_tf32_rounded_inputs_with_float32_accumulation() -> None:
    k = 64
    x, w = _mantissa_rich((8, k), 8), _mantissa_rich((k, 16), 9)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    engine = _build(_model([node], {"w": w}, [8, k], [8, 16]), TF32)
    got = engine.run({"x": x})["y"].astype(F64)
    xr, wr = round_to_tf32(x).astype(F64), round_to_tf32(w).astype(F64)
    want = xr @ wr
    # float32 accumulation of k products: |error| <= k * 2**-24 * sum |x_i w_i|.
    bound = k * 2.0**-24 * (np.abs(xr) @ np.abs(wr))
    assert np.all(np.abs(got - want) <= bound)
    fp32 = x.astype(F64) @ w.astype(F64)
    assert np.mean(np.abs(got - fp32) > bound) > 0.5, "tf32 must differ from plain fp32"
    fp32_engine = build(load(_model([node], {"w": w}, [8, k], [8, 16])), BASE)
    plain = fp32_engine.run({"x": x})["y"].astype(F64)
    assert np.all(np.abs(plain - fp32) <= bound)
    assert np.any(plain != got)


def test_a_tf32_conv_convolves_tf32_rounded_inputs_with_float32_accumulation() -> None:
    x, w = _mantissa_rich((1, 4, 6, 6), 10), _mantissa_rich((3, 4, 3, 3), 11)
    b = np.zeros(3, F32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    engine = _build(_model([node], {"w": w}, [1, 4, 6, 6], [1, 3, 6, 6]), TF32)
    got = engine.run({"x": x})["y"].astype(F64)
    xr, wr = round_to_tf32(x), round_to_tf32(w)
    want = _conv2d(xr, wr, b, 1)
    depth = 4 * 3 * 3
    bound = depth * 2.0**-24 * _conv2d(np.abs(xr), np.abs(wr), b, 1)
    assert np.all(np.abs(got - want) <= bound)
    assert np.mean(np.abs(got - _conv2d(x, w, b, 1)) > bound) > 0.5
