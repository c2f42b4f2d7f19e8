"""2:4 magnitude pruning of weights and of whole models (which returns a new model).

In every group of 4 consecutive values along the reduction dimension K (the ``[rows, K]``
reduction matrix of :mod:`engine.sparsity.check`), the 2 values of largest magnitude are kept and
the other 2 set to zero; ties are broken by the lower index, so the result is deterministic.
``retained_magnitude`` measures what survives: sum |pruned| / sum |original| (1.0 = nothing lost).

``prune_model(permute=True)`` first searches a channel permutation per layer
(:mod:`engine.sparsity.permute`) and applies it where that is safe, so pruning keeps more
magnitude; elsewhere the record says "permutation not applicable: <reason>".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.registry import Attrs
from engine.sparsity.check import (
    DEFAULT_MIN_CHANNELS,
    GROUP,
    check_model,
    constant_weight,
    ineligibility,
    reduction_matrix,
    weight_from_matrix,
)
from engine.sparsity.permute import permutation_blocker, permute_input_channels, search_permutation


def prune_2_4(matrix: np.ndarray) -> np.ndarray:
    """``matrix [rows, K]`` with the 2 smallest |w| of every group of 4 along K set to zero.

    Same dtype and shape; K must be a multiple of 4. Ties keep the lower index.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[1] % GROUP:
        raise ValueError(f"expected a [rows, K] matrix with K a multiple of 4, got {matrix.shape}")
    rows, width = matrix.shape
    magnitude = np.abs(matrix.astype(np.float64)).reshape(rows, width // GROUP, GROUP)
    order = np.argsort(-magnitude, axis=-1, kind="stable")  # largest first, lower index on ties
    keep = np.zeros(magnitude.shape, dtype=bool)
    np.put_along_axis(keep, order[..., : GROUP // 2], True, axis=-1)
    return np.where(keep.reshape(rows, width), matrix, np.zeros((), dtype=matrix.dtype))


def retained_magnitude(original: np.ndarray, pruned: np.ndarray) -> float:
    """sum |pruned| / sum |original| (1.0 when the original is all zeros)."""
    total = float(np.abs(np.asarray(original, dtype=np.float64)).sum())
    if total == 0.0:
        return 1.0
    return float(np.abs(np.asarray(pruned, dtype=np.float64)).sum()) / total


def prune_weight(
    weight: np.ndarray,
    op: str,
    attrs: Attrs | Mapping[str, Any] | None = None,
    permutation: np.ndarray | None = None,
) -> np.ndarray:
    """The weight of ``op`` pruned 2:4 along its reduction dimension, in its own layout.

    With ``permutation`` (of K), the reduction dimension is first reordered (column j becomes
    original column ``permutation[j]``) and the result keeps that order: the layer's input
    channels are then permuted, which is only correct when its input is permuted too (see
    :mod:`engine.sparsity.permute`).
    """
    weight = np.asarray(weight)
    matrix = reduction_matrix(weight, op, attrs)
    if permutation is not None:
        matrix = matrix[:, np.asarray(permutation)]
    return weight_from_matrix(prune_2_4(matrix), weight.shape, op, attrs).astype(weight.dtype)


@dataclass(frozen=True)
class PruneRecord:
    """What pruning did to one layer.

    ``retained_before_permutation``: fraction of |w| kept by plain 2:4 pruning;
    ``retained_after``: fraction kept by what was applied (with the permutation when
    ``permuted``). ``note`` explains why no permutation was applied ("" otherwise or when none
    was asked for).
    """

    name: str
    retained_before_permutation: float
    retained_after: float
    permuted: bool
    note: str = ""


def copy_model(model: ir.Model) -> ir.Model:
    """A deep copy of ``model`` (through its ONNX proto)."""
    return ir.from_proto(ir.to_proto(model))


def _targets(model: ir.Model, layers: Sequence[str] | None, min_channels: int) -> set[str]:
    """Names of the layers to prune: the eligible ones, or the named ones (which must have a
    constant weight, K a multiple of 4 and not be depthwise; small layers are allowed)."""
    reports = {report.name: report for report in check_model(model, min_channels)}
    if layers is None:
        return {name for name, report in reports.items() if report.eligible}
    chosen = set()
    for name in layers:
        report = reports.get(name)
        if report is None:
            raise ValueError(f"no Conv/Gemm/MatMul/ConvAct/GemmAct layer named {name!r}")
        if not report.eligible and not report.reason.startswith("too small"):
            raise ValueError(f"layer {name!r} cannot be pruned 2:4: {report.reason}")
        chosen.add(name)
    return chosen


def prune_model(
    model: ir.Model,
    layers: Sequence[str] | None = None,
    permute: bool = False,
    min_channels: int = DEFAULT_MIN_CHANNELS,
    seed: int = 0,
) -> tuple[ir.Model, list[PruneRecord]]:
    """A new model whose chosen layers are 2:4 pruned, and one record per pruned layer.

    ``layers``: node names (default: every layer :func:`check_model` finds eligible with
    ``min_channels``). ``permute``: search and apply channel permutations where safe. ``seed``
    drives the permutation search. The input model is not modified. A weight initializer shared
    by several nodes is pruned for all of them.
    """
    pruned_model = copy_model(model)
    targets = _targets(pruned_model, layers, min_channels)
    records = []
    for node in list(pruned_model.graph):
        if node.name not in targets:
            continue
        weight = constant_weight(node)
        attrs = Attrs.from_node(node)
        if weight is None or ineligibility(node, weight, min_channels=0):
            continue  # checked by _targets; the weight cannot have changed kind since
        matrix = reduction_matrix(weight, node.op_type, attrs)
        before = retained_magnitude(matrix, prune_2_4(matrix))
        permuted, note = False, ""
        if permute:
            blocker = permutation_blocker(node)
            if blocker:
                note = f"permutation not applicable: {blocker}"
            else:
                result = search_permutation(matrix, seed=seed)
                if result.is_identity:
                    note = "no channel permutation retains more magnitude"
                else:
                    permute_input_channels(node, result.permutation)
                    weight = constant_weight(node)
                    assert weight is not None
                    matrix = reduction_matrix(weight, node.op_type, attrs)
                    permuted = True
        pruned = prune_2_4(matrix)
        new_weight = weight_from_matrix(pruned, weight.shape, node.op_type, attrs)
        value = node.inputs[1]
        value.const_value = ir.Tensor(new_weight.astype(weight.dtype), name=value.name)
        records.append(
            PruneRecord(node.name or "", before, retained_magnitude(matrix, pruned), permuted, note)
        )
    return pruned_model, records


__all__ = [
    "PruneRecord",
    "copy_model",
    "prune_2_4",
    "prune_model",
    "prune_weight",
    "retained_magnitude",
]
