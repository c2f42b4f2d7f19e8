"""The 2:4 sparse GEMM (kernels/gemm_sparse.cu, mma.sp) on the CPU shim: a pruned matrix
compressed by engine.sparsity.compress (values + reordered metadata, layouts sm80_f16 and
sm80_s8) times a dense B equals the dense product on the pruned matrix: fp16 within 1e-2, int8
bit-exact with gie::QGemm on the decompressed weight. The shim's mma.sp follows the PTX ISA
fragment and metadata tables; the kernel's metadata indexing follows compress.py's reorder, so
agreement checks one against the other (not against silicon).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.backends.cuda import activations, nvrtc, shim_runner
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, default_registry
from engine.sparsity import compress

REGISTRY = default_registry()
CONTEXT = KernelContext(opset=17)
pytestmark = pytest.mark.xdist_group("cuda-shim")


def library(shim_cache: Path) -> shim_runner.ShimLibrary:
    return shim_runner.build_file(KERNEL_DIR / "gemm_sparse.cu", shim_cache)


def pruned(rng: np.random.Generator, rows: int, k: int, dtype: type) -> np.ndarray:
    """A random [rows, K] matrix keeping 2 (sometimes 1 or 0) values of every group of 4."""
    if dtype == np.int8:
        dense = rng.integers(-128, 128, size=(rows, k)).astype(np.int8)
    else:
        dense = rng.standard_normal((rows, k)).astype(dtype)
    groups = dense.reshape(rows, k // 4, 4)
    keep = np.argsort(rng.random(groups.shape), axis=-1)[..., :2]
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    mask &= rng.random(groups.shape) > 0.1  # some groups with fewer than 2 non-zeros
    return np.where(mask, groups, 0).reshape(rows, k).astype(dtype)


def metadata_words(packed: compress.Compressed) -> np.ndarray:
    """The stored metadata as the kernel's 32-bit words."""
    return np.ascontiguousarray(packed.metadata).reshape(-1).view(np.uint32)


@pytest.mark.parametrize(
    ("m", "n", "k", "activation", "with_bias", "with_residual"),
    [
        (16, 8, 32, "", False, False),
        (20, 13, 60, "Relu", True, True),
        (40, 24, 96, "GELU", True, False),
    ],
)
def test_sparse_f16_gemm_equals_the_dense_product(
    shim_cache, m, n, k, activation, with_bias, with_residual
) -> None:
    rng = np.random.default_rng(m + n + k)
    weight = pruned(rng, m, k, np.float16)
    packed = compress.compress_2_4(weight)
    assert packed.layout == compress.SparseLayout.SM80_F16
    np.testing.assert_array_equal(compress.decompress(packed), weight)
    b = rng.standard_normal((k, n)).astype(np.float16)
    bias = rng.standard_normal(m).astype(np.float16) if with_bias else None
    residual = rng.standard_normal((m, n)).astype(np.float16) if with_residual else None
    code, alpha, beta = activations.activation_arguments(Attrs({"activation": activation}))
    out = np.zeros((m, n), np.float16)
    library(shim_cache).launch(
        "gie_gemm_sparse_f16",
        ((n + 7) // 8, (m + 15) // 16),
        32,
        [np.ascontiguousarray(packed.values), metadata_words(packed), b, bias, residual, out,
         m, n, k, packed.padded_shape[0], n, 1, n, 1, code, alpha, beta, 1],
    )  # fmt: skip
    y = weight.astype(np.float32) @ b.astype(np.float32)
    if bias is not None:
        y += bias.astype(np.float32)[:, None]
    if residual is not None:
        y += residual.astype(np.float32)
    spec = REGISTRY.lookup("GemmAct", GIE_DOMAIN)
    identity = np.eye(n, dtype=np.float32)
    expected = spec.kernel([y, identity], Attrs({"activation": activation}), CONTEXT)[0]
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    ("out_channels", "tokens", "k", "activation", "with_residual"),
    [(16, 8, 64, "", False), (21, 11, 100, "Relu", True), (32, 17, 128, "Clip", True)],
)
def test_sparse_s8_gemm_equals_qgemm_on_the_pruned_weight(
    shim_cache, out_channels, tokens, k, activation, with_residual
) -> None:
    """Y[tokens, out] = QGemm(X, W^T): the kernel computes W @ X^T and writes Y through C's
    strides; per-channel scales and the int32 bias along W's rows."""
    rng = np.random.default_rng(out_channels * tokens + k)
    weight = pruned(rng, out_channels, k, np.int8)
    packed = compress.compress_2_4(weight)
    assert packed.layout == compress.SparseLayout.SM80_S8
    x = rng.integers(-128, 128, size=(tokens, k)).astype(np.int8)
    x_scale, y_scale = np.float32(0.021), np.float32(0.04)
    w_scale = rng.uniform(0.001, 0.01, out_channels).astype(np.float32)
    bias = rng.integers(-30000, 30000, out_channels).astype(np.int32)
    residual = (
        (rng.standard_normal((tokens, out_channels)) * 3).astype(np.float32)
        if with_residual
        else None
    )
    attributes = {"kind": "Gemm", "transB": 1, "activation": activation, "min": -2.0, "max": 3.0}
    spec = REGISTRY.lookup("QGemm", GIE_DOMAIN)
    inputs = [x, x_scale, weight, w_scale, bias, residual, y_scale]
    expected = spec.kernel(inputs, Attrs(attributes), CONTEXT)[0]
    code, alpha, beta = activations.activation_arguments(Attrs(attributes))
    out = np.zeros((tokens, out_channels), np.int8)
    library(shim_cache).launch(
        "gie_gemm_sparse_s8",
        ((tokens + 7) // 8, (out_channels + 15) // 16),
        32,
        [np.ascontiguousarray(packed.values), metadata_words(packed), x, bias, w_scale,
         residual, out, out_channels, tokens, k, packed.padded_shape[0], 1, k, 1,
         out_channels, float(x_scale), 1, float(y_scale), code, alpha, beta, 1],
    )  # fmt: skip
    assert expected.dtype == np.int8
    np.testing.assert_array_equal(out, expected)


def test_sparse_kernels_compile_without_spills_and_use_mma_sp(
    nvrtc_cache: nvrtc.CompileCache,
) -> None:
    instructions = (
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32",
        "mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32",
    )
    path = nvrtc.KERNEL_DIR / "gemm_sparse.cu"
    for arch in nvrtc.DEFAULT_ARCHS:
        cubin = nvrtc.compile_file(path, arch, cache=nvrtc_cache)
        assert set(cubin.resources) == {"gie_gemm_sparse_f16", "gie_gemm_sparse_s8"}
        assert not any(r.spills for r in cubin.resources.values()), (arch, cubin.resources)
        text = nvrtc.compile_file(path, arch, "ptx", cache=nvrtc_cache).binary.decode()
        assert all(i in text for i in instructions), arch
