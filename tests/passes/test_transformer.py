"""Transformer fusions (LayerNorm, skip LayerNorm, RMSNorm, GELU, attention).

Every rule is checked three ways on tiny onnx.helper graphs run through a PassManager holding
TRANSFORMER_PASSES: the structure after the pass (op counts, one recorded step per
application), numeric equivalence (reference backend on the optimized graph against the
reference backend and onnxruntime on the original), and a near miss that must not fire and
must leave its reason as a WhyNot. The zoo's transformers are checked with the passes alone
and at O3 through engine.passes.optimize.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load
from engine.passes import optimize, replay
from engine.passes.graph_text import canonical_text
from engine.passes.manager import PassManager, StepRecorder
from engine.passes.pipelines import prepare_for_optimization
from engine.passes.transformer import TRANSFORMER_PASSES
from engine.zoo import build, make_inputs

RTOL, ATOL = 1e-4, 1e-5
RNG = np.random.default_rng(3)
B, S, HEADS, D = 2, 6, 2, 4
HIDDEN = HEADS * D


# --------------------------------------------------------------------------- harness


class G:
    """A tiny graph under construction: nodes, constants, inputs (with feeds), outputs."""

    def __init__(self, opset: int = 13) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.consts: dict[str, np.ndarray] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}
        self.outputs: list[str] = []

    def input(self, name: str, shape: Sequence[Any], array: np.ndarray) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        self.feeds[name] = array.astype(np.float32)
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        name = f"c{len(self.consts)}"
        self.consts[name] = np.asarray(value, dtype=dtype)
        return name

    def op(self, op: str, inputs: Sequence[str], outputs: int = 1, **attrs: Any) -> Any:
        index = len(self.nodes)
        names = [f"{op}_{index}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, name=f"{op}_{index}", **attrs))
        return names[0] if outputs == 1 else names

    def model(self, *outputs: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            self.inputs,
            [onnx.ValueInfoProto(name=o) for o in outputs],
            [numpy_helper.from_array(a, n) for n, a in self.consts.items()],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        proto.ir_version = 8
        return proto


def _fuse(proto: onnx.ModelProto) -> tuple[ir.Model, StepRecorder]:
    model = prepare_for_optimization(load(proto))
    recorder = StepRecorder()
    PassManager(TRANSFORMER_PASSES, [recorder]).run(model)
    return model, recorder


def _ops(model: ir.Model) -> Counter[str]:
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph)


def _assert_equivalent(proto: onnx.ModelProto, model: ir.Model, feeds: dict) -> None:
    got = list(ReferenceInterpreter(model).run(feeds).outputs.values())
    want = list(ReferenceInterpreter(load(proto)).run(feeds).outputs.values())
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for g, w, o in zip(got, want, session.run(None, feeds), strict=True):
        np.testing.assert_allclose(g, w, RTOL, ATOL)
        np.testing.assert_allclose(g, o, RTOL, ATOL)


def _fires(g: G, outputs: Sequence[str], rules: dict[str, int], fused: dict[str, int]) -> None:
    proto = g.model(*outputs)
    model, recorder = _fuse(proto)
    ops = _ops(model)
    for op, count in fused.items():
        assert ops[op] == count, (op, ops)
    assert Counter(s.rule for s in recorder.steps) == Counter(rules), recorder.steps
    _assert_equivalent(proto, model, g.feeds)


def _refuses(g: G, outputs: Sequence[str], rule: str, reason: str) -> None:
    proto = g.model(*outputs)
    model, recorder = _fuse(proto)
    assert not recorder.steps or all(s.rule != rule for s in recorder.steps)
    reasons = [w.reason for w in recorder.why_not.values() if w.rule == rule]
    assert any(reason in r for r in reasons), reasons
    assert any(w.node in {n.name for n in model.graph} for w in recorder.why_not.values())
    _assert_equivalent(proto, model, g.feeds)


def _x(g: G, shape: Sequence[int] = (B, S, 16), name: str = "x") -> str:
    return g.input(name, ["batch", "seq", *shape[2:]], RNG.normal(size=shape))


# --------------------------------------------------------------------------- LayerNorm


def _decomposed_ln(g: G, x: str, axis: int = -1, square: str = "pow", norm: str = "div") -> str:
    def mean(value: str) -> str:
        if g.opset >= 18:
            return g.op("ReduceMean", [value, g.const([axis], np.int64)], keepdims=1)
        return g.op("ReduceMean", [value], axes=[axis], keepdims=1)

    d = g.op("Sub", [x, mean(x)])
    sq = g.op("Pow", [d, g.const(2.0)]) if square == "pow" else g.op("Mul", [d, d])
    std = g.op("Sqrt", [g.op("Add", [mean(sq), g.const(1e-5)])])
    if norm == "div":
        return g.op("Div", [d, std])
    return g.op("Mul", [d, g.op("Reciprocal", [std])])


@pytest.mark.parametrize(
    ("opset", "square", "norm", "bias", "scale_first"),
    [(13, "pow", "div", True, False), (18, "mul", "reciprocal", False, True)],
)
def test_layer_norm_decomposed(opset: int, square: str, norm: str, bias: bool, scale_first: bool):
    g = G(opset)
    normed = _decomposed_ln(g, _x(g), square=square, norm=norm)
    scale = g.const(RNG.normal(size=16))
    y = g.op("Mul", [scale, normed] if scale_first else [normed, scale])
    if bias:
        y = g.op("Add", [g.const(RNG.normal(size=16)), y])
    rules = {"layer_norm_decomposed": 1, "layer_norm_bias": int(bias)}
    _fires(g, [y], rules, {"gie::LayerNorm": 1, "ReduceMean": 0, "Sqrt": 0, "Add": 0})


def test_layer_norm_decomposed_refuses_a_norm_over_another_axis():
    g = G()
    y = g.op("Mul", [_decomposed_ln(g, _x(g), axis=1), g.const(RNG.normal(size=16))])
    _refuses(g, [y], "layer_norm_decomposed", "reduces axes [1], not the last axis")


def test_layer_normalization_op_and_its_residual_add():
    g = G(17)
    total = g.op("Add", [_x(g), _x(g, name="r")])
    scale, bias = g.const(RNG.normal(size=16)), g.const(RNG.normal(size=16))
    y = g.op("LayerNormalization", [total, scale, bias], epsilon=1e-6)
    rules = {"layer_normalization": 1, "skip_layer_norm": 1}
    _fires(g, [y], rules, {"gie::LayerNorm": 1, "LayerNormalization": 0, "Add": 0})


def test_layer_normalization_with_used_statistics_is_not_fused():
    g = G(17)
    y, mean, _ = g.op("LayerNormalization", [_x(g), g.const(np.ones(16))], outputs=3)
    _refuses(g, [y, mean], "layer_normalization", "mean/inv-std-dev outputs are used")


def test_shared_residual_sum_becomes_the_second_output():
    g = G(17)
    total = g.op("Add", [_x(g), _x(g, name="r")])
    y = g.op("LayerNormalization", [total, g.const(RNG.normal(size=16))], epsilon=1e-6)
    after = g.op("Add", [total, y])  # pre-LN: the sum is also the next residual
    rules = {"layer_normalization": 1, "skip_layer_norm_shared": 1}
    _fires(g, [after, total], rules, {"gie::LayerNorm": 1, "Add": 1})


def test_residual_of_another_rank_is_not_fused():
    g = G(17)
    total = g.op("Add", [_x(g), g.const(RNG.normal(size=16))])
    y = g.op("LayerNormalization", [total, g.const(np.ones(16))])
    _refuses(g, [y], "skip_layer_norm", "the Add operands have ranks 3 and 1")


def test_layer_norm_bias_refuses_a_bias_that_is_not_a_vector():
    g = G(17)
    y = g.op("LayerNormalization", [_x(g), g.const(np.ones(16))])
    y = g.op("Add", [y, g.const(RNG.normal(size=(S, 16)))])
    _refuses(g, [y], "layer_norm_bias", "is not a vector over the last axis")


# --------------------------------------------------------------------------- RMSNorm


def _rms(g: G, x: str, norm: str, eps: str) -> str:
    squared = g.op("Pow", [x, g.const(2.0)])
    std = g.op("Sqrt", [g.op("Add", [g.op("ReduceMean", [squared], axes=[-1]), eps])])
    if norm == "div":
        normed = g.op("Div", [x, std])
    elif norm == "reciprocal":
        normed = g.op("Mul", [x, g.op("Reciprocal", [std])])
    else:
        normed = g.op("Mul", [g.op("Div", [g.const(1.0), std]), x])
    return g.op("Mul", [normed, g.const(RNG.normal(size=16))])


@pytest.mark.parametrize("norm", ["div", "reciprocal", "one_over"])
def test_rms_norm(norm: str):
    g = G()
    y = _rms(g, _x(g), norm, g.const(1e-6))
    _fires(g, [y], {"rms_norm": 1}, {"gie::RMSNorm": 1, "ReduceMean": 0, "Sqrt": 0})


def test_rms_norm_refuses_a_computed_epsilon():
    g = G()
    eps = g.input("eps", [], np.array(1e-6))
    _refuses(g, [_rms(g, _x(g), "div", eps)], "rms_norm", "is not a constant scalar")


# --------------------------------------------------------------------------- GELU


def _gelu_erf(g: G, x: str, order: str, root: str, divisor: float = 2**0.5) -> str:
    scaled = (
        g.op("Div", [x, g.const(divisor)])
        if root == "div"
        else g.op("Mul", [g.const(1 / divisor), x])
    )
    term = g.op("Add", [g.const(1.0), g.op("Erf", [scaled])])
    half = g.const(0.5)
    if order == "half_last":
        return g.op("Mul", [g.op("Mul", [x, term]), half])
    if order == "half_first":
        return g.op("Mul", [term, g.op("Mul", [half, x])])
    return g.op("Mul", [x, g.op("Mul", [half, term])])


@pytest.mark.parametrize(
    ("order", "root"), [("half_last", "div"), ("half_first", "mul"), ("half_inner", "div")]
)
def test_gelu_erf(order: str, root: str):
    g = G()
    _fires(g, [_gelu_erf(g, _x(g), order, root)], {"gelu_erf": 1}, {"gie::Gelu": 1, "Erf": 0})


def test_gelu_erf_refuses_another_divisor():
    g = G()
    y = _gelu_erf(g, _x(g), "half_last", "div", divisor=1.5)
    _refuses(g, [y], "gelu_erf", "the Erf input divisor is 1.5, not 1.41421")


def _gelu_tanh(g: G, x: str, cube: str, half_first: bool, coefficient: float = 0.044715) -> str:
    if cube == "pow":
        cubed = g.op("Pow", [x, g.const(3.0)])
    else:
        cubed = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Add", [x, g.op("Mul", [g.const(coefficient), cubed])])
    tanh = g.op("Tanh", [g.op("Mul", [g.const(0.7978845608028654), inner])])
    term = g.op("Add", [g.const(1.0), tanh])
    if half_first:
        return g.op("Mul", [g.op("Mul", [g.const(0.5), x]), term])
    return g.op("Mul", [g.op("Mul", [x, term]), g.const(0.5)])


@pytest.mark.parametrize(("cube", "half_first"), [("pow", True), ("mul", False)])
def test_gelu_tanh(cube: str, half_first: bool):
    g = G()
    y = _gelu_tanh(g, _x(g), cube, half_first)
    _fires(g, [y], {"gelu_tanh": 1}, {"gie::Gelu": 1, "Tanh": 0, "Pow": 0})


def test_gelu_tanh_refuses_another_coefficient():
    g = G()
    y = _gelu_tanh(g, _x(g), "pow", True, coefficient=0.05)
    _refuses(g, [y], "gelu_tanh", "the cubic coefficient is 0.05, not 0.044715")


# --------------------------------------------------------------------------- attention


def _dim(g: G, x: str, index: int) -> str:
    gathered = g.op("Gather", [g.op("Shape", [x]), g.const(index, np.int64)], axis=0)
    return g.op("Unsqueeze", [gathered, g.const([0], np.int64)])


def _target(g: G, x: str, chain: bool, tail: Sequence[int]) -> str:
    if not chain:
        return g.const([0, 0, *tail], np.int64)
    parts = [_dim(g, x, 0), _dim(g, x, 1), *(g.const([t], np.int64) for t in tail)]
    return g.op("Concat", parts, axis=0)


def _heads(g: G, x: str, chain: bool, perm: list[int]) -> str:
    return g.op("Transpose", [g.op("Reshape", [x, _target(g, x, chain, [HEADS, D])])], perm=perm)


def _attention_tail(g: G, scores: str, v4: str, chain: bool, softmax_axis: int = -1) -> str:
    probs = g.op("Softmax", [scores], axis=softmax_axis)
    merged = g.op("Transpose", [g.op("MatMul", [probs, v4])], perm=[0, 2, 1, 3])
    return g.op("Reshape", [merged, _target(g, merged, chain, [HIDDEN])])


def _bert_attention(
    chain: bool,
    mask_shape: Sequence[int] | None = (B, 1, 1, S),
    k_form: str = "direct",
    scaling: str = "div",
    softmax_axis: int = -1,
) -> tuple[G, str]:
    g = G()
    q, k, v = (_x(g, (B, S, HIDDEN), name) for name in "qkv")
    q4, v4 = _heads(g, q, chain, [0, 2, 1, 3]), _heads(g, v, chain, [0, 2, 1, 3])
    if k_form == "direct":
        kt = _heads(g, k, chain, [0, 2, 3, 1])
    else:
        kt = g.op("Transpose", [_heads(g, k, chain, [0, 2, 1, 3])], perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q4, kt])
    if scaling == "div":
        scores = g.op("Div", [scores, g.const(D**0.5)])
    else:
        scores = g.op("Mul", [g.const(D**-0.5), scores])
    if mask_shape is not None:
        mask = np.where(RNG.random(mask_shape) < 0.3, -1e9, 0.0)
        named = ["batch", *mask_shape[1:-1], "seq"] if len(mask_shape) == 4 else list(mask_shape)
        scores = g.op("Add", [scores, g.input("mask", named, mask)])
    return g, _attention_tail(g, scores, v4, chain, softmax_axis)


@pytest.mark.parametrize(
    ("chain", "k_form", "scaling", "masked"),
    [(False, "direct", "div", True), (True, "direct", "div", True), (True, "double", "mul", False)],
)
def test_attention_bert_form(chain: bool, k_form: str, scaling: str, masked: bool):
    mask = (B, 1, 1, S) if masked else None
    g, y = _bert_attention(chain, mask, k_form, scaling)
    fused = {"gie::Attention": 1, "Softmax": 0, "MatMul": 0, "Transpose": 0}
    _fires(g, [y], {"attention": 1}, fused)


def test_attention_refuses_a_mask_of_unknown_shape():
    g, y = _bert_attention(False)
    g.inputs[-1] = onnx.ValueInfoProto(name="mask", type=g.inputs[-1].type)
    g.inputs[-1].type.tensor_type.ClearField("shape")
    _refuses(g, [y], "attention", "the shape of the mask mask is unknown")


def test_attention_refuses_a_mask_with_more_axes():
    g, y = _bert_attention(False, mask_shape=(1, B, 1, 1, S))
    model, recorder = _fuse(g.model(y))
    reasons = [w.reason for w in recorder.why_not.values() if w.rule == "attention"]
    assert any("is not broadcastable to [batch, heads, seq, seq]" in r for r in reasons)
    assert _ops(model)["Softmax"] == 1


def test_attention_refuses_a_softmax_over_queries():
    g, y = _bert_attention(False, softmax_axis=2)
    _refuses(g, [y], "attention", "Softmax is over axis 2, not the key axis")


def _gpt_attention(fill: float = -3.4e38, lower: bool = True) -> tuple[G, str]:
    g = G()
    q, k, v = (_x(g, (B, S, HIDDEN), name) for name in "qkv")
    q4, v4 = _heads(g, q, True, [0, 2, 1, 3]), _heads(g, v, True, [0, 2, 1, 3])
    kt = _heads(g, k, True, [0, 2, 3, 1])
    scores = g.op("Div", [g.op("MatMul", [q4, kt]), g.const(D**0.5)])
    square = np.tril(np.ones((16, 16), bool)) if lower else np.triu(np.ones((16, 16), bool))
    buffer, seq = g.const(square[None, None], np.bool_), _dim(g, q, 1)
    zero = g.const([0], np.int64)
    for axis in (2, 3):
        buffer = g.op("Slice", [buffer, zero, seq, g.const([axis], np.int64)])
    scores = g.op("Where", [buffer, scores, g.const(fill)])
    return g, _attention_tail(g, scores, v4, True)


def test_attention_gpt_causal_where_becomes_causal():
    g, y = _gpt_attention()
    proto = g.model(y)
    model, recorder = _fuse(proto)
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert node.attributes.get_int("causal") == 1
    assert len(node.inputs) == 3 or node.inputs[3] is None
    assert [s.rule for s in recorder.steps] == ["attention"]
    _assert_equivalent(proto, model, g.feeds)


@pytest.mark.parametrize(
    ("fill", "lower", "reason"),
    [(-1.0, True, "is not a large negative constant"), (-1e9, False, "is not lower-triangular")],
)
def test_attention_refuses_a_where_that_is_not_causal(fill: float, lower: bool, reason: str):
    g, y = _gpt_attention(fill, lower)
    _refuses(g, [y], "attention", reason)


@pytest.mark.parametrize("chain", [False, True])
def test_attention_packed_qkv_vit_form(chain: bool):
    g = G()
    qkv = _x(g, (B, S, 3 * HIDDEN), "qkv")
    heads = g.op("Reshape", [qkv, _target(g, qkv, chain, [3, HEADS, D])])
    moved = g.op("Transpose", [heads], perm=[2, 0, 3, 1, 4])
    parts = g.op("Split", [moved, g.const([1, 1, 1], np.int64)], outputs=3, axis=0)
    q, k, v = (g.op("Squeeze", [p, g.const([0], np.int64)]) for p in parts)
    q = g.op("Mul", [q, g.const(D**-0.5)])
    kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
    y = _attention_tail(g, g.op("MatMul", [q, kt]), v, chain)
    fused = {"gie::Attention": 1, "Split": 1, "Squeeze": 0, "Softmax": 0}
    _fires(g, [y], {"attention_packed_qkv": 1}, fused)


# --------------------------------------------------------------------------- zoo


ZOO_RULES = {
    "bert_opset13": {"layer_norm_decomposed": 5, "layer_norm_bias": 5, "skip_layer_norm": 5},
    "bert_opset17": {"layer_normalization": 5, "skip_layer_norm": 5},
    "vit_block": {"layer_normalization": 5, "attention_packed_qkv": 2},
    "gpt_block": {"layer_normalization": 5, "gelu_tanh": 2, "attention": 2},
}
LEFTOVERS = ("ReduceMean", "Erf", "Softmax", "LayerNormalization", "Tanh", "Pow")


@pytest.mark.parametrize("name", sorted(ZOO_RULES))
def test_zoo_transformers_fuse_with_the_transformer_passes_alone(name: str):
    proto = build(name)
    model, recorder = _fuse(proto)
    ops = _ops(model)
    assert (ops["gie::LayerNorm"], ops["gie::Gelu"], ops["gie::Attention"]) == (5, 2, 2), ops
    for leftover in LEFTOVERS:
        assert ops[leftover] == (1 if name.startswith("bert") and leftover == "Tanh" else 0)
    rules = Counter(s.rule for s in recorder.steps)
    assert all(rules[rule] == count for rule, count in ZOO_RULES[name].items()), rules
    feeds = make_inputs(proto, 0)
    got = ReferenceInterpreter(model).run(feeds).outputs
    for key, want in ReferenceInterpreter(load(proto)).run(feeds).outputs.items():
        np.testing.assert_allclose(got[key], want, RTOL, ATOL)


@pytest.mark.parametrize("name", ["bert_opset13", "bert_opset17", "vit_block", "gpt_block"])
def test_zoo_transformers_at_o3(name: str):
    proto = build(name)
    original = load(proto)
    result = optimize(original, "O3")
    ops = _ops(result.model)
    assert (ops["gie::LayerNorm"], ops["gie::Gelu"], ops["gie::Attention"]) == (5, 2, 2), ops
    for leftover in ("ReduceMean", "Erf", "Softmax", "LayerNormalization"):
        assert ops[leftover] == 0, (leftover, ops)
    feeds = make_inputs(proto, 0)
    got = ReferenceInterpreter(result.model).run(feeds).outputs
    for key, want in ReferenceInterpreter(original).run(feeds).outputs.items():
        np.testing.assert_allclose(got[key], want, RTOL, ATOL)
    replayed = replay(original, result.steps, "O3")
    assert canonical_text(replayed) == canonical_text(result.model)
