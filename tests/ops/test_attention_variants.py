"""LinearAttention, CausalConvWithState and FlexAttention agree with onnx's ReferenceEvaluator.

Each case builds a one-node model, runs it on the reference interpreter and on
onnx.reference.ReferenceEvaluator (onnxruntime lacks these ops), compares outputs, and checks the
shape rule and cost against the real outputs.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from engine.backends.numpy_ref.interpreter import NodeExecutionError, ReferenceInterpreter
from engine.onnx_io import load
from engine.ops import attention_variants, elementwise
from engine.ops.registry import Attrs, KernelContext, OpRegistry, TensorSpec

REGISTRY = OpRegistry(attention_variants.OPS + elementwise.OPS)
PREVIEW = "ai.onnx.preview"


def _model(
    op: str, feeds: dict[str, np.ndarray], names: list[str], n_out: int, domain: str = "", **attrs
) -> onnx.ModelProto:
    """One-node model; ``names`` are the node inputs ('' for an omitted optional)."""
    outputs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outputs, domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in feeds.items()
        ],
        [onnx.ValueInfoProto(name=o) for o in outputs],
    )
    opsets = [helper.make_opsetid("", 27)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def _compare(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-4) -> None:
    ours = ReferenceInterpreter(load(model), REGISTRY).run(feeds).outputs
    theirs = ReferenceEvaluator(model).run(None, feeds)
    node = load(model).graph.node(0)
    spec = REGISTRY.lookup(node.op_type, node.domain)
    in_specs = [None if v is None else TensorSpec.of_array(feeds[v.name]) for v in node.inputs]
    ctx = KernelContext(opset=27, output_count=len(theirs))
    rule = spec.shape_rule(in_specs, Attrs.from_node(node), ctx)
    for index, expected in enumerate(theirs):
        got = ours[f"y{index}"]
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert rule[index] == TensorSpec.of_array(got)
        np.testing.assert_allclose(
            got.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=rtol
        )
    out_specs = [TensorSpec.of_array(ours[f"y{i}"]) for i in range(len(theirs))]
    cost = spec.cost(in_specs, out_specs, Attrs.from_node(node))
    assert cost.flops > 0 and cost.bytes_read > 0 and cost.bytes_written > 0


def _linear_feeds(
    rng: np.random.Generator, rule: str, t: int, hq: int, hkv: int, per_dim: bool, past: bool
) -> tuple[dict[str, np.ndarray], list[str]]:
    b, dk, dv = 2, 8, 6
    key = rng.standard_normal((b, t, hkv, dk))
    key /= np.linalg.norm(key, axis=-1, keepdims=True)
    feeds = {
        "q": rng.standard_normal((b, t, hq * dk)),
        "k": key.reshape(b, t, hkv * dk),
        "v": rng.standard_normal((b, t, hkv * dv)),
    }
    names = ["q", "k", "v", "", "", ""]
    if past:
        feeds["p"], names[3] = rng.standard_normal((b, hkv, dk, dv)), "p"
    if "gated" in rule:
        width = hkv * dk if per_dim else hkv
        feeds["d"], names[4] = -0.3 * np.abs(rng.standard_normal((b, t, width))), "d"
    if "delta" in rule:
        feeds["b"], names[5] = 1 / (1 + np.exp(-rng.standard_normal((b, t, hkv)))), "b"
    while names[-1] == "":
        names.pop()
    return {n: a.astype(np.float32) for n, a in feeds.items()}, names


@pytest.mark.parametrize("rule", ["linear", "gated", "delta", "gated_delta"])
@pytest.mark.parametrize(("per_dim", "past"), [(False, True), (True, False)])
def test_linear_attention_matches_reference(rule: str, per_dim: bool, past: bool) -> None:
    rng = np.random.default_rng(7)
    # 37 tokens in chunks of 8: several full chunks and a ragged tail; GQA with groups of 3.
    feeds, names = _linear_feeds(rng, rule, 37, 6, 2, per_dim, past)
    model = _model(
        "LinearAttention",
        feeds,
        names,
        2,
        q_num_heads=6,
        kv_num_heads=2,
        update_rule=rule,
        chunk_size=8,
    )
    _compare(model, feeds)


def test_linear_attention_bfloat16_and_decode_step() -> None:
    rng = np.random.default_rng(3)
    feeds, names = _linear_feeds(rng, "gated_delta", 1, 4, 4, False, True)
    feeds = {n: a.astype(ml_dtypes.bfloat16) for n, a in feeds.items()}
    model = _model("LinearAttention", feeds, names, 2, q_num_heads=4, kv_num_heads=4)
    _compare(model, feeds, rtol=2e-2)


@pytest.mark.parametrize(
    ("k", "bias", "past", "activation", "dtype"),
    [
        (4, True, True, "silu", np.float32),
        (3, False, False, "none", np.float16),
        (1, True, False, "swish", np.float32),
        (5, False, True, "none", np.float32),
    ],
)
def test_causal_conv_matches_reference(
    k: int, bias: bool, past: bool, activation: str, dtype: Any
) -> None:
    rng = np.random.default_rng(11)
    feeds = {"x": rng.standard_normal((2, 5, 3)), "w": rng.standard_normal((5, 1, k))}
    names = ["x", "w", "", ""]
    if bias:
        feeds["b"], names[2] = rng.standard_normal(5), "b"
    if past:
        feeds["p"], names[3] = rng.standard_normal((2, 5, k - 1)), "p"
    while names[-1] == "":
        names.pop()
    feeds = {n: a.astype(dtype) for n, a in feeds.items()}
    model = _model("CausalConvWithState", feeds, names, 2, activation=activation)
    _compare(model, feeds, rtol=2e-3 if dtype == np.float16 else 1e-5)


def _mod_graph(name: str, op: str, constant: float) -> onnx.GraphProto:
    """(x) -> op(x, constant) on float32 rank-4 tensors."""
    value = helper.make_tensor("c", TensorProto.FLOAT, [], [constant])
    return helper.make_graph(
        [helper.make_node(op, ["x", "c"], ["out"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [value],
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_flex_attention_matches_reference(dtype: Any) -> None:
    rng = np.random.default_rng(5)
    feeds = {
        "q": rng.standard_normal((2, 6, 5, 8)).astype(dtype),
        "k": rng.standard_normal((2, 3, 7, 8)).astype(dtype),
        "v": rng.standard_normal((2, 3, 7, 4)).astype(dtype),
    }
    mods: dict[str, Any] = {}
    if dtype == np.float32:
        mods = {
            "score_mod": _mod_graph("score", "Add", 0.5),
            "prob_mod": _mod_graph("prob", "Mul", 2.0),
        }
    model = _model("FlexAttention", feeds, ["q", "k", "v"], 1, PREVIEW, scale=0.3, **mods)
    _compare(model, feeds, rtol=2e-3 if dtype == np.float16 else 1e-5)


def test_linear_attention_rejects_missing_decay() -> None:
    rng = np.random.default_rng(1)
    feeds, names = _linear_feeds(rng, "delta", 4, 2, 2, False, False)
    model = _model(
        "LinearAttention", feeds, names, 2, q_num_heads=2, kv_num_heads=2, update_rule="gated_delta"
    )
    interpreter = ReferenceInterpreter(load(model), REGISTRY)
    with pytest.raises(NodeExecutionError, match="update_rule 'gated_delta' takes decay and beta"):
        interpreter.run(feeds)
