"""Each kernel family run on the CPU through the shim equals the NumPy reference kernels.

Shapes are tiny and deliberately not multiples of the tiles (GEMM 13x17x19, softmax 3x37,
layernorm 4x33, rmsnorm 3x45) so every bounds check runs. fp32 results match at fp32 tolerance; fp16
kernels compute in fp32 and round once, so they match the reference to fp16 rounding.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.backends.cuda import activations, shim_runner
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.ops.gie_fused import ACTIVATIONS
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, default_registry

REGISTRY = default_registry()
CONTEXT = KernelContext(opset=17)
pytestmark = pytest.mark.xdist_group("cuda-shim")

RNG = np.random.default_rng(7)


def reference(op_type: str, inputs: list, attributes: dict, domain: str = "") -> np.ndarray:
    spec = REGISTRY.lookup(op_type, domain)
    assert spec is not None, op_type
    return np.asarray(spec.kernel(inputs, Attrs(attributes), CONTEXT)[0])


def library(shim_cache: Path, file_name: str) -> shim_runner.ShimLibrary:
    return shim_runner.build_file(KERNEL_DIR / file_name, shim_cache)


def random(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize(
    ("activation", "with_bias", "with_residual", "residual_first"),
    [
        ("", False, False, 1),
        ("Relu", True, True, 1),
        ("GELU", True, True, 0),
        ("LeakyRelu", True, False, 1),
    ],
)
def test_simt_gemm_with_epilogue_matches_gemm_act(
    shim_cache, activation, with_bias, with_residual, residual_first
) -> None:
    m, n, k = 13, 17, 19
    a, b = random(m, k), random(k, n)
    bias = random(n) if with_bias else None
    residual = random(m, n) if with_residual else None
    attributes = {
        "kind": "Gemm",
        "activation": activation,
        "residual_before_activation": residual_first,
        "activation_alpha": 0.1,
    }
    code, alpha, beta = activations.activation_arguments(Attrs(attributes))
    out = np.zeros((m, n), np.float32)
    library(shim_cache, "gemm_simt.cu").launch(
        "gie_gemm_simt_f32",
        ((n + 63) // 64, (m + 63) // 64),
        256,
        [a, b, bias, residual, out, m, n, k, k, n, n, code, alpha, beta, residual_first],
    )
    expected = reference("GemmAct", [a, b, bias, residual], attributes, GIE_DOMAIN)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_simt_gemm_spans_several_tiles(shim_cache) -> None:
    m, n, k = 70, 67, 33  # 2 x 2 blocks of 64 x 64, three K steps
    a, b, bias = random(m, k), random(k, n), random(n)
    out = np.zeros((m, n), np.float32)
    library(shim_cache, "gemm_simt.cu").launch(
        "gie_gemm_simt_f32",
        (2, 2),
        256,
        [a, b, bias, None, out, m, n, k, k, n, n, 0, 0.0, 0.0, 1],
    )
    np.testing.assert_allclose(out, a @ b + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entry", ["gie_gemm_simt_f16", "gie_gemm_mma_f16"])
def test_fp16_gemms_match_the_reference(shim_cache, entry) -> None:
    m, n, k = 13, 17, 19
    a, b, bias, residual = (
        random(m, k, dtype=np.float16),
        random(k, n, dtype=np.float16),
        random(n, dtype=np.float16),
        random(m, n, dtype=np.float16),
    )
    out = np.zeros((m, n), np.float16)
    if entry == "gie_gemm_mma_f16":
        lib, block = library(shim_cache, "gemm_mma_f16.cu"), 32
        grid = ((n + 7) // 8, (m + 15) // 16)
    else:
        lib, grid, block = library(shim_cache, "gemm_simt.cu"), (1, 1), 256
    lib.launch(
        entry,
        grid,
        block,
        [
            a,
            b,
            bias,
            residual,
            out,
            m,
            n,
            k,
            k,
            n,
            n,
            int(activations.Activation.RELU),
            0.0,
            0.0,
            1,
        ],
    )
    wide = [x.astype(np.float32) for x in (a, b, bias, residual)]
    expected = np.maximum(wide[0] @ wide[1] + wide[2] + wide[3], 0)  # fp32 accumulate
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_mma_gemm_at_tile_multiples_uses_the_cp_async_path(shim_cache) -> None:
    m, n, k = 32, 16, 48  # lda, ldb multiples of 8: every chunk goes through cp.async
    a, b = random(m, k, dtype=np.float16), random(k, n, dtype=np.float16)
    out = np.zeros((m, n), np.float16)
    library(shim_cache, "gemm_mma_f16.cu").launch(
        "gie_gemm_mma_f16", (2, 2), 32, [a, b, None, None, out, m, n, k, k, n, n, 0, 0.0, 0.0, 1]
    )
    expected = a.astype(np.float32) @ b.astype(np.float32)
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=2e-3, atol=4e-3)


# --------------------------------------------------------------------------- softmax, layernorm


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_softmax_rows_match_softmax(shim_cache, dtype) -> None:
    x = (random(3, 37) * 4).astype(dtype)
    out = np.zeros_like(x)
    suffix = "f32" if dtype == np.float32 else "f16"
    library(shim_cache, "softmax.cu").launch(f"gie_softmax_{suffix}", 3, 64, [x, out, 3, 37])
    expected = reference("Softmax", [x], {"axis": -1})
    tolerance = 1e-6 if dtype == np.float32 else 1e-3
    np.testing.assert_allclose(
        out.astype(np.float32), expected.astype(np.float32), rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize(
    ("dtype", "with_residual"), [(np.float32, False), (np.float32, True), (np.float16, True)]
)
def test_layernorm_matches_gie_layer_norm_and_its_residual_stream(
    shim_cache, dtype, with_residual
) -> None:
    x, gamma, beta = random(4, 33, dtype=dtype), random(33, dtype=dtype), random(33, dtype=dtype)
    residual = random(4, 33, dtype=dtype) if with_residual else None
    out, stream = np.zeros_like(x), np.zeros_like(x)
    suffix = "f32" if dtype == np.float32 else "f16"
    library(shim_cache, "layernorm.cu").launch(
        f"gie_layernorm_{suffix}", 2, 64, [x, residual, gamma, beta, out, stream, 4, 33, 1e-5]
    )
    spec = REGISTRY.lookup("LayerNorm", GIE_DOMAIN)
    expected, expected_stream = spec.kernel(
        [x, gamma, beta, residual], Attrs({"epsilon": 1e-5}), KernelContext(17, output_count=2)
    )
    tolerance = 1e-5 if dtype == np.float32 else 2e-3
    np.testing.assert_allclose(
        out.astype(np.float32), expected.astype(np.float32), rtol=tolerance, atol=tolerance
    )
    np.testing.assert_array_equal(stream, expected_stream)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rmsnorm_matches_gie_rms_norm(shim_cache, dtype) -> None:
    x, gamma = random(3, 45, dtype=dtype), random(45, dtype=dtype)
    out = np.zeros_like(x)
    suffix = "f32" if dtype == np.float32 else "f16"
    library(shim_cache, "rmsnorm.cu").launch(
        f"gie_rmsnorm_{suffix}", 3, 32, [x, gamma, out, 3, 45, 1e-6]
    )
    expected = reference("RMSNorm", [x, gamma], {"epsilon": 1e-6}, GIE_DOMAIN)
    tolerance = 1e-5 if dtype == np.float32 else 2e-3
    np.testing.assert_allclose(
        out.astype(np.float32), expected.astype(np.float32), rtol=tolerance, atol=tolerance
    )


# --------------------------------------------------------------------------- bias + activation


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a])
def test_bias_activation_matches_every_epilogue_activation(shim_cache, activation) -> None:
    x, bias = random(5, 7) * 3, random(7)
    attributes = {
        "kind": "Gemm",
        "activation": activation,
        "activation_alpha": 0.2,
        "min": -1.5,
        "max": 2.5,
    }
    code, alpha, beta = activations.activation_arguments(Attrs(attributes))
    out = np.zeros_like(x)
    library(shim_cache, "elementwise.cu").launch(
        "gie_bias_act_f32",
        1,
        32,
        [x, bias, out, 5, 7, code, alpha, beta],  # 32 < 35: strides
    )
    identity = np.eye(7, dtype=np.float32)
    expected = reference("GemmAct", [x, identity, bias], attributes, GIE_DOMAIN)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- shim primitives


SHIM_PRIMITIVES = r"""
#include "gie_prelude.cuh"
// out[0]: block sum of 1..n, out[1]: block max, out[2]: atomic count, out[3 + t]: a value
// written by thread (t + 1) % n read by thread t after a barrier.
extern "C" __global__ void primitives(float* out, int* counter) {
    __shared__ float scratch[32];
    __shared__ float ring[256];
    const int t = threadIdx.x, n = blockDim.x;
    const float total = gie_block_sum(float(t + 1), scratch);
    const float largest = gie_block_max(float(t), scratch);
    atomicAdd(counter, 1);
    ring[t] = float(t * 10);
    __syncthreads();
    out[3 + t] = ring[(t + 1) % n] + __shfl_xor_sync(0xffffffffu, 0.5f * (t & 1), 1);
    if (t == 0) { out[0] = total; out[1] = largest; }
}
"""


def test_shim_barrier_shuffle_reductions_and_atomics(shim_cache) -> None:
    lib = shim_runner.build(SHIM_PRIMITIVES, "primitives.cu", shim_cache)
    out, counter = np.zeros(3 + 96, np.float32), np.zeros(1, np.int32)
    lib.launch("primitives", 1, 96, [out, counter])
    threads = np.arange(96)
    assert out[0] == threads.sum() + 96 and out[1] == 95 and counter[0] == 96
    partner_half = 0.5 * ((threads ^ 1) & 1)
    np.testing.assert_array_equal(out[3:], ((threads + 1) % 96) * 10 + partner_half)


def test_launch_checks_buffer_dtypes_and_arity(shim_cache) -> None:
    lib = library(shim_cache, "softmax.cu")
    with pytest.raises(shim_runner.ShimError, match="float32"):
        lib.launch("gie_softmax_f32", 1, 32, [np.zeros(4), np.zeros(4, np.float32), 1, 4])
    with pytest.raises(shim_runner.ShimError, match="takes 4 arguments"):
        lib.launch("gie_softmax_f32", 1, 32, [None])
    with pytest.raises(shim_runner.ShimError, match="no kernel"):
        lib.launch("missing", 1, 32, [])


def test_int8_mma_emulation_follows_the_m16n8k32_fragment_layout(shim_cache) -> None:
    """Fragments packed per the PTX tables (A row-major 16x32, B col-major 32x8, s8, 4 per
    register, lowest k in the lowest byte) give D = A @ B in the C-fragment layout."""
    a = RNG.integers(-128, 128, (16, 32), dtype=np.int8)
    b = RNG.integers(-128, 128, (32, 8), dtype=np.int8)
    lanes = np.arange(32)
    group, pair = lanes // 4, lanes % 4

    def pack(values: np.ndarray) -> np.ndarray:  # [..., 4] int8 -> uint32
        return np.ascontiguousarray(values).view(np.uint32)[..., 0]

    a_regs = np.stack(
        [
            pack(np.stack([a[r, 4 * t + k0 : 4 * t + k0 + 4] for r, t in zip(rows, pair)]))
            for rows, k0 in ((group, 0), (group + 8, 0), (group, 16), (group + 8, 16))
        ],
        axis=1,
    )
    b_regs = np.stack(
        [
            pack(np.stack([b[4 * t + k0 : 4 * t + k0 + 4, g] for g, t in zip(group, pair)]))
            for k0 in (0, 16)
        ],
        axis=1,
    )
    fragments = np.concatenate([a_regs.ravel(), b_regs.ravel()]).astype(np.uint32)
    out = np.zeros(128, np.int32)
    lib = library(shim_cache, "tensor_core_stubs.cu")
    lib.launch("gie_probe_mma_s8", 1, 32, [fragments, out])
    product = a.astype(np.int32) @ b.astype(np.int32)
    rows = group[:, None] + np.array([0, 0, 8, 8])[None, :]
    cols = 2 * pair[:, None] + np.array([0, 1, 0, 1])[None, :]
    np.testing.assert_array_equal(out.reshape(32, 4), product[rows, cols])


DEADLOCK = r"""
// Thread 0 waits at a barrier the others never reach: they spin on a flag nobody sets.
extern "C" __global__ void stuck(int* flag) {
    if (threadIdx.x == 0) __syncthreads();
    else while (atomicAdd(flag, 0) == 0) {}
}
"""


def test_a_deadlocked_barrier_aborts_with_a_message_instead_of_hanging(shim_cache) -> None:
    shim_runner.build(DEADLOCK, "stuck.cu", shim_cache)  # compiled here, loaded by the child
    code = (
        "import numpy as np\n"
        "from engine.backends.cuda import shim_runner\n"
        f"lib = shim_runner.build({DEADLOCK!r}, 'stuck.cu', {str(shim_cache)!r})\n"
        "lib.set_barrier_timeout(0.3)\n"
        "lib.launch('stuck', 1, 32, [np.zeros(1, np.int32)])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "gie_cpu_shim: a barrier waited 300 ms for 31 of 32 threads" in result.stderr
