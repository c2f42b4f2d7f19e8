"""Acceptance tests of issue 5 (Precision): measured accuracy of fp16 / int8 engines on the zoo.

Every test is a real measurement against an independent oracle: our fp32 engine (itself checked
against the reference interpreter elsewhere), onnxruntime running an exported or an
onnxruntime-quantized QDQ model, and NumPy formulas. The numbers are recorded with pytest's
``record_property`` (``--junitxml`` keeps them) and printed (``-s`` shows them).

Calibration uses seeds 10-13 of :func:`engine.zoo.make_inputs`; evaluation uses seeds 1 and 2,
which calibration never saw.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnxruntime import quantization as ort_quant

from engine import zoo
from engine.builder import build
from engine.config import BuilderConfig, Precision
from engine.onnx_io import load, to_proto
from engine.quantize.mixed_precision import AccuracyBudget, auto_mixed_precision
from engine.quantize.qdq_export import export_qdq
from engine.runtime import Engine

REFERENCE_ONLY = frozenset({"reference"})
FP16 = frozenset({Precision.FP32, Precision.FP16})
INT8 = frozenset({Precision.FP32, Precision.INT8})
CALIBRATION_SEEDS = (10, 11, 12, 13)
EVALUATION_SEEDS = (1, 2)
CNNS = ("resnet", "mobilenetv2_block", "unet_block", "detector_head")

Feeds = dict[str, np.ndarray]


# --------------------------------------------------------------------------- helpers


def _config(**changes: Any) -> BuilderConfig:
    """A fast build (no tactic timing) with ``changes``."""
    return BuilderConfig(tactic_sources=REFERENCE_ONLY, **changes)


def _feeds(proto: onnx.ModelProto, seeds: Sequence[int]) -> list[Feeds]:
    return [zoo.make_inputs(proto, seed=seed) for seed in seeds]


def _cosine(reference: np.ndarray, value: np.ndarray) -> float:
    """Cosine similarity of two tensors, flattened, in float64 (1.0 for two zero tensors)."""
    a = np.asarray(reference, dtype=np.float64).ravel()
    b = np.asarray(value, dtype=np.float64).ravel()
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 if norms == 0.0 else float(a @ b) / norms


def _float_outputs(outputs: Mapping[str, np.ndarray]) -> list[str]:
    return [n for n, v in outputs.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def _worst_cosine(reference: Engine, candidate: Engine, batches: Sequence[Feeds]) -> float:
    """The lowest cosine over every float output of every batch."""
    worst = 1.0
    for feeds in batches:
        want, got = reference.run(feeds), candidate.run(feeds)
        assert set(got) == set(want)
        for name in _float_outputs(want):
            assert np.all(np.isfinite(got[name])), name
            worst = min(worst, _cosine(want[name], got[name]))
    return worst


def _pooled_cosine(reference: Engine, candidate: Engine, batches: Sequence[Feeds]) -> float:
    """The lowest over float outputs of the cosine of all batches' values of that output."""
    want = [reference.run(feeds) for feeds in batches]
    got = [candidate.run(feeds) for feeds in batches]
    return min(
        _cosine(
            np.concatenate([w[name].ravel() for w in want]),
            np.concatenate([g[name].ravel() for g in got]),
        )
        for name in _float_outputs(want[0])
    )


def _compute_layers(engine: Engine, precision: Precision) -> int:
    return sum(
        1
        for layer in engine.plan.layers
        if layer.role == "compute" and layer.precision == precision
    )


def _op_counts(engine: Engine) -> Counter[str]:
    return Counter(layer.op_type for layer in engine.plan.layers)


def _report(record_property: Any, name: str, value: Any) -> None:
    record_property(name, value)
    print(f"{name} = {value}")


# --------------------------------------------------------------------------- 1. fp16


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_fp16_engine_output_matches_fp32(name: str, record_property: Any) -> None:
    proto = zoo.build(name)
    batches = _feeds(proto, EVALUATION_SEEDS)
    fp32 = build(load(proto), _config())
    fp16 = build(load(proto), _config(precisions=FP16), calibration_data=batches)
    fp16_layers = _compute_layers(fp16, Precision.FP16)
    cosine = _worst_cosine(fp32, fp16, batches)
    _report(record_property, f"{name}.fp16_layers", fp16_layers)
    _report(record_property, f"{name}.fp16_cosine", cosine)
    assert fp16_layers > 0, "no layer runs in fp16: the comparison would be vacuous"
    assert cosine >= 0.9999


# --------------------------------------------------------------------------- 2. int8 CNNs


@pytest.mark.parametrize("name", CNNS)
def test_int8_entropy_engine_output_matches_fp32(name: str, record_property: Any) -> None:
    proto = zoo.build(name)
    fp32 = build(load(proto), _config())
    int8 = build(
        load(proto),
        _config(precisions=INT8, calibrator="entropy"),
        calibration_data=_feeds(proto, CALIBRATION_SEEDS),
    )
    qconv = _op_counts(int8)["QConv"]
    cosine = _worst_cosine(fp32, int8, _feeds(proto, EVALUATION_SEEDS))
    _report(record_property, f"{name}.int8_qconv_layers", qconv)
    _report(record_property, f"{name}.int8_layers", _compute_layers(int8, Precision.INT8))
    _report(record_property, f"{name}.int8_cosine", cosine)
    source_convs = sum(1 for node in proto.graph.node if node.op_type == "Conv")
    assert 0 < qconv <= source_convs
    assert cosine >= 0.99


# --------------------------------------------------------------------------- 3. QDQ export


@pytest.mark.parametrize("name", ["resnet", "bert_opset17"])
def test_exported_qdq_model_matches_the_int8_engine_in_onnxruntime(
    name: str, record_property: Any
) -> None:
    proto = zoo.build(name)
    fp32 = build(load(proto), _config())
    int8 = build(
        load(proto), _config(precisions=INT8), calibration_data=_feeds(proto, CALIBRATION_SEEDS)
    )
    exported, report = export_qdq(int8.plan.model)
    assert report.int8_layers == _compute_layers(int8, Precision.INT8) > 0
    session = ort.InferenceSession(
        to_proto(exported).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    within: dict[str, list[np.ndarray]] = {}
    for feeds in _feeds(proto, EVALUATION_SEEDS):
        ours, want = int8.run(feeds), fp32.run(feeds)
        theirs = dict(
            zip(names, session.run(None, {k: v for k, v in feeds.items() if k in inputs}))
        )
        assert set(theirs) == set(ours)
        for output in _float_outputs(want):
            step = float(np.max(np.abs(want[output]))) / 127
            error = np.abs(ours[output].astype(np.float64) - theirs[output].astype(np.float64))
            within.setdefault(output, []).append((error <= step).ravel())
    for output, flags in within.items():
        fraction = float(np.concatenate(flags).mean())
        _report(record_property, f"{name}.{output}.within_one_step", fraction)
        assert fraction >= 0.99, output


# --------------------------------------------------------------------------- 4. QAT import


class _Batches(ort_quant.CalibrationDataReader):
    """onnxruntime's calibration reader over a list of feed dicts."""

    def __init__(self, batches: Sequence[Feeds]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> Feeds | None:
        return next(self._batches, None)


def _output_step(model: onnx.ModelProto, output: str) -> float:
    """The scale of the DequantizeLinear that produces graph output ``output``."""
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = next(n for n in model.graph.node if output in n.output)
    assert producer.op_type == "DequantizeLinear", producer.op_type
    return float(initializers[producer.input[1]])


def test_qdq_model_from_onnxruntime_builds_int8_and_matches_onnxruntime(
    tmp_path: Path, record_property: Any
) -> None:
    proto = zoo.build("resnet")
    source, quantized = tmp_path / "resnet.onnx", tmp_path / "resnet_qdq.onnx"
    onnx.save(proto, source)
    ort_quant.quantize_static(
        str(source),
        str(quantized),
        _Batches(_feeds(proto, CALIBRATION_SEEDS[:2])),
        quant_format=ort_quant.QuantFormat.QDQ,
        per_channel=True,
        activation_type=ort_quant.QuantType.QInt8,
        weight_type=ort_quant.QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    engine = build(str(quantized), _config())
    qconv = _op_counts(engine)["QConv"]
    source_convs = sum(1 for node in proto.graph.node if node.op_type == "Conv")
    _report(record_property, "qat.qconv_layers", qconv)
    assert qconv == source_convs
    assert any("from the model's Q/DQ nodes" in line for line in engine.log.lines())
    assert not any("calibrated" in line for line in engine.log.lines())

    qdq = onnx.load(quantized)
    session = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    worst_cosine, worst_steps = 1.0, 0.0
    for feeds in _feeds(proto, EVALUATION_SEEDS):
        ours = engine.run(feeds)
        for output, theirs in zip(names, session.run(None, feeds)):
            step = _output_step(qdq, output)
            error = np.abs(ours[output].astype(np.float64) - theirs.astype(np.float64))
            worst_cosine = min(worst_cosine, _cosine(theirs, ours[output]))
            worst_steps = max(worst_steps, float(error.max()) / step)
    _report(record_property, "qat.cosine_vs_onnxruntime", worst_cosine)
    _report(record_property, "qat.max_diff_output_steps", worst_steps)
    assert worst_cosine >= 0.999
    assert worst_steps <= 3.0


# --------------------------------------------------------------------------- 5. mixed precision


def test_auto_mixed_precision_meets_a_cosine_budget_on_bert(record_property: Any) -> None:
    proto = zoo.build("bert_opset17")
    batches = _feeds(proto, CALIBRATION_SEEDS)
    budget = AccuracyBudget.parse("cosine=0.999")
    result = auto_mixed_precision(load(proto), batches, budget, _config())
    assert result.engine is not None
    fp32 = build(load(proto), _config())
    achieved = _pooled_cosine(fp32, result.engine, batches)
    _report(record_property, "amp.achieved_cosine", achieved)
    _report(record_property, "amp.int8_layers", len(result.int8_layers))
    _report(record_property, "amp.candidates", result.candidates)
    _report(record_property, "amp.latency_ms", result.latency_ms)
    assert result.met is True
    assert achieved >= 0.999
    assert achieved == pytest.approx(result.achieved, abs=1e-6)
    assert _compute_layers(result.engine, Precision.INT8) == len(result.int8_layers) > 0


@pytest.mark.slow
def test_a_tight_budget_sends_the_most_sensitive_layers_to_fp16(record_property: Any) -> None:
    proto = zoo.build("bert_opset17")
    batches = _feeds(proto, CALIBRATION_SEEDS)
    budget = AccuracyBudget.parse("cosine=0.99995")
    result = auto_mixed_precision(load(proto), batches, budget, _config())
    assert result.engine is not None
    achieved = _pooled_cosine(build(load(proto), _config()), result.engine, batches)
    _report(record_property, "amp_tight.achieved_cosine", achieved)
    _report(record_property, "amp_tight.int8_layers", len(result.int8_layers))
    _report(record_property, "amp_tight.trials", result.trials)
    assert result.met is True and achieved >= 0.99995
    assert 0 < len(result.int8_layers) < result.candidates
    fallen = [s.layer for s in result.sensitivity if s.layer not in result.int8_layers]
    assert len(fallen) == result.candidates - len(result.int8_layers)
    assert all(result.layer_precisions[layer] == "fp16" for layer in fallen)
    assert all(result.layer_precisions[layer] == "int8" for layer in result.int8_layers)
    # The fallen layers are the most sensitive ones: a prefix of the ranking.
    ranking = [s.layer for s in result.sensitivity]
    assert set(ranking[: len(fallen)]) == set(fallen)


# --------------------------------------------------------------------------- 6. calibrators


@pytest.fixture(scope="module")
def resnet_fp32() -> tuple[onnx.ModelProto, Engine]:
    proto = zoo.build("resnet")
    return proto, build(load(proto), _config())


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy", "mse"])
def test_each_calibrator_builds_an_accurate_int8_resnet(
    calibrator: str, resnet_fp32: tuple[onnx.ModelProto, Engine], record_property: Any
) -> None:
    proto, fp32 = resnet_fp32
    calibration = _feeds(proto, CALIBRATION_SEEDS)
    int8 = build(
        load(proto), _config(precisions=INT8, calibrator=calibrator), calibration_data=calibration
    )
    cosine = _worst_cosine(fp32, int8, _feeds(proto, EVALUATION_SEEDS))
    _report(record_property, f"resnet.{calibrator}.cosine", cosine)
    assert _op_counts(int8)["QConv"] > 0
    assert cosine >= 0.99
    # The graph input feeds the first QConv; its threshold is bounded by max |x| over the data.
    amax = max(float(np.max(np.abs(feeds["input"]))) for feeds in calibration)
    scale = int8.quant_scales.activation["input"]
    if calibrator == "minmax":
        assert scale == pytest.approx(amax / 127, rel=1e-5)
    else:
        assert 0 < scale <= amax / 127 * (1 + 1e-5)


def test_calibration_cache_is_reused_without_data(
    tmp_path: Path, resnet_fp32: tuple[onnx.ModelProto, Engine]
) -> None:
    proto, _ = resnet_fp32
    cache = tmp_path / "calibration.json"
    config = _config(precisions=INT8, calibration_cache_path=str(cache))
    first = build(load(proto), config, calibration_data=_feeds(proto, CALIBRATION_SEEDS))
    assert cache.is_file()
    assert any("calibration cache written" in line for line in first.log.lines())
    second = build(load(proto), config)
    assert any("read from calibration cache" in line for line in second.log.lines())
    assert not any("tensors calibrated" in line for line in second.log.lines())
    assert second.quant_scales.activation == first.quant_scales.activation
    for feeds in _feeds(proto, EVALUATION_SEEDS):
        ours, again = first.run(feeds), second.run(feeds)
        for name in ours:
            np.testing.assert_array_equal(again[name], ours[name])
    # The cache keeps histograms: another calibrator reads it as if it had calibrated the data.
    minmax = config.with_changes(calibrator="minmax")
    from_data = build(
        load(proto),
        minmax.with_changes(calibration_cache_path=None),
        calibration_data=_feeds(proto, CALIBRATION_SEEDS),
    )
    from_cache = build(load(proto), minmax)
    for name, scale in from_data.quant_scales.activation.items():
        assert from_cache.quant_scales.activation[name] == pytest.approx(scale, rel=1e-6), name
