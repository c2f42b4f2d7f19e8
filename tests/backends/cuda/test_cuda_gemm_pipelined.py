"""The pipelined tensor-core fp16 GEMM (kernels/gemm_mma_pipelined.cu) on the CPU shim.

Reference: np.matmul in float32 of the fp16 inputs, with the epilogue of gie::GemmAct (bias,
every activation, residual before or after it). The kernel rounds once to fp16, so it matches
within 1e-2. Shapes are not multiples of the tiles (70x40x24, 130x136x72, ...) so the M/N/K
tails (zero-filled chunks, unstored outputs) run, and K spans more tiles than stages so the
stage ring wraps. Both tile variants (128x128x32 with 8 warps, -D GIE_PIPE_SMALL=1: 64x64x32
with 4 warps) and other -D tiles run with the shim's deferred cp.async (a copy lands only at
the wait that covers it, as on the GPU) and poisoned (NaN) dynamic shared memory, so a wrong
wait count or a missing zero-fill fails. The file compiles for sm_80 and sm_90 with no spills.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from engine.backends.cuda import activations, lower_gemm_fast, nvrtc, shim_runner
from engine.backends.cuda.executor import CudaRunner
from engine.backends.cuda.launch_plan import KernelLaunch, KernelSource
from engine.backends.cuda.lowering import lower_launch_plan
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.backends.cuda.shim_device import ShimDevice
from engine.build.memory import plan_memory
from engine.build.plan import lower
from engine.config import BuilderConfig
from engine.ops.gie_fused import ACTIVATIONS
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, default_registry

REGISTRY = default_registry()
CONTEXT = KernelContext(opset=19)
RNG = np.random.default_rng(23)
FILE = KERNEL_DIR / "gemm_mma_pipelined.cu"
ENTRY = "gie_gemm_mma_pipelined_f16"
pytestmark = pytest.mark.xdist_group("cuda-shim")

#: variant -> (defines, BM, BN, BK, stages, threads)
VARIANTS: dict[str, tuple[dict[str, int], int, int, int, int, int]] = {
    "default": ({}, 128, 128, 32, 3, 256),
    "small": ({"GIE_PIPE_SMALL": 1}, 64, 64, 32, 3, 128),
    "small-4stage-bk64-group2": (
        {"GIE_PIPE_SMALL": 1, "GIE_PIPE_STAGES": 4, "GIE_PIPE_BK": 64, "GIE_PIPE_GROUP_M": 2},
        64,
        64,
        64,
        4,
        128,
    ),
}


def shared_bytes(bm: int, bn: int, bk: int, stages: int) -> int:
    """Dynamic shared memory of one block: STAGES * (BM * BK + BK * BN) fp16 values."""
    return stages * (bm * bk + bk * bn) * 2


def library(shim_cache: Path, variant: str) -> shim_runner.ShimLibrary:
    defines = VARIANTS[variant][0]
    prefix = "".join(f"#define {name} {value}\n" for name, value in defines.items())
    lib = shim_runner.build(
        prefix + FILE.read_text(), f"gemm_mma_pipelined_{variant}.cu", shim_cache
    )
    lib.set_deferred_cp_async(True)
    return lib


def half(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float16)


def run(
    lib: shim_runner.ShimLibrary,
    variant: str,
    a: np.ndarray,
    b: np.ndarray,
    bias: np.ndarray | None,
    residual: np.ndarray | None,
    m: int,
    n: int,
    k: int,
    code: int = 0,
    alpha: float = 0.0,
    beta: float = 0.0,
    residual_first: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Launch on the shim; a, b, out may be wider than K / N (lda, ldb, ldc = their widths)."""
    _, bm, bn, bk, stages, threads = VARIANTS[variant]
    if out is None:
        out = np.zeros((m, n), np.float16)
    lda, ldb, ldc = a.shape[1], b.shape[1], out.shape[1]
    grid = (-(-n // bn), -(-m // bm))
    args = [a, b, bias, residual, out, m, n, k, lda, ldb, ldc, code, alpha, beta, residual_first]
    lib.launch(ENTRY, grid, threads, args, shared_bytes=shared_bytes(bm, bn, bk, stages))
    return out


def gemm_act(a, b, bias, residual, attributes: dict) -> np.ndarray:
    """gie::GemmAct on the fp16 values widened to float32 (fp32 accumulate)."""
    wide = [None if x is None else x.astype(np.float32) for x in (a, b, bias, residual)]
    spec = REGISTRY.lookup("GemmAct", GIE_DOMAIN)
    assert spec is not None
    return np.asarray(spec.kernel(wide, Attrs({"kind": "Gemm", **attributes}), CONTEXT)[0])


def assert_fp16_close(out: np.ndarray, expected: np.ndarray) -> None:
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("variant", "m", "n", "k"),
    [
        ("small", 70, 40, 24),
        ("small", 130, 136, 72),
        ("small", 33, 16, 136),  # 5 K tiles through 3 stages: the ring wraps
        ("default", 70, 40, 24),
        ("default", 130, 136, 72),
        ("small-4stage-bk64-group2", 150, 72, 200),  # 3 x 2 blocks in grouped order, 4 K tiles
        ("small", 5, 8, 8),  # less than one chunk column of anything
    ],
)
def test_pipelined_gemm_matches_matmul_at_tails(shim_cache, variant, m, n, k) -> None:
    a, b = half(m, k), half(k, n)
    out = run(library(shim_cache, variant), variant, a, b, None, None, m, n, k)
    assert_fp16_close(out, np.matmul(a.astype(np.float32), b.astype(np.float32)))


def test_pipelined_gemm_with_k_zero_is_the_epilogue_of_zero(shim_cache) -> None:
    m, n = 9, 16
    a, b, bias = np.zeros((m, 8), np.float16), np.zeros((8, n), np.float16), half(n)
    out = run(library(shim_cache, "small"), "small", a, b, bias, None, m, n, 0)
    assert_fp16_close(out, np.broadcast_to(bias.astype(np.float32), (m, n)))


def test_leading_dimensions_wider_than_the_matrices(shim_cache) -> None:
    """lda = K + 16, ldb = N + 8, ldc = N + 24: only C[:, :N] is written."""
    m, n, k = 67, 48, 40
    a_wide, b_wide = half(m, k + 16), half(k, n + 8)
    out = np.full((m, n + 24), 7.0, np.float16)
    bias, residual = half(n), half(m, n + 24)
    run(
        library(shim_cache, "small"),
        "small",
        a_wide,
        b_wide,
        bias,
        residual,
        m,
        n,
        k,
        code=int(activations.Activation.RELU),
        out=out,
    )
    a, b = a_wide[:, :k], b_wide[:, :n]
    expected = gemm_act(a, b, bias, residual[:, :n], {"activation": "Relu"})
    assert_fp16_close(out[:, :n], expected)
    assert (out[:, n:] == 7.0).all()


# --------------------------------------------------------------------------- epilogue


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_matches_gemm_act(shim_cache, activation) -> None:
    m, n, k = 70, 40, 24
    a, b, bias = half(m, k, scale=0.5), half(k, n), half(n)
    attributes = {"activation": activation, "activation_alpha": 0.2, "min": -1.5, "max": 2.5}
    code, alpha, beta = activations.activation_arguments(Attrs(attributes))
    out = run(library(shim_cache, "small"), "small", a, b, bias, None, m, n, k, code, alpha, beta)
    expected = gemm_act(a, b, bias, None, attributes)
    assert_fp16_close(out, expected)


@pytest.mark.parametrize("variant", ["small", "default"])
@pytest.mark.parametrize("residual_first", [1, 0], ids=["residual-before", "residual-after"])
def test_residual_before_and_after_the_activation(shim_cache, variant, residual_first) -> None:
    m, n, k = 70, 40, 24
    a, b, bias, residual = half(m, k, scale=0.5), half(k, n), half(n), half(m, n, scale=2.0)
    attributes = {
        "activation": "GELU",
        "residual_before_activation": residual_first,
    }
    code, alpha, beta = activations.activation_arguments(Attrs(attributes))
    out = run(
        library(shim_cache, variant),
        variant,
        a,
        b,
        bias,
        residual,
        m,
        n,
        k,
        code,
        alpha,
        beta,
        residual_first,
    )
    expected = gemm_act(a, b, bias, residual, attributes)
    other = gemm_act(
        a, b, bias, residual, {**attributes, "residual_before_activation": 1 - residual_first}
    )
    assert np.abs(expected - other).max() > 0.5  # the order is visible at these values
    assert_fp16_close(out, expected)


# --------------------------------------------------------------------------- shim features

SHIM_PROBE = r"""
#include "gie_prelude.cuh"
// One thread: two cp.async groups into dynamic shared memory, read before any wait, after
// wait_group<1> and after wait_group<0>; then a float never written (0xFF poison: NaN).
extern "C" __global__ void probe(const float* source, float* out) {
    extern __shared__ __align__(16) float buffer[];
    gie_cp_async_16(buffer, source);
    gie_cp_async_commit();
    gie_cp_async_16(buffer + 4, source + 4);
    gie_cp_async_commit();
    for (int i = 0; i < 8; ++i) out[i] = buffer[i];
    gie_cp_async_wait_group<1>();
    for (int i = 0; i < 8; ++i) out[8 + i] = buffer[i];
    gie_cp_async_wait_group<0>();
    for (int i = 0; i < 8; ++i) out[16 + i] = buffer[i];
    out[24] = buffer[8];
}
"""


@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "synchronous"])
def test_shim_dynamic_shared_memory_and_cp_async_wait_group(shim_cache, deferred) -> None:
    lib = shim_runner.build(SHIM_PROBE, "cp_async_probe.cu", shim_cache)
    lib.set_deferred_cp_async(deferred)
    source = np.arange(1, 9, dtype=np.float32)
    out = np.zeros(25, np.float32)
    lib.launch("probe", 1, 1, [source, out], shared_bytes=48)
    lib.set_deferred_cp_async(False)
    if deferred:
        assert np.isnan(out[:8]).all()  # nothing landed before a wait
        np.testing.assert_array_equal(out[8:12], source[:4])  # the older group landed
        assert np.isnan(out[12:16]).all()  # the newest group may still be in flight
    else:
        np.testing.assert_array_equal(out[:8], source)
        np.testing.assert_array_equal(out[8:16], source)
    np.testing.assert_array_equal(out[16:24], source)
    assert np.isnan(out[24])


def test_shim_rewrites_extern_shared_declarations(shim_cache) -> None:
    rewrite = shim_runner.rewrite_dynamic_shared
    assert (
        rewrite("extern __shared__ __align__(16) gie_half smem[];")
        == "gie_half* smem = reinterpret_cast<gie_half*>(gie_shim::dynamic_shared());"
    )
    assert rewrite("extern __shared__ unsigned char raw[ ];").startswith("unsigned char* raw =")
    lib = shim_runner.build(SHIM_PROBE, "cp_async_probe.cu", shim_cache)
    with pytest.raises(shim_runner.ShimError, match="shared_bytes"):
        lib.launch("probe", 1, 1, [np.zeros(8, np.float32), np.zeros(25, np.float32)], -1)


# --------------------------------------------------------------------------- NVRTC

COMPILE_VARIANTS = {
    "default": [],
    "small": ["-DGIE_PIPE_SMALL=1"],
    "4-stages": ["-DGIE_PIPE_STAGES=4"],
    "bk64": ["-DGIE_PIPE_BK=64"],
}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("variant", list(COMPILE_VARIANTS))
def test_compiles_without_spills(nvrtc_cache, arch, variant) -> None:
    result = nvrtc.compile_file(
        FILE, arch, extra_options=COMPILE_VARIANTS[variant], cache=nvrtc_cache
    )
    resources = result.resources[ENTRY]
    assert not resources.spills, resources
    assert resources.stack_bytes == 0, resources
    assert resources.shared_bytes == 0  # all of it is dynamic (shared_bytes at launch)
    if variant != "bk64":  # __launch_bounds__(threads, 2): 2 blocks per SM by registers
        assert 0 < resources.registers <= 128, resources


# --------------------------------------------------------------------------- lowering


class SharedBytesShimDevice(ShimDevice):
    """ShimDevice passing each launch's dynamic shared memory to the shim (as the GPU device
    does); the kernel aborts on a launch with shared_bytes=0."""

    def _run_launch(self, launch: KernelLaunch) -> None:
        library = self._library(launch.source)
        args = [self._argument(a) for a in launch.args]
        library.launch(launch.entry, launch.grid, launch.block, args, launch.shared_bytes)


def gemm_model(w: np.ndarray, w2: np.ndarray, bias: np.ndarray) -> ir.Model:
    """Y1 = X @ W (MatMul), Y2 = X2 @ W2^T + bias (Gemm, transB), Y3 = GELU(X @ W + bias) + R
    (gie::GemmAct, residual after the activation); fp16."""
    from onnx import TensorProto, helper, numpy_helper

    f16 = TensorProto.FLOAT16
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["Y1"]),
        helper.make_node("Gemm", ["X2", "W2", "B"], ["Y2"], transB=1),
        helper.make_node(
            "GemmAct",
            ["X", "W", "B", "R"],
            ["Y3"],
            domain=GIE_DOMAIN,
            kind="MatMul",
            activation="GELU",
            residual_before_activation=0,
        ),
    ]
    inputs = [("X", [70, 24]), ("X2", [33, 16]), ("R", [70, 40])]
    graph = helper.make_graph(
        nodes,
        "gemms",
        [helper.make_tensor_value_info(name, f16, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, f16, None) for name in ("Y1", "Y2", "Y3")],
        [numpy_helper.from_array(v, k) for k, v in (("W", w), ("W2", w2), ("B", bias))],
    )
    opsets = [helper.make_opsetid("", 19), helper.make_opsetid(GIE_DOMAIN, 1)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


def test_tactics_lowerings_and_tile_variants_agree() -> None:
    assert [t.name for t in lower_gemm_fast.TACTICS] == list(lower_gemm_fast.LOWERINGS)
    for tile in lower_gemm_fast.TILES:
        assert tile.shared_bytes == shared_bytes(tile.bm, tile.bn, tile.bk, tile.stages)
    tactic = lower_gemm_fast.TACTICS[0]
    assert tactic.family == "gemm_tensor_core" and tactic.entry == ENTRY
    assert KernelSource(file=tactic.kernel_file).const_pointers(ENTRY) == [True] * 4 + [False] * 11
    assert lower_gemm_fast.TILES[0].shared_bytes == 48 * 1024  # fits without the attribute


@pytest.mark.parametrize("tile_index", [0, 1, 2, 3])
def test_tile_variants_of_the_catalogue_compile_without_spills(nvrtc_cache, tile_index) -> None:
    tile = lower_gemm_fast.TILES[tile_index]
    options = [f"-D{name}={value}" for name, value in tile.defines]
    result = nvrtc.compile_file(FILE, "sm_90", extra_options=options, cache=nvrtc_cache)
    assert not result.resources[ENTRY].spills, result.resources


def test_lowered_gemm_layers_run_the_pipelined_kernel(shim_cache) -> None:
    w, w2, bias = half(24, 40), half(40, 16), half(40)
    model = gemm_model(w, w2, bias)
    shapes = {"X": (70, 24), "X2": (33, 16), "R": (70, 40)}
    plan = lower(model, shapes)
    tactics = {t.name: t for t in lower_gemm_fast.TACTICS}
    chosen = {
        "MatMul": "gemm_mma_pipelined_f16_128x128x32_s4",
        "Gemm": "gemm_mma_pipelined_f16_64x64x32_s3",
        "gie::GemmAct": "gemm_mma_pipelined_f16_128x64x32_s3",
    }
    for layer in plan.layers:
        tactic = tactics[chosen[layer.qualified_op]]
        assert layer.qualified_op in tactic.ops
        assert tactic.check is not None and tactic.check(layer, plan) is None
        layer.tactic = tactic.name
    big = tactics["gemm_mma_pipelined_f16_128x128x32_s3"]
    gemm_layer = next(layer for layer in plan.layers if layer.op_type == "Gemm")
    assert "over twice" in (big.check(gemm_layer, plan) or "")  # 33 x 40 in a 128 x 128 tile

    memory = plan_memory(plan, BuilderConfig(), shapes)
    launch_plan = lower_launch_plan(plan, memory, shapes, dict(lower_gemm_fast.LOWERINGS))
    launches = [s for s in launch_plan.steps if isinstance(s, KernelLaunch)]
    assert [s.entry for s in launches] == [ENTRY] * 3
    geometry = {s.source.defines: (s.grid, s.block, s.shared_bytes) for s in launches}
    tile = {t.name: t for t in lower_gemm_fast.TILES}
    assert geometry[tactics[chosen["MatMul"]].defines] == ((1, 1, 1), (256, 1, 1), 65536)
    assert geometry[tactics[chosen["Gemm"]].defines] == ((1, 1, 1), (128, 1, 1), 24576)
    assert geometry[tactics[chosen["gie::GemmAct"]].defines] == (
        (1, 1, 1),
        (128, 1, 1),
        tile["gemm_mma_pipelined_f16_128x64x32_s3"].shared_bytes,
    )

    x, x2, r = half(70, 24), half(33, 16), half(70, 40)
    runner = CudaRunner(launch_plan, SharedBytesShimDevice(shim_cache), use_graph=False)
    got = runner.run({"X": x, "X2": x2, "R": r})
    runner.close()
    wide = {k: v.astype(np.float32) for k, v in dict(x=x, x2=x2, w=w, w2=w2, b=bias).items()}
    assert_fp16_close(got["Y1"], wide["x"] @ wide["w"])
    assert_fp16_close(got["Y2"], wide["x2"] @ wide["w2"].T + wide["b"])
    attributes = {"kind": "MatMul", "activation": "GELU", "residual_before_activation": 0}
    expected = REGISTRY.lookup("GemmAct", GIE_DOMAIN).kernel(
        [wide["x"], wide["w"], wide["b"], r.astype(np.float32)], Attrs(attributes), CONTEXT
    )[0]
    assert_fp16_close(got["Y3"], np.asarray(expected))
