"""Optimization levels as recipes, and the entry points: optimize, replay.

    O0  nothing
    O1  cleanup (identity/dropout/no-op removal, dead code, duplicate initializers, CSE),
        constant folding, shape-chain folding, Cast cleanup
    O2  O1 + BatchNorm folding, Pad into Conv, Conv/Gemm epilogue fusion, pointwise fusion
    O3  O1 + transformer fusions (LayerNorm, GELU, RMSNorm, attention) and layout
        simplification, then the O2 fusions

Transformer fusions run before the epilogue and pointwise fusions, which would otherwise eat
the MatMul+Add and Erf/Mul chains the transformer patterns look for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from engine.cost_model import GPU_FP32, DeviceProfile
from engine.onnx_io import load
from engine.ops.registry import OpRegistry, default_registry
from engine.passes.cleanup import CLEANUP_PASSES
from engine.passes.conv_bn import CONV_BN_PASSES
from engine.passes.epilogue import EPILOGUE_PASSES
from engine.passes.events import Instrument, PassContext, WhyNot
from engine.passes.fold_constants import FOLD_PASSES
from engine.passes.layout import LAYOUT_PASSES
from engine.passes.manager import GraphPass, PassManager, StepRecorder, disabled_set
from engine.passes.pointwise import POINTWISE_PASSES
from engine.passes.provenance import name_unnamed_nodes, stamp_originals
from engine.passes.step import Step
from engine.passes.transformer import TRANSFORMER_PASSES

LEVELS = ("O0", "O1", "O2", "O3")


def pipeline(level: str) -> list[GraphPass]:
    """The passes of an optimization level, in order."""
    if level not in LEVELS:
        raise ValueError(f"unknown optimization level {level!r}; choose from {', '.join(LEVELS)}")
    o1 = [*CLEANUP_PASSES, *FOLD_PASSES]
    fusions = [*CONV_BN_PASSES, *EPILOGUE_PASSES, *POINTWISE_PASSES, *CLEANUP_PASSES]
    if level == "O0":
        return []
    if level == "O1":
        return o1
    if level == "O2":
        return [*o1, *fusions]
    return [*o1, *TRANSFORMER_PASSES, *LAYOUT_PASSES, *fusions]


def all_pass_and_rule_names() -> dict[str, list[str]]:
    """Every pass of O3 with its rule names (what ``--disable`` accepts)."""
    return {p.name: p.rule_names() for p in pipeline("O3")}


@dataclass
class OptimizationResult:
    """The optimized model (a copy), the recorded steps and the "why not" reasons."""

    model: ir.Model
    steps: list[Step]
    why_not: list[WhyNot] = field(default_factory=list)
    level: str = "O2"


def copy_model(model: ir.Model) -> ir.Model:
    """A deep copy through serialization (the optimizer never mutates its input)."""
    copied = ir.from_proto(ir.to_proto(model))
    copied.meta.update(model.meta)
    return copied


#: Models below this default-domain opset are upgraded before optimizing: the stock rewrite
#: rules match current op versions (e.g. BatchNormalization folding does nothing at opset 9).
UPGRADE_BELOW_OPSET = 13
UPGRADE_TO_OPSET = 17


def upgrade_opset(model: ir.Model) -> ir.Model:
    """The model converted to opset 17 when it is older than opset 13 (unchanged otherwise or
    when ONNX's version converter cannot convert it). Node names are kept."""
    opset = model.opset_imports.get("", UPGRADE_TO_OPSET)
    if opset >= UPGRADE_BELOW_OPSET:
        return model
    try:
        original = ir.to_proto(model)
        original.ir_version = max(original.ir_version, 8)
        proto = onnx.version_converter.convert_version(original, UPGRADE_TO_OPSET)
        upgraded = load(proto)
    except Exception:  # noqa: BLE001 - an old model that cannot be converted stays as it is
        return model
    upgraded.meta.update(model.meta)
    upgraded.meta["opset_upgrade"] = f"{opset} -> {UPGRADE_TO_OPSET}"
    return upgraded


def prepare_for_optimization(model: ir.Model) -> ir.Model:
    """Copy (upgrading old opsets), name every node, and mark each as its own origin."""
    copied = upgrade_opset(copy_model(model))
    name_unnamed_nodes(copied.graph)
    stamp_originals(copied.graph)
    return copied


def optimize(
    model: ir.Model,
    level: str = "O2",
    disabled: Iterable[str] = (),
    instruments: Sequence[Instrument] = (),
    check_feeds: Mapping[str, np.ndarray] | None = None,
    device: DeviceProfile = GPU_FP32,
    registry: OpRegistry | None = None,
    estimate_costs: bool = True,
) -> OptimizationResult:
    """Optimize a copy of ``model`` at ``level``, recording every step.

    ``disabled`` names passes or rules to skip; ``check_feeds`` turns on the per-step numeric
    check against the reference backend; extra ``instruments`` see every pass and rewrite;
    ``estimate_costs=False`` records steps without the per-step cost estimate (faster).
    """
    registry = registry or default_registry()
    working = prepare_for_optimization(model)
    recorder = StepRecorder(
        device=device, check_feeds=check_feeds, registry=registry, estimate_costs=estimate_costs
    )
    manager = PassManager(
        pipeline(level), [recorder, *instruments], disabled_set(disabled), registry
    )
    manager.run(working)
    return OptimizationResult(working, recorder.steps, list(recorder.why_not.values()), level)


def replay(model: ir.Model, steps: Sequence[Step], level: str = "O3") -> ir.Model:
    """Re-apply recorded steps to (a copy of) the original model, in order.

    Rule steps apply their rule at their anchor node; other steps rerun their pass. Raises
    ValueError when a step cannot be replayed (unknown pass or rule, anchor missing).
    """
    registry = default_registry()
    working = prepare_for_optimization(model)
    passes = {p.name: p for p in pipeline(level)}
    for step in steps:
        graph_pass = passes.get(step.pass_name)
        if graph_pass is None:
            raise ValueError(f"step {step.index}: pass {step.pass_name!r} is not in {level}")
        context = PassContext(registry, [], frozenset(), step.pass_name)
        if step.rule is None:
            graph_pass.run(working, context)
            continue
        apply_at = getattr(graph_pass, "apply_at", None)
        if apply_at is None or not apply_at(working, step.rule, step.anchor or "", context):
            raise ValueError(
                f"step {step.index}: rule {step.rule!r} did not apply at {step.anchor!r}"
            )
    return working
