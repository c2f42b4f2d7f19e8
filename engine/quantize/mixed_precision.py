"""Sensitivity ranking and automatic mixed precision under an accuracy budget.

Sensitivity: every layer that can run int8 is quantized *alone* (the rest fp32) and the
model's output error vs fp32 is measured on the data; layers are ranked most sensitive first.

Automatic mixed precision: given a budget on the outputs (``cosine>=0.999``, ``top1>=0.99``
agreement with fp32 on the argmax of the first output, or ``sqnr>=30`` dB), keep int8 for as
many layers as possible. If every int8-capable layer in int8 meets the budget, that is the
answer; otherwise the k most sensitive layers fall back to ``fallback`` (fp16 by default) and
the smallest k that meets the budget is found by bisection on the sensitivity order (the error
is close to monotone in k; the chosen k is verified by its own build). The report gives the
choice per layer, how many stayed int8, the achieved metric, and the estimated latency of
fp32, all-fallback, all-int8 (every int8-capable layer int8, the others in the fallback
precision) and the chosen mix (engine.build.estimate). Every layer that cannot run int8 runs in
the fallback precision in all but the fp32 figure.

Searching builds use the reference tactic only (no timing); the final engine is built with the
caller's config plus the chosen per-layer precisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.build.estimate import estimate_latency
from engine.builder import build
from engine.config import BuilderConfig, Precision
from engine.quantize.accuracy import _Accumulator, top1_agreement
from engine.quantize.calibrate import CalibrationResult
from engine.runtime import Engine

Progress = Callable[[str, int, int], None]
METRICS = ("cosine", "top1", "sqnr")


class BudgetError(ValueError):
    """An accuracy budget that cannot be parsed."""


@dataclass(frozen=True)
class AccuracyBudget:
    """``metric`` (cosine, top1 or sqnr in dB) must reach at least ``threshold``."""

    metric: str
    threshold: float

    @staticmethod
    def parse(text: str) -> AccuracyBudget:
        """``"cosine=0.999"``, ``"cosine>=0.999"``, ``"top1=99%"``, ``"sqnr=30"``."""
        cleaned = text.replace(">=", "=").replace(" ", "")
        metric, sep, value = cleaned.partition("=")
        if not sep or metric not in METRICS:
            raise BudgetError(
                f"accuracy budget {text!r}: expected METRIC=VALUE with METRIC one of {METRICS}"
            )
        try:
            threshold = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        except ValueError:
            raise BudgetError(f"accuracy budget {text!r}: {value!r} is not a number") from None
        if not math.isfinite(threshold):
            raise BudgetError(f"accuracy budget {text!r}: the threshold must be a finite number")
        if metric in ("cosine", "top1") and not 0.0 <= threshold <= 1.0:
            raise BudgetError(f"accuracy budget {text!r}: {metric} must be in [0, 1]")
        return AccuracyBudget(metric, threshold)

    def met(self, value: float) -> bool:
        return value >= self.threshold

    def __str__(self) -> str:
        return f"{self.metric}>={self.threshold:g}"


def output_metric(
    reference: Sequence[Mapping[str, np.ndarray]],
    outputs: Sequence[Mapping[str, np.ndarray]],
    metric: str,
) -> float:
    """``metric`` of ``outputs`` vs ``reference`` over all batches: the worst output's cosine
    or SQNR, or the top-1 agreement of the first output."""
    names = [
        n for n in reference[0] if np.issubdtype(np.asarray(reference[0][n]).dtype, np.floating)
    ]
    if metric == "top1":
        first = names[0]
        return top1_agreement([r[first] for r in reference], [o[first] for o in outputs])
    worst = np.inf
    for name in names:
        acc = _Accumulator()
        for ref, out in zip(reference, outputs):
            acc.add(ref[name], out[name])
        worst = min(worst, acc.cosine if metric == "cosine" else acc.sqnr_db)
    return float(worst)


@dataclass(frozen=True)
class LayerSensitivity:
    """Output error when only ``layer`` runs int8: cosine, SQNR (dB), top-1 agreement."""

    layer: str
    op: str
    cosine: float
    sqnr_db: float
    top1: float

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "op": self.op,
            "cosine": self.cosine,
            "sqnr_db": self.sqnr_db,
            "top1": self.top1,
        }


@dataclass
class MixedPrecisionResult:
    """The automatic mixed precision choice (see the module docstring)."""

    budget: AccuracyBudget
    achieved: float
    met: bool
    layer_precisions: dict[str, str]
    int8_layers: list[str]
    candidates: int
    fallback: str
    latency_ms: dict[str, float]
    sensitivity: list[LayerSensitivity]
    trials: list[tuple[int, float]] = field(default_factory=list)
    config: BuilderConfig | None = None
    engine: Engine | None = None

    def summary(self) -> str:
        verdict = "meets" if self.met else "does NOT meet"
        lat = ", ".join(f"{k} {v:.3f} ms" for k, v in self.latency_ms.items())
        return (
            f"{len(self.int8_layers)} of {self.candidates} int8-capable layers stay int8, "
            f"{self.candidates - len(self.int8_layers)} fall back to {self.fallback}; "
            f"{self.budget.metric} = {self.achieved:.6g} {verdict} {self.budget}; "
            f"estimated latency: {lat}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": str(self.budget),
            "achieved": self.achieved,
            "met": self.met,
            "layer_precisions": self.layer_precisions,
            "int8_layers": self.int8_layers,
            "candidates": self.candidates,
            "fallback": self.fallback,
            "latency_ms": self.latency_ms,
            "sensitivity": [s.to_json() for s in self.sensitivity],
            "trials": [[k, v] for k, v in self.trials],
        }


class _Search:
    """Builds and evaluates engines of one model on one data set."""

    def __init__(
        self,
        model: ir.Model,
        config: BuilderConfig,
        batches: Sequence[Mapping[str, Any]],
        calibration: CalibrationResult | None,
        calibration_data: Any,
    ) -> None:
        self.model = model
        self.base = config.with_changes(
            precisions=frozenset({Precision.FP32}),
            layer_precisions=(),
            tactic_sources=frozenset({"reference"}),
            timing_cache_path=None,
        )
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("sensitivity / mixed precision need at least one batch of data")
        self.calibration = calibration
        self.reference = self.run(self.engine(self.base))
        if calibration is None:
            probe = build(
                model,
                self.base.with_changes(precisions=frozenset({Precision.FP32, Precision.INT8})),
                calibration_data=calibration_data if calibration_data is not None else batches,
            )
            self.calibration = probe.calibration
            self.int8_engine = probe
        else:
            self.int8_engine = self.engine(
                self.base.with_changes(precisions=frozenset({Precision.FP32, Precision.INT8}))
            )
        self.candidates = [
            layer
            for layer in self.int8_engine.plan.layers
            if layer.role == "compute" and layer.precision == Precision.INT8
        ]

    def engine(self, config: BuilderConfig) -> Engine:
        return build(self.model, config, calibration=self.calibration)

    def run(self, engine: Engine) -> list[dict[str, np.ndarray]]:
        return [engine.run(feeds) for feeds in self.batches]

    def metrics(self, engine: Engine) -> tuple[float, float, float]:
        outputs = self.run(engine)
        return (
            output_metric(self.reference, outputs, "cosine"),
            output_metric(self.reference, outputs, "sqnr"),
            output_metric(self.reference, outputs, "top1"),
        )


def _sensitivity(search: _Search, progress: Progress | None) -> list[LayerSensitivity]:
    ranked = []
    for done, layer in enumerate(search.candidates):
        if progress:
            progress("sensitivity", done, len(search.candidates))
        engine = search.engine(
            search.base.with_changes(layer_precisions=((layer.name, Precision.INT8),))
        )
        cosine, sqnr, top1 = search.metrics(engine)
        ranked.append(LayerSensitivity(layer.name, layer.qualified_op, cosine, sqnr, top1))
    if progress:
        progress("sensitivity", len(search.candidates), len(search.candidates))
    ranked.sort(key=lambda s: (s.cosine, s.sqnr_db))
    return ranked


def sensitivity(
    model: ir.Model,
    batches: Sequence[Mapping[str, Any]],
    config: BuilderConfig | None = None,
    calibration: CalibrationResult | None = None,
    calibration_data: Any = None,
    progress: Progress | None = None,
) -> list[LayerSensitivity]:
    """Every int8-capable layer quantized alone, ranked most sensitive (lowest cosine) first.
    ``batches`` (feed dicts) measure the error; calibration comes from ``calibration``, else
    from ``calibration_data``, else from ``batches``."""
    search = _Search(model, config or BuilderConfig(), batches, calibration, calibration_data)
    return _sensitivity(search, progress)


def auto_mixed_precision(
    model: ir.Model,
    batches: Sequence[Mapping[str, Any]],
    budget: AccuracyBudget,
    config: BuilderConfig | None = None,
    calibration: CalibrationResult | None = None,
    calibration_data: Any = None,
    fallback: Precision = Precision.FP16,
    progress: Progress | None = None,
) -> MixedPrecisionResult:
    """Choose int8 for as many layers as the budget allows (see the module docstring)."""
    config = config or BuilderConfig()
    search = _Search(model, config, batches, calibration, calibration_data)
    enabled = frozenset({Precision.FP32, Precision.INT8, fallback})
    names = [layer.name for layer in search.candidates]

    def trial(k: int, ranked: Sequence[str]) -> tuple[float, Engine]:
        overrides = tuple((name, fallback) for name in ranked[:k])
        engine = search.engine(
            search.base.with_changes(precisions=enabled, layer_precisions=overrides)
        )
        value = output_metric(search.reference, search.run(engine), budget.metric)
        return value, engine

    trials: list[tuple[int, float]] = []
    value, all_int8 = trial(0, names)
    trials.append((0, value))
    ranked_layers: list[LayerSensitivity] = []
    keep = 0
    if not budget.met(value) and names:
        ranked_layers = _sensitivity(search, progress)
        order = [s.layer for s in ranked_layers]
        low, high = 0, len(order)  # budget fails at low; assume it holds at high
        high_value, _ = trial(high, order)
        trials.append((high, high_value))
        while high - low > 1:
            middle = (low + high) // 2
            middle_value, _ = trial(middle, order)
            trials.append((middle, middle_value))
            if budget.met(middle_value):
                high = middle
            else:
                low = middle
        keep = high
        names = order
    fallback_layers = set(names[:keep])
    overrides = tuple((name, fallback) for name in names[:keep])
    final_config = config.with_changes(
        precisions=enabled, layer_precisions=config.layer_precisions + overrides
    )
    engine = build(model, final_config, calibration=search.calibration)
    achieved = output_metric(search.reference, search.run(engine), budget.metric)
    int8 = [n for n in (layer.name for layer in search.candidates) if n not in fallback_layers]
    precisions = {
        layer.name: layer.precision.value for layer in engine.plan.layers if layer.role == "compute"
    }
    latency = {
        "fp32": estimate_latency(search.engine(search.base).plan).total_ms,
        f"all {fallback.value}": estimate_latency(
            search.engine(
                search.base.with_changes(precisions=frozenset({Precision.FP32, fallback}))
            ).plan
        ).total_ms,
        "all int8": estimate_latency(all_int8.plan).total_ms,
        "chosen": estimate_latency(engine.plan).total_ms,
    }
    return MixedPrecisionResult(
        budget,
        achieved,
        budget.met(achieved),
        precisions,
        int8,
        len(search.candidates),
        fallback.value,
        latency,
        ranked_layers,
        trials,
        final_config,
        engine,
    )


__all__ = [
    "AccuracyBudget",
    "BudgetError",
    "LayerSensitivity",
    "MixedPrecisionResult",
    "auto_mixed_precision",
    "output_metric",
    "sensitivity",
]
