"""``build(model, config) -> Engine``: the builder pipeline, with a log of every decision.

import explicit quantization (a model with Q/DQ nodes: engine.quantize.qdq_import)
-> optimize (engine.passes, at config.optimization_level)
-> 2:4 sparsity: per-layer eligibility logged; ``force`` prunes eligible weights
   (engine.build.sparsity)
-> int8 scales (Q/DQ, calibration, or a calibration cache: engine.build.quantization)
-> precisions (engine.build.precision) materialized in the model: int8 ops, fp16 weights,
   explicit conversion layers (engine.build.reformat)
-> lower to a Plan at the optimization shapes (each input profile's ``opt``)
-> tactic selection (timed candidates, timing cache, pins)
-> memory plan (one arena, sized for each profile's ``max``)
-> Engine
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import onnx_ir as ir

from engine.backends.cuda.engine import CUDA_BACKENDS, CudaEngine
from engine.backends.cuda.setup import cuda_setup
from engine.build.log import BuildLog
from engine.build.memory import plan_memory
from engine.build.plan import lower, optimization_specs
from engine.build.precision import PrecisionDecision, PrecisionError, decide_precisions
from engine.build.quantization import gather_scales
from engine.build.reformat import apply_precisions
from engine.build.selector import select_tactics
from engine.build.sparsity import apply_sparsity, log_sparse_choices
from engine.build.timing import Timer, TimingCache
from engine.config import BuilderConfig, SparsityMode
from engine.device import device_identity
from engine.onnx_io import load
from engine.ops.shape_inference import infer_specs
from engine.passes import optimize
from engine.quantize.calibrate import CalibrationResult
from engine.quantize.qdq_import import has_qdq, import_qdq
from engine.quantize.scales import QuantScales
from engine.recipe import SOURCE_SHA256_KEY, file_sha256
from engine.runtime import Engine

#: ``progress(stage, done, total)`` is called as the build advances (the CLI draws a bar).
Progress = Callable[[str, int, int], None]


class BuildError(RuntimeError):
    """The build cannot honour the config (e.g. an "obey" precision request)."""


def apply_precision_decisions(
    model: ir.Model,
    config: BuilderConfig,
    scales: QuantScales,
    log: BuildLog,
) -> dict[str, PrecisionDecision]:
    """Decide every layer's precision and rewrite ``model`` (in place) accordingly."""
    shapes = {p.input_name: p.opt for p in config.profiles}
    specs = infer_specs(model, optimization_specs(model, shapes)).specs
    try:
        decisions = decide_precisions(model, specs, config, scales, log)
    except PrecisionError as error:
        raise BuildError(str(error)) from error
    stats = apply_precisions(model, decisions, specs, scales)
    if stats.int8_layers or stats.fp16_weights or stats.reformats or stats.explicit_qdq:
        log.add(
            "precision",
            f"{len(stats.int8_layers)} int8 layers, {len(stats.fp16_weights)} weights converted "
            f"to fp16, {len(stats.reformats)} reformat layers, "
            f"{len(stats.explicit_qdq)} explicit Q/DQ layers",
        )
    return decisions


def build(
    model: ir.Model | str | os.PathLike[str],
    config: BuilderConfig | None = None,
    timer: Timer | None = None,
    progress: Progress | None = None,
    calibration_data: Any = None,
    calibration: CalibrationResult | None = None,
    scales: Mapping[str, float] | None = None,
) -> Engine:
    """Build an engine for ``model`` (an onnx-ir model or an ONNX path).

    ``calibration_data`` (arrays, a dict of arrays, feed dicts, an .npz path or an image
    folder: engine.quantize.calibration_data) or a ready ``calibration`` result give the int8
    scales of post-training quantization; see engine.build.quantization. ``scales`` (tensor
    name -> int8 scale, e.g. from engine.recipe.scales_from_recipe) replace calibration.
    """
    config = config or BuilderConfig()
    if not isinstance(model, ir.Model):
        source = model
        model = load(source)
        model.metadata_props[SOURCE_SHA256_KEY] = file_sha256(source)
    log = BuildLog()
    for profile in config.profiles:
        names = {v.name for v in model.graph.inputs}
        if profile.input_name not in names:
            raise BuildError(
                f"profile names input '{profile.input_name}', the model's inputs are "
                f"{sorted(n for n in names if n)}"
            )
    hints = None
    if has_qdq(model):
        model, hints = import_qdq(model)
        log.add("import", hints.summary())
    if progress:
        progress("optimize", 0, 1)
    result = optimize(
        model, config.optimization_level, disabled=config.disabled_passes, estimate_costs=False
    )
    before = len(model.graph)
    log.add(
        "optimize",
        f"{len(result.steps)} rewrites at {config.optimization_level}: "
        f"{before} nodes -> {len(result.model.graph)} layers",
    )
    if progress:
        progress("optimize", 1, 1)
    optimized = result.model
    if config.sparsity != SparsityMode.OFF:
        optimized = apply_sparsity(optimized, config, log)
    if scales is not None:
        quant = QuantScales(activation=dict(scales), source="given scales")
        calibrated = None
        log.add("calibrate", f"{len(scales)} int8 scales given; no calibration")
    else:
        quant, calibrated = gather_scales(
            optimized, config, log, hints, calibration, calibration_data, progress
        )
    decisions = apply_precision_decisions(optimized, config, quant, log)
    shapes = {p.input_name: p.opt for p in config.profiles}
    plan = lower(optimized, shapes)
    cache = TimingCache(config.timing_cache_path) if config.timing_cache_path else None
    cuda = cuda_setup(config, log, timer) if config.backend in CUDA_BACKENDS else None
    stats = select_tactics(
        plan,
        config,
        log,
        timer=cuda.timer if cuda else timer,
        cache=cache,
        progress=progress,
        source=cuda.source if cuda else None,
    )
    if config.sparsity != SparsityMode.OFF:
        log_sparse_choices(plan, log)
    log.add("tactics", f"{stats.timed} candidates timed, {stats.cache_hits} timing-cache hits")
    memory = plan_memory(plan, config, log=log)
    if cuda is not None:
        identity = device_identity(config.backend)
        engine: Engine = CudaEngine(plan, memory, config, log, identity, cuda.device)
    else:
        engine = Engine(plan, memory, config, log, device_identity(config.backend))
    engine.calibration = calibrated
    engine.precision_decisions = decisions
    engine.quant_scales = quant
    return engine
