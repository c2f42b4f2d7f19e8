"""Conv, pooling, normalization, linalg and resize kernels agree with onnxruntime.

Each case builds a one-node model with onnx.helper, runs it on the reference interpreter (with a
registry of just these op families, so the test does not depend on the rest) and on
onnxruntime's CPU provider, and compares outputs; shape rules are checked against the results.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from engine.backends.numpy_ref.interpreter import NodeExecutionError, ReferenceInterpreter
from engine.onnx_io import load
from engine.ops import conv, linalg, normalization, pool, resize
from engine.ops.registry import KernelContext, OpRegistry, TensorSpec, dtype_of_array

REGISTRY = OpRegistry(conv.OPS + pool.OPS + normalization.OPS + linalg.OPS + resize.OPS)
RNG = np.random.default_rng(1234)


def _model(
    op: str,
    inputs: dict[str, np.ndarray],
    n_outputs: int = 1,
    opset: int = 17,
    constants: dict[str, np.ndarray] | None = None,
    **attrs: Any,
) -> onnx.ModelProto:
    constants = constants or {}
    names = list(inputs) + list(constants)
    outputs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op, names, outputs, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for name, a in inputs.items()
        ],
        [onnx.ValueInfoProto(name=o) for o in outputs],
        [onnx.numpy_helper.from_array(a, name) for name, a in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _compare(model: onnx.ModelProto, inputs: dict[str, np.ndarray], rtol: float = 1e-4) -> None:
    ours = ReferenceInterpreter(load(model), REGISTRY).run(inputs).outputs
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = session.run(None, inputs)
    for name, expected in zip([o.name for o in model.graph.output], theirs, strict=True):
        got = ours[name]
        assert got.shape == expected.shape, name
        assert got.dtype == expected.dtype, name
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol, err_msg=name)


def _rand(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


CONV_CASES = [
    ((2, 4, 9, 9), (6, 4, 3, 3), {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ((1, 6, 8, 8), (6, 2, 3, 3), {"group": 3, "dilations": [2, 2], "pads": [2, 1, 1, 2]}),
    ((1, 6, 8, 8), (6, 2, 3, 3), {"group": 3, "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((1, 8, 7, 7), (8, 1, 3, 3), {"group": 8, "auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ((2, 3, 11), (5, 3, 4), {"auto_pad": "VALID", "strides": [3]}),
    ((1, 2, 5, 6, 4), (3, 2, 2, 3, 2), {"pads": [1, 0, 1, 0, 1, 1]}),
    ((2, 16, 6, 6), (8, 16, 1, 1), {"strides": [2, 2]}),
    # 16+ input channels, stride 1: the shifted-GEMM path (no im2col)
    ((2, 16, 9, 9), (6, 16, 3, 3), {"pads": [1, 0, 2, 1]}),
    ((1, 20, 8, 8), (5, 20, 3, 2), {"dilations": [2, 2], "pads": [2, 1, 1, 2]}),
    ((1, 16, 5, 6, 4), (3, 16, 2, 3, 2), {"pads": [1, 0, 1, 0, 1, 1]}),
]


@pytest.mark.parametrize(("x_shape", "w_shape", "attrs"), CONV_CASES)
def test_conv_matches_onnxruntime(x_shape: tuple, w_shape: tuple, attrs: dict) -> None:
    inputs = {"x": _rand(*x_shape), "w": _rand(*w_shape), "b": _rand(w_shape[0])}
    _compare(_model("Conv", inputs, **attrs), inputs)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "attrs"),
    [
        ((1, 4, 5, 5), (4, 3, 3, 3), {"strides": [2, 2], "output_padding": [1, 0]}),
        ((2, 4, 4, 3), (4, 1, 2, 2), {"group": 2, "pads": [1, 0, 0, 1], "dilations": [2, 1]}),
        ((1, 2, 6), (2, 3, 3), {"strides": [2], "output_shape": [14]}),
    ],
)
def test_conv_transpose_matches_onnxruntime(x_shape: tuple, w_shape: tuple, attrs: dict) -> None:
    inputs = {"x": _rand(*x_shape), "w": _rand(*w_shape)}
    _compare(_model("ConvTranspose", inputs, **attrs), inputs)


def test_float16_conv_keeps_dtype_and_accuracy() -> None:
    inputs = {"x": _rand(1, 8, 10, 10, dtype=np.float16), "w": _rand(4, 8, 3, 3, dtype=np.float16)}
    _compare(_model("Conv", inputs, pads=[1, 1, 1, 1]), inputs, rtol=2e-2)


@pytest.mark.parametrize(
    ("op", "attrs", "n_outputs"),
    [
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, 2),
        ("MaxPool", {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 0, 0]}, 1),
        ("MaxPool", {"kernel_shape": [2, 3], "storage_order": 1}, 2),
        ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, 1),
        ("AveragePool", {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, 1),
        ("LpPool", {"kernel_shape": [2, 2], "p": 3}, 1),
        ("GlobalAveragePool", {}, 1),
        ("GlobalMaxPool", {}, 1),
    ],
)
def test_pools_match_onnxruntime(op: str, attrs: dict, n_outputs: int) -> None:
    inputs = {"x": _rand(2, 3, 9, 8)}
    _compare(_model(op, inputs, n_outputs=n_outputs, opset=18, **attrs), inputs)


@pytest.mark.parametrize(
    ("op", "inputs", "attrs", "opset"),
    [
        ("BatchNormalization", [(2, 3, 4, 5), (3,), (3,), (3,), "var3"], {"epsilon": 1e-3}, 15),
        ("InstanceNormalization", [(2, 3, 4, 5), (3,), (3,)], {}, 17),
        ("LayerNormalization", [(2, 3, 8), (8,), (8,)], {"axis": -1}, 17),
        ("LayerNormalization", [(2, 3, 4), (3, 4)], {"axis": 1, "epsilon": 1e-3}, 17),
        ("LRN", [(2, 6, 4, 4)], {"size": 3, "alpha": 1e-3}, 17),
        ("MeanVarianceNormalization", [(2, 3, 4, 4)], {}, 17),
        ("Gemm", [(4, 3), (5, 4), (5,)], {"transA": 1, "transB": 1, "alpha": 0.5}, 17),
        ("MatMul", [(2, 1, 3, 4), (3, 4, 5)], {}, 17),
        ("MatMul", [(4,), (2, 4, 3)], {}, 17),
        ("Einsum", [(2, 3, 4), (2, 4, 5)], {"equation": "bij,bjk->bik"}, 17),
    ],
)
def test_normalization_and_linalg_match_onnxruntime(
    op: str, inputs: list, attrs: dict, opset: int
) -> None:
    feeds = {}
    for i, shape in enumerate(inputs):
        feeds[f"i{i}"] = np.abs(_rand(3)) + 0.5 if shape == "var3" else _rand(*shape)
    _compare(_model(op, feeds, opset=opset, **attrs), feeds)


@pytest.mark.parametrize(
    ("attrs", "scales", "sizes"),
    [
        ({"mode": "linear"}, [1, 1, 1.7, 0.6], None),
        ({"mode": "cubic", "coordinate_transformation_mode": "align_corners"}, [1, 1, 2, 2], None),
        ({"mode": "nearest", "nearest_mode": "floor"}, None, [1, 2, 7, 3]),
        (
            {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
            None,
            [1, 2, 3, 9],
        ),
        ({"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5}, [1, 1, 0.5, 1.5], None),
    ],
)
def test_resize_matches_onnxruntime(attrs: dict, scales: list | None, sizes: list | None) -> None:
    feeds = {"x": _rand(1, 2, 5, 6)}
    constants = {"roi": np.array([], dtype=np.float32)}
    constants["scales"] = np.array(scales or [], dtype=np.float32)
    if sizes is not None:
        constants["sizes"] = np.array(sizes, dtype=np.int64)
    _compare(_model("Resize", feeds, opset=19, constants=constants, **attrs), feeds)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_grid_sample_matches_onnxruntime(mode: str, padding_mode: str) -> None:
    feeds = {
        "x": _rand(2, 3, 5, 4),
        "grid": RNG.uniform(-1.3, 1.3, (2, 6, 7, 2)).astype(np.float32),
    }
    model = _model("GridSample", feeds, opset=16, mode=mode, padding_mode=padding_mode)
    _compare(model, feeds, rtol=1e-3)


def test_shape_rules_follow_attributes_and_keep_symbolic_dims() -> None:
    ctx = KernelContext(opset=17)
    x = TensorSpec(("N", 3, 224, 224), dtype_of_array(np.zeros(1, np.float32)))
    w = TensorSpec((64, 3, 7, 7), x.dtype)
    conv_spec = REGISTRY.lookup("Conv")
    assert conv_spec is not None
    attrs = conv.Attrs({"strides": [2, 2], "pads": [3, 3, 3, 3]})
    (out,) = conv_spec.shape_rule([x, w], attrs, ctx)
    assert out.shape == ("N", 64, 112, 112)
    cost = conv_spec.cost(
        [TensorSpec((1, 3, 224, 224), x.dtype), w], [TensorSpec((1, 64, 112, 112), x.dtype)], attrs
    )
    assert cost.flops == 2 * 64 * 112 * 112 * 3 * 49
    matmul = REGISTRY.lookup("MatMul")
    assert matmul is not None
    (mm,) = matmul.shape_rule(
        [TensorSpec(("B", 1, 5, 4), x.dtype), TensorSpec((7, 4, 2), x.dtype)], attrs, ctx
    )
    assert mm.shape == ("B", 7, 5, 2)


def test_conv_with_mismatched_channels_fails_with_a_clear_error() -> None:
    feeds = {"x": _rand(1, 4, 6, 6), "w": _rand(2, 3, 3, 3)}
    interpreter = ReferenceInterpreter(load(_model("Conv", feeds), infer_shapes=False), REGISTRY)
    with pytest.raises(NodeExecutionError, match=r"Conv.*channels 4 / weight \(2, 3, 3, 3\)"):
        interpreter.run(feeds)
