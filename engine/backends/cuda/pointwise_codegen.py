"""CUDA source for a ``gie::Pointwise`` node: its whole expression in one kernel.

The expression tree (see :mod:`engine.ops.gie_pointwise`) becomes one C expression over
per-element loads; every intermediate stays in registers. Each generated source has two entry
points with the same first arguments ``(x0, .., xN-1, y, n)``:

``<name>_contiguous(x0.., y, n)``
    every input has the output's shape and is contiguous (offset = element index);
``<name>_strided(x0.., y, n, layout)``
    NumPy broadcasting by strides: ``layout`` is an int64 array of ``RANK`` output dims, then
    ``RANK`` element strides per input (0 along a broadcast axis); see :func:`broadcast_layout`.

Math runs in float32 (float64 when an input is float64), loads widen fp16, the store rounds
once, as the reference kernel does. A grid-stride loop makes any launch shape correct.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from engine.ops.gie_pointwise import (
    Call,
    Expr,
    Input,
    Literal,
    format_expression,
    parse_expression,
)

#: Storage types the generator handles, by NumPy dtype.
STORAGE_TYPES: dict[np.dtype, str] = {
    np.dtype(np.float32): "float",
    np.dtype(np.float16): "gie_half",
    np.dtype(np.float64): "double",
    # Integer inputs are loaded as float (a Cast to float through the identity expression).
    np.dtype(np.int64): "long long",
    np.dtype(np.int32): "int",
    np.dtype(np.int8): "signed char",
    np.dtype(np.uint8): "unsigned char",
}
#: Storage types an output may have.
OUTPUT_TYPES = frozenset({np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)})

#: Ranks up to this are handled by the strided kernel (lower ranks pad with leading 1s).
MAX_RANK = 6


class UnsupportedPointwiseError(ValueError):
    """The node cannot be generated (the message is the user-facing reason)."""


@dataclass(frozen=True)
class PointwiseKernel:
    """Generated source for one expression / dtype / rank combination."""

    name: str
    source: str
    expression: str
    input_dtypes: tuple[str, ...]
    output_dtype: str
    rank: int

    @property
    def contiguous_entry(self) -> str:
        return f"{self.name}_contiguous"

    @property
    def strided_entry(self) -> str:
        return f"{self.name}_strided"


# --------------------------------------------------------------------------- expression -> C

# name: (float32 C, float64 C), with {0} {1} {2} for the arguments (each evaluated once
# because helpers take values).
_FUNCTIONS: dict[str, tuple[str, str]] = {
    "add": ("({0} + {1})", "({0} + {1})"),
    "sub": ("({0} - {1})", "({0} - {1})"),
    "mul": ("({0} * {1})", "({0} * {1})"),
    "div": ("({0} / {1})", "({0} / {1})"),
    "pow": ("powf({0}, {1})", "pow({0}, {1})"),
    "neg": ("(-{0})", "(-{0})"),
    "abs": ("fabsf({0})", "fabs({0})"),
    "sqrt": ("sqrtf({0})", "sqrt({0})"),
    "exp": ("expf({0})", "exp({0})"),
    "log": ("logf({0})", "log({0})"),
    "erf": ("erff({0})", "erf({0})"),
    "tanh": ("tanhf({0})", "tanh({0})"),
    "sigmoid": ("gie_pw_sigmoid({0})", "gie_pw_sigmoid({0})"),
    "relu": ("gie_pw_relu({0})", "gie_pw_relu({0})"),
    "reciprocal": ("(1.0f / {0})", "(1.0 / {0})"),
    "softplus": ("gie_pw_softplus({0})", "gie_pw_softplus({0})"),
    "hard_swish": ("gie_pw_hard_swish({0})", "gie_pw_hard_swish({0})"),
    "leaky_relu": ("gie_pw_leaky_relu({0}, {1})", "gie_pw_leaky_relu({0}, {1})"),
    "clip": ("gie_pw_clip({0}, {1}, {2})", "gie_pw_clip({0}, {1}, {2})"),
    "hard_sigmoid": ("gie_pw_hard_sigmoid({0}, {1}, {2})", "gie_pw_hard_sigmoid({0}, {1}, {2})"),
}


def _literal(value: float, wide: bool) -> str:
    if math.isnan(value):
        return "(0.0 / 0.0)" if wide else "(0.0f / 0.0f)"
    if math.isinf(value):
        big = "(1.0 / 0.0)" if wide else "(1.0f / 0.0f)"
        return big if value > 0 else f"(-{big})"
    if wide:
        return f"({value!r})"
    single = float(np.float32(value))
    if math.isinf(single):  # beyond float32: what the reference gets when it rounds the literal
        return "(1.0f / 0.0f)" if single > 0 else "(-(1.0f / 0.0f))"
    return f"({np.format_float_scientific(np.float32(value), unique=True)}f)"


def expression_to_c(tree: Expr, wide: bool = False) -> str:
    """One C expression for the tree; inputs are the locals ``v0, v1, ...``."""
    if isinstance(tree, Input):
        return f"v{tree.index}"
    if isinstance(tree, Literal):
        return _literal(tree.value, wide)
    assert isinstance(tree, Call)
    args = [expression_to_c(a, wide) for a in tree.args]
    if tree.op in ("max", "min"):
        result = args[0]
        for other in args[1:]:
            result = f"gie_pw_{tree.op}({result}, {other})"
        return result
    template = _FUNCTIONS[tree.op][1 if wide else 0]
    return template.format(*args)


# --------------------------------------------------------------------------- source


def _storage(dtype: np.dtype | str | None, output: bool = False) -> str:
    resolved = np.dtype(dtype if dtype is not None else np.float32)
    if resolved not in STORAGE_TYPES or (output and resolved not in OUTPUT_TYPES):
        allowed = "float32, float16, float64" + (
            "" if output else "; inputs also int64/32/8, uint8"
        )
        raise UnsupportedPointwiseError(
            f"no CUDA pointwise kernel for {'output ' if output else ''}dtype {resolved} "
            f"({allowed})"
        )
    return STORAGE_TYPES[resolved]


def generate(
    expression: str | Expr,
    input_dtypes: Sequence[np.dtype | str | None],
    output_dtype: np.dtype | str | None = None,
    rank: int | None = None,
) -> PointwiseKernel:
    """The kernel for ``expression`` over inputs of ``input_dtypes``.

    ``output_dtype`` defaults to input 0's; ``rank`` (the output's) defaults to
    :data:`MAX_RANK`, which serves every lower rank too.
    """
    tree = parse_expression(expression) if isinstance(expression, str) else expression
    text = format_expression(tree)
    in_types = [_storage(d) for d in input_dtypes]
    out_type = _storage(
        output_dtype if output_dtype is not None else (input_dtypes[0] if input_dtypes else None),
        output=True,
    )
    rank = MAX_RANK if rank is None else max(1, int(rank))
    if rank > MAX_RANK:
        raise UnsupportedPointwiseError(f"rank {rank} exceeds the pointwise maximum {MAX_RANK}")
    wide = "double" in in_types
    compute = "double" if wide else "float"
    body = expression_to_c(tree, wide)
    digest = hashlib.sha256(f"{text}|{in_types}|{out_type}|{rank}".encode()).hexdigest()[:12]
    name = f"gie_pointwise_{digest}"
    params = ", ".join(f"const {t}* __restrict__ x{i}" for i, t in enumerate(in_types))
    params = f"{params}, " if params else ""
    loads_contiguous = "\n".join(
        f"        const {compute} v{i} = gie_pw_load(x{i} + i);" for i in range(len(in_types))
    )
    offsets = "\n".join(f"        long long o{i} = 0;" for i in range(len(in_types)))
    accumulate = "\n".join(
        f"            o{i} += index * layout[{rank} * {i + 1} + d];" for i in range(len(in_types))
    )
    loads_strided = "\n".join(
        f"        const {compute} v{i} = gie_pw_load(x{i} + o{i});" for i in range(len(in_types))
    )
    source = f"""// Generated by engine/backends/cuda/pointwise_codegen.py for gie::Pointwise
// expression: {text}
// inputs: {", ".join(in_types) or "none"}; output: {out_type}; rank {rank}
#include "gie_pointwise.cuh"

extern "C" __global__ void {name}_contiguous({params}{out_type}* __restrict__ y, long long n) {{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {{
{loads_contiguous}
        gie_pw_store(y + i, {body});
    }}
}}

extern "C" __global__ void {name}_strided({params}{out_type}* __restrict__ y, long long n,
                                          const long long* __restrict__ layout) {{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {{
{offsets}
        long long rest = i;
        for (int d = {rank} - 1; d >= 0; --d) {{
            const long long index = rest % layout[d];
            rest /= layout[d];
{accumulate}
        }}
{loads_strided}
        gie_pw_store(y + i, {body});
    }}
}}
"""
    return PointwiseKernel(
        name,
        source,
        text,
        tuple(np.dtype(d if d is not None else np.float32).name for d in input_dtypes),
        np.dtype(
            output_dtype
            if output_dtype is not None
            else (input_dtypes[0] if input_dtypes and input_dtypes[0] is not None else np.float32)
        ).name,
        rank,
    )


def broadcast_layout(
    output_shape: Sequence[int], input_shapes: Sequence[Sequence[int]], rank: int | None = None
) -> np.ndarray:
    """The strided kernel's ``layout``: ``rank`` output dims, then per input ``rank`` element
    strides of a contiguous array broadcast to the output (0 on broadcast axes)."""
    rank = rank if rank is not None else MAX_RANK
    if len(output_shape) > rank:
        raise UnsupportedPointwiseError(f"output rank {len(output_shape)} exceeds {rank}")
    dims = [1] * (rank - len(output_shape)) + [int(d) for d in output_shape]
    layout = list(dims)
    for shape in input_shapes:
        padded = [1] * (rank - len(shape)) + [int(d) for d in shape]
        strides = [0] * rank
        step = 1
        for axis in range(rank - 1, -1, -1):
            if padded[axis] != 1:
                if padded[axis] != dims[axis]:
                    raise UnsupportedPointwiseError(
                        f"input shape {tuple(shape)} does not broadcast to {tuple(output_shape)}"
                    )
                strides[axis] = step
            step *= padded[axis]
        layout += strides
    return np.asarray(layout, dtype=np.int64)


# --------------------------------------------------------------------------- from a node


def _dtype(value: ir.Value | None) -> np.dtype | None:
    if value is None or value.dtype is None:
        return None
    try:
        return value.dtype.numpy()
    except (TypeError, ValueError):
        return None


def kernel_for_node(node: ir.Node) -> PointwiseKernel:
    """The kernel for a ``gie::Pointwise`` node (its expression, input/output dtypes, rank)."""
    attribute = node.attributes.get("expression")
    if attribute is None:
        raise UnsupportedPointwiseError(f"{node.name}: gie::Pointwise without an expression")
    output = node.outputs[0]
    shape = output.shape
    rank = len(shape) if shape is not None else None
    in_dtypes = [_dtype(v) for v in node.inputs]
    out_dtype = _dtype(output) or (in_dtypes[0] if in_dtypes else None)
    return generate(attribute.as_string(), in_dtypes, out_dtype, rank)
