"""Lowerings of the persistent LSTM / GRU tactics (kernels/rnn.cu): every time step of a layer
in ONE launch (TensorRT's temporal fusion of recurrent layers).

Two tactics per op and storage dtype:

* ``<op>_persistent_<dtype>``: one launch, grid (batch, directions); each block computes
  x_t . W^T and h_{t-1} . R^T for its units at every step (the input projection inside the
  kernel).
* ``<op>_persistent_xw_<dtype>``: a documented pre-pass first, X @ W^T for all steps at once by
  ``gemm_simt.cu`` (A = X as [seq*batch, input], B = W transposed once to [input, dirs*G*H])
  into a per-layer scratch, then the same single persistent launch reading it (``xw``): the
  recurrence loop then streams only R. Needs a constant W.

Constant W and R are uploaded once transposed to [dirs, K, G*H] (``weights_transposed = 1``:
consecutive threads read consecutive units); B, P, sequence_lens and the initial states are read
as they are (constants uploaded in the layer's dtype, sequence_lens as int32). The checks
refuse what the kernel does not do: activations other than the defaults (sigmoid, tanh, tanh /
sigmoid, tanh), H > 1024, non-static shapes, a non-constant sequence_lens that is not int32.
Layout 0 and 1, clip, peepholes, input_forget, linear_before_reset 0/1, per-batch lengths and
every direction are supported.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from engine.backends.cuda.launch_plan import DeviceBuffer
from engine.backends.cuda.lowering import LowerContext, LowerFunction, LoweringError
from engine.backends.cuda.tactic_checks import Check, input_name, static_shape
from engine.backends.cuda.tactics import F16_ONLY, FLOAT_PRECISIONS, CudaTactic
from engine.build.plan import Layer, Plan

#: The kernel's GIE_RNN_MAX_HIDDEN (shared-memory state size) and GIE_RNN_THREADS.
MAX_HIDDEN = 1024
MAX_THREADS = 512
GATES = {"LSTM": 4, "GRU": 3}
DEFAULT_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"]}
DIRECTIONS = {"forward": 0, "reverse": 1, "bidirectional": 2}
F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def block_threads(hidden: int) -> int:
    """Threads per block: one per hidden unit, rounded up to a warp, at most 512."""
    return min(MAX_THREADS, _ceil(hidden, 32) * 32)


def rnn_check(pre_pass: bool = False) -> Check:
    """Refusal reason of the persistent kernel (and of its X @ W^T pre-pass) for a layer."""

    def check(layer: Layer, plan: Plan) -> str | None:
        op = layer.op_type
        if op not in GATES or layer.domain:
            return f"the persistent RNN kernel runs LSTM and GRU, not {layer.qualified_op}"
        attrs = layer.attrs
        names = attrs.strs("activations")
        if names:
            defaults = DEFAULT_ACTIVATIONS[op]
            lowered = [n.lower() for n in names]
            if lowered not in (defaults, defaults * 2):
                return f"only the default activations {defaults} (got {names})"
        direction = attrs.str("direction", "forward")
        if direction not in DIRECTIONS:
            return f"unknown direction {direction!r}"
        if attrs.int("layout", 0) not in (0, 1):
            return f"layout {attrs.int('layout', 0)}"
        shapes = [static_shape(plan, input_name(layer, i)) for i in range(3)]
        if any(s is None or len(s) != 3 for s in shapes):
            return "X, W and R need static 3-D shapes"
        hidden = shapes[2][-1]  # type: ignore[index]
        if hidden > MAX_HIDDEN:
            return f"hidden size {hidden} > {MAX_HIDDEN} (the kernel's shared-memory state)"
        lengths = input_name(layer, 4)
        if lengths and lengths not in plan.constants:  # constants are uploaded as int32
            spec = plan.specs.get(lengths)
            if spec is None or spec.dtype != ir.DataType.INT32:
                return "sequence_lens must be int32 (or a constant)"
        if pre_pass and input_name(layer, 1) not in plan.constants:
            return "the X @ W^T pre-pass needs a constant W"
        return None

    return check


def _float_input(ctx: LowerContext, index: int, dtype: np.dtype, form: str) -> DeviceBuffer | None:
    """Input ``index`` in the layer's dtype (a constant uploaded once, converted if needed)."""
    value = ctx.constant(index)
    if value is not None:
        name = ctx.layer.inputs[index]
        return ctx.weight(f"{name}:{form}:{dtype}", np.asarray(value).astype(dtype))
    buffer = ctx.input(index)
    if buffer is not None and np.dtype(buffer.dtype) != dtype:
        raise LoweringError(f"input {index} is {buffer.dtype}, the layer computes in {dtype}")
    return buffer


def _output(ctx: LowerContext, index: int) -> DeviceBuffer | None:
    outputs = ctx.layer.outputs
    return ctx.output(index) if index < len(outputs) and outputs[index] else None


def lower_rnn(ctx: LowerContext, pre_pass: bool) -> None:
    """One persistent launch (after the X @ W^T GEMM when ``pre_pass``) for an LSTM/GRU layer."""
    op = ctx.layer.op_type
    lstm = op == "LSTM"
    gates = GATES[op]
    attrs = ctx.attrs
    layout = attrs.int("layout", 0)
    x_shape = ctx.input_shape(0)
    seq, batch = (x_shape[1], x_shape[0]) if layout else (x_shape[0], x_shape[1])
    input_size = x_shape[2]
    dirs, rows = ctx.input_shape(1)[0], ctx.input_shape(1)[1]
    hidden = ctx.input_shape(2)[-1]
    if rows != gates * hidden:
        raise LoweringError(f"W has {rows} rows, expected {gates} x {hidden}")
    dtype = ctx.input_dtype(0)
    suffix = _SUFFIX.get(dtype)
    if suffix is None:
        raise LoweringError(f"the persistent RNN kernel stores fp32 or fp16, not {dtype}")
    x = ctx.input(0)
    assert x is not None
    w_value, r_value = ctx.constant(1), ctx.constant(2)
    transposed = int(w_value is not None and r_value is not None)
    if transposed:
        w = ctx.weight(
            f"{ctx.layer.inputs[1]}:rnn_kt:{dtype}",
            np.asarray(w_value).transpose(0, 2, 1).astype(dtype),
        )
        r = ctx.weight(
            f"{ctx.layer.inputs[2]}:rnn_kt:{dtype}",
            np.asarray(r_value).transpose(0, 2, 1).astype(dtype),
        )
    else:
        w, r = _float_input(ctx, 1, dtype, "plain"), _float_input(ctx, 2, dtype, "plain")
    b = _float_input(ctx, 3, dtype, "plain")
    lengths = None
    if ctx.has_input(4):
        value = ctx.constant(4)
        if value is not None:
            name = ctx.layer.inputs[4]
            lengths = ctx.weight(f"{name}:int32", np.asarray(value).astype(np.int32))
        else:
            lengths = ctx.input(4)
    h0 = _float_input(ctx, 5, dtype, "plain")
    c0 = _float_input(ctx, 6, dtype, "plain") if lstm else None
    p = _float_input(ctx, 7, dtype, "plain") if lstm else None
    xw = None
    if pre_pass:
        if w_value is None:
            raise LoweringError("the X @ W^T pre-pass needs a constant W")
        m, n = seq * batch, dirs * rows
        w_kn = np.asarray(w_value).reshape(n, input_size).T.astype(dtype)
        b_operand = ctx.weight(f"{ctx.layer.inputs[1]}:rnn_xw_kn:{dtype}", w_kn)
        xw = ctx.scratch((m, n), dtype)
        args = (x.with_shape((m, input_size)), b_operand, None, None, xw, m, n, input_size)
        args += (input_size, n, n, 0, 0.0, 0.0, 1)
        grid = (_ceil(n, 64), _ceil(m, 64))
        ctx.launch("gemm_simt.cu", f"gie_gemm_simt_{suffix}", grid, (256,), args)
    y, y_h = _output(ctx, 0), _output(ctx, 1)
    y_c = _output(ctx, 2) if lstm else None
    clip_value = attrs.get("clip")
    clip = -1.0 if clip_value is None else float(clip_value)
    direction = DIRECTIONS[attrs.str("direction", "forward")]
    scalars = (seq, batch, input_size, hidden, direction, layout, transposed, clip)
    if lstm:
        args = (x, w, r, b, lengths, h0, c0, p, xw, y, y_h, y_c, *scalars)
        args += (attrs.int("input_forget", 0),)
    else:
        args = (x, w, r, b, lengths, h0, xw, y, y_h, *scalars)
        args += (attrs.int("linear_before_reset", 0),)
    entry = f"gie_{op.lower()}_persistent_{suffix}"
    ctx.launch("rnn.cu", entry, (batch, dirs), (block_threads(hidden),), args)


def _bind(pre_pass: bool) -> LowerFunction:
    def lower(ctx: LowerContext) -> None:
        lower_rnn(ctx, pre_pass)

    return lower


def _tactics() -> list[CudaTactic]:
    tactics = []
    for op in GATES:
        for suffix, dtype, precisions, cc in (
            ("f32", F32, FLOAT_PRECISIONS, (5, 0)),
            ("f16", F16, F16_ONLY, (5, 3)),
        ):
            entry = f"gie_{op.lower()}_persistent_{suffix}"
            for tail, pre_pass in (("", False), ("_xw", True)):
                tactic = CudaTactic(
                    name=f"{op.lower()}_persistent{tail}_{suffix}",
                    family="rnn",
                    ops=frozenset({op}),
                    kernel_file="rnn.cu",
                    entry=entry,
                    check=rnn_check(pre_pass),
                    min_cc=cc,
                    dtypes=frozenset({dtype}),
                    precisions=precisions,
                )
                tactics.append(tactic)
    return tactics


TACTICS: list[CudaTactic] = _tactics()
#: Tactic name -> lowering (the ``_xw`` tactics run the GEMM pre-pass first).
LOWERINGS: dict[str, LowerFunction] = {t.name: _bind("_xw_" in t.name) for t in TACTICS}
