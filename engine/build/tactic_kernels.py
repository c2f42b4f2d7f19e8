"""Implementations of the NumPy backend's tactics (the catalogue is :mod:`engine.build.tactics`).

Convolution cores (im2col + GEMM, direct per-tap accumulation, Winograd F(2x2, 3x3)), GEMM
products (np.matmul, np.einsum, pre-transposed weight) and per-head attention, each wrapped
into a registry-style kernel ``kernel(inputs, attrs, ctx) -> outputs`` that rounds exactly as
the op's reference kernel does and, for fused ops, applies the op's own epilogue. Each
``check_*`` says why a tactic does not apply to a layer (None when it does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.build.plan import Layer, Plan
from engine.ops.conv import IM2COL_BYTES, compute_dtype, pad_input, window_attrs, window_geometry
from engine.ops.conv import windows as window_view
from engine.ops.gie_fused import _is_matmul, apply_epilogue
from engine.ops.linalg import _work
from engine.ops.registry import Attrs, Kernel, KernelContext, KernelError


def _optional(inputs: list[Any], index: int) -> Any:
    return inputs[index] if len(inputs) > index else None


class Prepared:
    """A derived array (transposed or transformed weight) for the last source array seen."""

    def __init__(self, derive: Callable[[np.ndarray], np.ndarray]) -> None:
        self._derive = derive
        self._entry: tuple[np.ndarray, np.ndarray] | None = None  # (source, derived), swapped whole

    def __call__(self, source: np.ndarray) -> np.ndarray:
        entry = self._entry
        if entry is None or entry[0] is not source:
            entry = (source, self._derive(source))
            self._entry = entry
        return entry[1]


# --------------------------------------------------------------------------- convolution

ConvCore = Callable[[np.ndarray, np.ndarray, Attrs], np.ndarray]


def _geometry(x: np.ndarray, w: np.ndarray, attrs: Attrs) -> tuple:
    """(kernel, strides, dilations, begin pads, end pads, output spatial dims, group)."""
    kernel, strides, dilations, pads, auto_pad = window_attrs(attrs, x.ndim - 2, w.shape[2:])
    out, begins, ends = window_geometry(x.shape[2:], kernel, strides, dilations, pads, auto_pad)
    group = attrs.int("group", 1)
    if x.shape[1] != w.shape[1] * group or w.shape[0] % group:
        raise KernelError(f"channels {x.shape[1]} / weight {w.shape} do not match group {group}")
    return kernel, strides, dilations, begins, ends, [int(o) for o in out], group


def im2col_core(x: np.ndarray, w: np.ndarray, attrs: Attrs) -> np.ndarray:
    """Convolution as im2col + one batched GEMM over the groups, in batch chunks."""
    kernel, strides, dilations, begins, ends, out, group = _geometry(x, w, attrs)
    n, c, m, spatial = x.shape[0], x.shape[1], w.shape[0], x.ndim - 2
    cg, mg, ksize = c // group, m // group, math.prod(kernel)
    weights = w.reshape(group, mg, cg * ksize)
    chunk = max(1, IM2COL_BYTES // max(c * ksize * math.prod(out) * x.itemsize, 1))
    parts = []
    for start in range(0, n, chunk):
        part = x[start : start + chunk]
        view = window_view(part, kernel, strides, dilations, begins, ends, out)
        view = view.reshape(part.shape[0], group, cg, *out, *kernel)
        order = (1, 2, *range(3 + spatial, 3 + 2 * spatial), 0, *range(3, 3 + spatial))
        cols = view.transpose(order).reshape(group, cg * ksize, -1)
        result = np.matmul(weights, cols).reshape(m, part.shape[0], *out)
        parts.append(result.swapaxes(0, 1))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


#: Channel groups up to this depth (e.g. an RGB stem) accumulate taps with einsum, not BLAS.
SHALLOW_CHANNELS = 8


def direct_core() -> ConvCore:
    """Convolution as a sum over kernel taps of (weight tap) x (strided view of the input)."""

    def taps(w: np.ndarray) -> np.ndarray:  # (M, C/g, *K) -> contiguous (K, M, C/g)
        return np.ascontiguousarray(np.moveaxis(w.reshape(*w.shape[:2], -1), 2, 0))

    prepared = Prepared(taps)

    def core(x: np.ndarray, w: np.ndarray, attrs: Attrs) -> np.ndarray:
        kernel, strides, dilations, begins, ends, out, group = _geometry(x, w, attrs)
        n, c, m = x.shape[0], x.shape[1], w.shape[0]
        cg, mg, npix = c // group, m // group, math.prod(out)
        y = np.zeros((n, group, mg, npix), dtype=x.dtype)
        if npix <= 0:
            return y.reshape(n, m, *[max(o, 0) for o in out])
        xp = pad_input(x, begins, ends)
        weights = prepared(w).reshape(-1, group, mg, cg)
        for tap, offset in enumerate(np.ndindex(*kernel)):
            index = tuple(
                slice(o * d, o * d + (size - 1) * s + 1, s)
                for o, d, size, s in zip(offset, dilations, out, strides)
            )
            view = xp[(slice(None), slice(None), *index)].reshape(n, group, cg, npix)
            if cg == 1:  # depthwise: a broadcast multiply beats a GEMM of depth 1
                y += weights[tap][None] * view
            elif cg <= SHALLOW_CHANNELS:  # BLAS is slow at tiny depths; einsum's loop is not
                y += np.einsum("gmc,ngcp->ngmp", weights[tap], view)
            else:
                y += np.matmul(weights[tap], view)
        return y.reshape(n, m, *out)

    return core


_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


def winograd_core() -> ConvCore:
    """Winograd F(2x2, 3x3): U = G g G^T per filter, V = B^T d B per 4x4 input tile,
    M = U . V summed over channels (16 GEMMs), Y = A^T M A per 2x2 output tile."""

    def transform(w: np.ndarray) -> np.ndarray:  # (M, C, 3, 3) -> (16, M, C)
        g = _WINOGRAD_G.astype(w.dtype)
        u = np.einsum("ai,mcij,bj->abmc", g, w, g)
        return np.ascontiguousarray(u.reshape(16, *w.shape[:2]))

    prepared = Prepared(transform)

    def core(x: np.ndarray, w: np.ndarray, attrs: Attrs) -> np.ndarray:
        _, _, _, begins, ends, out, _ = _geometry(x, w, attrs)
        n, c, m = x.shape[0], x.shape[1], w.shape[0]
        oh, ow = out
        if oh <= 0 or ow <= 0:
            return np.zeros((n, m, max(oh, 0), max(ow, 0)), dtype=x.dtype)
        th, tw = -(-oh // 2), -(-ow // 2)
        xp = pad_input(x, begins, ends)
        grow = (
            (0, 0),
            (0, 0),
            (0, max(0, 2 * th + 2 - xp.shape[2])),
            (0, max(0, 2 * tw + 2 - xp.shape[3])),
        )
        xp = np.pad(xp, grow) if any(g[1] for g in grow) else xp

        def b_transform(t: Any, axis: int, count: int) -> list[np.ndarray]:
            def part(k: int) -> np.ndarray:
                index = [slice(None)] * 4
                index[axis] = slice(k, k + 2 * (count - 1) + 1, 2)
                return t[tuple(index)]

            r0, r1, r2, r3 = (part(k) for k in range(4))
            return [r0 - r2, r1 + r2, r2 - r1, r1 - r3]

        v = np.empty((16, n, c, th * tw), dtype=x.dtype)
        for a, rows in enumerate(b_transform(xp, 2, th)):
            for b, tile in enumerate(b_transform(rows, 3, tw)):
                v[4 * a + b] = tile.reshape(n, c, th * tw)
        mm = np.matmul(prepared(w)[:, None], v).reshape(4, 4, n, m, th * tw)
        s0, s1 = mm[0] + mm[1] + mm[2], mm[1] - mm[2] - mm[3]
        y = np.empty((n, m, 2 * th, 2 * tw), dtype=x.dtype)
        for i, s in enumerate((s0, s1)):
            y[:, :, i::2, 0::2] = (s[0] + s[1] + s[2]).reshape(n, m, th, tw)
            y[:, :, i::2, 1::2] = (s[1] - s[2] - s[3]).reshape(n, m, th, tw)
        return y[:, :, :oh, :ow]

    return core


def conv_kernel(make_core: Callable[[], ConvCore], fused: bool) -> Callable[[Layer], Kernel]:
    """Conv / gie::ConvAct kernel around a core: bias and rounding as in the reference, then
    the fused op's epilogue."""

    def build(layer: Layer) -> Kernel:
        core = make_core()

        def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
            x, w, bias = inputs[0], inputs[1], _optional(inputs, 2)
            work = compute_dtype(x.dtype)
            y = np.ascontiguousarray(
                core(x.astype(work, copy=False), w.astype(work, copy=False), attrs)
            )
            if bias is not None:
                y += bias.astype(work).reshape((1, -1) + (1,) * (x.ndim - 2))
            y = y.astype(x.dtype, copy=False)
            return [apply_epilogue(y, _optional(inputs, 3), attrs) if fused else y]

        return kernel

    return build


def _conv_weight_shape(layer: Layer, plan: Plan) -> tuple[int, ...] | None:
    spec = plan.specs.get(layer.inputs[1])
    weight = plan.constants.get(layer.inputs[1])
    if weight is not None:
        return tuple(weight.shape)
    return tuple(spec.shape) if spec is not None and spec.is_static else None  # type: ignore


def check_winograd(layer: Layer, plan: Plan) -> str | None:
    """Why Winograd F(2x2,3x3) does not apply to this convolution (None when it does)."""
    shape = _conv_weight_shape(layer, plan)
    if shape is None:
        return "winograd_f2x3 needs a known weight shape"
    kernel = layer.attrs.ints("kernel_shape") or list(shape[2:])
    if len(kernel) != 2:
        return f"winograd_f2x3 needs a 2-D convolution (got {len(kernel)}-D)"
    if list(kernel) != [3, 3]:
        return f"winograd_f2x3 needs a 3x3 kernel (got {'x'.join(map(str, kernel))})"
    strides = layer.attrs.ints("strides") or [1, 1]
    if any(s != 1 for s in strides):
        return f"winograd_f2x3 needs stride 1 (got {'x'.join(map(str, strides))})"
    dilations = layer.attrs.ints("dilations") or [1, 1]
    if any(d != 1 for d in dilations):
        return f"winograd_f2x3 needs dilation 1 (got {'x'.join(map(str, dilations))})"
    group = layer.attrs.int("group", 1)
    if group != 1:
        return f"winograd_f2x3 needs group 1 (got {group})"
    return None


# --------------------------------------------------------------------------- GEMM

Product = Callable[[np.ndarray, np.ndarray, bool], np.ndarray]


def matmul_product() -> Product:
    return lambda a, b, trans_b: np.matmul(a, b.swapaxes(-1, -2) if trans_b else b)


def einsum_product() -> Product:
    def product(a: np.ndarray, b: np.ndarray, trans_b: bool) -> np.ndarray:
        equation = "...ik,...jk->...ij" if trans_b else "...ik,...kj->...ij"
        return np.einsum(equation, a, b, optimize=True)

    return product


def transposed_b_product() -> Product:
    prepared = Prepared(lambda b: np.ascontiguousarray(b.T))

    def product(a: np.ndarray, b: np.ndarray, trans_b: bool) -> np.ndarray:
        stored = prepared(b)  # B^T, contiguous: op(B) is then a view of it
        return np.matmul(a, stored if trans_b else stored.T)

    return product


def gemm_kernel(make_product: Callable[[], Product]) -> Callable[[Layer], Kernel]:
    """MatMul / Gemm / gie::GemmAct kernel around a product, rounding as the reference does."""

    def build(layer: Layer) -> Kernel:
        product = make_product()
        op = layer.qualified_op

        def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
            a, b, c = inputs[0], inputs[1], _optional(inputs, 2)
            if op == "MatMul" or (op == "gie::GemmAct" and _is_matmul(attrs)):
                y = np.asarray(product(_work(a), _work(b), False)).astype(a.dtype, copy=False)
                if op == "MatMul":
                    return [y]
                if c is not None:
                    y = y + c.astype(y.dtype, copy=False)
            else:
                wa = _work(a).T if attrs.int("transA", 0) else _work(a)
                y = product(wa, _work(b), bool(attrs.int("transB", 0)))
                alpha, beta = attrs.float("alpha", 1.0), attrs.float("beta", 1.0)
                if alpha != 1.0:
                    y = y * np.asarray(alpha, dtype=y.dtype)
                if c is not None and beta != 0.0:
                    wc = _work(c)
                    y = y + (wc if beta == 1.0 else wc * np.asarray(beta, dtype=wc.dtype))
                y = y.astype(a.dtype, copy=False)
            return [apply_epilogue(y, _optional(inputs, 3), attrs) if op != "Gemm" else y]

        return kernel

    return build


def _operand_ranks(layer: Layer, plan: Plan) -> tuple[int | None, int | None]:
    a, b = plan.specs.get(layer.inputs[0]), plan.specs.get(layer.inputs[1])
    return (a.rank if a else None), (b.rank if b else None)


def check_einsum(layer: Layer, plan: Plan) -> str | None:
    ranks = _operand_ranks(layer, plan)
    if any(r is None or r < 2 for r in ranks):
        return f"einsum needs operands of rank >= 2 (got ranks {ranks})"
    return None


def check_transposed_b(layer: Layer, plan: Plan) -> str | None:
    weight = plan.constants.get(layer.inputs[1])
    if weight is None:
        return "transposed_b needs a constant B"
    if weight.ndim != 2 or _operand_ranks(layer, plan)[0] in (None, 1):
        return f"transposed_b needs a 2-D B and an A of rank >= 2 (B is {weight.ndim}-D)"
    return None


# --------------------------------------------------------------------------- attention


def attention_per_head(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """gie::Attention one head at a time (same arithmetic as the batched reference)."""
    q, k, v, mask = inputs[0], inputs[1], inputs[2], _optional(inputs, 3)
    heads = attrs.int("num_heads")
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise KernelError("gie::Attention: Q, K and V must be [batch, seq, hidden]")
    if q.shape[-1] % heads or v.shape[-1] % heads or q.shape[-1] != k.shape[-1]:
        raise KernelError(f"gie::Attention: hidden sizes do not split into {heads} heads")
    dtype = np.float64 if q.dtype == np.float64 else np.float32
    seq_q, seq_k = q.shape[1], k.shape[1]
    head_dim, head_dim_v = q.shape[-1] // heads, v.shape[-1] // heads
    scale = dtype(attrs.float("scale", 1.0 / math.sqrt(head_dim)))
    q4 = q.astype(dtype).reshape(q.shape[0], seq_q, heads, head_dim)
    k4 = k.astype(dtype).reshape(k.shape[0], seq_k, heads, head_dim)
    v4 = v.astype(dtype).reshape(v.shape[0], seq_k, heads, head_dim_v)
    if mask is not None:
        mask = mask.astype(dtype).reshape((1,) * (4 - mask.ndim) + mask.shape)
    allowed = np.tril(np.ones((seq_q, seq_k), dtype=bool), k=seq_k - seq_q)
    out: np.ndarray | None = None
    for h in range(heads):
        scores = np.matmul(q4[:, :, h], k4[:, :, h].transpose(0, 2, 1)) * scale
        if mask is not None:
            scores = scores + mask[:, h if mask.shape[1] > 1 else 0]
        if attrs.int("causal", 0):
            scores = np.where(allowed, scores, dtype(-np.inf))
        scores = scores - scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=-1, keepdims=True)
        head = np.matmul(weights, v4[:, :, h])
        if out is None:
            out = np.empty((head.shape[0], seq_q, heads * head_dim_v), dtype=dtype)
        out[:, :, h * head_dim_v : (h + 1) * head_dim_v] = head
    assert out is not None
    return [out.astype(q.dtype, copy=False)]


__all__ = [
    "ConvCore",
    "Product",
    "attention_per_head",
    "check_einsum",
    "check_transposed_b",
    "check_winograd",
    "conv_kernel",
    "direct_core",
    "einsum_product",
    "gemm_kernel",
    "im2col_core",
    "matmul_product",
    "transposed_b_product",
    "winograd_core",
]
