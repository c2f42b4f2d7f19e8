"""Lowering of gie::Attention to the fused flash-style kernels of ``kernels/attention.cu``.

One launch per layer: Q, K, V [batch, seq, heads * head_dim] (V: heads * head_dim_v) are read
in place (row strides = their hidden sizes, batch stride 0 for a K/V batch of 1), the optional
additive mask (input 3, broadcastable to [batch, heads, seq_q, seq_k] as in the reference) by
element strides with 0 on its broadcast axes, the output written [batch, seq_q, heads *
head_dim_v]. No [seq_q, seq_k] score matrix is ever stored.

Tactics (:data:`TACTICS`, family ``attention``):

* ``attention_simt_f32`` / ``attention_simt_f16``: SIMT, 16 query rows per 128-thread block,
  head dims up to 128; ``_d64`` variants compiled with ``GIE_ATTN_MAX_D=64`` (fewer registers
  and half the shared memory) for head dims up to 64.
* ``attention_mma_f16`` (``_d64``): mma.sync m16n8k16 tensor cores (compute capability 8.0+),
  64 query rows per 128-thread block.

The mask must have the storage dtype of Q (fp16 for the fp16 tactics): a float32 mask in an
fp16 layer is refused (the builder casts it, or the layer runs elsewhere).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx_ir as ir

from engine.backends.cuda.lowering import LowerContext, LowerFunction, LoweringError
from engine.backends.cuda.tactic_checks import Check
from engine.backends.cuda.tactics import F16_ONLY, FLOAT_PRECISIONS, CudaTactic
from engine.build.plan import Layer, Plan

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
ATTENTION_OPS = frozenset({"gie::Attention"})
KERNEL_FILE = "attention.cu"
#: Compile-time head-dim limit of the kernels at their default -D (GIE_ATTN_MAX_D).
DEFAULT_MAX_D = 128
#: Query rows per block: SIMT (GIE_ATTN_WARPS * GIE_ATTN_ROWS), mma (16 * GIE_ATTN_MMA_WARPS).
SIMT_ROWS, MMA_ROWS, THREADS = 16, 64, 128
GRID_LIMIT = 65535  # grid y (heads) and z (batch)


def mask_strides(shape: Sequence[int], full: Sequence[int]) -> tuple[int, int, int, int]:
    """Element strides of a C-contiguous mask of ``shape`` along ``full`` = [batch, heads,
    seq_q, seq_k], 0 on broadcast axes (numpy rules: right-aligned, size 1 or the full size)."""
    if len(shape) > 4:
        raise ValueError(f"the mask {list(shape)} has more than 4 dimensions")
    padded = (1,) * (4 - len(shape)) + tuple(int(d) for d in shape)
    strides, step = [0, 0, 0, 0], 1
    for axis in range(3, -1, -1):
        if padded[axis] not in (1, full[axis]):
            raise ValueError(f"the mask {list(shape)} does not broadcast to {list(full)}")
        strides[axis] = step if padded[axis] != 1 else 0
        step *= padded[axis]
    return strides[0], strides[1], strides[2], strides[3]


def _last_dim(plan: Plan, name: str) -> int | None:
    spec = plan.specs.get(name) if name else None
    if spec is None or spec.shape is None or not spec.shape:
        return None
    last = spec.shape[-1]
    return int(last) if isinstance(last, int) else None


def _rank(plan: Plan, name: str) -> int | None:
    spec = plan.specs.get(name)
    return None if spec is None or spec.shape is None else len(spec.shape)


def _dtype(plan: Plan, name: str) -> ir.DataType | None:
    spec = plan.specs.get(name)
    return None if spec is None else spec.dtype


def attention_check(max_d: int = DEFAULT_MAX_D) -> Check:
    """Refusal reason of the fused kernels (compiled with GIE_ATTN_MAX_D = ``max_d``)."""

    def check(layer: Layer, plan: Plan) -> str | None:
        if layer.qualified_op not in ATTENTION_OPS:
            return f"the fused attention kernel runs gie::Attention, not {layer.qualified_op}"
        names = [layer.inputs[i] if i < len(layer.inputs) else "" for i in range(4)]
        if not all(names[:3]):
            return "gie::Attention needs Q, K and V"
        if any(_rank(plan, n) not in (3, None) for n in names[:3]):
            return "Q, K and V must be [batch, seq, hidden]"
        dtype = _dtype(plan, names[0])
        for name in names[1:]:
            if name and _dtype(plan, name) != dtype:
                found = _dtype(plan, name)
                return (
                    f"input '{name}' is {found.name if found else 'unknown'}, Q is "
                    f"{dtype.name if dtype else 'unknown'}: the kernel reads one storage type"
                )
        if names[3] and (_rank(plan, names[3]) or 0) > 4:
            return "the mask has more than 4 dimensions"
        heads = layer.attrs.int("num_heads", 0)
        if heads <= 0 or heads > GRID_LIMIT:
            return f"num_heads {heads} is not in 1..{GRID_LIMIT}"
        hidden, hidden_v = _last_dim(plan, names[0]), _last_dim(plan, names[2])
        if hidden is None or hidden_v is None:
            return "the hidden sizes of Q and V are not static"
        if hidden % heads or hidden_v % heads:
            return f"hidden sizes {hidden}/{hidden_v} do not split into {heads} heads"
        head_dim, head_dim_v = hidden // heads, hidden_v // heads
        if max(head_dim, head_dim_v) > max_d:
            return f"head dims {head_dim}/{head_dim_v}: this kernel handles up to {max_d}"
        return None

    return check


def lower_attention(ctx: LowerContext, entry: str, rows: int, max_d: int) -> None:
    """One fused attention launch (see the module docstring)."""
    layer = ctx.layer
    batch, seq_q, hidden = ctx.input_shape(0)
    batch_k, seq_k, hidden_k = ctx.input_shape(1)
    batch_v, seq_v, hidden_v = ctx.input_shape(2)
    heads = layer.attrs.int("num_heads")
    if hidden != hidden_k or seq_v != seq_k or hidden % heads or hidden_v % heads:
        raise LoweringError(
            f"layer '{layer.name}': Q {ctx.input_shape(0)}, K {ctx.input_shape(1)}, "
            f"V {ctx.input_shape(2)} do not form {heads}-head attention"
        )
    if batch_k not in (1, batch) or batch_v not in (1, batch):
        raise LoweringError(
            f"layer '{layer.name}': K/V batch {batch_k}/{batch_v} is neither 1 nor {batch}"
        )
    head_dim, head_dim_v = hidden // heads, hidden_v // heads
    if max(head_dim, head_dim_v) > max_d or batch > GRID_LIMIT or heads > GRID_LIMIT:
        raise LoweringError(f"layer '{layer.name}': head dims {head_dim}/{head_dim_v} > {max_d}")
    scale = layer.attrs.float("scale", 1.0 / math.sqrt(head_dim))
    causal = 1 if layer.attrs.int("causal", 0) else 0
    strides = (0, 0, 0, 0)
    mask = ctx.input(3) if ctx.has_input(3) else None
    if mask is not None:
        try:
            strides = mask_strides(ctx.input_shape(3), (batch, heads, seq_q, seq_k))
        except ValueError as error:
            raise LoweringError(f"layer '{layer.name}': {error}") from None
    q, k, v = ctx.input(0), ctx.input(1), ctx.input(2)
    out = ctx.output(0)
    k_sb = 0 if batch_k == 1 else seq_k * hidden
    v_sb = 0 if batch_v == 1 else seq_k * hidden_v
    args = (q, k, v, mask, out, seq_q, seq_k, head_dim, head_dim_v)
    args += (seq_q * hidden, hidden, k_sb, hidden, v_sb, hidden_v)
    args += (seq_q * hidden_v, hidden_v, *strides, float(scale), causal)
    defines = () if max_d == DEFAULT_MAX_D else (("GIE_ATTN_MAX_D", max_d),)
    grid = (-(-seq_q // rows), heads, batch)
    ctx.launch(KERNEL_FILE, entry, grid, (THREADS,), args, defines)


def _bind(entry: str, rows: int, max_d: int) -> LowerFunction:
    def lower(ctx: LowerContext) -> None:
        lower_attention(ctx, entry, rows, max_d)

    return lower


def _tactics() -> tuple[list[CudaTactic], dict[str, LowerFunction]]:
    tactics: list[CudaTactic] = []
    lowerings: dict[str, LowerFunction] = {}
    variants = (
        ("simt_f32", "gie_attention_f32", SIMT_ROWS, F32, FLOAT_PRECISIONS, (5, 0)),
        ("simt_f16", "gie_attention_f16", SIMT_ROWS, F16, F16_ONLY, (5, 3)),
        ("mma_f16", "gie_attention_mma_f16", MMA_ROWS, F16, F16_ONLY, (8, 0)),
    )
    for kind, entry, rows, dtype, precisions, cc in variants:
        for max_d in (DEFAULT_MAX_D, 64):
            name = f"attention_{kind}" + ("" if max_d == DEFAULT_MAX_D else f"_d{max_d}")
            defines = () if max_d == DEFAULT_MAX_D else (("GIE_ATTN_MAX_D", max_d),)
            tactics.append(
                CudaTactic(
                    name=name,
                    family="attention",
                    ops=ATTENTION_OPS,
                    kernel_file=KERNEL_FILE,
                    entry=entry,
                    defines=defines,
                    check=attention_check(max_d),
                    min_cc=cc,
                    dtypes=frozenset({dtype}),
                    precisions=precisions,
                )
            )
            lowerings[name] = _bind(entry, rows, max_d)
    return tactics, lowerings


#: The fused attention tactics (SIMT fp32/fp16, mma fp16; head dims up to 128 or 64).
TACTICS: list[CudaTactic]
#: Tactic name -> lowering function.
LOWERINGS: dict[str, LowerFunction]
TACTICS, LOWERINGS = _tactics()

__all__ = ["LOWERINGS", "TACTICS", "attention_check", "lower_attention", "mask_strides"]
