"""Detector post-processing: NonMaxSuppression."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.ops.common import declared_rule, spec
from engine.ops.registry import Attrs, KernelContext, OpCost, OpSpec, TensorSpec


def _corners(boxes: np.ndarray, center_point_box: int) -> np.ndarray:
    """Boxes as [y1, x1, y2, x2] with y1 <= y2 and x1 <= x2."""
    if center_point_box:
        x_center, y_center, width, height = np.moveaxis(boxes, -1, 0)
        return np.stack(
            [
                y_center - height / 2,
                x_center - width / 2,
                y_center + height / 2,
                x_center + width / 2,
            ],
            axis=-1,
        )
    y1, x1, y2, x2 = np.moveaxis(boxes, -1, 0)
    return np.stack(
        [np.minimum(y1, y2), np.minimum(x1, x2), np.maximum(y1, y2), np.maximum(x1, x2)], axis=-1
    )


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over union of one corner box with many."""
    top = np.maximum(box[0], others[:, 0])
    left = np.maximum(box[1], others[:, 1])
    bottom = np.minimum(box[2], others[:, 2])
    right = np.minimum(box[3], others[:, 3])
    intersection = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / union, 0.0)


def _scalar(inputs: list[Any], index: int, default: float) -> float:
    if len(inputs) > index and inputs[index] is not None and np.size(inputs[index]):
        return float(np.asarray(inputs[index]).reshape(-1)[0])
    return default


def _non_max_suppression(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Greedy per-class NMS; returns [selected, 3] rows of (batch, class, box index)."""
    boxes, scores = inputs[0], inputs[1]
    max_per_class = int(_scalar(inputs, 2, 0))
    iou_threshold = _scalar(inputs, 3, 0.0)
    score_threshold = _scalar(inputs, 4, -np.inf)
    corners = _corners(boxes.astype(np.float64), attrs.int("center_point_box", 0))
    selected: list[tuple[int, int, int]] = []
    if max_per_class > 0:
        for batch in range(scores.shape[0]):
            for klass in range(scores.shape[1]):
                class_scores = scores[batch, klass]
                order = np.argsort(-class_scores, kind="stable")
                order = order[class_scores[order] > score_threshold]
                kept: list[int] = []
                while order.size and len(kept) < max_per_class:
                    best = int(order[0])
                    kept.append(best)
                    rest = order[1:]
                    overlaps = _iou(corners[batch, best], corners[batch, rest])
                    order = rest[overlaps <= iou_threshold]
                selected.extend((batch, klass, index) for index in kept)
    return [np.array(selected, dtype=np.int64).reshape(-1, 3)]


def _nms_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    boxes = ins[0].numel() // 4 if ins[0].is_static else 0
    return OpCost(10 * boxes * max(boxes, 1), ins[0].nbytes() + ins[1].nbytes(), 0)


OPS: list[OpSpec] = [
    spec("NonMaxSuppression", _non_max_suppression, declared_rule, _nms_cost, "detection"),
]
