"""Convolution, pooling and reformat kernels (NHWC) on the CPU shim vs the NumPy reference.

The references run in NCHW (engine.ops: Conv, gie::ConvAct, MaxPool, AveragePool,
GlobalAveragePool; engine.quantize.qparams for int8); the kernels get the same values transposed
to NHWC (weights to KRSC) in NumPy, and their outputs are transposed back. Shapes are tiny and
not multiples of the tiles, so every bounds check runs. fp32 convolutions match at rtol 1e-4
(other summation order), fp16 storage within 1e-2 (the kernel rounds once, the reference per
stage); pooling and every reformat kernel match bit for bit. Each file also compiles for sm_80
and sm_90 with no local-memory spills, the implicit GEMM also at other -D tile sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conv_cases import ConvCase

from engine.backends.cuda import activations, nvrtc, shim_runner
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, default_registry
from engine.quantize import qparams

REGISTRY = default_registry()
CONTEXT = KernelContext(opset=19)
RNG = np.random.default_rng(11)
FILES = ("conv_implicit_gemm.cu", "conv_depthwise.cu", "pool.cu", "reformat.cu")
SMALL_TILES = "#define GIE_CONV_BM 32\n#define GIE_CONV_BN 16\n#define GIE_CONV_BK 8\n"
pytestmark = pytest.mark.xdist_group("cuda-shim")


def reference(op_type: str, inputs: list, attributes: dict, domain: str = "") -> np.ndarray:
    spec = REGISTRY.lookup(op_type, domain)
    assert spec is not None, op_type
    return np.asarray(spec.kernel(inputs, Attrs(attributes), CONTEXT)[0])


def library(shim_cache: Path, file_name: str) -> shim_runner.ShimLibrary:
    return shim_runner.build_file(KERNEL_DIR / file_name, shim_cache)


def random(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW (or OIHW) -> NHWC (or KRSC), contiguous."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw(x: np.ndarray) -> np.ndarray:
    """NHWC -> NCHW, contiguous."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def suffix(dtype: type) -> str:
    return "f32" if dtype == np.float32 else "f16"


def blocks(total: int, threads: int = 256) -> int:
    """Blocks for a grid-stride kernel; at most 3 so the stride loop runs on bigger shapes."""
    return min(3, -(-total // threads))


# --------------------------------------------------------------------------- convolution


CONV_CASES = [
    ConvCase(1, 3, 7, 7, 4, 3, pads=(1, 1, 1, 1), activation="Relu", residual=True),
    ConvCase(2, 4, 9, 9, 5, 3, pads=(1, 1, 1, 1), activation="Relu"),  # 162 rows: 3 tiles
    ConvCase(
        2,
        8,
        9,
        6,
        6,
        3,
        stride=2,
        pads=(0, 1, 1, 0),
        group=2,
        residual=True,
        activation="LeakyRelu",
        residual_first=0,
    ),
    ConvCase(1, 4, 8, 9, 4, 3, pads=(2, 2, 2, 2), dilation=2, bias=False),
    ConvCase(2, 6, 5, 5, 6, 1, activation="Relu"),  # 1x1: the GEMM the builder sends to gemm_simt
    ConvCase(2, 4, 9, 8, 4, 1, stride=2, group=2, residual=True),
    ConvCase(1, 5, 6, 7, 6, 3, stride=2, pads=(1, 0, 2, 1), dilation=2, activation="Relu6"),
]


def run_conv(
    lib: shim_runner.ShimLibrary, case: ConvCase, dtype: type, tiles: tuple[int, int] = (64, 64)
) -> tuple[np.ndarray, np.ndarray]:
    """(kernel output, reference output), both NCHW."""
    x = random(case.n, case.c, case.h, case.w, dtype=dtype)
    w = (random(case.m, case.c // case.group, case.k, case.k) / case.k).astype(dtype)
    bias = random(case.m, dtype=dtype) if case.bias else None
    oh, ow = case.out()
    residual = random(case.n, case.m, oh, ow, dtype=dtype) if case.residual else None
    attributes = case.attributes()
    if case.activation or case.residual:
        expected = reference("ConvAct", [x, w, bias, residual], attributes, GIE_DOMAIN)
    else:
        conv = {k: v for k, v in attributes.items() if k in ("group", "strides", "pads")}
        conv |= {"dilations": attributes["dilations"], "kernel_shape": attributes["kernel_shape"]}
        expected = reference("Conv", [x, w] if bias is None else [x, w, bias], conv)
    assert expected.shape == (case.n, case.m, oh, ow)
    code, alpha, beta = activations.activation_arguments(Attrs(attributes))
    out = np.zeros((case.n, oh, ow, case.m), dtype)
    rows, per_group = case.n * oh * ow, case.m // case.group
    grid = (-(-rows // tiles[0]), -(-per_group // tiles[1]), case.group)
    args = [nhwc(x), nhwc(w), bias, None if residual is None else nhwc(residual), out]
    args += [case.n, case.h, case.w, case.c, case.m, oh, ow, case.k, case.k]
    args += [case.stride, case.stride, case.pads[0], case.pads[1], case.dilation, case.dilation]
    args += [case.group, code, alpha, beta, case.residual_first]
    lib.launch(f"gie_conv_implicit_gemm_{suffix(dtype)}", grid, 256, args)
    return nchw(out), expected


@pytest.mark.parametrize(
    "case", CONV_CASES, ids=lambda c: f"k{c.k}s{c.stride}d{c.dilation}g{c.group}"
)
def test_implicit_gemm_conv_matches_conv_and_conv_act_in_fp32(shim_cache, case) -> None:
    out, expected = run_conv(library(shim_cache, "conv_implicit_gemm.cu"), case, np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2]], ids=["relu-residual", "groups"])
def test_implicit_gemm_conv_with_fp16_storage(shim_cache, case) -> None:
    out, expected = run_conv(library(shim_cache, "conv_implicit_gemm.cu"), case, np.float16)
    np.testing.assert_allclose(
        out.astype(np.float32), expected.astype(np.float32), rtol=1e-2, atol=1e-2
    )


def test_implicit_gemm_conv_at_other_tile_sizes(shim_cache) -> None:
    """-D GIE_CONV_BM=32, BN=16, BK=8: 20 output channels per group span two column tiles."""
    source = SMALL_TILES + (KERNEL_DIR / "conv_implicit_gemm.cu").read_text()
    lib = shim_runner.build(source, "conv_implicit_gemm_small_tiles.cu", shim_cache)
    case = ConvCase(2, 6, 6, 5, 40, 3, pads=(1, 1, 1, 1), group=2, activation="Relu")
    out, expected = run_conv(lib, case, np.float32, tiles=(32, 16))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_1x1_conv_is_the_simt_gemm_the_builder_maps_it_to(shim_cache) -> None:
    """A 1x1 stride-1 group-1 conv in NHWC is gie_gemm_simt_f32 with A = x as [N*H*W, C],
    B = the weight transposed at build time to [C, M], the same epilogue (conv_implicit_gemm.cu)."""
    case = ConvCase(2, 6, 5, 7, 9, 1, activation="Relu", residual=True)
    x, w = random(case.n, case.c, case.h, case.w), random(case.m, case.c, 1, 1)
    bias, residual = random(case.m), random(case.n, case.m, case.h, case.w)
    expected = reference("ConvAct", [x, w, bias, residual], case.attributes(), GIE_DOMAIN)
    rows = case.n * case.h * case.w
    out = np.zeros((rows, case.m), np.float32)
    b = np.ascontiguousarray(w[:, :, 0, 0].T)
    args = [nhwc(x).reshape(rows, case.c), b, bias, nhwc(residual).reshape(rows, case.m), out]
    args += [rows, case.m, case.c, case.c, case.m, case.m, int(activations.Activation.RELU)]
    args += [0.0, 0.0, 1]
    library(shim_cache, "gemm_simt.cu").launch("gie_gemm_simt_f32", (1, 2), 256, args)
    out = nchw(out.reshape(case.n, case.h, case.w, case.m))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- depthwise


@pytest.mark.parametrize(
    ("k", "stride", "pad", "dilation", "dtype"),
    [
        (3, 1, 1, 1, np.float32),
        (5, 2, 2, 1, np.float32),
        (4, 1, 2, 2, np.float32),  # the run-time filter loop
        (3, 2, 1, 1, np.float16),
    ],
)
def test_depthwise_conv_matches_conv_act(shim_cache, k, stride, pad, dilation, dtype) -> None:
    n, c, h, w = 2, 5, 9, 7
    x, weight = random(n, c, h, w, dtype=dtype), random(c, 1, k, k, dtype=dtype)
    bias = random(c, dtype=dtype)
    span = (k - 1) * dilation + 1
    oh, ow = (h + 2 * pad - span) // stride + 1, (w + 2 * pad - span) // stride + 1
    residual = random(n, c, oh, ow, dtype=dtype)
    attributes = {
        "group": c,
        "strides": [stride] * 2,
        "pads": [pad] * 4,
        "dilations": [dilation] * 2,
        "kernel_shape": [k, k],
        "activation": "Relu",
    }
    expected = reference("ConvAct", [x, weight, bias, residual], attributes, GIE_DOMAIN)
    out = np.zeros((n, oh, ow, c), dtype)
    args = [nhwc(x), np.ascontiguousarray(weight[:, 0]), bias, nhwc(residual), out]
    args += [n, h, w, c, oh, ow, k, k, stride, stride, pad, pad, dilation, dilation]
    args += [int(activations.Activation.RELU), 0.0, 0.0, 1]
    total = out.size
    library(shim_cache, "conv_depthwise.cu").launch(
        f"gie_conv_depthwise_{suffix(dtype)}", blocks(total, 64), 64, args
    )
    tolerance = 1e-4 if dtype == np.float32 else 1e-2
    np.testing.assert_allclose(
        nchw(out).astype(np.float32),
        expected.astype(np.float32),
        rtol=tolerance,
        atol=tolerance / 10 if dtype == np.float32 else tolerance,
    )


# --------------------------------------------------------------------------- pooling


POOL_CASES = [
    # kernel, strides, pads (t, l, b, r), dilations, ceil_mode, count_include_pad
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 0, 0),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 0, 1),
    ((2, 3), (2, 1), (0, 1, 1, 1), (1, 1), 1, 1),  # ceil mode grows the end pads
    ((3, 2), (1, 2), (1, 0, 0, 1), (2, 1), 1, 0),
]


def pool_attributes(case: tuple, op: str) -> dict:
    kernel, strides, pads, dilations, ceil_mode, include = case
    attributes = {
        "kernel_shape": list(kernel),
        "strides": list(strides),
        "pads": list(pads),
        "dilations": list(dilations),
        "ceil_mode": ceil_mode,
    }
    if op == "AveragePool":
        attributes["count_include_pad"] = include
    return attributes


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("case", POOL_CASES, ids=["k3s2", "k3s2-incl", "ceil-incl", "ceil-dil"])
def test_windowed_pools_match_the_reference_bit_for_bit(shim_cache, case, op, dtype) -> None:
    n, c, h, w = 2, 5, 7, 8
    x = random(n, c, h, w, dtype=dtype)
    x[0, 0, 0, :3] = -np.inf  # max of a window of -inf (and pads) stays -inf
    expected = reference(op, [x], pool_attributes(case, op))
    oh, ow = expected.shape[2:]
    kernel, strides, pads, dilations, _, include = case
    out = np.zeros((n, oh, ow, c), dtype)
    args = [nhwc(x), out, n, h, w, c, oh, ow, *kernel, *strides, pads[0], pads[1]]
    if op == "MaxPool":
        entry = f"gie_max_pool_{suffix(dtype)}"
        args += [*dilations]
    else:
        entry = f"gie_average_pool_{suffix(dtype)}"
        args += [pads[2], pads[3], *dilations, include]
    library(shim_cache, "pool.cu").launch(entry, blocks(out.size, 64), 64, args)
    np.testing.assert_array_equal(nchw(out), expected)


def test_max_pool_propagates_nan(shim_cache) -> None:
    x = random(1, 3, 4, 4)
    x[0, 1, 1, 1] = np.nan
    attributes = pool_attributes(((2, 2), (2, 2), (0, 0, 0, 0), (1, 1), 0, 0), "MaxPool")
    expected = reference("MaxPool", [x], attributes)
    out = np.zeros((1, 2, 2, 3), np.float32)
    args = [nhwc(x), out, 1, 4, 4, 3, 2, 2, 2, 2, 2, 2, 0, 0, 1, 1]
    library(shim_cache, "pool.cu").launch("gie_max_pool_f32", 1, 32, args)
    np.testing.assert_array_equal(nchw(out), expected)
    assert np.isnan(out[0, 0, 0, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_global_average_pool_matches_the_reference(shim_cache, dtype) -> None:
    n, c, h, w = 2, 37, 5, 7  # two channel blocks, the second partly empty
    x = random(n, c, h, w, dtype=dtype)
    expected = reference("GlobalAveragePool", [x], {})
    out = np.zeros((n, c), dtype)
    library(shim_cache, "pool.cu").launch(
        f"gie_global_average_pool_{suffix(dtype)}", (2, n), (32, 8), [nhwc(x), out, h, w, c]
    )
    tolerance = 1e-6 if dtype == np.float32 else 1e-3
    np.testing.assert_allclose(
        out.astype(np.float32),
        expected.reshape(n, c).astype(np.float32),
        rtol=tolerance,
        atol=tolerance,
    )


# --------------------------------------------------------------------------- reformat


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nchw_nhwc_transposes_are_exact(shim_cache, dtype) -> None:
    n, c, h, w = 2, 37, 5, 9  # C and H * W = 45 are not multiples of the 32 x 32 tile
    x = random(n, c, h, w, dtype=dtype)
    lib = library(shim_cache, "reformat.cu")
    grid = (-(-(h * w) // 32), -(-c // 32), n)
    to_nhwc = np.zeros((n, h, w, c), dtype)
    lib.launch(f"gie_nchw_to_nhwc_{suffix(dtype)}", grid, (32, 8), [x, to_nhwc, n, c, h * w])
    np.testing.assert_array_equal(to_nhwc, x.transpose(0, 2, 3, 1))
    back = np.zeros_like(x)
    lib.launch(f"gie_nhwc_to_nchw_{suffix(dtype)}", grid, (32, 8), [to_nhwc, back, n, c, h * w])
    np.testing.assert_array_equal(back.view(np.uint8), x.view(np.uint8))


SPECIAL = np.array(
    [
        0.0,
        -0.0,
        1.0,
        65504.0,
        65519.99,
        65520.0,
        -1e6,
        np.inf,
        -np.inf,
        np.nan,
        6e-8,
        3e-8,
        2.98e-8,
        1e-5,
        0.1,
        1 + 2**-11,
        1 + 3 * 2**-11,
    ],
    np.float32,
)  # fp16 max, overflow to inf, subnormals, ties to even


def test_fp32_fp16_casts_are_exact(shim_cache) -> None:
    x = np.concatenate([SPECIAL, random(300) * 100]).astype(np.float32)
    lib = library(shim_cache, "reformat.cu")
    half = np.zeros(x.size, np.float16)
    lib.launch("gie_cast_f32_to_f16", 1, 64, [x, half, x.size])
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(half.view(np.uint16)[finite], expected.view(np.uint16)[finite])
    assert np.isnan(half[~finite]).all()
    wide = np.zeros(x.size, np.float32)
    lib.launch("gie_cast_f16_to_f32", 2, 64, [half, wide, x.size])
    np.testing.assert_array_equal(wide, half.astype(np.float32))


def quantize_inputs() -> tuple[np.ndarray, float]:
    """Ties (k + 0.5 at scale 0.5), saturation, infinities, NaN, random values."""
    scale = 0.5
    ties = (np.arange(-300, 300, dtype=np.float32) + 0.5) * scale
    special = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 63.75, -64.25, -0.0], np.float32)
    return np.concatenate([ties, special, random(200) * 40]).astype(np.float32), scale


@pytest.mark.parametrize("scale", [0.5, 0.0137, 3.0])
def test_quantize_equals_qparams_quantize_bit_for_bit(shim_cache, scale) -> None:
    x, _ = quantize_inputs()
    x = (x * np.float32(scale / 0.5)).astype(np.float32)  # exact ties at scales 0.5 and 3
    lib = library(shim_cache, "reformat.cu")
    q = np.zeros(x.size, np.int8)
    lib.launch("gie_quantize_f32_s8", 3, 128, [x, q, x.size, scale])
    np.testing.assert_array_equal(q, qparams.quantize(x, scale))
    with np.errstate(over="ignore"):
        half = x.astype(np.float16)
    q16 = np.zeros(x.size, np.int8)
    lib.launch("gie_quantize_f16_s8", 3, 128, [half, q16, x.size, scale])
    np.testing.assert_array_equal(q16, qparams.quantize(half, scale))


def test_quantize_rounds_ties_to_even_and_saturates(shim_cache) -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 127.5, -128.5, -129.0, 1e9, np.nan], np.float32)
    q = np.zeros(x.size, np.int8)
    library(shim_cache, "reformat.cu").launch("gie_quantize_f32_s8", 1, 32, [x, q, x.size, 1.0])
    assert q.tolist() == [0, 2, 2, 0, -2, 126, 127, -128, -128, 127, 0]


def test_dequantize_equals_qparams_dequantize(shim_cache) -> None:
    q = np.arange(-128, 128, dtype=np.int8)
    scale = 0.0371
    lib = library(shim_cache, "reformat.cu")
    out = np.zeros(q.size, np.float32)
    lib.launch("gie_dequantize_s8_f32", 2, 64, [q, out, q.size, scale])
    np.testing.assert_array_equal(out, qparams.dequantize(q, scale))
    half = np.zeros(q.size, np.float16)
    lib.launch("gie_dequantize_s8_f16", 2, 64, [q, half, q.size, scale])
    np.testing.assert_array_equal(half, qparams.dequantize(q, scale).astype(np.float16))


# --------------------------------------------------------------------------- compile check


@pytest.mark.xdist_group("cuda-nvrtc")
def test_kernels_compile_for_sm80_and_sm90_without_spills(nvrtc_cache) -> None:
    variants = [(name, (KERNEL_DIR / name).read_text(), ()) for name in FILES]
    implicit = (KERNEL_DIR / "conv_implicit_gemm.cu").read_text()
    for tile in ("-DGIE_CONV_BM=128", "-DGIE_CONV_BN=32", "-DGIE_CONV_BK=8"):
        variants.append((f"conv_implicit_gemm.cu {tile}", implicit, (tile,)))
    for name, source, options in variants:
        for arch in nvrtc.DEFAULT_ARCHS:
            result = nvrtc.compile_source(
                source, name, arch, extra_options=options, cache=nvrtc_cache
            )
            assert result.resources, name
            for entry, used in result.resources.items():
                assert not used.spills, f"{name} {arch} {entry} spills: {used}"
                assert 0 < used.registers <= 128, f"{name} {arch} {entry}: {used.registers}"
