"""The int8 IMMA GEMM (kernels/gemm_int8.cu) on the CPU shim equals gie::QGemm / gie::QMatMul
bit for bit: int32 accumulation, int32 bias, float32 requantization, epilogue, and the int8
(rintf + saturate), float32 and float16 outputs. Shapes are tiny and off the 16 x 8 x 32 tile
(M 5..20, N 8..24, K 32..96) so every bounds check runs; scales are chosen so that the int8
outputs saturate in places.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.backends.cuda import activations, nvrtc, shim_runner
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, default_registry

REGISTRY = default_registry()
CONTEXT = KernelContext(opset=17)
pytestmark = pytest.mark.xdist_group("cuda-shim")

#: output_dtype code -> (entry point suffix, NumPy dtype)
OUTPUTS = {3: ("s8", np.int8), 1: ("f32", np.float32), 10: ("f16", np.float16)}


def library(shim_cache: Path) -> shim_runner.ShimLibrary:
    return shim_runner.build_file(KERNEL_DIR / "gemm_int8.cu", shim_cache)


def reference(op_type: str, inputs: list, attributes: dict) -> np.ndarray:
    spec = REGISTRY.lookup(op_type, GIE_DOMAIN)
    assert spec is not None, op_type
    return np.asarray(spec.kernel(inputs, Attrs(attributes), CONTEXT)[0])


def int8(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(-128, 128, size=shape).astype(np.int8)


@pytest.mark.parametrize(
    ("m", "n", "k", "output", "activation", "bias", "residual", "residual_first", "trans_b"),
    [
        (5, 8, 32, 3, "", False, False, 1, False),
        (13, 17, 40, 3, "Relu", True, False, 1, False),
        (20, 24, 96, 3, "Clip", True, True, 1, False),
        (7, 11, 64, 3, "Relu", True, True, 0, True),
        (9, 19, 35, 1, "LeakyRelu", True, True, 1, False),
        (16, 8, 96, 1, "", True, False, 1, True),
        (11, 21, 72, 10, "Relu", True, True, 0, False),
    ],
)
def test_int8_gemm_equals_qgemm(
    shim_cache, m, n, k, output, activation, bias, residual, residual_first, trans_b
) -> None:
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    a_q, b_q = int8(rng, m, k), int8(rng, k, n)
    x_scale = np.float32(0.0173)
    w_scale = rng.uniform(0.001, 0.02, n).astype(np.float32)
    bias_q = rng.integers(-40000, 40000, n).astype(np.int32) if bias else None
    res = (rng.standard_normal((m, n)) * 8).astype(np.float32) if residual else None
    y_scale = np.float32(0.05)
    attributes = {
        "kind": "MatMul",
        "activation": activation,
        "residual_before_activation": residual_first,
        "activation_alpha": 0.125,
        "min": -10.0,
        "max": 20.0,
        "output_dtype": output,
    }
    inputs = [a_q, x_scale, b_q, w_scale, bias_q, res, y_scale if output == 3 else None]
    expected = reference("QGemm", inputs, attributes)

    b_stored = np.ascontiguousarray(b_q.T) if trans_b else b_q
    b_strides = (1, k) if trans_b else (n, 1)
    code, alpha, beta = activations.activation_arguments(Attrs(attributes))
    suffix, dtype = OUTPUTS[output]
    out = np.zeros((m, n), dtype)
    library(shim_cache).launch(
        f"gie_gemm_int8_{suffix}",
        ((n + 7) // 8, (m + 15) // 16, 1),
        32,
        [a_q, b_stored, bias_q, w_scale, res, out, m, n, k, k, *b_strides, n, 0, 0, 0,
         float(x_scale), 1, float(y_scale), code, alpha, beta, residual_first],
    )  # fmt: skip
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(out, expected)
    if output == 3:
        assert np.any(np.abs(out.astype(np.int32)) == 127) or np.any(out == -128)


def test_int8_gemm_bias_saturates_int32(shim_cache) -> None:
    m, n, k = 5, 8, 32
    a_q = np.full((m, k), 127, np.int8)
    b_q = np.full((k, n), 127, np.int8)
    bias_q = np.full(n, 2**31 - 1, np.int32)
    bias_q[::2] = -(2**31)
    w_scale = np.full(n, 1e-9, np.float32)
    inputs = [a_q, np.float32(1.0), b_q, w_scale, bias_q]
    expected = reference("QGemm", inputs, {"kind": "MatMul"})
    out = np.zeros((m, n), np.float32)
    library(shim_cache).launch(
        "gie_gemm_int8_f32",
        (1, 1, 1),
        32,
        [a_q, b_q, bias_q, w_scale, None, out, m, n, k, k, n, 1, n, 0, 0, 0,
         1.0, 1, 1.0, 0, 0.0, 0.0, 1],
    )  # fmt: skip
    np.testing.assert_array_equal(out, expected)


def test_int8_requantization_rounds_ties_to_even(shim_cache) -> None:
    """real / y_scale = acc / 2 exactly: every odd accumulator is a tie (rintf, not roundf)."""
    rng = np.random.default_rng(5)
    m, n, k = 6, 8, 32
    a_q = rng.integers(-3, 4, size=(m, k)).astype(np.int8)
    b_q = rng.integers(-3, 4, size=(k, n)).astype(np.int8)
    w_scale = np.full(n, 0.5, np.float32)
    inputs = [a_q, np.float32(1.0), b_q, w_scale, None, None, np.float32(1.0)]
    expected = reference("QGemm", inputs, {"kind": "MatMul"})
    acc = a_q.astype(np.int32) @ b_q.astype(np.int32)
    assert np.any(acc % 2 == 1), "the data must contain ties"
    out = np.zeros((m, n), np.int8)
    library(shim_cache).launch(
        "gie_gemm_int8_s8",
        (1, 1, 1),
        32,
        [a_q, b_q, None, w_scale, None, out, m, n, k, k, n, 1, n, 0, 0, 0,
         1.0, 1, 1.0, 0, 0.0, 0.0, 1],
    )  # fmt: skip
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.clip(np.rint(acc / 2), -128, 127).astype(np.int8))


@pytest.mark.parametrize(("output", "trans_b"), [(3, True), (1, False)])
def test_batched_int8_gemm_equals_qmatmul(shim_cache, output, trans_b) -> None:
    """Attention's int8 Q@K^T (B given as K [batch, N, K]) and P@V, per-tensor scales."""
    rng = np.random.default_rng(11)
    batch, m, n, k = 3, 9, 12, 40
    a_q = int8(rng, batch, m, k)
    b_q = int8(rng, batch, k, n)
    a_scale, b_scale, y_scale = np.float32(0.02), np.float32(0.03), np.float32(0.9)
    attributes = {"output_dtype": output}
    inputs = [a_q, a_scale, b_q, b_scale, y_scale if output == 3 else None]
    expected = reference("QMatMul", inputs, attributes)

    b_stored = np.ascontiguousarray(b_q.transpose(0, 2, 1)) if trans_b else b_q
    b_strides = (1, k) if trans_b else (n, 1)
    suffix, dtype = OUTPUTS[output]
    out = np.zeros((batch, m, n), dtype)
    library(shim_cache).launch(
        f"gie_gemm_int8_{suffix}",
        ((n + 7) // 8, (m + 15) // 16, batch),
        32,
        [a_q, b_stored, None, np.array([b_scale], np.float32), None, out, m, n, k, k,
         *b_strides, n, m * k, k * n, m * n, float(a_scale), 0, float(y_scale), 0, 0.0, 0.0, 1],
    )  # fmt: skip
    np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------- gemm_batched.cu
# (the fp32 / fp16 batched GEMMs of attention live here beside their int8 variant above)


@pytest.mark.parametrize(
    ("entry", "trans_b", "shape"),
    [
        ("gie_gemm_batched_f32", False, (2, 13, 17, 19)),
        ("gie_gemm_batched_f32", True, (3, 33, 9, 40)),
        ("gie_gemm_batched_mma_f16", False, (2, 13, 17, 19)),
        ("gie_gemm_batched_mma_f16", True, (3, 20, 24, 40)),
    ],
)
def test_batched_gemm_matches_matmul(shim_cache, entry, trans_b, shape) -> None:
    """scale * A[b] @ B[b] (P@V) and scale * Q[b] @ K[b]^T with K stored [batch, N, K]."""
    batch, m, n, k = shape
    rng = np.random.default_rng(sum(shape))
    dtype = np.float32 if entry.endswith("f32") else np.float16
    a = rng.standard_normal((batch, m, k)).astype(dtype)
    b = rng.standard_normal((batch, k, n)).astype(dtype)
    scale = 0.125
    b_stored = np.ascontiguousarray(b.transpose(0, 2, 1)) if trans_b else b
    b_strides = (1, k) if trans_b else (n, 1)
    out = np.zeros((batch, m, n), dtype)
    if dtype == np.float32:
        grid, block = ((n + 31) // 32, (m + 31) // 32, batch), 256
    else:
        grid, block = ((n + 7) // 8, (m + 15) // 16, batch), 32
    lib = shim_runner.build_file(KERNEL_DIR / "gemm_batched.cu", shim_cache)
    lib.launch(
        entry,
        grid,
        block,
        [a, b_stored, out, m, n, k, k, *b_strides, n, m * k, k * n, m * n, scale],
    )
    expected = scale * np.matmul(a.astype(np.float32), b.astype(np.float32))
    tolerance = 1e-5 if dtype == np.float32 else 4e-3
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=tolerance, atol=tolerance)


# --------------------------------------------------------------------------- NVRTC


@pytest.mark.parametrize(
    ("file_name", "instructions"),
    [
        ("gemm_int8.cu", ("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32",)),
        ("gemm_batched.cu", ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",)),
    ],
)
def test_kernels_compile_without_spills_and_use_the_tensor_cores(
    nvrtc_cache: nvrtc.CompileCache, file_name: str, instructions: tuple[str, ...]
) -> None:
    for arch in nvrtc.DEFAULT_ARCHS:
        path = nvrtc.KERNEL_DIR / file_name
        cubin = nvrtc.compile_file(path, arch, cache=nvrtc_cache)
        assert cubin.resources and not any(r.spills for r in cubin.resources.values()), arch
        assert all(0 < r.registers <= 128 for r in cubin.resources.values()), cubin.resources
        text = nvrtc.compile_file(path, arch, "ptx", cache=nvrtc_cache).binary.decode()
        assert all(i in text for i in instructions), (file_name, arch)
