"""Optimizer steps of the ai.onnx.preview.training domain: Momentum, Adagrad and Adam.

Every node takes a scalar learning rate ``R``, a scalar int64 update count ``T``, then ``n``
tensors to optimize followed by their gradients and their optimizer states, each group of ``n``
in the same order: ``X_1..X_n, G_1..G_n, S_1..S_n[, S'_1..S'_n]``. The outputs are the updated
tensors then the updated states, in the same layout. Each tensor is updated independently.

Updates are computed in float64 and returned in each tensor's own dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from engine.ops.common import elementwise_cost
from engine.ops.registry import Attrs, KernelContext, KernelError, OpSpec, TensorSpec

TRAINING_DOMAIN = "ai.onnx.preview.training"

#: One tensor's step: (r, t, x, g, states, attrs) -> (x_new, *states_new), all float64.
Step = Callable[[float, int, np.ndarray, np.ndarray, list[np.ndarray], Attrs], list[np.ndarray]]


def _momentum_step(
    r: float, t: int, x: np.ndarray, g: np.ndarray, states: list[np.ndarray], attrs: Attrs
) -> list[np.ndarray]:
    """SGD with momentum; ``nesterov`` mode steps along the gradient plus the look-ahead."""
    mode = attrs.str("mode")
    if mode not in ("standard", "nesterov"):
        raise KernelError(f"Momentum mode must be 'standard' or 'nesterov', got {mode!r}")
    alpha, beta = attrs.float("alpha"), attrs.float("beta")
    g_reg = attrs.float("norm_coefficient") * x + g
    # The first step (T == 0) takes the whole gradient, whatever beta is.
    v_new = alpha * states[0] + (beta if t > 0 else 1.0) * g_reg
    direction = v_new if mode == "standard" else g_reg + alpha * v_new
    return [x - r * direction, v_new]


def _adagrad_step(
    r: float, t: int, x: np.ndarray, g: np.ndarray, states: list[np.ndarray], attrs: Attrs
) -> list[np.ndarray]:
    """ADAGRAD: per-coordinate rate from the accumulated squared gradient, decayed by T."""
    rate = r / (1 + t * attrs.float("decay_factor", 0.0))
    g_reg = attrs.float("norm_coefficient", 0.0) * x + g
    h_new = states[0] + g_reg * g_reg
    x_new = x - rate * g_reg / (np.sqrt(h_new) + attrs.float("epsilon", 1e-6))
    return [x_new, h_new]


def _adam_step(
    r: float, t: int, x: np.ndarray, g: np.ndarray, states: list[np.ndarray], attrs: Attrs
) -> list[np.ndarray]:
    """Adam with bias correction for T > 0 and optional post-update weight decay."""
    alpha, beta = attrs.float("alpha", 0.9), attrs.float("beta", 0.999)
    g_reg = attrs.float("norm_coefficient", 0.0) * x + g
    v_new = alpha * states[0] + (1 - alpha) * g_reg
    h_new = beta * states[1] + (1 - beta) * g_reg * g_reg
    rate = r * np.sqrt(1 - beta**t) / (1 - alpha**t) if t > 0 else r
    x_new = x - rate * v_new / (np.sqrt(h_new) + attrs.float("epsilon", 1e-6))
    x_final = (1 - attrs.float("norm_coefficient_post", 0.0)) * x_new
    return [x_final, v_new, h_new]


def _scalar(value: Any, name: str, op_type: str) -> np.ndarray:
    array = np.asarray(value)
    if array.size != 1:
        raise KernelError(f"{op_type} input {name} must be a scalar, got shape {array.shape}")
    return array.reshape(())


def _optimizer(op_type: str, step: Step, states: int) -> Callable[..., list[Any]]:
    """Kernel applying ``step`` to each of the node's tensors (with ``states`` states each)."""
    group = 2 + states  # X, G and the states

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        if len(inputs) < 2 + group or (len(inputs) - 2) % group:
            raise KernelError(
                f"{op_type} takes R, T and {group} inputs per optimized tensor "
                f"(X, G and {states} state(s)); got {len(inputs)} inputs"
            )
        r = float(_scalar(inputs[0], "R", op_type))
        t = int(_scalar(inputs[1], "T", op_type))
        count = (len(inputs) - 2) // group
        columns = [inputs[2 + k * count : 2 + (k + 1) * count] for k in range(group)]
        results: list[list[np.ndarray]] = [[] for _ in range(1 + states)]
        for x, g, *state in zip(*columns):
            as_float = [np.asarray(v, dtype=np.float64) for v in state]
            updated = step(
                r, t, np.asarray(x, np.float64), np.asarray(g, np.float64), as_float, attrs
            )
            for slot, (value, like) in enumerate(zip(updated, [x, *state])):
                results[slot].append(np.asarray(value).astype(like.dtype, copy=False))
        return [value for slot in results for value in slot]

    return kernel


def _optimizer_rule(states: int) -> Callable[..., list[TensorSpec]]:
    """Output k is shaped and typed like the input it updates: X_k, then each state."""

    def rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        count = (len(specs) - 2) // (2 + states)
        sources = list(range(2, 2 + count))
        for slot in range(states):
            first = 2 + (2 + slot) * count
            sources.extend(range(first, first + count))
        return [TensorSpec(specs[i].shape, specs[i].dtype) for i in sources]

    return rule


OPS: list[OpSpec] = [
    OpSpec(
        "Momentum",
        _optimizer("Momentum", _momentum_step, 1),
        _optimizer_rule(1),
        elementwise_cost(4),
        domain=TRAINING_DOMAIN,
        family="training",
    ),
    OpSpec(
        "Adagrad",
        _optimizer("Adagrad", _adagrad_step, 1),
        _optimizer_rule(1),
        elementwise_cost(5),
        domain=TRAINING_DOMAIN,
        family="training",
    ),
    OpSpec(
        "Adam",
        _optimizer("Adam", _adam_step, 2),
        _optimizer_rule(2),
        elementwise_cost(6),
        domain=TRAINING_DOMAIN,
        family="training",
    ),
]
