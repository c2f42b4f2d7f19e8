"""Fused CNN/linear layers of the engine: gie::ConvAct and gie::GemmAct.

Both compute ``y = producer(inputs)`` (a convolution, a Gemm or a batched MatMul plus bias),
then an epilogue made of an optional residual add and an optional activation, in one kernel:
the intermediate ``y`` is never written to memory.

gie::ConvAct(X, W, [B], [Residual])
    Conv attributes ``group``, ``strides``, ``pads``, ``dilations``, ``kernel_shape`` (pads are
    explicit: the fusion resolves ``auto_pad``), plus the epilogue attributes below.
gie::GemmAct(A, B, [C], [Residual])
    ``kind`` = "Gemm" (default; ``transA``, ``transB``, ``alpha``, ``beta`` with Gemm meaning)
    or "MatMul" (NumPy batched matmul, then ``C`` broadcast on the last axis as a bias), plus
    the epilogue attributes below.

Epilogue attributes (shared)
    ``activation``: one of :data:`ACTIVATIONS` ("" = none). ``activation_alpha`` (LeakyRelu
    slope, default 0.01; not ``alpha``, which is Gemm's scale), ``min``/``max`` (Clip bounds;
    ``Relu6`` means Clip(0, 6)).
    ``residual_before_activation``: 1 (default) computes ``act(y + residual)`` (the ResNet form),
    0 computes ``act(y) + residual``. Without a residual input it has no effect.

The reference kernels reuse the Conv/Gemm/MatMul kernels and the activation functions, and
round every stage to the input dtype exactly as the unfused graph does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.ops.activation import _gelu, _hard_swish, _leaky_relu, _relu, _sigmoid, _tanh
from engine.ops.common import _bytes, _numel
from engine.ops.conv import _conv, _conv_cost, _conv_shape
from engine.ops.linalg import (
    _gemm,
    _gemm_cost,
    _gemm_shape,
    _matmul,
    _matmul_cost,
    _matmul_shape,
)
from engine.ops.registry import (
    GIE_DOMAIN,
    Attrs,
    KernelContext,
    KernelError,
    OpCost,
    OpSpec,
    TensorSpec,
)

#: Activation names the epilogue understands, with their FLOPs per output element.
ACTIVATION_FLOPS: dict[str, int] = {
    "": 0,
    "Relu": 1,
    "Clip": 2,
    "Relu6": 2,
    "Sigmoid": 8,
    "SiLU": 9,
    "HardSwish": 4,
    "LeakyRelu": 2,
    "GELU": 16,
    "GELU_tanh": 16,
    "Tanh": 8,
}
ACTIVATIONS: tuple[str, ...] = tuple(ACTIVATION_FLOPS)


def activation_name(attrs: Attrs) -> str:
    """The node's activation, checked against :data:`ACTIVATIONS`."""
    name = attrs.str("activation", "") or ""
    if name not in ACTIVATION_FLOPS:
        raise KernelError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return name


def apply_activation(y: np.ndarray, attrs: Attrs) -> np.ndarray:
    """The epilogue activation of ``attrs`` applied to ``y`` (result in y's dtype)."""
    name = activation_name(attrs)
    if name == "":
        return y
    if name == "Relu":
        result = _relu(y, attrs)
    elif name in ("Clip", "Relu6"):
        low = attrs.float("min", 0.0 if name == "Relu6" else float(np.finfo(np.float32).min))
        high = attrs.float("max", 6.0 if name == "Relu6" else float(np.finfo(np.float32).max))
        result = np.minimum(np.maximum(y, y.dtype.type(low)), y.dtype.type(high))
    elif name == "Sigmoid":
        result = _sigmoid(y, attrs)
    elif name == "SiLU":
        result = y * np.asarray(_sigmoid(y, attrs)).astype(y.dtype, copy=False)
    elif name == "HardSwish":
        result = _hard_swish(y, attrs)
    elif name == "LeakyRelu":
        result = _leaky_relu(y, Attrs({"alpha": attrs.float("activation_alpha", 0.01)}))
    elif name == "GELU":
        result = _gelu(y, Attrs({"approximate": "none"}))
    elif name == "GELU_tanh":
        result = _gelu(y, Attrs({"approximate": "tanh"}))
    else:  # Tanh
        result = _tanh(y, attrs)
    return np.asarray(result).astype(y.dtype, copy=False)


def apply_epilogue(y: np.ndarray, residual: np.ndarray | None, attrs: Attrs) -> np.ndarray:
    """Residual add and activation in the order ``residual_before_activation`` says."""
    if residual is None:
        return apply_activation(y, attrs)
    residual = residual.astype(y.dtype, copy=False)
    if attrs.int("residual_before_activation", 1):
        return apply_activation(y + residual, attrs)
    return apply_activation(y, attrs) + residual


def _optional(inputs: list[Any], index: int) -> Any:
    return inputs[index] if len(inputs) > index else None


def _epilogue_flops(out: TensorSpec, attrs: Attrs, residual: bool) -> int:
    """FLOPs of the epilogue: activation plus one add per element for a residual."""
    per_element = ACTIVATION_FLOPS.get(attrs.str("activation", "") or "", 0) + int(residual)
    return per_element * _numel(out)


# --------------------------------------------------------------------------- ConvAct


def _conv_act(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """act(conv(X, W) + B [+ Residual]) or act(conv(X, W) + B) + Residual."""
    x, w, bias, residual = inputs[0], inputs[1], _optional(inputs, 2), _optional(inputs, 3)
    conv_inputs = [x, w] if bias is None else [x, w, bias]
    y = _conv(conv_inputs, attrs, ctx)[0]
    return [apply_epilogue(y, residual, attrs)]


def _conv_act_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """The Conv output shape (the residual must broadcast to it without growing it)."""
    return _conv_shape(specs[:2], attrs, ctx)


def _conv_act_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """Conv FLOPs (as Conv counts them) plus the epilogue's; bytes: inputs and output only."""
    conv = _conv_cost(ins[:2], outs, attrs)
    residual = len(ins) > 3 and ins[3] is not None
    flops = conv.flops + _epilogue_flops(outs[0], attrs, residual)
    return OpCost(flops, _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- GemmAct


def _is_matmul(attrs: Attrs) -> bool:
    kind = attrs.str("kind", "Gemm") or "Gemm"
    if kind not in ("Gemm", "MatMul"):
        raise KernelError(f"GemmAct kind must be 'Gemm' or 'MatMul', not {kind!r}")
    return kind == "MatMul"


def _gemm_act(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """Gemm (alpha*op(A)@op(B) + beta*C) or MatMul (A@B + C), then the epilogue."""
    a, b, c, residual = inputs[0], inputs[1], _optional(inputs, 2), _optional(inputs, 3)
    if _is_matmul(attrs):
        y = _matmul([a, b], attrs, ctx)[0]
        if c is not None:
            y = y + c.astype(y.dtype, copy=False)
    else:
        y = _gemm([a, b] if c is None else [a, b, c], attrs, ctx)[0]
    return [apply_epilogue(y, residual, attrs)]


def _gemm_act_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """(M, N) for kind Gemm, the batched matmul shape for kind MatMul."""
    if _is_matmul(attrs):
        return _matmul_shape(specs[:2], attrs, ctx)
    return _gemm_shape(specs[:2], attrs, ctx)


def _gemm_act_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """2*K FLOPs per output (plus the bias add) and the epilogue; bytes: inputs and output."""
    core = _matmul_cost if _is_matmul(attrs) else _gemm_cost
    flops = core(ins[:2], outs, attrs).flops
    if _is_matmul(attrs) and len(ins) > 2 and ins[2] is not None:
        flops += _numel(outs[0])
    residual = len(ins) > 3 and ins[3] is not None
    flops += _epilogue_flops(outs[0], attrs, residual)
    return OpCost(flops, _bytes(ins), _bytes(outs))


OPS: list[OpSpec] = [
    OpSpec("ConvAct", _conv_act, _conv_act_shape, _conv_act_cost, domain=GIE_DOMAIN, family="conv"),
    OpSpec(
        "GemmAct", _gemm_act, _gemm_act_shape, _gemm_act_cost, domain=GIE_DOMAIN, family="linalg"
    ),
]

__all__ = ["ACTIVATIONS", "OPS", "activation_name", "apply_activation", "apply_epilogue"]
