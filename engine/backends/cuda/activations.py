"""Epilogue activation codes shared with the kernels (``GIE_ACT_*`` in gie_prelude.cuh).

:func:`activation_arguments` turns a fused node's epilogue attributes (``activation``,
``activation_alpha``, ``min``/``max``; see :mod:`engine.ops.gie_fused`) into the
``(activation, alpha, beta)`` triple every epilogue kernel takes.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from engine.ops.registry import Attrs


class Activation(IntEnum):
    """The kernels' activation codes (keep equal to the GIE_ACT_* macros)."""

    NONE = 0
    RELU = 1
    GELU_ERF = 2
    GELU_TANH = 3
    SIGMOID = 4
    TANH = 5
    SILU = 6
    LEAKY_RELU = 7
    CLIP = 8
    HARD_SWISH = 9


#: gie epilogue activation name -> code.
BY_NAME: dict[str, Activation] = {
    "": Activation.NONE,
    "Relu": Activation.RELU,
    "GELU": Activation.GELU_ERF,
    "GELU_tanh": Activation.GELU_TANH,
    "Sigmoid": Activation.SIGMOID,
    "Tanh": Activation.TANH,
    "SiLU": Activation.SILU,
    "LeakyRelu": Activation.LEAKY_RELU,
    "Clip": Activation.CLIP,
    "Relu6": Activation.CLIP,
    "HardSwish": Activation.HARD_SWISH,
}

_FLOAT_MAX = float(np.finfo(np.float32).max)


def activation_arguments(attrs: Attrs) -> tuple[int, float, float]:
    """``(code, alpha, beta)`` for the epilogue of a gie::ConvAct / gie::GemmAct node."""
    name = attrs.str("activation", "") or ""
    if name not in BY_NAME:
        raise ValueError(f"no CUDA epilogue for activation {name!r}; known: {sorted(BY_NAME)}")
    code = BY_NAME[name]
    if name == "LeakyRelu":
        return int(code), attrs.float("activation_alpha", 0.01), 0.0
    if name == "Relu6":
        return int(code), attrs.float("min", 0.0), attrs.float("max", 6.0)
    if name == "Clip":
        return int(code), attrs.float("min", -_FLOAT_MAX), attrs.float("max", _FLOAT_MAX)
    return int(code), 0.0, 0.0
