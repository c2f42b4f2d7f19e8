"""The calibration run: fp32 model over the data, one |x| histogram per activation, thresholds.

:func:`calibrate` runs the model with the reference interpreter on every batch, taps the graph
inputs and every node output that depends on them (constants such as weights are not
activations), and streams the float tensors (float32 / float16) into one
:class:`~engine.quantize.histogram.TensorHistogram` each. Activations are dropped as soon as
they are counted: memory is O(tensors x bins), not O(data). Afterwards every calibrator's
threshold is computed per tensor and the requested one is chosen; since the histograms are
kept, :meth:`CalibrationResult.with_calibrator` switches method or percentile without data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.backends.numpy_ref.interpreter import (
    ReferenceInterpreter,
    captured_values,
    node_subgraphs,
)
from engine.progress import ProgressCallback
from engine.quantize import qparams
from engine.quantize.calibration_data import (
    CalibrationData,
    load_calibration_data,
    model_data_inputs,
    validate,
)
from engine.quantize.calibrators import (
    DEFAULT_PERCENTILE,
    Calibrator,
    all_thresholds,
    parse_calibrator,
    threshold,
)
from engine.quantize.histogram import TensorHistogram

#: Progress stage name reported by :func:`calibrate`.
STAGE = "calibrate"


def scale_from_threshold(value: float) -> float:
    """The int8 scale of a threshold (:func:`engine.quantize.qparams.scale_from_threshold`:
    ``max(threshold, 1e-8) / 127`` in float32) as a Python float."""
    return float(qparams.scale_from_threshold(value))


@dataclass(frozen=True)
class TensorCalibration:
    """One tensor's calibration: its histogram, every method's threshold, and the choice.

    ``thresholds`` maps calibrator names to the |x| each maps to 127; ``threshold`` is the
    chosen calibrator's and ``scale`` its int8 scale (float32-representable).
    """

    name: str
    histogram: TensorHistogram
    thresholds: dict[str, float]
    threshold: float
    scale: float


@dataclass(frozen=True)
class CalibrationResult:
    """Per-tensor calibrations made with ``calibrator`` (and ``percentile`` for that method).

    ``model_sha256`` optionally identifies the model the tensors belong to (caches check it).
    """

    calibrator: str
    percentile: float
    tensors: dict[str, TensorCalibration] = field(default_factory=dict)
    model_sha256: str | None = None

    def scales(self) -> dict[str, float]:
        """The chosen int8 scale of every tensor."""
        return {name: t.scale for name, t in self.tensors.items()}

    def with_calibrator(
        self, calibrator: str | Calibrator, percentile: float | None = None
    ) -> CalibrationResult:
        """The same histograms with ``calibrator``'s thresholds chosen (no data needed).

        A different ``percentile`` recomputes the percentile thresholds from the histograms.
        """
        method = parse_calibrator(calibrator)
        percentile = self.percentile if percentile is None else float(percentile)
        tensors = {}
        for name, tensor in self.tensors.items():
            thresholds = dict(tensor.thresholds)
            if percentile != self.percentile or Calibrator.PERCENTILE.value not in thresholds:
                thresholds[Calibrator.PERCENTILE.value] = threshold(
                    tensor.histogram, Calibrator.PERCENTILE, percentile
                )
            if method.value not in thresholds:
                thresholds[method.value] = threshold(tensor.histogram, method, percentile)
            tensors[name] = make_tensor_calibration(tensor.histogram, thresholds, method)
        return CalibrationResult(method.value, percentile, tensors, self.model_sha256)


def make_tensor_calibration(
    histogram: TensorHistogram, thresholds: dict[str, float], method: Calibrator
) -> TensorCalibration:
    """A :class:`TensorCalibration` choosing ``method`` among ``thresholds``."""
    chosen = float(thresholds[method.value])
    return TensorCalibration(
        histogram.name, histogram, dict(thresholds), chosen, scale_from_threshold(chosen)
    )


def activation_values(model: ir.Model) -> list[ir.Value]:
    """The main graph's values that depend on the graph inputs: the inputs themselves, then
    every output of a node that reads one of them (directly or through a nested graph)."""
    graph = model.graph
    dynamic: dict[ir.Value, None] = dict.fromkeys(model_data_inputs(model))
    for node in graph:
        used = [v for v in node.inputs if v is not None]
        for subgraph in node_subgraphs(node):
            used.extend(captured_values(subgraph))
        if any(v in dynamic for v in used):
            dynamic.update(dict.fromkeys(node.outputs))
    return list(dynamic)


def calibrate(
    model: ir.Model,
    data: Any,
    tensors: Iterable[str] | None = None,
    calibrator: str | Calibrator = "entropy",
    percentile: float = DEFAULT_PERCENTILE,
    progress: ProgressCallback | None = None,
) -> CalibrationResult:
    """Calibrate ``model`` (fp32) on ``data`` and choose ``calibrator``'s thresholds.

    ``data``: a :class:`CalibrationData` or any source
    :func:`~engine.quantize.calibration_data.load_calibration_data` accepts; it is validated
    against the model (:class:`CalibrationDataError` on bad data). ``tensors``: the value
    names to calibrate (None: every float activation, graph inputs included); a name the
    graph lacks is a ValueError. Tensors that produced no float data are left out of the
    result. ``progress("calibrate", done_batches, total_batches)`` follows the batches.
    """
    method = parse_calibrator(calibrator)
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if isinstance(data, CalibrationData):  # each batch is checked as the run reads it
        data = validate(data, model, eager=False)
    else:
        data = load_calibration_data(data, model)
    watched = _watched_values(model, tensors)
    histograms: dict[str, TensorHistogram] = {}

    def record(name: str, value: Any) -> None:
        if not isinstance(value, np.ndarray) or value.dtype not in (np.float32, np.float16):
            return
        histogram = histograms.get(name)
        if histogram is None:
            histogram = histograms[name] = TensorHistogram(name)
        histogram.update(value)

    def tap(node: ir.Node, outputs: list[Any]) -> None:
        for value, result in zip(node.outputs, outputs):
            if value in watched:
                record(watched[value], result)

    interpreter = ReferenceInterpreter(model)
    inputs = {v.name: v for v in model_data_inputs(model)}
    total = len(data)
    if progress is not None:
        progress(STAGE, 0, total)
    for done, feeds in enumerate(data, start=1):
        for name, array in feeds.items():
            if inputs[name] in watched:
                record(name, array)
        interpreter.run(feeds, tap=tap)
        if progress is not None:
            progress(STAGE, done, total)
    results = {}
    for name, histogram in histograms.items():
        thresholds = all_thresholds(histogram, percentile)
        results[name] = make_tensor_calibration(histogram, thresholds, method)
    return CalibrationResult(method.value, float(percentile), results)


def _watched_values(model: ir.Model, tensors: Iterable[str] | None) -> dict[ir.Value, str]:
    activations = activation_values(model)
    if tensors is None:
        return {v: v.name for v in activations if v.name}
    wanted = list(dict.fromkeys(tensors))
    by_name: dict[str, ir.Value] = {v.name: v for v in activations if v.name}
    for node in model.graph:
        for value in node.outputs:
            if value.name:
                by_name.setdefault(value.name, value)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise ValueError(f"cannot calibrate {unknown}: no such value in the model's graph")
    return {by_name[name]: name for name in wanted}
