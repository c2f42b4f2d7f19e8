"""Shape and attribute checks of the CUDA tactics: each returns why a kernel cannot run a layer
(a user-facing reason) or None. The constraints are those of the kernels' sources (see
:mod:`engine.backends.cuda.tactics`); :func:`gemm_dims` and :func:`conv_geometry` read a layer's
GEMM (batch, M, N, K) and 2-D convolution geometry from the plan's static specs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx_ir as ir

from engine.backends.cuda.activations import BY_NAME
from engine.build.plan import Layer, Plan

Check = Callable[[Layer, Plan], "str | None"]
I8 = ir.DataType.INT8


def static_shape(plan: Plan, name: str) -> tuple[int, ...] | None:
    """The value's shape when every dim is known."""
    spec = plan.specs.get(name) if name else None
    if spec is None or spec.shape is None or not all(isinstance(d, int) for d in spec.shape):
        return None
    return tuple(int(d) for d in spec.shape)  # type: ignore[arg-type]


def input_name(layer: Layer, index: int) -> str:
    """The name of input ``index`` ("" when absent or ``index`` < 0)."""
    return layer.inputs[index] if 0 <= index < len(layer.inputs) else ""


def _gemm_indices(layer: Layer) -> tuple[int, int, int, int]:
    """(A, B, bias, residual) input positions (-1: none) of a GEMM-like layer."""
    if layer.op_type == "QGemm":
        return 0, 2, 4, 5
    if layer.op_type == "MatMul":
        return 0, 1, -1, -1
    return 0, 1, 2, 3 if layer.op_type == "GemmAct" else -1


def _is_matmul_kind(layer: Layer) -> bool:
    if layer.op_type == "MatMul":
        return True
    return layer.op_type in ("GemmAct", "QGemm") and layer.attrs.str("kind", "Gemm") == "MatMul"


def gemm_dims(layer: Layer, plan: Plan) -> tuple[int, int, int, int] | str:
    """(batch, M, N, K) of a GEMM-like layer (batch > 1: both operands batched), or why not."""
    a_index, b_index, _, _ = _gemm_indices(layer)
    a, b = (
        static_shape(plan, input_name(layer, a_index)),
        static_shape(plan, input_name(layer, b_index)),
    )
    if a is None or b is None:
        return "operand shapes are not static"
    if _is_matmul_kind(layer):
        if len(b) < 2:
            return "a 1-D B operand is not a GEMM"
        rows = math.prod(a[:-1]) if len(a) > 1 else 1
        if len(b) == 2:
            return 1, rows, b[1], b[0]
        return math.prod(b[:-2]), (a[-2] if len(a) > 1 else 1), b[-1], b[-2]
    trans_a, trans_b = layer.attrs.int("transA", 0), layer.attrs.int("transB", 0)
    m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
    return 1, m, (b[0] if trans_b else b[1]), k


def _epilogue_reason(layer: Layer, plan: Plan, bias: int, residual: int) -> str | None:
    activation = layer.attrs.str("activation", "") or ""
    if activation not in BY_NAME:
        return f"activation {activation!r} has no CUDA epilogue"
    bias_shape = static_shape(plan, input_name(layer, bias)) if bias >= 0 else None
    out = static_shape(plan, layer.outputs[0])
    if bias_shape is not None and out and math.prod(bias_shape) != out[-1]:
        return f"C of shape {bias_shape} is not a bias over the {out[-1]} output columns"
    residual_shape = static_shape(plan, input_name(layer, residual)) if residual >= 0 else None
    if input_name(layer, residual) and residual_shape != out:
        return f"residual {residual_shape} must have the output's shape {out} (no broadcast)"
    return None


def check_own_gemm(layer: Layer, plan: Plan) -> str | None:
    """The contract of gemm_simt.cu / gemm_mma_f16.cu (and the planned IMMA / mma.sp GEMMs)."""
    dims = gemm_dims(layer, plan)
    if isinstance(dims, str):
        return dims
    if dims[0] > 1:
        return "both operands batched (attention): needs the batched GEMM (cuBLAS batched has it)"
    if not _is_matmul_kind(layer):
        if layer.attrs.int("transA", 0):
            return "transA = 1: the kernels read A row-major"
        if layer.attrs.float("alpha", 1.0) != 1.0 or layer.attrs.float("beta", 1.0) != 1.0:
            return "alpha/beta != 1: the epilogue has no scaling"
    _, b_index, bias, residual = _gemm_indices(layer)
    b_name = input_name(layer, b_index)
    if layer.attrs.int("transB", 0) and b_name not in plan.constants:
        return "transB = 1 with a non-constant B (only a weight is transposed once at build)"
    return _epilogue_reason(layer, plan, bias, residual)


def tile_check(bm: int, bn: int) -> Check:
    def check(layer: Layer, plan: Plan) -> str | None:
        reason = check_own_gemm(layer, plan)
        dims = gemm_dims(layer, plan)
        if reason is not None or isinstance(dims, str) or min(bm, bn) <= 32:
            return reason
        if dims[1] <= bm // 2 and dims[2] <= bn // 2:
            return (
                f"a {bm}x{bn} tile is over twice the {dims[1]}x{dims[2]} output in both "
                "dimensions (a smaller tile covers it)"
            )
        return None

    return check


def k_multiple_check(multiple: int, why: str) -> Check:
    def check(layer: Layer, plan: Plan) -> str | None:
        dims = gemm_dims(layer, plan)
        if not isinstance(dims, str) and dims[3] % multiple:
            return f"K = {dims[3]} is not a multiple of {multiple} ({why})"
        return check_own_gemm(layer, plan)

    return check


def check_cublas_gemm(layer: Layer, plan: Plan) -> str | None:
    """cuBLAS gemmEx (strided-batched when both operands are batched; transposes and
    alpha/beta are its own), then elementwise.cu for bias + activation: a residual is added
    through beta = 1 before the activation only."""
    dims = gemm_dims(layer, plan)
    if isinstance(dims, str):
        return dims
    activation = layer.attrs.str("activation", "") or ""
    if activation not in BY_NAME:
        return f"activation {activation!r} has no CUDA epilogue"
    _, _, _, residual = _gemm_indices(layer)
    after = not layer.attrs.int("residual_before_activation", 1)
    if input_name(layer, residual) and after and activation:
        return "a residual added after the activation needs a second kernel"
    return None


def int8_activation(layer: Layer, plan: Plan) -> str | None:
    spec = plan.specs.get(input_name(layer, 0))
    if spec is not None and spec.dtype not in (None, I8):
        return f"the activation input is {spec.dtype.name} in the plan; int8 kernels read int8"
    return None


def all_of(*checks: Check) -> Check:
    def check(layer: Layer, plan: Plan) -> str | None:
        return next((r for c in checks if (r := c(layer, plan)) is not None), None)

    return check


def conv_geometry(layer: Layer, plan: Plan) -> dict[str, int] | str:
    """N, C, H, W, M (out channels), KH, KW, group, strides/pads/dilations of a 2-D conv."""
    w_index = 2 if layer.op_type == "QConv" else 1
    x, w = static_shape(plan, input_name(layer, 0)), static_shape(plan, input_name(layer, w_index))
    if x is None or w is None:
        return "input or weight shape is not static"
    if len(x) != 4 or len(w) != 4:
        return f"only 2-D convolutions (input rank {len(x)})"
    if input_name(layer, w_index) not in plan.constants:
        return "the weight is not a constant"
    strides = layer.attrs.ints("strides", [1, 1]) or [1, 1]
    pads = layer.attrs.ints("pads", [0, 0, 0, 0]) or [0, 0, 0, 0]
    dilations = layer.attrs.ints("dilations", [1, 1]) or [1, 1]
    geometry = dict(n=x[0], c=x[1], h=x[2], w=x[3], m=w[0], kh=w[2], kw=w[3])
    geometry.update(group=layer.attrs.int("group", 1), stride=max(strides), pad=max(pads))
    geometry.update(dilation=max(dilations))
    return geometry


def conv_check(channels: int = 1, group: str = "dense", one_by_one: bool = False) -> Check:
    """Conv constraints: ``group`` "dense" (group 1), "depthwise" (group = C = M) or "any";
    C % ``channels``."""

    def check(layer: Layer, plan: Plan) -> str | None:
        g = conv_geometry(layer, plan)
        if isinstance(g, str):
            return g
        if group == "dense" and g["group"] != 1:
            return f"group = {g['group']}: this kernel runs ungrouped convolutions"
        if group == "depthwise" and not g["group"] == g["c"] == g["m"]:
            return f"not depthwise (group {g['group']}, C {g['c']}, M {g['m']})"
        if group == "any" and (g["c"] % g["group"] or g["m"] % g["group"]):
            return f"C {g['c']} / M {g['m']} are not multiples of group {g['group']}"
        if g["n"] * max(g["h"] * g["w"], 1) >= 2**31:
            return "2^31 pixels or more (32-bit pixel indices)"
        if g["c"] % channels:
            return f"C = {g['c']} is not a multiple of {channels} (16-byte NHWC channel vectors)"
        if one_by_one and (g["kh"], g["kw"], g["stride"], g["pad"]) != (1, 1, 1, 0):
            return "not a 1x1, stride-1, unpadded convolution"
        residual = 5 if layer.op_type == "QConv" else 3
        return _epilogue_reason(layer, plan, -1, residual)

    return check


def last_axis_check(layer: Layer, plan: Plan) -> str | None:
    shape = static_shape(plan, input_name(layer, 0))
    if shape is None or not shape:
        return "input shape is not static (or a scalar)"
    axis = layer.attrs.int("axis", -1)
    if axis % len(shape) != len(shape) - 1:
        return f"axis {axis} of rank {len(shape)}: the kernel reduces the last axis only"
    return None


def norm_check(layer: Layer, plan: Plan) -> str | None:
    shape = static_shape(plan, input_name(layer, 0))
    if shape is None or not shape:
        return "input shape is not static (or a scalar)"
    cols = math.prod(shape[layer.attrs.int("axis", -1) % len(shape) :])
    for index, role in ((1, "scale"), (2, "bias")):
        given = static_shape(plan, input_name(layer, index))
        if given is not None and math.prod(given) != cols:
            return f"{role} {given} is not one value per normalized element ({cols})"
    residual = static_shape(plan, input_name(layer, 3)) if layer.op_type == "LayerNorm" else None
    if residual is not None and residual != shape:
        return f"residual {residual} must have X's shape {shape} (no broadcast)"
    if layer.op_type == "LayerNormalization" and any(layer.outputs[1:]):
        return "the Mean / InvStdDev outputs are not produced"
    return None


def pointwise_check(layer: Layer, plan: Plan) -> str | None:
    from engine.backends.cuda.pointwise_codegen import UnsupportedPointwiseError, kernel_for_node

    try:
        kernel_for_node(layer.node)
    except UnsupportedPointwiseError as error:
        return str(error)
    return None


def _batch_compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Leading (batch) dims one stride per operand can express: equal, or one side all 1."""
    lead_a, lead_b = a[:-2], b[:-2]
    return lead_a == lead_b or math.prod(lead_a) == 1 or math.prod(lead_b) == 1


def check_batched(layer: Layer, plan: Plan) -> str | None:
    """gemm_batched.cu: C[z] = scale * A[z] @ B[z] by strides (no bias, no activation)."""
    index = 2 if layer.op_type == "QMatMul" else 1
    a, b = static_shape(plan, input_name(layer, 0)), static_shape(plan, input_name(layer, index))
    if a is None or b is None:
        return "operand shapes are not static"
    if len(a) < 2 or len(b) < 2:
        return "1-D operands are not a batched GEMM"
    if not _batch_compatible(a, b):
        return f"batch dims {a[:-2]} and {b[:-2]} need broadcasting beyond one stride"
    return None


def int8_gemm_check(output: ir.DataType) -> Check:
    """gemm_int8.cu (IMMA): gie::QGemm / gie::QMatMul producing ``output`` (int8 out needs
    Y_scale), K <= 131071, no transposed A, int8 activations."""

    def check(layer: Layer, plan: Plan) -> str | None:
        reason = int8_activation(layer, plan)
        if reason is not None:
            return reason
        y_scale = input_name(layer, 4 if layer.op_type == "QMatMul" else 6)
        default = int(I8) if y_scale else int(ir.DataType.FLOAT)
        produced = ir.DataType(layer.attrs.int("output_dtype", default))
        if produced != output:
            return f"the layer produces {produced.name}, this entry writes {output.name}"
        if layer.op_type == "QMatMul":
            return check_batched(layer, plan)
        dims = gemm_dims(layer, plan)
        if isinstance(dims, str):
            return dims
        if dims[3] > 131071:
            return f"K = {dims[3]} exceeds 131071 (exact int32 accumulation)"
        if not _is_matmul_kind(layer) and layer.attrs.int("transA", 0):
            return "transA = 1: the kernel reads A row-major"
        return _epilogue_reason(layer, plan, -1, 5)

    return check


def pool_check(layer: Layer, plan: Plan) -> str | None:
    """pool.cu: 2-D pools over NHWC (the indices output of MaxPool is not produced)."""
    shape = static_shape(plan, input_name(layer, 0))
    if shape is None or len(shape) != 4:
        return "only 2-D pools with a static input"
    if layer.op_type == "MaxPool" and (
        any(layer.outputs[1:]) or layer.attrs.int("storage_order", 0)
    ):
        return "the Indices output / storage_order of MaxPool are not produced"
    return None


def scale_check(layer: Layer, plan: Plan) -> str | None:
    """reformat.cu's (de)quantize: a constant per-tensor scale, zero point 0."""
    scale = plan.constants.get(input_name(layer, 1))
    if scale is None or scale.size != 1:
        return "needs a constant per-tensor scale"
    zero = plan.constants.get(input_name(layer, 2))
    if zero is not None and (zero.size != 1 or int(zero.reshape(-1)[0]) != 0):
        return "needs zero point 0 (symmetric int8)"
    return None


def cast_check(target: ir.DataType) -> Check:
    def check(layer: Layer, plan: Plan) -> str | None:
        to = ir.DataType(layer.attrs.int("to", 0))
        return None if to == target else f"casts to {to.name}, this kernel to {target.name}"

    return check
