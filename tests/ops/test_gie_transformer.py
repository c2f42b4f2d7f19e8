"""gie::LayerNorm, gie::RMSNorm, gie::Gelu and gie::Attention against float64 formulas.

Each kernel runs as a one-node model on the reference interpreter (so the registry, the shape
rule and the kernel are exercised together) and is compared with an independent float64
computation: the ONNX ops it replaces on onnxruntime where one exists, NumPy otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from scipy.special import erf

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load
from engine.ops.registry import (
    GIE_DOMAIN,
    Attrs,
    KernelContext,
    KernelError,
    TensorSpec,
    default_registry,
)

RNG = np.random.default_rng(5)
FLOAT = onnx.TensorProto.FLOAT
F32 = ir.DataType.FLOAT


def _model(
    op: str,
    inputs: list[str],
    feeds: dict[str, np.ndarray],
    consts: dict[str, np.ndarray],
    outputs: int = 1,
    domain: str = GIE_DOMAIN,
    **attrs: Any,
) -> onnx.ModelProto:
    names = [f"out{i}" for i in range(outputs)]
    node = helper.make_node(op, inputs, names, domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, FLOAT, a.shape) for n, a in feeds.items()],
        [onnx.ValueInfoProto(name=n) for n in names],
        [numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(GIE_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(ReferenceInterpreter(load(proto)).run(feeds).outputs.values())


def _ort(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _normal(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def test_every_transformer_op_is_registered_in_the_gie_domain() -> None:
    registry = default_registry()
    for op in ("LayerNorm", "RMSNorm", "Gelu", "Attention"):
        spec = registry.lookup(op, GIE_DOMAIN)
        assert spec is not None and spec.family == "gie_transformer"


@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_equals_onnx_layer_normalization(with_bias: bool) -> None:
    x, scale, bias = _normal(2, 5, 16), _normal(16), _normal(16)
    consts = {"scale": scale, "bias": bias} if with_bias else {"scale": scale}
    inputs = ["x", *consts]
    fused = _model("LayerNorm", inputs, {"x": x}, consts, axis=-1, epsilon=1e-5)
    plain = _model("LayerNormalization", inputs, {"x": x}, consts, domain="", epsilon=1e-5)
    np.testing.assert_allclose(_run(fused, {"x": x})[0], _ort(plain, {"x": x})[0], 1e-5, 1e-5)


def test_layer_norm_with_residual_normalizes_the_sum_and_returns_it() -> None:
    x, residual, scale, bias = _normal(2, 4, 3, 8), _normal(2, 4, 3, 8), _normal(3, 8), _normal(8)
    consts = {"scale": scale, "bias": bias, "residual": residual}
    proto = _model(
        "LayerNorm", ["x", "scale", "bias", "residual"], {"x": x}, consts, 2, axis=-2, epsilon=1e-3
    )
    y, total = _run(proto, {"x": x})
    s = x.astype(np.float64) + residual
    mean = s.mean(axis=(2, 3), keepdims=True)
    var = s.var(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(y, (s - mean) / np.sqrt(var + 1e-3) * scale + bias, 1e-4, 1e-5)
    np.testing.assert_allclose(total, s, 1e-6)
    assert y.dtype == np.float32 and total.dtype == np.float32


def test_rms_norm_matches_its_formula() -> None:
    x, scale = _normal(3, 7, 32), _normal(32)
    proto = _model("RMSNorm", ["x", "scale"], {"x": x}, {"scale": scale}, epsilon=1e-6)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(_run(proto, {"x": x})[0], want, 1e-5, 1e-6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_onnx_gelu(approximate: str) -> None:
    x = _normal(4, 33) * 3
    fused = _model("Gelu", ["x"], {"x": x}, {}, approximate=approximate)
    x64 = x.astype(np.float64)
    if approximate == "none":
        want = 0.5 * x64 * (1 + erf(x64 / math.sqrt(2)))
    else:
        want = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    np.testing.assert_allclose(_run(fused, {"x": x})[0], want, 1e-5, 1e-6)
    plain = _model("Gelu", ["x"], {"x": x}, {}, domain="", approximate=approximate)
    plain.opset_import[0].version = 20
    np.testing.assert_allclose(_run(fused, {"x": x})[0], _ort(plain, {"x": x})[0], 1e-5, 1e-6)


def test_gelu_refuses_an_unknown_approximation() -> None:
    spec = default_registry().lookup("Gelu", GIE_DOMAIN)
    with pytest.raises(KernelError, match="approximate"):
        spec.kernel([_normal(3)], Attrs({"approximate": "sigmoid"}), KernelContext(opset=17))


def _attention64(q, k, v, heads, scale, mask=None, causal=False) -> np.ndarray:
    """Per-head loop in float64: softmax(scale * q k^T + mask) v, heads merged back."""
    batch, seq_q, hidden = q.shape
    seq_k, d, dv = k.shape[1], hidden // heads, v.shape[2] // heads
    out = np.zeros((batch, seq_q, heads * dv))
    for b in range(batch):
        for h in range(heads):
            qh = q[b, :, h * d : (h + 1) * d].astype(np.float64)
            kh = k[b, :, h * d : (h + 1) * d].astype(np.float64)
            scores = scale * qh @ kh.T
            if mask is not None:
                scores = scores + np.broadcast_to(mask, (batch, heads, seq_q, seq_k))[b, h]
            if causal:
                allowed = np.tril(np.ones((seq_q, seq_k), bool), seq_k - seq_q)
                scores = np.where(allowed, scores, -np.inf)
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            out[b, :, h * dv : (h + 1) * dv] = p @ v[b, :, h * dv : (h + 1) * dv]
    return out


@pytest.mark.parametrize(
    ("seq_q", "seq_k", "masked", "causal", "scale"),
    [(6, 6, False, 0, None), (6, 6, True, 0, 0.3), (5, 5, False, 1, None), (3, 7, True, 1, 0.5)],
)
def test_attention_matches_a_per_head_loop(
    seq_q: int, seq_k: int, masked: bool, causal: int, scale: float | None
) -> None:
    heads, hidden, hidden_v = 4, 32, 16
    q, k, v = _normal(2, seq_q, hidden), _normal(2, seq_k, hidden), _normal(2, seq_k, hidden_v)
    mask = np.where(RNG.random((2, 1, 1, seq_k)) < 0.3, -1e9, 0.0).astype(np.float32)
    consts = {"k": k, "v": v, **({"mask": mask} if masked else {})}
    attrs: dict[str, Any] = {"num_heads": heads, "causal": causal}
    if scale is not None:
        attrs["scale"] = scale
    proto = _model("Attention", ["q", *consts], {"q": q}, consts, **attrs)
    got = _run(proto, {"q": q})[0]
    effective = scale if scale is not None else 1 / math.sqrt(hidden // heads)
    want = _attention64(q, k, v, heads, effective, mask if masked else None, bool(causal))
    assert got.shape == (2, seq_q, hidden_v)
    np.testing.assert_allclose(got, want, 1e-4, 1e-5)


def test_shape_rules_keep_symbolic_dims_and_costs_count_the_work() -> None:
    registry = default_registry()
    ctx = KernelContext(opset=17, output_count=2)
    x = TensorSpec(("batch", "seq", 64), F32)
    vector = TensorSpec((64,), F32)
    norm = registry.lookup("LayerNorm", GIE_DOMAIN)
    specs = norm.shape_rule([x, vector, vector, x], Attrs({}), ctx)
    assert [s.shape for s in specs] == [("batch", "seq", 64)] * 2
    attention = registry.lookup("Attention", GIE_DOMAIN)
    q = TensorSpec(("batch", "seq", 64), F32)
    v = TensorSpec(("batch", "kv", 32), F32)
    out = attention.shape_rule([q, q, v], Attrs({"num_heads": 4}), KernelContext(opset=17))
    assert out[0].shape == ("batch", "seq", 32)
    static_q, static_v = TensorSpec((1, 8, 64), F32), TensorSpec((1, 8, 32), F32)
    static_out = TensorSpec((1, 8, 32), F32)
    cost = attention.cost([static_q, static_q, static_v], [static_out], Attrs({"num_heads": 4}))
    # QK^T: 2*8*8*64, PV: 2*8*8*32, softmax: 5 per score (4 heads * 8 * 8)
    assert cost.flops == 2 * 8 * 8 * 64 + 2 * 8 * 8 * 32 + 5 * 4 * 8 * 8
    assert cost.bytes_written == 8 * 32 * 4
    gelu = registry.lookup("Gelu", GIE_DOMAIN)
    assert gelu.cost([static_out], [static_out], Attrs({})).flops == 8 * 8 * 32
