"""The tensor-core fp16 implicit-GEMM convolution (kernels/conv_mma_f16.cu) on the CPU shim vs
the reference Conv / gie::ConvAct.

The references run in NCHW on the fp16 values widened to float32 (one rounding, the kernel's
fp16 output, separates them: 1e-2); the kernel gets the same values in NHWC (weights KRSC).
Shapes are tiny and off the 64 x 64 x 32 tile (pixel counts 20..162, channels per group 8..40,
K not a multiple of BK, BK spanning several taps or one tap spanning several steps), with
strides 1 and 2, asymmetric pads, dilation, groups, 1x1 and 3x3 filters, every epilogue
activation and both residual orders. The file also compiles for sm_80 and sm_90 with no spills
at the default and at other -D tile sizes (the shim runs those too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conv_cases import ConvCase

from engine.backends.cuda import activations, lower_conv_tc, nvrtc, shim_runner
from engine.backends.cuda.executor import CudaRunner
from engine.backends.cuda.launch_plan import KernelLaunch, KernelSource
from engine.backends.cuda.lowering import lower_launch_plan
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.backends.cuda.shim_device import ShimDevice
from engine.build.memory import plan_memory
from engine.build.plan import Plan, lower
from engine.config import BuilderConfig
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, default_registry

REGISTRY = default_registry()
CONTEXT = KernelContext(opset=19)
FILE = "conv_mma_f16.cu"
ENTRY = "gie_conv_mma_f16"
#: (defines, BM, BN, threads) of the non-default tiles run on the shim and compiled.
OTHER_TILES = [
    ({"GIE_CONVMMA_BM": 32, "GIE_CONVMMA_BN": 32, "GIE_CONVMMA_BK": 16}, 32, 32, 128),
    ({"GIE_CONVMMA_BM": 64, "GIE_CONVMMA_BN": 32, "GIE_CONVMMA_WARPS_M": 4,
      "GIE_CONVMMA_WARPS_N": 1}, 64, 32, 128),
]  # fmt: skip
TACTICS = {t.name: t for t in lower_conv_tc.TACTICS}
pytestmark = pytest.mark.xdist_group("cuda-shim")


def reference(op_type: str, inputs: list, attributes: dict, domain: str = "") -> np.ndarray:
    spec = REGISTRY.lookup(op_type, domain)
    assert spec is not None, op_type
    return np.asarray(spec.kernel(inputs, Attrs(attributes), CONTEXT)[0])


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
    """A ConvCase whose Clip / Relu6 epilogues use the bounds (-0.5, 0.75)."""

    clip: tuple[float, float] | None = (-0.5, 0.75)


CASES = [
    Case(1, 8, 7, 7, 12, 3, pads=(1, 1, 1, 1), activation="Relu", residual=True),
    Case(2, 16, 9, 9, 20, 3, pads=(1, 1, 1, 1)),  # 162 pixels: 3 row tiles; BK spans 2 taps
    Case(2, 16, 9, 6, 16, 3, stride=2, pads=(0, 1, 1, 0), group=2, residual=True,
         activation="LeakyRelu", residual_first=0),
    Case(1, 8, 8, 9, 8, 3, pads=(2, 2, 2, 2), dilation=2, bias=False),
    Case(2, 24, 5, 5, 10, 1, activation="Relu"),  # 1x1, K = 24 < BK
    Case(2, 16, 9, 8, 16, 1, stride=2, group=2, residual=True),
    Case(1, 8, 6, 7, 8, 3, stride=2, pads=(1, 0, 2, 1), dilation=2, activation="Relu6"),
    Case(1, 40, 5, 4, 9, 3, pads=(1, 1, 1, 1), activation="Tanh"),  # a tap spans two steps
    Case(1, 48, 4, 5, 72, 3, pads=(1, 1, 0, 0), group=3, residual=True),  # 3 groups, Mg 24
]  # fmt: skip


def run(lib: shim_runner.ShimLibrary, case: Case, bm: int = 64, bn: int = 64,
        threads: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(kernel output, reference output), both NCHW float32."""
    rng = np.random.default_rng(seed + case.c * 100 + case.m)
    half = np.float16
    x = rng.standard_normal((case.n, case.c, case.h, case.w)).astype(half)
    w = (rng.standard_normal((case.m, case.c // case.group, case.k, case.k)) / case.k).astype(half)
    bias = rng.standard_normal(case.m).astype(half) if case.bias else None
    oh, ow = case.out()
    residual = rng.standard_normal((case.n, case.m, oh, ow)).astype(half) if case.residual else None
    attributes = case.attributes()
    wide = [None if a is None else a.astype(np.float32) for a in (x, w, bias, residual)]
    if case.activation or case.residual:
        expected = reference("ConvAct", wide, attributes, GIE_DOMAIN)
    else:
        conv = {k: attributes[k] for k in ("group", "strides", "pads", "dilations", "kernel_shape")}
        expected = reference("Conv", wide[:2] if bias is None else wide[:3], conv)
    assert expected.shape == (case.n, case.m, oh, ow)
    code, alpha, beta = activations.activation_arguments(Attrs(attributes))
    out = np.full((case.n, oh, ow, case.m), np.nan, half)  # every element must be written
    grid = (-(-(case.n * oh * ow) // bm), -(-(case.m // case.group) // bn), case.group)
    args = [nhwc(x), nhwc(w), bias, None if residual is None else nhwc(residual), out]
    args += [case.n, case.h, case.w, case.c, case.m, oh, ow, case.k, case.k]
    args += [case.stride, case.stride, case.pads[0], case.pads[1], case.dilation, case.dilation]
    args += [case.group, code, alpha, beta, case.residual_first]
    lib.launch(ENTRY, grid, threads, args)
    return nchw(out).astype(np.float32), expected


def check(out: np.ndarray, expected: np.ndarray) -> None:
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=1e-2, atol=1e-2)


def ids(case: Case) -> str:
    return f"c{case.c}m{case.m}k{case.k}s{case.stride}d{case.dilation}g{case.group}"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_mma_conv_matches_conv_and_conv_act(shim_cache: Path, case: Case) -> None:
    lib = shim_runner.build_file(KERNEL_DIR / FILE, shim_cache)
    check(*run(lib, case))


@pytest.mark.parametrize("activation", sorted(activations.BY_NAME))
@pytest.mark.parametrize("residual_first", [1, 0])
def test_mma_conv_epilogue_activations_and_residual_orders(
    shim_cache: Path, activation: str, residual_first: int
) -> None:
    lib = shim_runner.build_file(KERNEL_DIR / FILE, shim_cache)
    case = Case(1, 8, 5, 4, 8, 3, pads=(1, 1, 1, 1), activation=activation, residual=True,
                residual_first=residual_first)  # fmt: skip
    out, expected = run(lib, case)
    check(out, expected)


def test_mma_conv_residual_order_matters() -> None:
    """The two residual orders give different results here, so the test above can tell them
    apart (a kernel ignoring residual_first fails one of them)."""
    case = Case(1, 8, 5, 4, 8, 3, pads=(1, 1, 1, 1), activation="Relu", residual=True)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 8, 5, 4)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    residual = rng.standard_normal((1, 8, 5, 4)).astype(np.float32)
    attributes = case.attributes()
    first = reference("ConvAct", [x, w, None, residual], attributes, GIE_DOMAIN)
    attributes["residual_before_activation"] = 0
    after = reference("ConvAct", [x, w, None, residual], attributes, GIE_DOMAIN)
    assert np.abs(first - after).max() > 0.1


@pytest.mark.parametrize(("defines", "bm", "bn", "threads"), OTHER_TILES, ids=["32x32x16", "4x1"])
def test_mma_conv_at_other_tile_sizes(shim_cache: Path, defines, bm, bn, threads) -> None:
    name = "conv_mma_f16_" + "_".join(f"{k}{v}" for k, v in defines.items()) + ".cu"
    lib = shim_runner.build(source_with(defines), name, shim_cache)
    for case in (CASES[1], CASES[2], CASES[8]):
        check(*run(lib, case, bm, bn, threads))


@pytest.mark.xdist_group("cuda-nvrtc")
def test_mma_conv_compiles_for_sm80_and_sm90_without_spills(nvrtc_cache) -> None:
    variants = [({}, ()), *((d, ()) for d, *_ in OTHER_TILES)]
    variants.append(
        ({}, ("-DGIE_CONVMMA_BM=128", "-DGIE_CONVMMA_BN=128", "-DGIE_CONVMMA_WARPS_N=4"))
    )
    for defines, options in variants:
        source = source_with(defines)
        for arch in nvrtc.DEFAULT_ARCHS:
            result = nvrtc.compile_source(source, FILE, arch, extra_options=options,
                                          cache=nvrtc_cache)  # fmt: skip
            used = result.resources[ENTRY]
            assert not used.spills, f"{defines} {options} {arch} spills: {used}"
            assert 0 < used.registers <= 128, f"{defines} {options} {arch}: {used.registers}"
        ptx = nvrtc.compile_source(source, FILE, "sm_80", output="ptx", cache=nvrtc_cache)
        text = ptx.binary.decode()
        for instruction in (
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
            "cp.async.cg.shared.global",
        ):
            assert instruction in text, (defines, instruction)  # fmt: skip


# --------------------------------------------------------------------------- lowering


def conv_model(x_shape: tuple[int, ...], weights: dict[str, np.ndarray], nodes: list) -> Plan:
    """A Plan of an fp16 graph X -> nodes -> Z with the given initializers."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT16, list(x_shape))],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT16, None)],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    )
    return lower(model, {"X": x_shape})


def test_lowered_fp16_conv_chain_runs_the_mma_kernel_in_nhwc(shim_cache: Path) -> None:
    """Conv (bias, pad 1) -> grouped strided Conv, both conv_mma_f16_64x64: the activation is
    converted to NHWC once, the weights are uploaded as KRSC, the result converted back."""
    from onnx import helper

    rng = np.random.default_rng(5)
    w1 = (rng.standard_normal((16, 8, 3, 3)) / 3).astype(np.float16)
    b1 = rng.standard_normal(16).astype(np.float16)
    w2 = (rng.standard_normal((16, 8, 3, 3)) / 3).astype(np.float16)
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["Y"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["Y", "W2"], ["Z"], pads=[1, 0, 1, 1], strides=[2, 2], group=2),
    ]
    shapes = {"X": (1, 8, 5, 6)}
    plan = conv_model(shapes["X"], {"W1": w1, "B1": b1, "W2": w2}, nodes)
    tactic = TACTICS["conv_mma_f16_64x64"]
    big = TACTICS["conv_mma_f16_128x128"]
    for layer in plan.layers:
        assert tactic.check is not None and tactic.check(layer, plan) is None
        assert big.check is not None and "over twice" in (big.check(layer, plan) or "")
        layer.tactic = tactic.name
    memory = plan_memory(plan, BuilderConfig(), shapes)
    launch_plan = lower_launch_plan(plan, memory, shapes, lower_conv_tc.LOWERINGS)
    entries = [s.entry for s in launch_plan.steps if isinstance(s, KernelLaunch)]
    assert entries == ["gie_nchw_to_nhwc_f16", ENTRY, ENTRY, "gie_nhwc_to_nchw_f16"], entries
    x = rng.standard_normal((1, 8, 5, 6)).astype(np.float16)
    runner = CudaRunner(launch_plan, ShimDevice(shim_cache), use_graph=False)
    got = runner.run({"X": x})["Z"]
    runner.close()
    y = reference("Conv", [x.astype(np.float32), w1.astype(np.float32), b1.astype(np.float32)],
                  {"pads": [1, 1, 1, 1]})  # fmt: skip
    z = reference(
        "Conv",
        [y.astype(np.float16).astype(np.float32), w2.astype(np.float32)],
        {"pads": [1, 0, 1, 1], "strides": [2, 2], "group": 2},
    )
    assert got.shape == z.shape == (1, 16, 3, 3)
    check(got.astype(np.float32), z)


@pytest.mark.parametrize(
    ("c", "m", "group", "reason"),
    [
        (12, 16, 1, "C = 12 is not a multiple of 8"),
        (8, 16, 2, "C / group = 4 is not a multiple of 8"),
        (16, 8, 2, "M / group = 4 is not a multiple of 8"),
    ],
)
def test_fp16_tactics_refuse_unaligned_channels(c, m, group, reason) -> None:
    from onnx import helper

    w = np.zeros((m, c // group, 3, 3), np.float16)
    plan = conv_model(
        (1, c, 4, 4), {"W": w}, [helper.make_node("Conv", ["X", "W"], ["Z"], group=group)]
    )
    check = TACTICS["conv_mma_f16_64x64"].check
    assert check is not None
    assert reason in (check(plan.layers[0], plan) or "")


def test_tactic_tables_match() -> None:
    assert set(lower_conv_tc.LOWERINGS) == set(TACTICS)
    assert {t.entry for t in TACTICS.values() if t.kernel_file == FILE} == {ENTRY}
    for tactic in TACTICS.values():  # what the runtime derives the read / write sets from
        const = KernelSource(file=tactic.kernel_file).const_pointers(tactic.entry)
        inputs = 4 if tactic.kernel_file == FILE else 5  # int8: x, w, bias, w_scale, residual
        assert const[: inputs + 1] == [True] * inputs + [False], (tactic.entry, const)
