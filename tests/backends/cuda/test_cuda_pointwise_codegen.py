"""Generated gie::Pointwise kernels: broadcasting layout, every operator, zoo nodes on the shim."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from engine import zoo
from engine.backends.cuda import nvrtc, pointwise_codegen, shim_runner
from engine.onnx_io import load
from engine.ops.gie_pointwise import OPERATORS, evaluate, parse_expression
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, default_registry
from engine.passes.pipelines import optimize

pytestmark = pytest.mark.xdist_group("cuda-shim")

RNG = np.random.default_rng(3)

# Every operator of the language at least once (x0 [2,3,4], x1 [3,1] broadcast, x2 [4]).
TERMS = [
    "(sub (mul x0 x1) (div x2 (add (abs x1) 1.5)))",
    "(pow (abs x0) 1.5)",
    "(max x0 x1 x2)",
    "(min x0 (neg x1))",
    "(sqrt (abs x2))",
    "(exp (mul x0 0.1))",
    "(log (add (abs x1) 0.5))",
    "(erf x0)",
    "(tanh x1)",
    "(sigmoid x2)",
    "(relu x0)",
    "(reciprocal (add (abs x2) 2.0))",
    "(softplus x1)",
    "(hard_swish x0)",
    "(leaky_relu x1 0.01)",
    "(clip x2 -0.5 0.5)",
    "(hard_sigmoid x0 0.2 0.5)",
]
EVERY_OPERATOR = TERMS[0]
for _term in TERMS[1:]:
    EVERY_OPERATOR = f"(add {EVERY_OPERATOR} {_term})"


def test_the_test_expression_uses_every_operator() -> None:
    words = set(EVERY_OPERATOR.replace("(", " ").replace(")", " ").split())
    assert set(OPERATORS) <= words


def test_broadcast_layout_has_dims_then_strides_with_zeros_on_broadcast_axes() -> None:
    layout = pointwise_codegen.broadcast_layout((2, 3, 4), [(2, 3, 4), (3, 1), (4,), ()], rank=3)
    assert layout.tolist() == [2, 3, 4, 12, 4, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0]
    assert pointwise_codegen.broadcast_layout((5,), [(5,)]).tolist()[:6] == [1, 1, 1, 1, 1, 5]
    with pytest.raises(pointwise_codegen.UnsupportedPointwiseError, match="does not broadcast"):
        pointwise_codegen.broadcast_layout((2, 3), [(4,)])


def test_unsupported_dtype_is_refused_with_a_reason() -> None:
    with pytest.raises(pointwise_codegen.UnsupportedPointwiseError, match="int32"):
        pointwise_codegen.generate("(add x0 x1)", [np.int32, np.int32])


def _run(kernel, inputs, out_shape, out_dtype, shim_cache, strided=True):
    lib = shim_runner.build(kernel.source, f"{kernel.name}.cu", shim_cache)
    out = np.zeros(out_shape, out_dtype)
    if strided:
        layout = pointwise_codegen.broadcast_layout(
            out_shape, [x.shape for x in inputs], kernel.rank
        )
        lib.launch(kernel.strided_entry, 2, 32, [*inputs, out, out.size, layout])
    else:
        lib.launch(kernel.contiguous_entry, 2, 32, [*inputs, out, out.size])
    return out


@pytest.mark.parametrize(("dtype", "tolerance"), [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_every_operator_compiles_and_matches_the_reference(
    nvrtc_cache, shim_cache, dtype, tolerance
) -> None:
    inputs = [RNG.standard_normal(s).astype(dtype) for s in ((2, 3, 4), (3, 1), (4,))]
    kernel = pointwise_codegen.generate(EVERY_OPERATOR, [x.dtype for x in inputs], rank=3)
    for arch in nvrtc.DEFAULT_ARCHS:
        result = nvrtc.compile_source(kernel.source, f"{kernel.name}.cu", arch, cache=nvrtc_cache)
        assert {kernel.contiguous_entry, kernel.strided_entry} <= set(result.resources)
    out = _run(kernel, inputs, (2, 3, 4), dtype, shim_cache)
    expected = evaluate(parse_expression(EVERY_OPERATOR), inputs)
    assert expected.dtype == dtype
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)


def test_fp16_in_fp32_math_rounds_once_and_contiguous_entry(shim_cache) -> None:
    inputs = [RNG.standard_normal((3, 5)).astype(np.float16) for _ in range(2)]
    expression = "(mul (add x0 x1) (sigmoid x1))"
    kernel = pointwise_codegen.generate(expression, [np.float16, np.float16])
    out = _run(kernel, inputs, (3, 5), np.float16, shim_cache, strided=False)
    expected = evaluate(parse_expression(expression), inputs).astype(np.float16)
    np.testing.assert_allclose(out.astype(np.float32), expected.astype(np.float32), atol=1e-3)


def _concrete(value: ir.Value, size: int = 3) -> tuple[int, ...] | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else size for d in value.shape)


def test_generated_kernels_of_a_zoo_model_match_gie_pointwise(shim_cache) -> None:
    """BERT (opset 13) at O2, every distinct kernel whose input shapes are known: the mask
    ``(mul (sub 1.0 x0) -3.4e38)``, the embeddings sum and the decomposed-LayerNorm tail."""
    model = optimize(load(zoo.build("bert_opset13")), "O2", estimate_costs=False).model
    spec = default_registry().lookup("Pointwise", GIE_DOMAIN)
    checked: dict[str, str] = {}
    for node in model.graph:
        if node.op_type != "Pointwise":
            continue
        shapes = [_concrete(v) for v in node.inputs]
        kernel = pointwise_codegen.kernel_for_node(node)
        if None in shapes or kernel.name in checked:
            continue
        inputs = [RNG.standard_normal(s).astype(np.float32) for s in shapes]
        if "sqrt" in kernel.expression:  # the variance input of a LayerNorm tail is >= 0
            inputs[1] = np.abs(inputs[1])
        attrs = Attrs({name: a.value for name, a in node.attributes.items()})
        expected = spec.kernel(inputs, attrs, KernelContext(opset=17))[0]
        out = _run(kernel, inputs, expected.shape, np.float32, shim_cache)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=node.name)
        checked[kernel.name] = kernel.expression
    assert len(checked) == 3, checked
    assert any("sqrt" in e for e in checked.values()), checked


def test_fp32_math_with_an_fp16_output_cast(shim_cache) -> None:
    """A fused trailing Cast: float32 inputs, output_dtype float16, rounded once on store."""
    inputs = [RNG.standard_normal((4, 6)).astype(np.float32), np.float32([[0.5]] * 4)]
    expression = "(tanh (mul x0 x1))"
    kernel = pointwise_codegen.generate(expression, [np.float32, np.float32], np.float16, rank=2)
    assert kernel.output_dtype == "float16"
    out = _run(kernel, inputs, (4, 6), np.float16, shim_cache)
    expected = evaluate(parse_expression(expression), inputs).astype(np.float16)
    np.testing.assert_array_equal(out, expected)
