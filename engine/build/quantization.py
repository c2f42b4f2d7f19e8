"""Where a build's int8 scales come from: the model's Q/DQ nodes, a calibration run, or a cache.

In order of precedence:

1. explicit quantization: the model had QuantizeLinear/DequantizeLinear nodes, imported by
   :func:`engine.quantize.qdq_import.import_qdq` before optimization; no calibration happens;
2. a :class:`~engine.quantize.calibrate.CalibrationResult` passed to the build (e.g. the studio
   re-uses one across rebuilds);
3. calibration data passed to the build: the optimized fp32 model runs over it (tensor names
   then match the layers exactly); the result is written to ``config.calibration_cache_path``
   when set;
4. ``config.calibration_cache_path`` alone: the cache is read, no data needed.

Calibration runs only when something needs it: int8 is enabled (globally or for a layer), or
fp16 is enabled with ``fp16_overflow_fallback`` and data was given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from engine.build.log import BuildLog
from engine.config import BuilderConfig, Precision
from engine.quantize.calibrate import CalibrationResult, calibrate
from engine.quantize.calibration_cache import load_cache, save_cache
from engine.quantize.calibration_data import load_calibration_data
from engine.quantize.qdq_import import QuantHints
from engine.quantize.scales import QuantScales

STAGE = "calibrate"
Progress = Callable[[str, int, int], None]


def wants_int8(config: BuilderConfig) -> bool:
    return Precision.INT8 in config.precisions or any(
        p == Precision.INT8 for _, p in config.layer_precisions
    )


def wants_fp16_ranges(config: BuilderConfig) -> bool:
    """fp16 is enabled or requested with the overflow fallback, which needs activation ranges."""
    requested = set(config.precisions) | {p for _, p in config.layer_precisions}
    return Precision.FP16 in requested and config.fp16_overflow_fallback


def needs_calibration(config: BuilderConfig) -> bool:
    """Whether a build with ``config`` uses calibration: int8 scales or fp16 ranges."""
    return wants_int8(config) or wants_fp16_ranges(config)


def scales_from_calibration(result: CalibrationResult, source: str) -> QuantScales:
    return QuantScales(
        activation={name: t.scale for name, t in result.tensors.items()},
        amax={name: t.histogram.amax for name, t in result.tensors.items()},
        explicit=False,
        source=source,
    )


def gather_scales(
    model: ir.Model,
    config: BuilderConfig,
    log: BuildLog,
    hints: QuantHints | None = None,
    calibration: CalibrationResult | None = None,
    calibration_data: Any = None,
    progress: Progress | None = None,
) -> tuple[QuantScales, CalibrationResult | None]:
    """The scales for building ``model`` (the optimized fp32 model), and the calibration
    result when one was used (see the module docstring)."""
    if hints is not None and hints.activation_scales:
        log.add(
            STAGE,
            f"explicit quantization: {len(hints.activation_scales)} tensor scales and "
            f"{len(hints.weight_scales)} weight scales from the model's Q/DQ nodes; "
            "no calibration",
        )
        return (
            QuantScales(
                activation=dict(hints.activation_scales),
                weights=dict(hints.weight_scales),
                explicit=True,
                source="the model's Q/DQ nodes",
            ),
            None,
        )
    have_data = calibration_data is not None or calibration is not None
    if not wants_int8(config) and not (wants_fp16_ranges(config) and have_data):
        return QuantScales(), None
    cache = config.calibration_cache_path
    if calibration is not None:
        result = calibration.with_calibrator(config.calibrator, config.percentile)
        source = f"{config.calibrator} calibration (given)"
    elif calibration_data is not None:
        data = load_calibration_data(calibration_data, model)
        result = calibrate(
            model,
            data,
            calibrator=config.calibrator,
            percentile=config.percentile,
            progress=progress,
        )
        source = f"{config.calibrator} calibration on {len(data)} batches"
        log.add(STAGE, f"{len(result.tensors)} tensors calibrated, {source}")
        if cache:
            save_cache(result, cache)
            log.add(STAGE, f"calibration cache written to {cache}")
    elif cache and os.path.exists(cache):
        result = load_cache(cache).with_calibrator(config.calibrator, config.percentile)
        source = f"{config.calibrator} thresholds from calibration cache {cache}"
        log.add(STAGE, f"{len(result.tensors)} tensor scales read from calibration cache {cache}")
    else:
        if wants_int8(config):
            log.add(
                STAGE,
                "int8 enabled but no calibration data, result or cache: layers without "
                "scales stay in higher precision",
            )
        return QuantScales(), None
    return scales_from_calibration(result, source), result


__all__ = [
    "gather_scales",
    "needs_calibration",
    "scales_from_calibration",
    "wants_fp16_ranges",
    "wants_int8",
]
