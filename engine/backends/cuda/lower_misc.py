"""Lowerings of the elementwise, reformat, normalization and reshape tactics.

Elementwise kernels (generated pointwise, bias + activation, casts, int8 (de)quantization)
follow the layout their first input is stored in when every input has the output's shape, so
they never force a layout conversion inside an NHWC chain; with broadcasting they run the
generated strided kernel in plain layout. Softmax and the normalizations reduce the last axis
of a plain row-major tensor. Reshape-like ops are a device copy (none when the memory plan put
the output in its input's slot).

Also here: the catalogue additions of this module (:data:`TACTICS`): a generated kernel for a
single standard elementwise op (Add, Mul, Relu, ...; the pointwise fusion leaves some alone),
and the copy tactic of reshape-like ops.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from engine.backends.cuda.activations import Activation
from engine.backends.cuda.launch_plan import DeviceBuffer
from engine.backends.cuda.lower_conv import stride_grid
from engine.backends.cuda.lowering import LowerContext, LowerFunction, LoweringError
from engine.backends.cuda.pointwise_codegen import (
    PointwiseKernel,
    UnsupportedPointwiseError,
    broadcast_layout,
    generate,
    kernel_for_node,
)
from engine.backends.cuda.tactic_checks import static_shape
from engine.backends.cuda.tactics import ANY_PRECISION, CATALOGUE, FLOATS, CudaTactic
from engine.build.plan import Layer, Plan
from engine.ops.gie_pointwise import Call, Expr, Input, Literal
from engine.passes.pointwise import SIMPLE_FUNCTIONS

RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
#: Ops a generated kernel runs alone: the pointwise pass's elementwise ops, LeakyRelu, GELU.
ELEMENTWISE_OPS = frozenset({*SIMPLE_FUNCTIONS, "LeakyRelu", "gie::Gelu"})
_FLOAT_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)})


def single_op_expression(layer: Layer) -> Expr:
    """The pointwise expression of one standard elementwise layer."""
    args: tuple[Expr, ...] = tuple(Input(i) for i, name in enumerate(layer.inputs) if name)
    if layer.op_type in SIMPLE_FUNCTIONS and not layer.domain:
        return Call(SIMPLE_FUNCTIONS[layer.op_type], args)
    if layer.op_type == "LeakyRelu":
        return Call("leaky_relu", (Input(0), Literal(layer.attrs.float("alpha", 0.01))))
    if layer.qualified_op == "gie::Gelu":
        x = Input(0)
        if layer.attrs.str("approximate", "none") == "tanh":
            cube = Call("mul", (x, Call("mul", (x, x))))
            inner = Call("add", (x, Call("mul", (Literal(0.044715), cube))))
            scaled = Call("mul", (Literal(math.sqrt(2 / math.pi)), inner))
            gate = Call("add", (Literal(1.0), Call("tanh", (scaled,))))
        else:
            gate = Call(
                "add", (Literal(1.0), Call("erf", (Call("div", (x, Literal(math.sqrt(2)))),)))
            )
        return Call("mul", (Call("mul", (Literal(0.5), x)), gate))
    raise UnsupportedPointwiseError(f"{layer.qualified_op} is not an elementwise op")


def _dtypes(layer: Layer, plan: Plan) -> list[np.dtype | None]:
    out = []
    for name in layer.inputs:
        spec = plan.specs.get(name)
        out.append(None if spec is None or spec.dtype is None else np.dtype(spec.dtype.numpy()))
    return out


def elementwise_check(layer: Layer, plan: Plan) -> str | None:
    """A single elementwise op on float tensors of static shapes that broadcast."""
    dtypes = _dtypes(layer, plan)
    if any(d not in _FLOAT_DTYPES for d in dtypes):
        return f"inputs {[str(d) for d in dtypes]}: generated kernels compute float tensors"
    out = static_shape(plan, layer.outputs[0])
    if out is None or len(out) > 6:
        return "the output shape is not static (or rank > 6)"
    try:
        single_op_expression(layer)
    except UnsupportedPointwiseError as error:
        return str(error)
    return None


def _kernel(ctx: LowerContext) -> PointwiseKernel:
    rank = max(1, len(ctx.output_shape(0)))
    dtypes = [ctx.input_dtype(i) for i in range(len(ctx.layer.inputs)) if ctx.has_input(i)]
    if ctx.layer.qualified_op == "gie::Pointwise":
        node_kernel = kernel_for_node(ctx.layer.node)
        return generate(node_kernel.expression, dtypes, ctx.output_dtype(0), rank)
    return generate(single_op_expression(ctx.layer), dtypes, ctx.output_dtype(0), rank)


def follow_layout(ctx: LowerContext) -> str:
    """The layout an elementwise layer runs in: its first non-constant input's, when every
    input has the output's shape; plain otherwise."""
    out = ctx.output_shape(0)
    present = [i for i in range(len(ctx.layer.inputs)) if ctx.has_input(i)]
    if len(out) != 4 or any(ctx.input_shape(i) != out for i in present):
        return "plain"
    for i in present:
        if ctx.constant(i) is None:
            return ctx.stored_layout(i)
    return "plain"


def lower_pointwise(ctx: LowerContext) -> None:
    """A generated kernel: contiguous when no input broadcasts, strided otherwise."""
    kernel = _kernel(ctx)
    out_shape = ctx.output_shape(0)
    present = [i for i in range(len(ctx.layer.inputs)) if ctx.has_input(i)]
    total = math.prod(out_shape)
    if all(ctx.input_shape(i) == out_shape for i in present):
        layout = follow_layout(ctx)
        inputs = [ctx.input(i, layout) for i in present]
        y = ctx.output(0, layout)
        ctx.launch(
            None, kernel.contiguous_entry, stride_grid(total), (256,), (*inputs, y, total),
            text=kernel.source,
        )  # fmt: skip
        return
    shapes = [ctx.input_shape(i) for i in present]
    layout = broadcast_layout(out_shape, shapes, kernel.rank)
    table = ctx.weight(f"layout:{ctx.layer.name}:{out_shape}:{shapes}", layout)
    inputs = [ctx.input(i) for i in present]
    y = ctx.output(0)
    ctx.launch(
        None, kernel.strided_entry, stride_grid(total), (256,), (*inputs, y, total, table),
        text=kernel.source,
    )  # fmt: skip


def _activation(layer: Layer) -> tuple[int, float, float]:
    op = layer.qualified_op
    if op == "Relu":
        return int(Activation.RELU), 0.0, 0.0
    if op == "Sigmoid":
        return int(Activation.SIGMOID), 0.0, 0.0
    if op == "Tanh":
        return int(Activation.TANH), 0.0, 0.0
    if op == "LeakyRelu":
        return int(Activation.LEAKY_RELU), layer.attrs.float("alpha", 0.01), 0.0
    if op == "gie::Gelu":
        tanh = layer.attrs.str("approximate", "none") == "tanh"
        return int(Activation.GELU_TANH if tanh else Activation.GELU_ERF), 0.0, 0.0
    raise LoweringError(f"no epilogue activation for {op}")


def cast_check(layer: Layer, plan: Plan) -> str | None:
    """Cast from a numeric type to a float type, through the generated identity kernel."""
    from engine.backends.cuda.pointwise_codegen import OUTPUT_TYPES, STORAGE_TYPES

    source, target = _dtypes(layer, plan)[0], ir.DataType(layer.attrs.int("to", 0))
    try:
        wanted = np.dtype(target.numpy())
    except (TypeError, ValueError):
        return f"casts to {target.name}"
    if source not in STORAGE_TYPES or wanted not in OUTPUT_TYPES:
        return f"casts {source} to {wanted}: generated casts go from numeric to float types"
    if static_shape(plan, layer.outputs[0]) is None:
        return "the output shape is not static"
    return None


def lower_cast(ctx: LowerContext) -> None:
    """Cast as the generated identity kernel (integer loads convert, the store rounds)."""
    rank = max(1, len(ctx.output_shape(0)))
    kernel = generate("x0", [ctx.input_dtype(0)], ctx.output_dtype(0), rank)
    layout = follow_layout(ctx)
    x, y = ctx.input(0, layout), ctx.output(0, layout)
    total = math.prod(ctx.output_shape(0))
    args = (x, y, total)
    ctx.launch(None, kernel.contiguous_entry, stride_grid(total), (256,), args, text=kernel.source)


def lower_bias_act(ctx: LowerContext, entry: str) -> None:
    """elementwise.cu with a null bias: one activation."""
    layout = follow_layout(ctx)
    x, y = ctx.input(0, layout), ctx.output(0, layout)
    total = math.prod(ctx.output_shape(0))
    code, alpha, beta = _activation(ctx.layer)
    ctx.launch(
        "elementwise.cu",
        entry,
        stride_grid(total),
        (256,),
        (x, None, y, total, 1, code, alpha, beta),
    )


def lower_reformat(ctx: LowerContext, entry: str) -> None:
    """reformat.cu: casts and per-tensor int8 (de)quantization, in the input's layout."""
    layout = follow_layout(ctx) if len(ctx.output_shape(0)) == 4 else "plain"
    x, y = ctx.input(0, layout), ctx.output(0, layout)
    total = math.prod(ctx.output_shape(0))
    args: tuple = (x, y, total)
    if "quantize" in entry:
        scale = ctx.constant(1)
        if scale is None:
            raise LoweringError("the scale is not a constant")
        args = (*args, float(np.asarray(scale, np.float32).reshape(-1)[0]))
    ctx.launch("reformat.cu", entry, stride_grid(total), (256,), args)


def _rows_cols(ctx: LowerContext, axis: int) -> tuple[int, int]:
    shape = ctx.input_shape(0)
    axis %= len(shape)
    return math.prod(shape[:axis]), math.prod(shape[axis:])


def _gamma_beta(ctx: LowerContext, index: int, cols: int) -> DeviceBuffer | None:
    if not ctx.has_input(index):
        return None
    value = ctx.constant(index)
    dtype = ctx.input_dtype(0)
    if value is not None:
        array = np.broadcast_to(np.asarray(value).reshape(-1), (cols,)).astype(dtype)
        return ctx.weight(f"{ctx.layer.inputs[index]}:norm:{dtype}", array)
    buffer = ctx.input(index)
    assert buffer is not None
    return buffer


def lower_softmax(ctx: LowerContext, entry: str) -> None:
    rows, cols = _rows_cols(ctx, -1)
    x, y = ctx.input(0), ctx.output(0)
    ctx.launch("softmax.cu", entry, (min(rows, 65535),), (128,), (x, y, rows, cols))


def lower_layernorm(ctx: LowerContext, entry: str) -> None:
    """gie::LayerNorm (X, Scale, [Bias], [Residual]) -> Y, [S] and LayerNormalization."""
    rows, cols = _rows_cols(ctx, ctx.attrs.int("axis", -1))
    epsilon = ctx.attrs.float("epsilon", 1e-5)
    gamma, beta = _gamma_beta(ctx, 1, cols), _gamma_beta(ctx, 2, cols)
    residual = ctx.input(3) if ctx.layer.op_type == "LayerNorm" else None
    x, y = ctx.input(0), ctx.output(0)
    total = None
    if ctx.layer.op_type == "LayerNorm" and len(ctx.layer.outputs) > 1 and ctx.layer.outputs[1]:
        total = ctx.output(1)
    args = (x, residual, gamma, beta, y, total, rows, cols, epsilon)
    ctx.launch("layernorm.cu", entry, (min(rows, 65535),), (128,), args)


def lower_rmsnorm(ctx: LowerContext, entry: str) -> None:
    rows, cols = _rows_cols(ctx, ctx.attrs.int("axis", -1))
    epsilon = ctx.attrs.float("epsilon", 1e-5)
    x, y = ctx.input(0), ctx.output(0)
    args = (x, _gamma_beta(ctx, 1, cols), y, rows, cols, epsilon)
    ctx.launch("rmsnorm.cu", entry, (min(rows, 65535),), (128,), args)


def lower_reshape(ctx: LowerContext) -> None:
    """Reshape-like ops: the bytes of the plain input, copied to the output's slot."""
    x = ctx.input(0)
    assert x is not None
    y = ctx.output(0)
    ctx.copy(x.with_shape(y.shape), y)


def _bind(function, entry: str) -> LowerFunction:  # type: ignore[no-untyped-def]
    def lower(ctx: LowerContext) -> None:
        function(ctx, entry)

    return lower


def _reshape_check(layer: Layer, plan: Plan) -> str | None:
    if static_shape(plan, layer.outputs[0]) is None:
        return "the output shape is not static"
    spec = plan.specs.get(layer.inputs[0])
    if spec is None or spec.dtype in (None, ir.DataType.STRING):
        return "the input dtype is unknown (or string)"
    return None


TACTICS: list[CudaTactic] = [
    CudaTactic("elementwise_generated", "pointwise", ELEMENTWISE_OPS, None, "generated", (),
               elementwise_check, (5, 0), FLOATS, ANY_PRECISION),
    CudaTactic("cast_generated", "reformat", frozenset({"Cast"}), None, "generated", (),
               cast_check, (5, 0), frozenset(ir.DataType), ANY_PRECISION),
    CudaTactic("reshape_copy", "reshape", RESHAPE_OPS, None, "copy", (), _reshape_check,
               (5, 0), frozenset(ir.DataType), ANY_PRECISION),
]  # fmt: skip

_BY_FAMILY = {
    "softmax": lower_softmax,
    "reformat": lower_reformat,
}

LOWERINGS: dict[str, LowerFunction] = {
    "pointwise_generated": lower_pointwise,
    "elementwise_generated": lower_pointwise,
    "reshape_copy": lower_reshape,
    "cast_generated": lower_cast,
}
for _tactic in CATALOGUE:
    if _tactic.family in _BY_FAMILY:
        LOWERINGS[_tactic.name] = _bind(_BY_FAMILY[_tactic.family], _tactic.entry)
    elif _tactic.name.startswith("bias_act_"):
        LOWERINGS[_tactic.name] = _bind(lower_bias_act, _tactic.entry)
    elif _tactic.name.startswith("layernorm_"):
        LOWERINGS[_tactic.name] = _bind(lower_layernorm, _tactic.entry)
    elif _tactic.name.startswith("rmsnorm_"):
        LOWERINGS[_tactic.name] = _bind(lower_rmsnorm, _tactic.entry)
