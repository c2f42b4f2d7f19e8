"""2:4 sparsity in the build: eligibility per layer, pruning in ``force`` mode, the verdicts.

With ``BuilderConfig.sparsity`` ``on`` or ``force`` the build log says, for every layer with a
weight (Conv, Gemm, MatMul and their fused forms), whether it is eligible for 2:4 and why not
(engine.sparsity.check: non-constant weight, K not a multiple of 4, depthwise, fewer input
channels than ``sparsity_min_channels``), and whether its weight already is 2:4. ``force``
prunes the eligible weights by magnitude first (engine.sparsity.prune; a new model, the
retained magnitude logged per layer). After tactic selection, :func:`log_sparse_choices` says
for every layer that had the sparse tactic as a candidate whether it was picked and by what
margin, or which dense tactic beat it and by how much.
"""

from __future__ import annotations

import onnx_ir as ir

from engine.build.log import BuildLog
from engine.build.plan import Plan
from engine.config import BuilderConfig, SparsityMode
from engine.sparsity.check import check_model
from engine.sparsity.prune import prune_model

STAGE = "sparsity"
SPARSE_TACTIC = "sparse_2_4"


def apply_sparsity(model: ir.Model, config: BuilderConfig, log: BuildLog) -> ir.Model:
    """Log each weight layer's 2:4 eligibility; in ``force`` mode return the pruned model."""
    minimum = config.sparsity_min_channels
    if config.sparsity == SparsityMode.FORCE:
        model, records = prune_model(model, min_channels=minimum)
        for record in records:
            log.add(
                STAGE,
                f"pruned to 2:4, {100 * record.retained_after:.1f}% of the weight magnitude kept",
                record.name,
            )
        log.add(STAGE, f"force: {len(records)} layers pruned to 2:4")
    layers = check_model(model, min_channels=minimum)
    for layer in layers:
        if not layer.eligible:
            log.add(STAGE, f"not eligible for 2:4: {layer.reason}", layer.name)
        elif layer.is_2_4:
            log.add(STAGE, "eligible, weight is 2:4: the sparse tactic is a candidate", layer.name)
        else:
            log.add(
                STAGE,
                f"eligible, but the weight is not 2:4 ({100 * layer.compliant_fraction:.0f}% of "
                "groups comply): build with sparsity 'force' or prune it",
                layer.name,
            )
    eligible = sum(1 for layer in layers if layer.eligible)
    ready = sum(1 for layer in layers if layer.eligible and layer.is_2_4)
    log.add(STAGE, f"{len(layers)} weight layers: {eligible} eligible, {ready} with 2:4 weights")
    return model


def log_sparse_choices(plan: Plan, log: BuildLog) -> None:
    """For each layer that timed the sparse tactic: picked (margin) or beaten (by whom)."""
    picked = 0
    for layer in plan.layers:
        timings = {t.tactic: t for t in layer.candidates if t.samples > 0}
        sparse = timings.get(SPARSE_TACTIC)
        if layer.tactic == SPARSE_TACTIC:
            picked += 1
            others = [t.median_ms for name, t in timings.items() if name != SPARSE_TACTIC]
            margin = (min(others) / sparse.median_ms - 1) * 100 if others and sparse else 0.0
            log.add(STAGE, f"sparse tactic picked, {margin:.0f}% faster than dense", layer.name)
        elif sparse is not None and layer.tactic in timings:
            best = timings[layer.tactic].median_ms
            slower = (sparse.median_ms / best - 1) * 100 if best > 0 else 0.0
            log.add(
                STAGE,
                f"dense tactic {layer.tactic} kept: sparse_2_4 was {slower:.0f}% slower",
                layer.name,
            )
    log.add(STAGE, f"sparse tactic picked for {picked} layers")


__all__ = ["apply_sparsity", "log_sparse_choices"]
