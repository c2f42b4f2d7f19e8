"""Building blocks of decoder-only LLMs that have their own ONNX ops: SwiGLU, TensorScatter.

(Attention and RotaryEmbedding live with the other matrix ops in ``linalg``.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

from engine.ops.common import elementwise_cost, movement_cost, same_as_input, spec
from engine.ops.registry import Attrs, KernelContext, KernelError, OpSpec


def _swiglu(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Y = A * sigmoid(alpha * A) * B (Swish-gated linear unit; A and B of equal shape)."""
    gate, value = inputs
    if gate.shape != value.shape:
        raise KernelError(f"SwiGLU needs equal shapes, got {gate.shape} and {value.shape}")
    alpha = attrs.float("alpha", 1.0)
    wide = gate.astype(np.float32) if gate.dtype.itemsize < 4 else gate
    return [(wide * special.expit(alpha * wide) * value).astype(gate.dtype)]


def _tensor_scatter(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Write ``update`` into a copy of the KV cache at per-batch sequence offsets."""
    past, update = inputs[0], inputs[1]
    write_indices = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    axis = attrs.int("axis", -2) % past.ndim
    if axis == 0:
        raise KernelError("TensorScatter axis must not be the batch axis")
    circular = (attrs.str("mode", "linear") or "linear") == "circular"
    capacity = past.shape[axis]
    length = update.shape[axis]
    present = past.copy()
    starts = np.zeros(past.shape[0], np.int64) if write_indices is None else write_indices
    for batch in range(past.shape[0]):
        positions = int(starts[batch]) + np.arange(length)
        if circular:
            positions %= capacity
        elif positions.size and positions[-1] >= capacity:
            raise KernelError(
                f"batch {batch}: writing {length} steps at {int(starts[batch])} overflows the "
                f"cache length {capacity}"
            )
        target = np.moveaxis(present[batch], axis - 1, 0)
        target[positions] = np.moveaxis(update[batch], axis - 1, 0)
    return [present]


OPS: list[OpSpec] = [
    spec("SwiGLU", _swiglu, same_as_input(0), elementwise_cost(10), "activation"),
    spec("TensorScatter", _tensor_scatter, same_as_input(0), movement_cost, "indexing"),
]
