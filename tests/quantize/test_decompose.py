"""decompose_gie_ops: fused gie float ops written back as standard ONNX that onnxruntime runs.

The oracle is our reference interpreter on the fused model; the decomposed model runs in
onnxruntime (an independent implementation of every standard op it uses).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine import zoo
from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load, to_proto
from engine.ops.gie_fused import ACTIVATIONS
from engine.ops.registry import GIE_DOMAIN
from engine.passes import optimize
from engine.quantize.decompose import DecomposeError, decompose_gie_ops

RNG = np.random.default_rng(11)


def _ort(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(
        to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def _single(
    op_type: str,
    inputs: list[str],
    feeds: dict[str, np.ndarray],
    consts: dict[str, np.ndarray],
    attrs: dict[str, Any],
    outputs: int = 1,
    opset: int = 13,
    out_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A model of one gie node named 'fused' (``""`` in ``inputs`` = a missing input)."""
    node = helper.make_node(
        op_type, inputs, [f"out{i}" for i in range(outputs)], "fused", domain=GIE_DOMAIN, **attrs
    )
    node.metadata_props.add(key="gie.provenance", value='["origin"]')
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in feeds.items()
        ],
        [helper.make_tensor_value_info(f"out{i}", out_type, None) for i in range(outputs)],
        [numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(GIE_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _check(
    proto: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-4, atol: float = 1e-5
) -> Any:
    """Reference(fused) == onnxruntime(decomposed); returns the decomposed model."""
    fused = load(proto)
    expected = ReferenceInterpreter(fused).run(feeds).outputs
    decomposed = decompose_gie_ops(fused)
    assert not [n for n in decomposed.graph if n.domain == GIE_DOMAIN]
    assert GIE_DOMAIN not in decomposed.opset_imports
    assert decomposed.opset_imports[""] >= 17
    actual = _ort(decomposed, feeds)
    for (name, want), got in zip(expected.items(), actual):
        assert got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)
    return decomposed


def _random(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- ConvAct / GemmAct


def _epilogue_attrs(activation: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {"activation": activation}
    if activation == "LeakyRelu":
        attrs["activation_alpha"] = 0.2
    if activation == "Clip":
        attrs.update(min=-0.5, max=0.75)
    return attrs


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_conv_act_every_activation(activation: str) -> None:
    feeds = {"x": _random(1, 4, 7, 7)}
    consts = {"w": _random(6, 2, 3, 3) * 0.3, "b": _random(6)}
    attrs = {"group": 2, "strides": [2, 1], "pads": [1, 0, 1, 2], "dilations": [1, 1]}
    attrs.update(kernel_shape=[3, 3], **_epilogue_attrs(activation))
    decomposed = _check(_single("ConvAct", ["x", "w", "b"], feeds, consts, attrs), feeds)
    nodes = {n.name: n for n in decomposed.graph}
    assert nodes["fused/conv"].op_type == "Conv"
    assert nodes["fused/conv"].metadata_props["gie.provenance"] == '["origin"]'


@pytest.mark.parametrize("before", [0, 1])
def test_conv_act_residual_orders(before: int) -> None:
    feeds = {"x": _random(2, 3, 5, 5), "r": _random(2, 4, 5, 5)}
    attrs = {"kernel_shape": [1, 1], "pads": [0, 0, 0, 0], "activation": "Relu"}
    attrs["residual_before_activation"] = before
    consts = {"w": _random(4, 3, 1, 1)}
    _check(_single("ConvAct", ["x", "w", "", "r"], feeds, consts, attrs), feeds)


@pytest.mark.parametrize("activation", ["", "GELU", "SiLU"])
def test_gemm_act_gemm_kind(activation: str) -> None:
    feeds = {"a": _random(3, 8), "r": _random(3, 5)}
    consts = {"b": _random(5, 8), "c": _random(5)}
    attrs = {"transB": 1, "alpha": 0.5, "beta": 2.0, **_epilogue_attrs(activation)}
    _check(_single("GemmAct", ["a", "b", "c", "r"], feeds, consts, attrs), feeds)


def test_gemm_act_matmul_kind_batched() -> None:
    feeds = {"a": _random(2, 3, 8)}
    consts = {"b": _random(8, 5), "c": _random(5)}
    attrs = {"kind": "MatMul", "activation": "GELU_tanh"}
    decomposed = _check(_single("GemmAct", ["a", "b", "c"], feeds, consts, attrs), feeds)
    assert {"fused/matmul", "fused/bias"} <= {n.name for n in decomposed.graph}


# --------------------------------------------------------------------------- Pointwise


@pytest.mark.parametrize(
    "expression",
    [
        "(add (mul x0 x1) (sub x0 0.5))",
        "(div (pow (abs x0) 1.5) (add (exp (neg x1)) 1.0))",
        "(max x0 x1 0.1)",
        "(min (sqrt (abs x0)) (log (add (abs x1) 1.0)))",
        "(mul (erf x0) (tanh x1))",
        "(add (sigmoid x0) (relu x1))",
        "(mul (reciprocal (add (abs x0) 1.0)) (softplus x1))",
        "(hard_swish (add x0 x1))",
        "(leaky_relu x0 0.3)",
        "(leaky_relu x0 x1)",
        "(clip x0 -0.5 x1)",
        "(hard_sigmoid x0 0.2 0.5)",
        "(hard_sigmoid x0 x1 0.5)",
        "x0",
        "(mul x1 2.0)",
    ],
)
def test_pointwise_expressions(expression: str) -> None:
    feeds = {"x0": _random(2, 3, 4), "x1": _random(3, 1) + 1.0}
    proto = _single("Pointwise", ["x0", "x1"], feeds, {}, {"expression": expression})
    _check(proto, feeds)


def test_pointwise_float16_computes_in_float32_and_casts_output() -> None:
    feeds = {"x0": _random(4, 5).astype(np.float16), "x1": _random(5).astype(np.float16)}
    attrs = {"expression": "(mul (exp x0) x1)", "output_dtype": TensorProto.FLOAT}
    decomposed = _check(_single("Pointwise", ["x0", "x1"], feeds, {}, attrs), feeds)
    casts = [n for n in decomposed.graph if n.op_type == "Cast"]
    assert len(casts) == 2  # the two inputs widened, the float32 result needs no cast


# --------------------------------------------------------------------------- transformer ops


def test_layer_norm_with_residual_and_stream_output() -> None:
    feeds = {"x": _random(2, 4, 8), "r": _random(2, 4, 8)}
    consts = {"scale": _random(8), "bias": _random(8)}
    attrs = {"epsilon": 1e-6}
    proto = _single("LayerNorm", ["x", "scale", "bias", "r"], feeds, consts, attrs, outputs=2)
    _check(proto, feeds)


def test_layer_norm_without_bias_or_residual() -> None:
    feeds = {"x": _random(3, 6)}
    proto = _single("LayerNorm", ["x", "scale"], feeds, {"scale": _random(6)}, {}, outputs=2)
    _check(proto, feeds)


@pytest.mark.parametrize(("axis", "opset"), [(-1, 13), (1, 13), (-2, 18)])
def test_rms_norm(axis: int, opset: int) -> None:
    feeds = {"x": _random(2, 3, 4)}
    scale = _random(*([3, 4] if axis in (1, -2) else [4]))
    attrs = {"axis": axis, "epsilon": 1e-5}
    proto = _single("RMSNorm", ["x", "s"], feeds, {"s": scale}, attrs, opset=opset)
    decomposed = _check(proto, feeds)
    assert decomposed.opset_imports[""] == max(opset, 17)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate: str) -> None:
    feeds = {"x": _random(3, 7) * 3}
    _check(_single("Gelu", ["x"], feeds, {}, {"approximate": approximate}), feeds)


def test_gelu_float16() -> None:
    feeds = {"x": (_random(3, 7) * 3).astype(np.float16)}
    proto = _single("Gelu", ["x"], feeds, {}, {}, out_type=TensorProto.FLOAT16)
    _check(proto, feeds, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("causal", "mask", "seq_q"), [(0, False, 5), (0, True, 5), (1, False, 3), (1, True, 5)]
)
def test_attention(causal: int, mask: bool, seq_q: int) -> None:
    feeds = {"q": _random(2, seq_q, 8), "k": _random(2, 5, 8), "v": _random(2, 5, 12)}
    inputs = ["q", "k", "v"]
    if mask:
        feeds["m"] = np.where(RNG.random((2, 1, 1, 5)) < 0.2, -1e4, 0).astype(np.float32)
        inputs.append("m")
    attrs: dict[str, Any] = {"num_heads": 2, "causal": causal}
    _check(_single("Attention", inputs, feeds, {}, attrs), feeds)


# --------------------------------------------------------------------------- refusals, copies


def test_int8_op_and_unknown_scale_are_refused() -> None:
    feeds = {"x": _random(1, 2, 3, 3)}
    proto = _single("QConv", ["x"], feeds, {}, {})
    with pytest.raises(DecomposeError, match="'fused'.*export_qdq"):
        decompose_gie_ops(load(proto))
    node = helper.make_node("Attention", ["q", "q", "q"], ["out0"], "att", domain=GIE_DOMAIN)
    node.attribute.append(helper.make_attribute("num_heads", 2))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", "s", "h"])],
        [helper.make_tensor_value_info("out0", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(DecomposeError, match="'att'.*hidden size"):
        decompose_gie_ops(load(model))


def test_input_model_is_untouched() -> None:
    feeds = {"x": _random(3, 7)}
    model = load(_single("Gelu", ["x"], feeds, {}, {}))
    before = to_proto(model).SerializeToString()
    decompose_gie_ops(model)
    assert to_proto(model).SerializeToString() == before


# --------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize("level", ["O2", "O3"])
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_models_decompose_and_run_in_onnxruntime(name: str, level: str) -> None:
    proto = zoo.build(name)
    feeds = zoo.make_inputs(proto)
    optimized = optimize(load(proto), level, estimate_costs=False).model
    fused = [n for n in optimized.graph if n.domain == GIE_DOMAIN]
    assert fused, f"{name} at {level} has no gie op to decompose"
    expected = ReferenceInterpreter(optimized).run(feeds).outputs
    decomposed = decompose_gie_ops(optimized)
    assert not [n for n in decomposed.graph if n.domain == GIE_DOMAIN]
    actual = _ort(decomposed, feeds)
    for (output, want), got in zip(expected.items(), actual):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=output)
