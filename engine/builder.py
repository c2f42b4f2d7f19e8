"""``build(model, config) -> Engine``: the builder pipeline, with a log of every decision.

optimize (engine.passes, at config.optimization_level)
-> lower to a Plan at the optimization shapes (each input profile's ``opt``)
-> precisions (per-layer overrides; the precision issue fills in FP16/INT8 semantics)
-> tactic selection (timed candidates, timing cache, pins)
-> memory plan (one arena, sized for each profile's ``max``)
-> Engine
"""

from __future__ import annotations

import os
from collections.abc import Callable

import onnx_ir as ir

from engine.build.log import BuildLog
from engine.build.memory import plan_memory
from engine.build.plan import Plan, lower
from engine.build.selector import select_tactics
from engine.build.timing import Timer, TimingCache
from engine.config import BuilderConfig, Precision, PrecisionMode
from engine.device import device_identity
from engine.onnx_io import load
from engine.passes import optimize
from engine.recipe import SOURCE_SHA256_KEY, file_sha256
from engine.runtime import Engine

#: ``progress(stage, done, total)`` is called as the build advances (the CLI draws a bar).
Progress = Callable[[str, int, int], None]


class BuildError(RuntimeError):
    """The build cannot honour the config (e.g. an "obey" precision request)."""


def assign_precisions(plan: Plan, config: BuilderConfig, log: BuildLog) -> None:
    """Give each layer its precision; requests the engine cannot honour yet are logged.

    Until the precision issue lands every layer computes in FP32: an override or an enabled
    reduced precision is recorded with that reason ("prefer"), or fails the build ("obey").
    """
    for layer in plan.layers:
        requested = config.precision_override(layer.name)
        if requested is None or requested == Precision.FP32:
            continue
        reason = f"{requested.value} requested, kept fp32: reduced precisions are not built yet"
        if config.precision_mode == PrecisionMode.OBEY:
            raise BuildError(f"layer {layer.name}: {reason} (precision mode is obey)")
        log.add("precision", reason, layer.name)
    reduced = sorted(p.value for p in config.precisions if p != Precision.FP32)
    if reduced:
        log.add("precision", f"{', '.join(reduced)} enabled; all layers run in fp32 for now")


def build(
    model: ir.Model | str | os.PathLike[str],
    config: BuilderConfig | None = None,
    timer: Timer | None = None,
    progress: Progress | None = None,
) -> Engine:
    """Build an engine for ``model`` (an onnx-ir model or an ONNX path)."""
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
    shapes = {p.input_name: p.opt for p in config.profiles}
    plan = lower(result.model, shapes)
    assign_precisions(plan, config, log)
    if progress:
        progress("optimize", 1, 1)
    cache = TimingCache(config.timing_cache_path) if config.timing_cache_path else None
    stats = select_tactics(plan, config, log, timer=timer, cache=cache, progress=progress)
    log.add("tactics", f"{stats.timed} candidates timed, {stats.cache_hits} timing-cache hits")
    memory = plan_memory(plan, config, log=log)
    return Engine(plan, memory, config, log, device_identity(config.backend))
