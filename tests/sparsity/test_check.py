"""2:4 check: the reduction-matrix convention, the 2:4 predicates, and every ineligibility reason
on a hand-made model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from sparse_models import graph_model

from engine.onnx_io import load
from engine.ops.registry import GIE_DOMAIN
from engine.sparsity.check import (
    check_model,
    compliant_fraction,
    is_2_4,
    reduction_matrix,
    weight_from_matrix,
)

RNG = np.random.default_rng(3)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int, ...]],
    consts: dict[str, np.ndarray],
    outputs: list[str],
) -> onnx.ModelProto:
    return graph_model(nodes, inputs, consts, outputs)


def test_conv_matrix_is_input_channels_per_filter_and_kernel_offset() -> None:
    weight = RNG.standard_normal((3, 8, 2, 5)).astype(np.float32)
    matrix = reduction_matrix(weight, "Conv", {})
    assert matrix.shape == (3 * 2 * 5, 8)
    m, i, j = 2, 1, 3
    np.testing.assert_array_equal(matrix[(m * 2 + i) * 5 + j], weight[m, :, i, j])
    np.testing.assert_array_equal(weight_from_matrix(matrix, weight.shape, "ConvAct", {}), weight)


def test_gemm_and_matmul_matrices_hold_one_output_column_per_row() -> None:
    b = RNG.standard_normal((12, 5)).astype(np.float32)  # [K, N]
    np.testing.assert_array_equal(reduction_matrix(b, "Gemm", {}), b.T)
    np.testing.assert_array_equal(reduction_matrix(b.T, "Gemm", {"transB": 1}), b.T)
    np.testing.assert_array_equal(reduction_matrix(b, "MatMul", {}), b.T)
    np.testing.assert_array_equal(reduction_matrix(b, "GemmAct", {"kind": "MatMul"}), b.T)
    batched = RNG.standard_normal((2, 12, 5)).astype(np.float32)
    matrix = reduction_matrix(batched, "MatMul")
    assert matrix.shape == (10, 12)
    np.testing.assert_array_equal(matrix[5 + 3], batched[1, :, 3])
    for op, attrs, w in [("Gemm", {"transB": 1}, b.T), ("Gemm", {}, b), ("MatMul", {}, batched)]:
        back = weight_from_matrix(reduction_matrix(w, op, attrs), w.shape, op, attrs)
        np.testing.assert_array_equal(back, w)


def test_2_4_predicates_by_hand() -> None:
    good = np.array([[0, 1, 0, 2, 3, 0, 0, 0], [0, 0, 0, 0, 5, 0, 0, 6]], np.float32)
    assert is_2_4(good) and compliant_fraction(good) == 1.0
    bad = good.copy()
    bad[1, 1:3] = 7  # group (1, 0) now holds 2 non-zeros: still fine
    assert is_2_4(bad)
    bad[1, 0] = 1  # three non-zeros in that group
    assert not is_2_4(bad)
    assert compliant_fraction(bad) == 0.75
    assert not is_2_4(np.zeros((2, 6)))  # K not a multiple of 4
    assert compliant_fraction(np.ones((1, 6))) == 0.0  # the only complete group is dense


def test_check_model_gives_every_reason() -> None:
    sparse = np.zeros((8, 256, 1, 1), np.float32)
    sparse[:, ::2] = 1.0  # 2:4 along input channels
    consts = {
        "w_big": sparse,
        "w30": RNG.standard_normal((4, 30, 3, 3)).astype(np.float32),
        "w_dw": RNG.standard_normal((16, 1, 3, 3)).astype(np.float32),
        "b_small": RNG.standard_normal((64, 10)).astype(np.float32),
        "w_act": RNG.standard_normal((8, 256, 1, 1)).astype(np.float32),
        "b_mm": RNG.standard_normal((512, 4)).astype(np.float32),
        "b_vec": RNG.standard_normal(512).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x256", "w_big"], ["y_big"], name="big"),
        helper.make_node("Conv", ["x256", "w_dyn"], ["y_dyn"], name="dynamic"),
        helper.make_node("Conv", ["x30", "w30"], ["y30"], name="k30"),
        helper.make_node("Conv", ["x16", "w_dw"], ["y_dw"], name="depthwise", group=16),
        helper.make_node("Gemm", ["a64", "b_small"], ["y_small"], name="small"),
        helper.make_node(
            "ConvAct",
            ["x256", "w_act"],
            ["y_act"],
            name="fused",
            domain=GIE_DOMAIN,
            activation="Relu",
        ),
        helper.make_node(
            "GemmAct",
            ["a512", "b_mm"],
            ["y_mm"],
            name="fused_mm",
            domain=GIE_DOMAIN,
            kind="MatMul",
        ),
        helper.make_node("MatMul", ["a512", "b_vec"], ["y_vec"], name="vector"),
        helper.make_node("Relu", ["y_mm"], ["y_relu"], name="not_a_layer"),
    ]
    inputs = {
        "x256": (1, 256, 2, 2),
        "w_dyn": (8, 256, 1, 1),
        "x30": (1, 30, 4, 4),
        "x16": (1, 16, 4, 4),
        "a64": (2, 64),
        "a512": (2, 512),
    }
    outputs = ["y_big", "y_dyn", "y30", "y_dw", "y_small", "y_act", "y_vec", "y_relu"]
    model = load(_model(nodes, inputs, consts, outputs))
    reports = {report.name: report for report in check_model(model)}
    names = ["big", "dynamic", "k30", "depthwise", "small", "fused", "fused_mm", "vector"]
    assert list(reports) == names
    big = reports["big"]
    assert (big.eligible, big.reason, big.is_2_4, big.compliant_fraction) == (True, "", True, 1.0)
    assert (big.k, big.rows, big.op) == (256, 8, "Conv")
    assert reports["dynamic"].reason == "weight is not a constant"
    assert not reports["dynamic"].eligible and not reports["dynamic"].is_2_4
    assert reports["k30"].reason == "K = 30 is not a multiple of 4"
    assert reports["k30"].rows == 4 * 9
    assert reports["depthwise"].reason == "depthwise convolution (one input channel per group)"
    assert reports["small"].reason == (
        "too small to benefit: 64 < 256 input channels (NVIDIA's guidance)"
    )
    fused = reports["fused"]
    assert fused.eligible and not fused.is_2_4 and fused.compliant_fraction < 0.01
    assert reports["fused_mm"].eligible and reports["fused_mm"].k == 512
    assert reports["fused_mm"].rows == 4
    assert reports["vector"].reason.startswith("weight has no [rows, K] view")
    relaxed = {report.name: report for report in check_model(model, min_channels=64)}
    assert relaxed["small"].eligible and relaxed["small"].reason == ""


@pytest.mark.parametrize("op", ["Relu", "Conv1"])
def test_reduction_matrix_refuses_other_ops(op: str) -> None:
    with pytest.raises(ValueError, match="no weight operand"):
        reduction_matrix(np.zeros((4, 4)), op)
