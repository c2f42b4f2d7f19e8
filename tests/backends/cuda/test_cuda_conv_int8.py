"""The int8 IMMA implicit-GEMM convolution (kernels/conv_int8.cu) on the CPU shim equals
gie::QConv bit for bit: exact int32 accumulation, saturating int32 bias, float32
requantization (round half to even, saturation), fused residual + activation, int8 / float32 /
float16 outputs.

The reference runs in NCHW; the kernel gets the same int8 values in NHWC (weights KRSC) and its
output is transposed back. Shapes are tiny and off the 64 x 64 x 64 tile (pixel counts 20..162,
channels per group 16..48, K not a multiple of BK), with strides 1 and 2, asymmetric pads,
dilation, groups, 1x1 and 3x3 filters, every epilogue activation and both residual orders;
scales make the int8 outputs saturate in places. Every comparison is exact (0 differing
elements). The file also compiles for sm_80 and sm_90 with no spills at the default and at
other -D tile sizes (the shim runs those too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir_types
import pytest
from conv_cases import ConvCase

from engine.backends.cuda import activations, lower_conv_tc, nvrtc, shim_runner
from engine.backends.cuda import lower_data_movement as dm
from engine.backends.cuda.executor import CudaRunner
from engine.backends.cuda.launch_plan import KernelLaunch
from engine.backends.cuda.lowering import lower_launch_plan
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.backends.cuda.shim_device import ShimDevice
from engine.build.memory import plan_memory
from engine.build.plan import Plan, lower
from engine.config import BuilderConfig
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, TensorSpec, default_registry

REGISTRY = default_registry()
CONTEXT = KernelContext(opset=19)
FILE = "conv_int8.cu"
#: output_dtype code -> (entry point suffix, NumPy dtype)
OUTPUTS = {3: ("s8", np.int8), 1: ("f32", np.float32), 10: ("f16", np.float16)}
#: (defines, BM, BN, threads) of the non-default tiles run on the shim and compiled.
OTHER_TILES = [
    ({"GIE_CONVI8_BM": 32, "GIE_CONVI8_BN": 32, "GIE_CONVI8_BK": 32}, 32, 32, 128),
    ({"GIE_CONVI8_BM": 64, "GIE_CONVI8_BN": 32, "GIE_CONVI8_WARPS_M": 4,
      "GIE_CONVI8_WARPS_N": 1}, 64, 32, 128),
]  # fmt: skip
#: Activations whose reference (NumPy: float64 erf, y * sigmoid(y), np.tanh) and kernel (libm /
#: libdevice erff, x / (1 + expf(-x)), tanhf) formulas differ in the last float32 bits: their
#: float32 outputs are compared at rtol 1e-5, their int8 outputs still bit for bit.
LIBM_ACTIVATIONS = frozenset({"GELU", "GELU_tanh", "SiLU", "Tanh"})
TACTICS = {t.name: t for t in lower_conv_tc.TACTICS}
pytestmark = pytest.mark.xdist_group("cuda-shim")


def nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW (or OIHW) -> NHWC (or KRSC), contiguous."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def source_with(defines: dict[str, int]) -> str:
    head = "".join(f"#define {name} {value}\n" for name, value in defines.items())
    return head + (KERNEL_DIR / FILE).read_text()


@dataclass(frozen=True)
class Case(ConvCase):
    """A ConvCase with the int8 layer's output type (3 int8, 1 float32, 10 float16) and, with
    ``per_tensor_w_scale``, one weight scale for all channels."""

    alpha: float = 0.125
    clip: tuple[float, float] | None = (-6.0, 9.0)
    output: int = 3
    per_tensor_w_scale: bool = False

    def attributes(self) -> dict:
        return {**super().attributes(), "output_dtype": self.output}


CASES = [
    Case(1, 16, 7, 7, 12, 3, pads=(1, 1, 1, 1), activation="Relu", residual=True),
    Case(2, 16, 9, 9, 20, 3, pads=(1, 1, 1, 1)),  # 162 pixels: 3 row tiles; BK spans 4 taps
    Case(2, 32, 9, 6, 16, 3, stride=2, pads=(0, 1, 1, 0), group=2, residual=True,
         activation="LeakyRelu", residual_first=0),
    Case(1, 16, 8, 9, 8, 3, pads=(2, 2, 2, 2), dilation=2, bias=False, output=1),
    Case(2, 48, 5, 5, 10, 1, activation="Relu", output=10),  # 1x1, K = 48 < BK
    Case(2, 32, 9, 8, 16, 1, stride=2, group=2, residual=True, output=1),
    Case(1, 16, 6, 7, 8, 3, stride=2, pads=(1, 0, 2, 1), dilation=2, activation="Relu6"),
    Case(1, 80, 5, 4, 9, 3, pads=(1, 1, 1, 1), activation="Clip", residual=True),  # tap > step
    Case(1, 48, 4, 5, 72, 3, pads=(1, 1, 0, 0), group=3, residual=True, output=10),
    Case(2, 16, 5, 5, 24, 3, pads=(1, 1, 1, 1), per_tensor_w_scale=True),
]  # fmt: skip


def run(lib: shim_runner.ShimLibrary, case: Case, bm: int = 64, bn: int = 64,
        threads: int = 128) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(kernel output, reference output), both NCHW."""
    rng = np.random.default_rng(case.c * 1000 + case.m * 10 + case.k)
    x_q = rng.integers(-128, 128, (case.n, case.c, case.h, case.w)).astype(np.int8)
    w_q = rng.integers(-128, 128, (case.m, case.c // case.group, case.k, case.k)).astype(np.int8)
    x_scale = np.float32(0.0173)
    depth = case.c // case.group * case.k * case.k
    scale = 0.6 / depth  # real values of order 10
    if case.per_tensor_w_scale:
        w_scale = np.array([scale], np.float32)
    else:
        w_scale = rng.uniform(0.2 * scale, 2 * scale, case.m).astype(np.float32)
    bias_q = rng.integers(-40000, 40000, case.m).astype(np.int32) if case.bias else None
    oh, ow = case.out()
    residual = None
    if case.residual:
        residual = (rng.standard_normal((case.n, case.m, oh, ow)) * 4).astype(np.float32)
    y_scale = np.float32(0.05)
    attributes = case.attributes()
    inputs = [x_q, x_scale, w_q, w_scale, bias_q, residual, y_scale if case.output == 3 else None]
    spec = REGISTRY.lookup("QConv", GIE_DOMAIN)
    expected = np.asarray(spec.kernel(inputs, Attrs(attributes), CONTEXT)[0])
    assert expected.shape == (case.n, case.m, oh, ow)
    code, alpha, beta = activations.activation_arguments(Attrs(attributes))
    suffix, dtype = OUTPUTS[case.output]
    out = np.zeros((case.n, oh, ow, case.m), dtype)
    if dtype != np.int8:
        out[...] = np.nan  # every element must be written
    grid = (-(-(case.n * oh * ow) // bm), -(-(case.m // case.group) // bn), case.group)
    args = [nhwc(x_q), nhwc(w_q), bias_q, w_scale, None if residual is None else nhwc(residual)]
    args += [out, case.n, case.h, case.w, case.c, case.m, oh, ow, case.k, case.k]
    args += [case.stride, case.stride, case.pads[0], case.pads[1], case.dilation, case.dilation]
    args += [case.group, float(x_scale), 0 if case.per_tensor_w_scale else 1, float(y_scale)]
    args += [code, alpha, beta, case.residual_first]
    lib.launch(f"gie_conv_int8_{suffix}", grid, threads, args)
    return nchw(out), expected


def check(out: np.ndarray, expected: np.ndarray) -> None:
    assert out.dtype == expected.dtype
    differing = int(np.count_nonzero(out.view(np.uint8) != expected.view(np.uint8)))
    assert differing == 0, f"{differing} differing bytes"


def ids(case: Case) -> str:
    name = f"c{case.c}m{case.m}k{case.k}s{case.stride}d{case.dilation}g{case.group}"
    return f"{name}-{OUTPUTS[case.output][0]}"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_int8_conv_equals_qconv(shim_cache: Path, case: Case) -> None:
    out, expected = run(shim_runner.build_file(KERNEL_DIR / FILE, shim_cache), case)
    check(out, expected)
    if case.output == 3:  # the scales make some outputs saturate, others not
        assert np.any(np.abs(out.astype(np.int32)) >= 127) and np.any(np.abs(out) < 100)


@pytest.mark.parametrize("activation", sorted(activations.BY_NAME))
@pytest.mark.parametrize("residual_first", [1, 0])
@pytest.mark.parametrize("output", [3, 1])
def test_int8_conv_epilogue_activations_and_residual_orders(
    shim_cache: Path, activation: str, residual_first: int, output: int
) -> None:
    lib = shim_runner.build_file(KERNEL_DIR / FILE, shim_cache)
    case = Case(1, 16, 5, 4, 8, 3, pads=(1, 1, 1, 1), activation=activation, residual=True,
                residual_first=residual_first, output=output)  # fmt: skip
    out, expected = run(lib, case)
    if output == 1 and activation in LIBM_ACTIVATIONS:
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    else:
        check(out, expected)


def test_int8_conv_bias_saturates_int32(shim_cache: Path) -> None:
    """acc + bias beyond int32 saturates (as qparams.add_bias), both signs."""
    n, c, h, w, m = 1, 16, 3, 3, 8
    x_q = np.full((n, c, h, w), 127, np.int8)
    w_q = np.full((m, c, 3, 3), 127, np.int8)
    w_q[1::2] = -128
    bias_q = np.full(m, 2**31 - 1, np.int32)
    bias_q[1::2] = -(2**31)
    w_scale = np.full(m, 1e-9, np.float32)
    attributes = {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3], "output_dtype": 1}
    spec = REGISTRY.lookup("QConv", GIE_DOMAIN)
    inputs = [x_q, np.float32(1.0), w_q, w_scale, bias_q]
    expected = np.asarray(spec.kernel(inputs, Attrs(attributes), CONTEXT)[0])
    out = np.zeros((n, h, w, m), np.float32)
    args = [nhwc(x_q), nhwc(w_q), bias_q, w_scale, None, out, n, h, w, c, m, h, w, 3, 3]
    args += [1, 1, 1, 1, 1, 1, 1, 1.0, 1, 1.0, 0, 0.0, 0.0, 1]
    shim_runner.build_file(KERNEL_DIR / FILE, shim_cache).launch(
        "gie_conv_int8_f32", (1, 1, 1), 128, args
    )
    np.testing.assert_array_equal(nchw(out), expected)
    # Saturated: one value per sign although the accumulators differ with the border taps.
    assert np.unique(expected[:, 0::2]).size == 1 and np.unique(expected[:, 1::2]).size == 1
    assert expected[0, 0, 0, 0] > 2.0 and expected[0, 1, 0, 0] < -2.0


@pytest.mark.parametrize(("defines", "bm", "bn", "threads"), OTHER_TILES, ids=["32x32x32", "4x1"])
def test_int8_conv_at_other_tile_sizes(shim_cache: Path, defines, bm, bn, threads) -> None:
    name = "conv_int8_" + "_".join(f"{k}{v}" for k, v in defines.items()) + ".cu"
    lib = shim_runner.build(source_with(defines), name, shim_cache)
    for case in (CASES[1], CASES[2], CASES[7], CASES[8]):
        check(*run(lib, case, bm, bn, threads))


@pytest.mark.xdist_group("cuda-nvrtc")
def test_int8_conv_compiles_for_sm80_and_sm90_without_spills(nvrtc_cache) -> None:
    variants = [({}, ()), *((d, ()) for d, *_ in OTHER_TILES)]
    variants.append(({}, ("-DGIE_CONVI8_BM=128", "-DGIE_CONVI8_BN=128", "-DGIE_CONVI8_WARPS_N=4")))
    for defines, options in variants:
        source = source_with(defines)
        for arch in nvrtc.DEFAULT_ARCHS:
            result = nvrtc.compile_source(source, FILE, arch, extra_options=options,
                                          cache=nvrtc_cache)  # fmt: skip
            assert set(result.resources) == {f"gie_conv_int8_{s}" for s in ("s8", "f32", "f16")}
            for entry, used in result.resources.items():
                assert not used.spills, f"{defines} {options} {arch} {entry} spills: {used}"
                assert 0 < used.registers <= 128, f"{defines} {options} {arch} {entry}: {used}"
        ptx = nvrtc.compile_source(source, FILE, "sm_80", output="ptx", cache=nvrtc_cache)
        text = ptx.binary.decode()
        for instruction in (
            "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32",
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
            "cp.async.cg.shared.global",
        ):
            assert instruction in text, (defines, instruction)  # fmt: skip


# --------------------------------------------------------------------------- lowering


def qconv_plan(y_is_output: bool) -> tuple[Plan, dict[str, np.ndarray]]:
    """X int8 [1, 16, 5, 6] -> QConv (int8 out, bias, pad 1) -> Y -> grouped strided QConv
    (float32 out, per-tensor weight scale) -> Z."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(21)
    weights = {
        "xs": np.asarray(0.02, np.float32),
        "W1": rng.integers(-128, 128, (32, 16, 3, 3)).astype(np.int8),
        "ws1": rng.uniform(1e-3, 6e-3, 32).astype(np.float32),
        "B1": rng.integers(-5000, 5000, 32).astype(np.int32),
        "ys": np.asarray(0.04, np.float32),
        "W2": rng.integers(-128, 128, (16, 16, 3, 3)).astype(np.int8),
        "ws2": np.asarray([2e-3], np.float32),
    }
    common = {"kernel_shape": [3, 3]}
    nodes = [
        helper.make_node("QConv", ["X", "xs", "W1", "ws1", "B1", "", "ys"], ["Y"],
                         domain=GIE_DOMAIN, pads=[1, 1, 1, 1], output_dtype=3,
                         activation="Relu", **common),
        helper.make_node("QConv", ["Y", "ys", "W2", "ws2"], ["Z"], domain=GIE_DOMAIN,
                         pads=[1, 0, 0, 1], strides=[2, 2], group=2, output_dtype=1, **common),
    ]  # fmt: skip
    outputs = [helper.make_tensor_value_info("Z", TensorProto.FLOAT, None)]
    if y_is_output:
        outputs.append(helper.make_tensor_value_info("Y", TensorProto.INT8, None))
    graph = helper.make_graph(
        nodes,
        "qconvs",
        [helper.make_tensor_value_info("X", TensorProto.INT8, [1, 16, 5, 6])],
        outputs,
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    opsets = [helper.make_opsetid("", 19), helper.make_opsetid(GIE_DOMAIN, 1)]
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))
    return lower(model, {"X": (1, 16, 5, 6)}), weights


@pytest.mark.parametrize("y_is_output", [False, True], ids=["nhwc-chain", "int8-graph-output"])
def test_lowered_qconv_chain_equals_qconv(shim_cache: Path, y_is_output: bool) -> None:
    """The int8 input (plain NCHW) is byte-transposed to NHWC, the int8 result stays NHWC for the
    next QConv (or is transposed back when it is a graph output), the float32 one is converted
    by the layout kernel; both outputs equal the reference bit for bit."""
    plan, weights = qconv_plan(y_is_output)
    first, second = plan.layers
    for layer, name in ((first, "conv_imma_s8_64x64"), (second, "conv_imma_f32_64x64")):
        tactic = TACTICS[name]
        assert tactic.check is not None and tactic.check(layer, plan) is None, name
        other = TACTICS[name.replace("s8", "f16").replace("f32", "f16")]
        assert "this entry writes FLOAT16" in (other.check(layer, plan) or "")  # type: ignore[misc]
        layer.tactic = name
    shapes = {"X": (1, 16, 5, 6)}
    memory = plan_memory(plan, BuilderConfig(), shapes)
    launch_plan = lower_launch_plan(
        plan, memory, shapes, {**dm.LOWERINGS, **lower_conv_tc.LOWERINGS}
    )
    entries = [s.entry for s in launch_plan.steps if isinstance(s, KernelLaunch)]
    middle = ["gie_transpose_b1", "gie_transpose_b1"] if y_is_output else []
    assert entries == [
        "gie_transpose_b1",
        "gie_conv_int8_s8",
        *middle,
        "gie_conv_int8_f32",
        "gie_nhwc_to_nchw_f32",
    ], entries
    rng = np.random.default_rng(2)
    x = rng.integers(-128, 128, (1, 16, 5, 6)).astype(np.int8)
    runner = CudaRunner(launch_plan, ShimDevice(shim_cache), use_graph=False)
    got = runner.run({"X": x})
    runner.close()
    spec = REGISTRY.lookup("QConv", GIE_DOMAIN)
    common = {"kernel_shape": [3, 3]}
    y = spec.kernel(
        [x, weights["xs"], weights["W1"], weights["ws1"], weights["B1"], None, weights["ys"]],
        Attrs({"pads": [1, 1, 1, 1], "output_dtype": 3, "activation": "Relu", **common}),
        CONTEXT,
    )[0]
    z = spec.kernel(
        [y, weights["ys"], weights["W2"], weights["ws2"]],
        Attrs({"pads": [1, 0, 0, 1], "strides": [2, 2], "group": 2, "output_dtype": 1, **common}),
        CONTEXT,
    )[0]
    assert np.any(y == 127) and np.any((y > 0) & (y < 100))
    check(got["Z"], z)
    if y_is_output:
        check(got["Y"], y)


def test_int8_tactics_refuse_what_the_kernel_cannot_run() -> None:
    plan, _ = qconv_plan(False)
    first = plan.layers[0]
    check_s8 = TACTICS["conv_imma_s8_64x64"].check
    assert check_s8 is not None and check_s8(first, plan) is None
    plan.specs[first.inputs[0]] = TensorSpec((1, 16, 5, 6), ir_types.DataType.FLOAT)
    assert "int8 kernels read int8" in (check_s8(first, plan) or "")
    big = TACTICS["conv_imma_s8_128x128"].check
    plan.specs[first.inputs[0]] = TensorSpec((1, 16, 5, 6), ir_types.DataType.INT8)
    assert big is not None and "over twice" in (big(first, plan) or "")
