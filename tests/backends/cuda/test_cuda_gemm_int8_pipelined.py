"""The pipelined int8 IMMA GEMM (kernels/gemm_int8_pipelined.cu) on the CPU shim equals
gie::QGemm bit for bit (np.array_equal): int32 accumulation, saturating int32 bias, float32
requantization, residual before / after the activation, int8 / float32 / float16 outputs,
per-channel and per-tensor weight scales. Shapes are not multiples of the tiles (70x40x48,
130x136x96, 5x8x16, ...) so the M / N tails (zero-filled rows, unstored outputs) and the K tail
(zero-filled chunks) run, and K spans more tiles than stages so the ring wraps. Both tile
variants (128x128x64 with 8 warps; -D GIE_I8P_SMALL=1: 64x64x64 with 4 warps) run with the
shim's deferred cp.async (a copy lands only at the wait that covers it, as on the GPU). The file
compiles for sm_80 and sm_90 with no spills, and its lowering runs a QGemm plan end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from engine.backends.cuda import activations, lower_gemm_int8_fast, nvrtc, shim_runner
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, default_registry

REGISTRY = default_registry()
CONTEXT = KernelContext(opset=17)
FILE = KERNEL_DIR / "gemm_int8_pipelined.cu"
pytestmark = pytest.mark.xdist_group("cuda-shim")

#: output_dtype code -> (entry point suffix, NumPy dtype)
OUTPUTS = {3: ("s8", np.int8), 1: ("f32", np.float32), 10: ("f16", np.float16)}

#: variant -> (defines, BM, BN, BK, stages, threads)
VARIANTS: dict[str, tuple[dict[str, int], int, int, int, int, int]] = {
    "default": ({}, 128, 128, 64, 3, 256),
    "small": ({"GIE_I8P_SMALL": 1}, 64, 64, 64, 3, 128),
    "small-4stage-bk32-group2": (
        {"GIE_I8P_SMALL": 1, "GIE_I8P_STAGES": 4, "GIE_I8P_BK": 32, "GIE_I8P_GROUP_M": 2},
        64,
        64,
        32,
        4,
        128,
    ),
}


def shared_bytes(bm: int, bn: int, bk: int, stages: int) -> int:
    """Dynamic shared memory of one block: STAGES * (BM + BN) * BK int8 values."""
    return stages * (bm + bn) * bk


def library(shim_cache: Path, variant: str) -> shim_runner.ShimLibrary:
    defines = VARIANTS[variant][0]
    prefix = "".join(f"#define {name} {value}\n" for name, value in defines.items())
    lib = shim_runner.build(
        prefix + FILE.read_text(), f"gemm_int8_pipelined_{variant}.cu", shim_cache
    )
    lib.set_deferred_cp_async(True)
    return lib


def reference(inputs: list, attributes: dict) -> np.ndarray:
    spec = REGISTRY.lookup("QGemm", GIE_DOMAIN)
    assert spec is not None
    return np.asarray(spec.kernel(inputs, Attrs(attributes), CONTEXT)[0])


def int8(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(-128, 128, size=shape).astype(np.int8)


def run(
    lib: shim_runner.ShimLibrary,
    variant: str,
    output: int,
    a: np.ndarray,
    bt: np.ndarray,
    bias: np.ndarray | None,
    w_scale: np.ndarray,
    residual: np.ndarray | None,
    m: int,
    n: int,
    k: int,
    x_scale: float,
    y_scale: float,
    code: int = 0,
    alpha: float = 0.0,
    beta: float = 0.0,
    residual_first: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Launch on the shim; a, bt, out may be wider than K / N (lda, ldb, ldc = their widths)."""
    _, bm, bn, bk, stages, threads = VARIANTS[variant]
    suffix, dtype = OUTPUTS[output]
    if out is None:
        out = np.zeros((m, n), dtype)
    lda, ldb, ldc = a.shape[1], bt.shape[1], out.shape[1]
    stride = 1 if w_scale.size > 1 else 0
    args = [a, bt, bias, w_scale, residual, out, m, n, k, lda, ldb, ldc,
            x_scale, stride, y_scale, code, alpha, beta, residual_first]  # fmt: skip
    lib.launch(
        f"gie_gemm_int8_pipelined_{suffix}",
        (-(-n // bn), -(-m // bm)),
        threads,
        args,
        shared_bytes=shared_bytes(bm, bn, bk, stages),
    )
    return out


CASES = [
    # variant, m, n, k, output, activation, bias, residual, residual_first, per_channel
    ("small", 70, 40, 48, 3, "Relu", True, False, 1, True),
    ("small", 130, 136, 96, 3, "Clip", True, True, 1, True),
    ("small", 33, 24, 336, 1, "LeakyRelu", True, True, 0, False),  # 6 K tiles, 3 stages
    ("small", 5, 8, 16, 10, "", False, False, 1, True),
    ("default", 70, 40, 48, 10, "Relu", True, True, 0, True),
    ("default", 130, 136, 96, 3, "", True, False, 1, False),
    ("default", 5, 8, 16, 1, "Clip", True, True, 1, True),
    ("small-4stage-bk32-group2", 150, 72, 208, 3, "Relu", True, True, 0, True),
]


@pytest.mark.parametrize(
    ("variant", "m", "n", "k", "output", "activation", "bias", "residual", "first", "per_channel"),
    CASES,
)
def test_pipelined_int8_gemm_equals_qgemm(
    shim_cache, variant, m, n, k, output, activation, bias, residual, first, per_channel
) -> None:
    rng = np.random.default_rng(m * 1000 + n * 10 + k + output)
    a_q, b_q = int8(rng, m, k), int8(rng, k, n)
    x_scale = np.float32(0.0173)
    w_scale = (
        rng.uniform(0.001, 0.02, n).astype(np.float32)
        if per_channel
        else np.asarray([0.0071], np.float32)
    )
    bias_q = rng.integers(-40000, 40000, n).astype(np.int32) if bias else None
    res = (rng.standard_normal((m, n)) * 8).astype(np.float32) if residual else None
    y_scale = np.float32(0.05 * np.sqrt(k / 32))
    attributes = {
        "kind": "MatMul",
        "activation": activation,
        "residual_before_activation": first,
        "activation_alpha": 0.125,
        "min": -10.0,
        "max": 20.0,
        "output_dtype": output,
    }
    scale_input = w_scale if per_channel else w_scale.reshape(())
    inputs = [a_q, x_scale, b_q, scale_input, bias_q, res, y_scale if output == 3 else None]
    expected = reference(inputs, attributes)

    code, alpha, beta = activations.activation_arguments(Attrs(attributes))
    lib = library(shim_cache, variant)
    bt = np.ascontiguousarray(b_q.T)
    out = run(lib, variant, output, a_q, bt, bias_q, w_scale, res, m, n, k,
              float(x_scale), float(y_scale), code, alpha, beta, first)  # fmt: skip
    assert out.dtype == expected.dtype
    assert np.count_nonzero(out != expected) == 0
    np.testing.assert_array_equal(out, expected)
    if output == 3:
        assert len(np.unique(out)) > 20  # the scales give a spread of int8 values
    assert np.any(out != 0)


@pytest.mark.parametrize("variant", ["default", "small"])
def test_bias_saturates_int32(shim_cache, variant) -> None:
    m, n, k = 5, 8, 32
    a_q = np.full((m, k), 127, np.int8)
    b_q = np.full((k, n), 127, np.int8)
    b_q[:, ::2] = -128  # even columns: a negative sum meets the most negative bias
    bias_q = np.full(n, 2**31 - 1, np.int32)
    bias_q[::2] = -(2**31)
    w_scale = np.full(n, 1e-9, np.float32)
    expected = reference([a_q, np.float32(1.0), b_q, w_scale, bias_q], {"kind": "MatMul"})
    lib = library(shim_cache, variant)
    bt = np.ascontiguousarray(b_q.T)
    out = run(lib, variant, 1, a_q, bt, bias_q, w_scale, None, m, n, k, 1.0, 1.0)
    np.testing.assert_array_equal(out, expected)
    # Saturated: (2^31 - 1) * 1e-9 and -2^31 * 1e-9, not a wrapped sum.
    assert out[0, 1] == np.float32(np.float32(2**31 - 1) * np.float32(1e-9))
    assert out[0, 0] == np.float32(np.float32(-(2**31)) * np.float32(1e-9))


def test_leading_dimensions_wider_than_the_matrices(shim_cache) -> None:
    """lda, ldb, ldc > K, K, N: the padding is never read and never written."""
    rng = np.random.default_rng(3)
    m, n, k = 37, 21, 80
    a_wide, bt_wide = int8(rng, m, k + 32), int8(rng, n, k + 16)
    w_scale = rng.uniform(0.001, 0.02, n).astype(np.float32)
    out = np.full((m, n + 5), 99, np.int8)
    lib = library(shim_cache, "small")
    run(lib, "small", 3, a_wide, bt_wide, None, w_scale, None, m, n, k, 0.02, 0.3, out=out)
    a_q, b_q = a_wide[:, :k], np.ascontiguousarray(bt_wide[:, :k].T)
    expected = reference(
        [a_q, np.float32(0.02), b_q, w_scale, None, None, np.float32(0.3)], {"kind": "MatMul"}
    )
    np.testing.assert_array_equal(out[:, :n], expected)
    assert (out[:, n:] == 99).all()


# --------------------------------------------------------------------------- NVRTC

COMPILE_VARIANTS = {
    "default": [],
    "small": ["-DGIE_I8P_SMALL=1"],
    "4-stages": ["-DGIE_I8P_STAGES=4"],
    "bk128": ["-DGIE_I8P_BK=128"],
}
ENTRIES = [f"gie_gemm_int8_pipelined_{suffix}" for suffix, _ in OUTPUTS.values()]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("variant", list(COMPILE_VARIANTS))
def test_compiles_without_spills(nvrtc_cache, arch, variant) -> None:
    result = nvrtc.compile_file(
        FILE, arch, extra_options=COMPILE_VARIANTS[variant], cache=nvrtc_cache
    )
    for entry in ENTRIES:
        resources = result.resources[entry]
        assert not resources.spills, (entry, resources)
        assert resources.stack_bytes == 0, (entry, resources)
        assert resources.shared_bytes == 0  # all of it is dynamic (shared_bytes at launch)
        # __launch_bounds__(threads, 2) at BK <= 64: 2 blocks per SM by registers
        limit = 255 if variant == "bk128" else 128
        assert 0 < resources.registers <= limit, (entry, resources)


@pytest.mark.parametrize("tactic_index", range(len(lower_gemm_int8_fast.TACTICS)))
def test_tactic_tiles_compile_without_spills(nvrtc_cache, tactic_index) -> None:
    tactic = lower_gemm_int8_fast.TACTICS[tactic_index]
    result = nvrtc.compile_file(FILE, "sm_90", extra_options=tactic.options(), cache=nvrtc_cache)
    assert not result.resources[tactic.entry].spills, result.resources


# --------------------------------------------------------------------------- lowering


def qgemm_model(w1: np.ndarray, w2: np.ndarray, scales: np.ndarray, bias: np.ndarray) -> ir.Model:
    """Y1 = int8 QGemm(X1, W1^T) (kind Gemm, transB, per-channel scales, bias, Relu, residual
    after it); Y2 = float32 QGemm(X2, W2) (kind MatMul, per-tensor scale, residual first)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray) -> object:
        return numpy_helper.from_array(np.asarray(value), name)

    nodes = [
        helper.make_node(
            "QGemm",
            ["X1", "xs", "W1", "ws1", "b1", "R1", "ys"],
            ["Y1"],
            domain=GIE_DOMAIN,
            kind="Gemm",
            transB=1,
            activation="Relu",
            residual_before_activation=0,
            output_dtype=3,
        ),
        helper.make_node(
            "QGemm",
            ["X2", "xs", "W2", "ws2", "", "R2"],
            ["Y2"],
            domain=GIE_DOMAIN,
            kind="MatMul",
            activation="LeakyRelu",
            activation_alpha=0.125,
            residual_before_activation=1,
            output_dtype=1,
        ),
    ]
    inputs = [
        helper.make_tensor_value_info("X1", TensorProto.INT8, [70, 48]),
        helper.make_tensor_value_info("R1", TensorProto.FLOAT, [70, 40]),
        helper.make_tensor_value_info("X2", TensorProto.INT8, [130, 96]),
        helper.make_tensor_value_info("R2", TensorProto.FLOAT, [130, 136]),
    ]
    outputs = [
        helper.make_tensor_value_info("Y1", TensorProto.INT8, None),
        helper.make_tensor_value_info("Y2", TensorProto.FLOAT, None),
    ]
    initializers = [
        const("xs", np.float32(0.0173)),
        const("W1", w1),
        const("ws1", scales),
        const("b1", bias),
        const("ys", np.float32(0.07)),
        const("W2", w2),
        const("ws2", np.float32(0.0071)),
    ]
    graph = helper.make_graph(nodes, "qgemms", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(GIE_DOMAIN, 1)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


def test_tactics_and_lowerings_agree() -> None:
    tactics = lower_gemm_int8_fast.TACTICS
    assert [t.name for t in tactics] == list(lower_gemm_int8_fast.LOWERINGS)
    assert {t.name for t in tactics} == {
        f"gemm_imma_pipelined_{s}_{tile}"
        for s in ("s8", "f32", "f16")
        for tile in ("128x128", "64x64")
    }
    for tactic in tactics:
        assert tactic.family == "gemm_int8" and tactic.kernel_file == FILE.name
    assert [t.shared_bytes for t in lower_gemm_int8_fast.TILES] == [49152, 24576]
    for tile in lower_gemm_int8_fast.TILES:
        assert tile.shared_bytes == shared_bytes(tile.bm, tile.bn, tile.bk, tile.stages)


def test_lowered_qgemm_layers_run_the_pipelined_kernel(shim_cache) -> None:
    from engine.backends.cuda.executor import CudaRunner
    from engine.backends.cuda.launch_plan import KernelLaunch
    from engine.backends.cuda.lowering import lower_launch_plan
    from engine.backends.cuda.shim_device import ShimDevice
    from engine.build.memory import plan_memory
    from engine.build.plan import lower
    from engine.config import BuilderConfig

    rng = np.random.default_rng(31)
    w1, w2 = int8(rng, 40, 48), int8(rng, 96, 136)  # W1 is [N, K] (transB), W2 [K, N]
    scales = rng.uniform(0.001, 0.02, 40).astype(np.float32)
    bias = rng.integers(-40000, 40000, 40).astype(np.int32)
    shapes = {"X1": (70, 48), "R1": (70, 40), "X2": (130, 96), "R2": (130, 136)}
    plan = lower(qgemm_model(w1, w2, scales, bias), shapes)
    tactics = {t.name: t for t in lower_gemm_int8_fast.TACTICS}
    chosen = {"Y1": "gemm_imma_pipelined_s8_64x64", "Y2": "gemm_imma_pipelined_f32_128x128"}
    for layer in plan.layers:
        tactic = tactics[chosen[layer.outputs[0]]]
        assert layer.qualified_op in tactic.ops
        assert tactic.check is not None and tactic.check(layer, plan) is None
        layer.tactic = tactic.name
    first = next(layer for layer in plan.layers if layer.outputs[0] == "Y1")
    wrong_dtype = tactics["gemm_imma_pipelined_f32_64x64"].check
    assert wrong_dtype is not None and "INT8" in (wrong_dtype(first, plan) or "")
    big = tactics["gemm_imma_pipelined_s8_128x128"].check
    assert big is not None and big(first, plan) is None  # 70 > 64: not over twice in M

    memory = plan_memory(plan, BuilderConfig(), shapes)
    launch_plan = lower_launch_plan(plan, memory, shapes, dict(lower_gemm_int8_fast.LOWERINGS))
    launches = [s for s in launch_plan.steps if isinstance(s, KernelLaunch)]
    assert sorted((s.entry, s.grid, s.block, s.shared_bytes) for s in launches) == [
        ("gie_gemm_int8_pipelined_f32", (2, 2, 1), (256, 1, 1), 49152),
        ("gie_gemm_int8_pipelined_s8", (1, 2, 1), (128, 1, 1), 24576),
    ]

    x1, x2 = int8(rng, 70, 48), int8(rng, 130, 96)
    r1 = (rng.standard_normal((70, 40)) * 4).astype(np.float32)
    r2 = (rng.standard_normal((130, 136)) * 4).astype(np.float32)
    runner = CudaRunner(launch_plan, ShimDevice(shim_cache), use_graph=False)
    got = runner.run({"X1": x1, "R1": r1, "X2": x2, "R2": r2})
    runner.close()

    expected1 = reference(
        [x1, np.float32(0.0173), w1, scales, bias, r1, np.float32(0.07)],
        {"kind": "Gemm", "transB": 1, "activation": "Relu", "residual_before_activation": 0,
         "output_dtype": 3},
    )  # fmt: skip
    expected2 = reference(
        [x2, np.float32(0.0173), w2, np.float32(0.0071), None, r2],
        {"kind": "MatMul", "activation": "LeakyRelu", "activation_alpha": 0.125,
         "residual_before_activation": 1, "output_dtype": 1},
    )  # fmt: skip
    assert got["Y1"].dtype == np.int8 and got["Y2"].dtype == np.float32
    assert np.count_nonzero(got["Y1"] != expected1) == 0
    assert np.count_nonzero(got["Y2"] != expected2) == 0
    assert len(np.unique(got["Y1"])) > 20
