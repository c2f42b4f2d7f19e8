"""Accuracy tools: per-layer comparison, first divergence, output metrics, budgets, mixed precision.

Expected values are computed in the tests from NumPy formulas (SQNR, cosine, max |diff|) or
from independent runs (the reference interpreter on the original model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.backends.numpy_ref import ReferenceInterpreter
from engine.build.plan import Layer
from engine.builder import build
from engine.config import BuilderConfig, Precision
from engine.onnx_io import load
from engine.quantize.accuracy import (
    compare_engines,
    first_divergent,
    output_errors,
    top1_agreement,
)
from engine.quantize.mixed_precision import (
    AccuracyBudget,
    BudgetError,
    auto_mixed_precision,
    sensitivity,
)
from engine.runtime import Engine

FP32, FP16, INT8 = Precision.FP32, Precision.FP16, Precision.INT8
BASE = BuilderConfig(tactic_sources=frozenset({"reference"}))
PADS = [1, 1, 1, 1]


def _conv_net() -> onnx.ModelProto:
    """conv1 -> relu1 -> conv2 -> relu2 -> conv3 (a 3-conv model, 3 int8-capable layers)."""
    rng = np.random.default_rng(0)
    shapes = {"w1": (8, 3, 3, 3), "w2": (8, 8, 3, 3), "w3": (4, 8, 3, 3)}
    inits = []
    for name, shape in shapes.items():
        w = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        b = (rng.standard_normal(shape[0]) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, name), numpy_helper.from_array(b, "b" + name[1])]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=PADS),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=PADS),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3", pads=PADS),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(n: int, seed: int, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((1, 3, 8, 8)) * scale).astype(np.float32)} for _ in range(n)]


def _build(data: Any = None, **changes: Any) -> Engine:
    return build(load(_conv_net()), BASE.with_changes(**changes), calibration_data=data)


def _stats(ref: np.ndarray, x: np.ndarray) -> tuple[float, float, float]:
    """(SQNR dB, cosine, max |ref - x|) by their textbook formulas, in float64."""
    r, v = np.asarray(ref, np.float64).ravel(), np.asarray(x, np.float64).ravel()
    err = np.sum((r - v) ** 2)
    sqnr = math.inf if err == 0 else 10 * math.log10(np.sum(r**2) / err)
    cosine = float(r @ v / (np.linalg.norm(r) * np.linalg.norm(v)))
    return sqnr, cosine, float(np.max(np.abs(r - v)))


def _compute_layers(engine: Engine) -> list[Layer]:
    return [layer for layer in engine.plan.layers if layer.role == "compute"]


def _with_origin(engine: Engine, origin: str) -> Layer:
    (layer,) = [layer for layer in engine.plan.layers if origin in layer.origins]
    return layer


def _reference_values(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every value of the original model on the reference interpreter."""
    model = load(_conv_net())
    values: dict[str, np.ndarray] = {}

    def tap(node: Any, outputs: list[Any]) -> None:
        for value, array in zip(node.outputs, outputs):
            values[value.name] = np.array(array)

    values.update(ReferenceInterpreter(model).run(feeds, tap=tap).outputs)
    return values


# ---------------------------------------------------------------------------- compare_engines


def test_an_engine_compared_with_itself_has_no_error_on_any_layer() -> None:
    engine = _build(_data(3, 1), precisions=frozenset({FP32, INT8}))
    layers, outputs = compare_engines(engine, engine, _data(2, 2))
    assert [row.layer for row in layers] == [layer.name for layer in _compute_layers(engine)]
    for row in layers:
        assert row.cosine == 1.0 and row.sqnr_db == math.inf and row.max_abs == 0.0, row
    assert set(outputs) == {"y"}
    assert outputs["y"].cosine == 1.0 and outputs["y"].max_abs == 0.0
    assert outputs["y"].elements == 2 * 4 * 8 * 8


def test_int8_vs_fp32_rows_follow_execution_order_with_dequantized_int8_outputs() -> None:
    fp32 = _build()
    int8 = _build(_data(4, 1), precisions=frozenset({FP32, INT8}))
    batch = _data(1, 5)
    layers, outputs = compare_engines(fp32, int8, batch)
    compute = _compute_layers(int8)
    assert len(compute) == 3 and all(layer.precision == INT8 for layer in compute)
    assert [row.layer for row in layers] == [layer.name for layer in compute]
    assert [row.index for row in layers] == sorted(row.index for row in layers)
    assert all(row.precision == "int8" and row.op == "gie::QConv" for row in layers)
    assert all(row.cosine > 0.99 for row in layers), layers
    # Recompute every row: the reference interpreter's value vs the int8 engine's output,
    # dequantized with the layer's output scale when the layer writes int8.
    reference = _reference_values(batch[0])
    seen: dict[str, np.ndarray] = {}

    def record(layer: Layer, inputs: list[Any], outs: list[Any]) -> None:
        if layer.role != "compute":
            return
        out = np.array(outs[0])
        if out.dtype == np.int8:
            out = out.astype(np.float64) * float(inputs[6])
        seen[layer.name] = out

    int8.run_observed(batch[0], record)
    for row in layers:
        assert row.tensor in reference, row.tensor
        sqnr, cosine, max_abs = _stats(reference[row.tensor], seen[row.layer])
        assert row.cosine == pytest.approx(cosine, abs=1e-9)
        assert row.sqnr_db == pytest.approx(sqnr, rel=1e-6)
        assert row.max_abs == pytest.approx(max_abs, rel=1e-5, abs=1e-6)
    first = _with_origin(int8, "conv1")
    assert first.outputs[0] == "r1" and int8.plan.specs["r1"].dtype.name == "INT8"
    # Raw int8 codes (up to 127) against values of a few units would differ by far more.
    assert layers[0].max_abs < 0.1 * np.abs(reference["r1"]).max()
    assert layers[0].sqnr_db > 20
    sqnr, cosine, max_abs = _stats(reference["y"], int8.run(batch[0])["y"])
    assert outputs["y"].cosine == pytest.approx(cosine, abs=1e-9)
    assert outputs["y"].max_abs == pytest.approx(max_abs, rel=1e-6)


def test_first_divergent_names_the_first_clipped_layer() -> None:
    # Calibrated on data 100x too small: every activation scale clips on normal data.
    # conv1 stays fp32 (identical to the reference), so conv2 is the first clipped layer.
    tiny = _build(
        _data(3, 1, scale=0.01),
        layer_precisions=(("conv2*", INT8), ("conv3*", INT8), ("relu2", INT8)),
    )
    conv1, conv2 = _with_origin(tiny, "conv1"), _with_origin(tiny, "conv2")
    assert conv1.precision == FP32 and conv2.precision == INT8
    layers, _ = compare_engines(_build(), tiny, _data(2, 5))
    rows = {row.layer: row for row in layers}
    assert rows[conv1.name].cosine == 1.0
    assert rows[conv2.name].cosine < 0.99
    found = first_divergent(layers, min_cosine=0.99)
    assert found is not None and found.layer == conv2.name
    assert first_divergent(layers, min_cosine=0.0) is None
    by_sqnr = first_divergent(layers, min_cosine=0.0, min_sqnr_db=rows[conv2.name].sqnr_db + 1)
    assert by_sqnr is not None and by_sqnr.layer == conv2.name


def test_first_divergent_is_the_first_layer_when_every_layer_clips() -> None:
    tiny = _build(_data(3, 1, scale=0.01), precisions=frozenset({FP32, INT8}))
    layers, _ = compare_engines(_build(), tiny, _data(2, 5))
    found = first_divergent(layers, min_cosine=0.99)
    assert found is not None and found.layer == _with_origin(tiny, "conv1").name
    assert found.index == min(row.index for row in layers)


def test_fp16_layers_are_compared_under_their_model_names() -> None:
    fp16 = _build(precisions=frozenset({FP32, FP16}))
    layers, outputs = compare_engines(_build(), fp16, _data(1, 5))
    assert [row.layer for row in layers] == [layer.name for layer in _compute_layers(fp16)]
    assert [row.tensor for row in layers] == ["r1", "r2", "y"]  # "y::fp16" compared as "y"
    assert all(row.precision == "fp16" and 0.9999 < row.cosine < 1.0 for row in layers)
    assert 0.9999 < outputs["y"].cosine < 1.0


# ---------------------------------------------------------------------------- output metrics


def test_output_errors_on_hand_made_arrays() -> None:
    reference = {
        "same": np.array([3.0, 4.0], np.float32),
        "orthogonal": np.array([1.0, 0.0], np.float32),
        "off": np.array([1.0, 2.0, 3.0], np.float32),
        "ids": np.array([1, 2], np.int64),
        "missing": np.array([1.0], np.float32),
    }
    outputs = {
        "same": np.array([3.0, 4.0], np.float32),
        "orthogonal": np.array([0.0, 1.0], np.float32),
        "off": np.array([1.0, 2.0, 4.0], np.float32),
        "ids": np.array([1, 3], np.int64),
    }
    errors = output_errors(reference, outputs)
    assert set(errors) == {"same", "orthogonal", "off"}
    same = errors["same"]
    assert (same.sqnr_db, same.cosine, same.max_abs, same.elements) == (math.inf, 1.0, 0.0, 2)
    orth = errors["orthogonal"]
    assert orth.cosine == 0.0 and orth.max_abs == 1.0
    assert orth.sqnr_db == pytest.approx(10 * math.log10(1 / 2))
    off = errors["off"]
    assert off.sqnr_db == pytest.approx(10 * math.log10(14 / 1))
    assert off.cosine == pytest.approx(17 / math.sqrt(14 * 21))
    assert off.max_abs == 1.0 and off.elements == 3


def test_top1_agreement_on_hand_made_arrays() -> None:
    reference = [np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]), np.array([[0.0, 0.0, 1.0]])]
    outputs = [np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1]]), np.array([[0.0, 0.1, 0.9]])]
    assert top1_agreement(reference, outputs) == pytest.approx(2 / 3)
    assert top1_agreement(reference, reference) == 1.0
    assert top1_agreement([np.eye(4)], [np.eye(4)[::-1]]) == 0.0


# ---------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    ("text", "metric", "threshold"),
    [
        ("cosine=0.999", "cosine", 0.999),
        ("cosine>=0.999", "cosine", 0.999),
        ("top1=99%", "top1", 0.99),
        ("top1>=0.5", "top1", 0.5),
        ("sqnr=30", "sqnr", 30.0),
        (" sqnr >= 25.5 ", "sqnr", 25.5),
    ],
)
def test_accuracy_budgets_parse(text: str, metric: str, threshold: float) -> None:
    budget = AccuracyBudget.parse(text)
    assert budget.metric == metric and budget.threshold == pytest.approx(threshold)
    assert budget.met(threshold) and not budget.met(threshold - 1e-6)


@pytest.mark.parametrize(
    "text", ["", "cosine", "cosine=", "cos=0.9", "cosine=abc", "cosine=1.5", "top1=150%", "=3"]
)
def test_bad_accuracy_budgets_are_refused(text: str) -> None:
    with pytest.raises(BudgetError):
        AccuracyBudget.parse(text)


def test_a_nan_sqnr_budget_is_refused() -> None:
    with pytest.raises(BudgetError):
        AccuracyBudget.parse("sqnr=nan")


# ---------------------------------------------------------------------------- mixed precision


def _output_cosine(engine: Engine, reference: Engine, batches: list[dict[str, Any]]) -> float:
    refs = np.concatenate([reference.run(b)["y"].ravel() for b in batches]).astype(np.float64)
    got = np.concatenate([engine.run(b)["y"].ravel() for b in batches]).astype(np.float64)
    return float(refs @ got / (np.linalg.norm(refs) * np.linalg.norm(got)))


def test_sensitivity_ranks_each_int8_capable_layer_alone() -> None:
    batches, calibration = _data(2, 3), _data(3, 1)
    rows = sensitivity(load(_conv_net()), batches, BASE, calibration_data=calibration)
    probe = _build(calibration, precisions=frozenset({FP32, INT8}))
    assert sorted(row.layer for row in rows) == sorted(l_.name for l_ in _compute_layers(probe))
    assert len(rows) == 3 and all(row.op == "gie::QConv" for row in rows)
    cosines = [row.cosine for row in rows]
    assert cosines == sorted(cosines)
    fp32 = _build()
    for row in rows:
        alone = build(
            load(_conv_net()),
            BASE.with_changes(layer_precisions=((row.layer, INT8),)),
            calibration=probe.calibration,
        )
        assert [l_.name for l_ in _compute_layers(alone) if l_.precision == INT8] == [row.layer]
        assert row.cosine == pytest.approx(_output_cosine(alone, fp32, batches), abs=1e-9)
        assert 0.9 < row.cosine < 1.0


def test_auto_mixed_precision_keeps_all_int8_when_the_budget_allows() -> None:
    batches = _data(2, 3)
    result = auto_mixed_precision(
        load(_conv_net()), batches, AccuracyBudget.parse("cosine=0.9"), BASE
    )
    assert result.met and result.candidates == 3 and len(result.int8_layers) == 3
    assert result.engine is not None
    compute = _compute_layers(result.engine)
    assert {layer.precision for layer in compute} == {INT8}
    assert result.layer_precisions == {layer.name: "int8" for layer in compute}
    assert result.achieved == pytest.approx(
        _output_cosine(result.engine, _build(), batches), abs=1e-9
    )
    assert result.achieved >= 0.9


@pytest.mark.parametrize("fallback", [FP16, FP32])
def test_auto_mixed_precision_reports_an_impossible_budget_honestly(fallback: Precision) -> None:
    batches = _data(2, 3)
    budget = AccuracyBudget.parse("cosine=1.0")
    result = auto_mixed_precision(load(_conv_net()), batches, budget, BASE, fallback=fallback)
    assert result.engine is not None
    achieved = _output_cosine(result.engine, _build(), batches)
    assert result.achieved == pytest.approx(achieved, abs=1e-12)
    assert result.met == (result.achieved >= 1.0)
    assert len(result.int8_layers) < 3  # layers fell back
    compute = _compute_layers(result.engine)
    fell_back = [layer for layer in compute if layer.precision != INT8]
    assert fell_back and all(layer.precision == fallback for layer in fell_back)
    assert {layer.name for layer in compute if layer.precision == INT8} == set(result.int8_layers)
    if fallback == FP32:
        assert result.met and result.int8_layers == [] and result.achieved == 1.0


def test_non_finite_outputs_give_nan_metrics_instead_of_an_error() -> None:
    from engine.quantize.accuracy import output_errors

    reference = {"y": np.array([1.0, 2.0, 3.0], dtype=np.float32)}
    overflowed = {"y": np.array([1.0, np.inf, np.nan], dtype=np.float32)}
    error = output_errors(reference, overflowed)["y"]
    assert np.isnan(error.cosine) and np.isnan(error.sqnr_db)
