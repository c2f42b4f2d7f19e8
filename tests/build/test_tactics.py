"""Every NumPy tactic computes what the reference kernel computes (to fp32 rounding), and the
catalogue offers each tactic exactly where it applies, with a reason where it does not."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.build.plan import Layer, Plan, lower
from engine.build.tactics import (
    TACTIC_FAMILIES,
    candidate_tactics,
    make_kernel,
    tactic_kernel,
    tactics_for,
    why_not,
)
from engine.config import BuilderConfig

ALL_SOURCES = BuilderConfig()


def _plan(
    op: str,
    inputs: dict[str, np.ndarray],
    constants: dict[str, np.ndarray],
    out_rank: int,
    domain: str = "",
    **attrs: object,
) -> Plan:
    """A one-node model (op over graph inputs + initializers), lowered at the inputs' shapes."""
    graph_inputs = [
        helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)
        )
        for name, array in inputs.items()
    ]
    names = [*inputs, *constants]
    order = attrs.pop("order", None)
    node = helper.make_node(
        op, list(order) if order else names, ["y"], name="layer", domain=domain, **attrs
    )
    graph = helper.make_graph(
        [node],
        "g",
        graph_inputs,
        [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, [None] * out_rank)],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("gie", 1)] if domain else [])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))
    return lower(model, {name: array.shape for name, array in inputs.items()})


def _check_all(plan: Plan, feeds: dict[str, np.ndarray], expect: set[str]) -> None:
    """Every candidate tactic of the plan's layer equals the reference kernel's output."""
    layer = plan.layers[0]
    values = {**plan.constants, **feeds}
    inputs = [values[name] if name else None for name in layer.inputs]
    reference = make_kernel(layer, "reference")(inputs, layer.attrs, layer.context)[0]
    candidates = candidate_tactics(layer, plan, ALL_SOURCES)
    assert set(candidates) == {"reference", *expect}
    scale = float(np.abs(reference).max()) or 1.0
    for name in candidates:
        got = make_kernel(layer, name)(inputs, layer.attrs, layer.context)[0]
        assert got.shape == reference.shape and got.dtype == reference.dtype, name
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


RNG = np.random.default_rng(7)


def _normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- convolution

CONV_CASES = [
    # x shape, w shape, attributes, expected tactics beyond reference
    ((1, 3, 9, 9), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}, "wino"),
    ((2, 5, 8, 7), (6, 5, 3, 3), {}, "wino"),  # odd output width
    ((1, 16, 11, 12), (32, 16, 3, 3), {"pads": [0, 1, 2, 1]}, "wino"),  # asymmetric pads
    ((3, 2, 5, 5), (2, 2, 3, 3), {"pads": [1, 1, 1, 1]}, "wino"),
    ((2, 8, 12, 12), (8, 1, 3, 3), {"group": 8, "strides": [2, 2], "pads": [1, 1, 1, 1]}, ""),
    ((1, 6, 10, 10), (4, 3, 5, 5), {"group": 2, "pads": [2, 2, 2, 2]}, ""),
    ((1, 4, 12, 12), (4, 4, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, ""),
    ((2, 16, 9, 9), (24, 16, 1, 1), {"strides": [2, 2]}, ""),
    ((1, 3, 16, 16), (8, 3, 7, 7), {"strides": [2, 2], "pads": [3, 3, 3, 3]}, ""),
    ((2, 4, 20), (6, 4, 3), {"pads": [1, 1]}, ""),  # 1-D
    ((1, 2, 5, 6, 7), (3, 2, 3, 3, 3), {"pads": [1, 1, 1, 1, 1, 1]}, ""),  # 3-D
    ((1, 4, 9, 9), (4, 4, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, ""),
]


@pytest.mark.parametrize(("x_shape", "w_shape", "attrs", "wino"), CONV_CASES)
def test_conv_tactics_match_reference(x_shape, w_shape, attrs, wino) -> None:
    x, w, b = _normal(*x_shape), _normal(*w_shape), _normal(w_shape[0])
    plan = _plan("Conv", {"x": x}, {"w": w, "b": b}, len(x_shape), **attrs)
    expect = {"im2col_gemm", "direct"} | ({"winograd_f2x3"} if wino else set())
    _check_all(plan, {"x": x}, expect)


@pytest.mark.parametrize("activation", ["", "Relu", "SiLU", "Clip"])
@pytest.mark.parametrize("residual_first", [0, 1])
def test_conv_act_tactics_apply_the_fused_epilogue(activation: str, residual_first: int) -> None:
    x, w, b, r = _normal(2, 8, 10, 10), _normal(8, 8, 3, 3), _normal(8), _normal(2, 8, 10, 10)
    plan = _plan(
        "ConvAct",
        {"x": x, "r": r},
        {"w": w, "b": b},
        4,
        domain="gie",
        order=["x", "w", "b", "r"],
        pads=[1, 1, 1, 1],
        kernel_shape=[3, 3],
        activation=activation,
        min=-0.5,
        max=0.5,
        residual_before_activation=residual_first,
    )
    _check_all(plan, {"x": x, "r": r}, {"im2col_gemm", "direct", "winograd_f2x3"})


@pytest.mark.parametrize(
    ("w_shape", "attrs", "reason"),
    [
        ((4, 4, 5, 5), {}, "needs a 3x3 kernel (got 5x5)"),
        ((4, 4, 3, 3), {"strides": [2, 2]}, "needs stride 1 (got 2x2)"),
        ((4, 4, 3, 3), {"dilations": [2, 2]}, "needs dilation 1 (got 2x2)"),
        ((4, 2, 3, 3), {"group": 2}, "needs group 1 (got 2)"),
    ],
)
def test_winograd_refuses_with_a_reason(w_shape, attrs, reason) -> None:
    plan = _plan("Conv", {"x": _normal(1, 4, 12, 12)}, {"w": _normal(*w_shape)}, 4, **attrs)
    layer = plan.layers[0]
    assert reason in (why_not(layer, plan, "winograd_f2x3") or "")
    assert "winograd_f2x3" not in candidate_tactics(layer, plan, ALL_SOURCES)


def test_winograd_refuses_1d_convolutions() -> None:
    plan = _plan("Conv", {"x": _normal(1, 2, 9)}, {"w": _normal(2, 2, 3)}, 3)
    assert "2-D convolution (got 1-D)" in (why_not(plan.layers[0], plan, "winograd_f2x3") or "")


def test_float16_convolution_tactics_round_like_the_reference() -> None:
    x, w = _normal(1, 4, 8, 8).astype(np.float16), _normal(4, 4, 3, 3).astype(np.float16)
    plan = _plan("Conv", {"x": x}, {"w": w}, 4, pads=[1, 1, 1, 1])
    layer = plan.layers[0]
    reference = make_kernel(layer, "reference")([x, w], layer.attrs, layer.context)[0]
    for name in ("im2col_gemm", "direct", "winograd_f2x3"):
        got = make_kernel(layer, name)([x, w], layer.attrs, layer.context)[0]
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), reference, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize(
    "attrs",
    [{}, {"transA": 1}, {"transB": 1, "alpha": 0.5, "beta": 2.0}, {"transA": 1, "transB": 1}],
)
def test_gemm_tactics_match_reference(attrs: dict) -> None:
    a = _normal(7, 5) if not attrs.get("transA") else _normal(5, 7)
    b = _normal(5, 6) if not attrs.get("transB") else _normal(6, 5)
    plan = _plan("Gemm", {"a": a}, {"b": b, "c": _normal(6)}, 2, **attrs)
    _check_all(plan, {"a": a}, {"matmul", "einsum", "transposed_b"})


def test_matmul_tactics_with_a_constant_and_a_computed_b() -> None:
    a, w = _normal(2, 3, 8, 5), _normal(5, 4)
    _check_all(
        _plan("MatMul", {"a": a}, {"w": w}, 4), {"a": a}, {"matmul", "einsum", "transposed_b"}
    )
    b = _normal(3, 5, 4)
    plan = _plan("MatMul", {"a": a, "b": b}, {}, 4)
    _check_all(plan, {"a": a, "b": b}, {"matmul", "einsum"})
    assert why_not(plan.layers[0], plan, "transposed_b") == "transposed_b needs a constant B"


def test_matmul_with_a_vector_keeps_blas_only() -> None:
    a, w = _normal(5), _normal(5, 3)
    plan = _plan("MatMul", {"a": a}, {"w": w}, 1)
    _check_all(plan, {"a": a}, {"matmul"})
    assert "rank >= 2" in (why_not(plan.layers[0], plan, "einsum") or "")


@pytest.mark.parametrize("kind", ["Gemm", "MatMul"])
def test_gemm_act_tactics_apply_the_fused_epilogue(kind: str) -> None:
    shape = (6, 5) if kind == "Gemm" else (2, 6, 5)
    a, r = _normal(*shape), _normal(*shape[:-1], 4)
    b = _normal(4, 5) if kind == "Gemm" else _normal(5, 4)
    extra = {"transB": 1, "alpha": 1.5} if kind == "Gemm" else {}
    plan = _plan(
        "GemmAct",
        {"a": a, "r": r},
        {"b": b, "c": _normal(4)},
        len(shape),
        domain="gie",
        order=["a", "b", "c", "r"],
        kind=kind,
        activation="GELU",
        **extra,
    )
    _check_all(plan, {"a": a, "r": r}, {"matmul", "einsum", "transposed_b"})


def test_transposed_b_prepares_the_weight_once_per_array() -> None:
    a, w = _normal(3, 5), _normal(5, 4)
    plan = _plan("MatMul", {"a": a}, {"w": w}, 2)
    layer = plan.layers[0]
    kernel = make_kernel(layer, "transposed_b")
    first = kernel([a, w], layer.attrs, layer.context)[0]
    np.testing.assert_allclose(kernel([a, w], layer.attrs, layer.context)[0], first)
    refit = _normal(5, 4)  # a new weight array (refit) is prepared again
    np.testing.assert_allclose(
        kernel([a, refit], layer.attrs, layer.context)[0], a @ refit, rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize(
    ("seq_q", "seq_k", "mask_shape", "causal"),
    [(6, 6, None, 0), (4, 7, (2, 1, 4, 7), 1), (5, 5, (5, 5), 0), (3, 3, (1, 4, 3, 3), 1)],
)
def test_attention_tactics_match_reference(seq_q, seq_k, mask_shape, causal) -> None:
    feeds = {"q": _normal(2, seq_q, 16), "k": _normal(2, seq_k, 16), "v": _normal(2, seq_k, 8)}
    if mask_shape:
        feeds["mask"] = _normal(*mask_shape)
    plan = _plan("Attention", feeds, {}, 3, domain="gie", num_heads=4, causal=causal)
    _check_all(plan, feeds, {"batched", "per_head"})


# --------------------------------------------------------------------------- catalogue


def _conv_plan() -> Plan:
    return _plan("Conv", {"x": _normal(1, 4, 8, 8)}, {"w": _normal(4, 4, 3, 3)}, 4)


def test_tactic_sources_filter_families() -> None:
    plan = _conv_plan()
    layer = plan.layers[0]
    only_direct = BuilderConfig(tactic_sources=frozenset({"direct", "blas"}))
    assert candidate_tactics(layer, plan, only_direct) == ["direct"]
    with_reference = BuilderConfig(tactic_sources=frozenset({"reference", "winograd"}))
    assert candidate_tactics(layer, plan, with_reference) == ["reference", "winograd_f2x3"]
    nothing_fits = BuilderConfig(tactic_sources=frozenset({"einsum"}))
    assert candidate_tactics(layer, plan, nothing_fits) == ["reference"]
    with pytest.raises(ValueError, match="unknown tactic sources \\['cudnn'\\]"):
        candidate_tactics(layer, plan, BuilderConfig(tactic_sources=frozenset({"cudnn"})))


def test_every_family_is_documented_and_used() -> None:
    ops = ["Conv", "gie::ConvAct", "MatMul", "Gemm", "gie::GemmAct", "gie::Attention"]
    used = {t.family for op in ops for t in tactics_for(op)} | {"reference"}
    assert used == set(TACTIC_FAMILIES)


def test_other_ops_have_only_the_reference() -> None:
    plan = _plan("Relu", {"x": _normal(2, 3)}, {}, 2)
    assert candidate_tactics(plan.layers[0], plan, ALL_SOURCES) == ["reference"]


def test_tactic_kernel_follows_the_layer_tactic() -> None:
    plan = _conv_plan()
    layer: Layer = plan.layers[0]
    x, w = _normal(1, 4, 8, 8), plan.constants["w"]
    layer.tactic = "winograd_f2x3"
    got = tactic_kernel(layer)([x, w], layer.attrs, layer.context)[0]
    layer.tactic = "reference"
    want = tactic_kernel(layer)([x, w], layer.attrs, layer.context)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    layer.tactic = "per_head"
    with pytest.raises(ValueError, match="no tactic 'per_head' for Conv"):
        tactic_kernel(layer)
