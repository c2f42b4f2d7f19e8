"""Reduced precisions on the NumPy backend: exact emulation around the float32 kernels.

fp16 layers store float16 and compute in float32 (what tensor-core kernels with float32
accumulation do, and what keeps softmax, layer norm and mean reductions accurate): their
float16 inputs are widened to float32, the layer's kernel runs, and every output the plan
declares float16 is rounded to float16 (round to nearest even, as ``astype`` does).

tf32 layers (convolutions and matrix products only) round their float32 inputs to a 10-bit
mantissa (:func:`engine.quantize.numerics.round_to_tf32`), then compute in float32: the same
products a tensor core in TF32 mode forms, accumulated in float32.

int8 layers need no wrapper: their ops (engine.ops.gie_quant) are exact by construction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from engine.build.plan import Layer
from engine.config import Precision
from engine.ops.registry import Attrs, Kernel, KernelContext
from engine.quantize.numerics import round_to_tf32


def _fp16_kernel(kernel: Kernel, layer: Layer) -> Kernel:
    narrow = [
        spec is not None and spec.dtype == ir.DataType.FLOAT16
        for spec in layer.context.declared_outputs
    ]

    def run(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        wide = [
            x.astype(np.float32) if isinstance(x, np.ndarray) and x.dtype == np.float16 else x
            for x in inputs
        ]
        results = list(kernel(wide, attrs, ctx))
        return [
            r.astype(np.float16)
            if index < len(narrow) and narrow[index] and isinstance(r, np.ndarray)
            else r
            for index, r in enumerate(results)
        ]

    return run


def _tf32_kernel(kernel: Kernel) -> Kernel:
    def run(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        rounded = [
            round_to_tf32(x) if isinstance(x, np.ndarray) and x.dtype == np.float32 else x
            for x in inputs
        ]
        return kernel(rounded, attrs, ctx)

    return run


def emulate_precision(kernel: Kernel, layer: Layer) -> Kernel:
    """``kernel`` wrapped to compute as ``layer.precision`` says (unchanged for fp32/int8 and
    for conversion layers)."""
    if layer.role != "compute":
        return kernel
    if layer.precision == Precision.FP16:
        return _fp16_kernel(kernel, layer)
    if layer.precision == Precision.TF32:
        return _tf32_kernel(kernel)
    return kernel


__all__ = ["emulate_precision"]
