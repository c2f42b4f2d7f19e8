"""Convolutions: Conv, ConvTranspose and DeformConv, plus the window geometry pools share.

Conv is computed as im2col (a strided sliding-window view copied once) followed by one batched
GEMM over the groups (depthwise convolutions included); 1x1 convolutions skip the copy.
ConvTranspose does the GEMM first and scatters (col2im) the columns into the output with one
strided add per kernel offset. Half-precision inputs are accumulated in float32 and cast back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine.ops.common import Dim, _bytes, _numel
from engine.ops.registry import Attrs, KernelContext, KernelError, OpCost, OpSpec, TensorSpec

# --------------------------------------------------------------------------- window geometry


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype arithmetic runs in: float64 stays, everything else accumulates in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def window_geometry(
    in_shape: Sequence[Dim],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int] | None,
    auto_pad: str,
    ceil_mode: bool = False,
) -> tuple[list[Dim], list[int], list[int]]:
    """Output spatial dims and (begin, end) pads of a sliding-window op (Conv and the pools).

    Unknown or symbolic input dims give None output dims (and zero pads). End pads are grown so
    that every output window lies inside the padded input (ceil mode may need that).
    """
    rank = len(in_shape)
    explicit = list(pads) if pads else [0] * (2 * rank)
    outs: list[Dim] = []
    begins, ends = [], []
    for i, size in enumerate(in_shape):
        span = (kernel[i] - 1) * dilations[i] + 1
        if not isinstance(size, int):
            outs.append(None)
            begins.append(explicit[i])
            ends.append(explicit[i + rank])
            continue
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + span - size)
            small = total // 2
            begin = small if auto_pad == "SAME_UPPER" else total - small
            end = total - begin
        elif auto_pad == "VALID":
            begin = end = 0
            out = (size - span) // strides[i] + 1
        else:
            begin, end = explicit[i], explicit[i + rank]
            room = size + begin + end - span
            if ceil_mode:
                out = -(-room // strides[i]) + 1
                if (out - 1) * strides[i] >= size + begin:
                    out -= 1
            else:
                out = room // strides[i] + 1
        out = max(out, 0)
        end = max(end, (out - 1) * strides[i] + span - size - begin)
        outs.append(out)
        begins.append(begin)
        ends.append(end)
    return outs, begins, ends


def window_attrs(
    attrs: Attrs, spatial: int, kernel: Sequence[int] | None = None
) -> tuple[list[int], list[int], list[int], list[int] | None, str]:
    """(kernel_shape, strides, dilations, pads, auto_pad) with ONNX defaults filled in."""
    kernel = attrs.ints("kernel_shape") or (list(kernel) if kernel is not None else None)
    if kernel is None:
        raise KernelError("kernel_shape is required")
    strides = attrs.ints("strides") or [1] * spatial
    dilations = attrs.ints("dilations") or [1] * spatial
    auto_pad = attrs.str("auto_pad", "NOTSET") or "NOTSET"
    return list(kernel), strides, dilations, attrs.ints("pads"), auto_pad


def pad_input(
    x: np.ndarray, begins: Sequence[int], ends: Sequence[int], fill: float = 0.0
) -> np.ndarray:
    """x padded (or, for negative pads, cropped) on its spatial axes with ``fill``."""
    if not any(begins) and not any(ends):
        return x
    pad_width = [(0, 0), (0, 0)] + [(max(b, 0), max(e, 0)) for b, e in zip(begins, ends)]
    x = np.pad(x, pad_width, constant_values=fill)
    crop = tuple(
        slice(-min(b, 0), x.shape[2 + i] + min(e, 0)) for i, (b, e) in enumerate(zip(begins, ends))
    )
    return x[(slice(None), slice(None), *crop)]


def windows(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    begins: Sequence[int],
    ends: Sequence[int],
    out: Sequence[int],
    fill: float = 0.0,
) -> np.ndarray:
    """Strided view (N, C, *out, *kernel) of the padded input's sliding windows (no copy
    beyond the padding)."""
    spatial = len(kernel)
    if any(o <= 0 for o in out):
        return np.zeros((*x.shape[:2], *[max(o, 0) for o in out], *kernel), dtype=x.dtype)
    x = pad_input(x, begins, ends, fill)
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    view = sliding_window_view(x, spans, axis=tuple(range(2, 2 + spatial)))
    index = (
        slice(None),
        slice(None),
        *tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(out, strides)),
        *tuple(slice(None, None, d) for d in dilations),
    )
    return view[index]


# --------------------------------------------------------------------------- Conv


def _conv_core(
    x: np.ndarray, w: np.ndarray, group: int, attrs: Attrs, kernel: Sequence[int]
) -> np.ndarray:
    """Convolution of x (N, C, *S) with w (M, C/group, *K) in the dtype of x (no bias)."""
    spatial = x.ndim - 2
    kernel, strides, dilations, pads, auto_pad = window_attrs(attrs, spatial, kernel)
    out, begins, ends = window_geometry(x.shape[2:], kernel, strides, dilations, pads, auto_pad)
    n, c = x.shape[:2]
    m = w.shape[0]
    cg, mg = c // group, m // group
    if c != w.shape[1] * group or m % group:
        raise KernelError(f"channels {c} / weight {w.shape} do not match group {group}")
    npix = int(np.prod(out))
    ksize = int(np.prod(kernel))
    if ksize == 1 and not any(begins) and not any(ends):
        if any(st != 1 for st in strides):
            x = x[(Ellipsis, *[slice(0, (o - 1) * st + 1, st) for o, st in zip(out, strides)])]
        cols = x.reshape(n, group, cg, npix)
        result = np.matmul(w.reshape(group, mg, cg), cols)
        return result.reshape(n, m, *out)
    shifted = group == 1 and c >= SHIFTED_MIN_CHANNELS and m <= SHIFTED_MAX_FILTERS
    if shifted and npix <= SHIFTED_MAX_PIXELS and all(st == 1 for st in strides):
        return _conv_shifted(x, w, (kernel, dilations, begins, ends, out))
    view = windows(x, kernel, strides, dilations, begins, ends, out)
    # (N, C, *out, *K) -> (group, C/group*K, N*out): the copy runs along contiguous output rows
    view = view.reshape(n, group, cg, *out, *kernel)
    order = (1, 2, *range(3 + spatial, 3 + 2 * spatial), 0, *range(3, 3 + spatial))
    cols = view.transpose(order).reshape(group, cg * ksize, n * npix)
    result = np.matmul(w.reshape(group, mg, cg * ksize), cols)  # (group, mg, N*out)
    if n == 1:
        return result.reshape(1, m, *out)
    return result.reshape(m, n, *out).swapaxes(0, 1)


#: Stride-1 ungrouped convolutions with at least this many input channels, at most this many
#: filters and output pixels skip im2col (measured faster there; large filter banks favour im2col).
SHIFTED_MIN_CHANNELS = 16
SHIFTED_MAX_FILTERS = 64
SHIFTED_MAX_PIXELS = 4096


def _conv_shifted(x: np.ndarray, w: np.ndarray, geometry: tuple) -> np.ndarray:
    """Stride-1 convolution as one GEMM per kernel offset on the flattened padded input.

    ``geometry`` is (kernel, dilations, begin pads, end pads, output spatial dims).

    With the padded spatial dims flattened, the input a kernel offset multiplies is a contiguous
    window of every channel row, so no im2col copy is made; the output carries the padded row
    pitch and is cropped at the end. One extra slab of padding keeps the last window in bounds.
    """
    kernel, dilations, begins, ends, out = geometry
    n, c = x.shape[:2]
    m = w.shape[0]
    xp = pad_input(x, begins, [e + (1 if i == 0 else 0) for i, e in enumerate(ends)])
    padded = xp.shape[2:]
    pitch = [int(np.prod(padded[i + 1 :])) for i in range(len(padded))]
    length = out[0] * pitch[0]
    flat = np.ascontiguousarray(xp).reshape(n, c, -1)
    weights = np.ascontiguousarray(np.moveaxis(w.reshape(m, c, -1), 2, 0))  # (K, M, C)
    result = np.matmul(weights[0], flat[:, :, :length])
    for k, offset in enumerate(np.ndindex(*kernel)):
        start = sum(o * d * p for o, d, p in zip(offset, dilations, pitch))
        if k:
            result += np.matmul(weights[k], flat[:, :, start : start + length])
    result = result.reshape(n, m, out[0], *padded[1:])
    return np.ascontiguousarray(result[(Ellipsis, *[slice(0, o) for o in out[1:]])])


#: Largest im2col buffer built at once; bigger batches are convolved in batch chunks.
IM2COL_BYTES = 256 << 20


def _conv(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """Conv: N-D grouped, strided, dilated, padded convolution plus optional bias."""
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    work = compute_dtype(x.dtype)
    xs, ws = x.astype(work, copy=False), w.astype(work, copy=False)
    group = attrs.int("group", 1)
    per_image = x[:1].size * int(np.prod(w.shape[2:])) * work.itemsize
    chunk = max(1, IM2COL_BYTES // max(per_image, 1))
    parts = [
        _conv_core(xs[i : i + chunk], ws, group, attrs, w.shape[2:])
        for i in range(0, x.shape[0], chunk)
    ]
    result = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if bias is not None:
        result += bias.astype(work).reshape((1, -1) + (1,) * (x.ndim - 2))
    return [np.ascontiguousarray(result).astype(x.dtype, copy=False)]


def _conv_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """(N, M, *out) with the window geometry of the attributes."""
    x, w = specs[0], specs[1]
    if x.shape is None or w.shape is None:
        return [TensorSpec(None, x.dtype)]
    spatial = len(x.shape) - 2
    kernel = attrs.ints("kernel_shape") or list(w.shape[2:])
    if not all(isinstance(k, int) for k in kernel):
        return [TensorSpec((x.shape[0], w.shape[0]) + (None,) * spatial, x.dtype)]
    kernel, strides, dilations, pads, auto_pad = window_attrs(attrs, spatial, kernel)
    out, _, _ = window_geometry(x.shape[2:], kernel, strides, dilations, pads, auto_pad)
    return [TensorSpec((x.shape[0], w.shape[0], *out), x.dtype)]


def _conv_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """2 * Cin/group * prod(kernel) FLOPs per output element."""
    w = ins[1]
    per_output = 2 * (int(np.prod(w.shape[1:])) if w.is_static else 0)
    return OpCost(per_output * _numel(outs[0]), _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- ConvTranspose


def _transpose_geometry(
    in_shape: Sequence[Dim], kernel: Sequence[int], attrs: Attrs
) -> tuple[list[Dim], list[int]]:
    """Output spatial dims and begin pads of ConvTranspose."""
    spatial = len(in_shape)
    strides = attrs.ints("strides") or [1] * spatial
    dilations = attrs.ints("dilations") or [1] * spatial
    out_pad = attrs.ints("output_padding") or [0] * spatial
    pads = attrs.ints("pads")
    auto_pad = attrs.str("auto_pad", "NOTSET") or "NOTSET"
    output_shape = attrs.ints("output_shape")
    if output_shape is not None and len(output_shape) > spatial:
        output_shape = output_shape[-spatial:]
    outs: list[Dim] = []
    begins: list[int] = []
    for i, size in enumerate(in_shape):
        span = (kernel[i] - 1) * dilations[i] + 1
        if not isinstance(size, int):
            outs.append(output_shape[i] if output_shape else None)
            begins.append(pads[i] if pads else 0)
            continue
        full = strides[i] * (size - 1) + out_pad[i] + span
        if output_shape is not None or (auto_pad in ("SAME_UPPER", "SAME_LOWER") and not pads):
            target = output_shape[i] if output_shape is not None else size * strides[i]
            total = full - target
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            outs.append(target)
            begins.append(begin)
        else:
            begin, end = (pads[i], pads[i + spatial]) if pads else (0, 0)
            outs.append(full - begin - end)
            begins.append(begin)
    return outs, begins


def _convt(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """ConvTranspose: GEMM of the input with the weights, then col2im scatter and crop."""
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    work = compute_dtype(x.dtype)
    spatial = x.ndim - 2
    group = attrs.int("group", 1)
    kernel = list(w.shape[2:])
    strides = attrs.ints("strides") or [1] * spatial
    dilations = attrs.ints("dilations") or [1] * spatial
    out, begins = _transpose_geometry(x.shape[2:], kernel, attrs)
    n, c = x.shape[:2]
    cg, mg = c // group, w.shape[1]
    insz = x.shape[2:]
    npix = int(np.prod(insz))
    ksize = int(np.prod(kernel))
    xs = x.astype(work, copy=False).reshape(n, group, cg, npix)
    ws = w.astype(work, copy=False).reshape(group, cg, mg * ksize)
    # (group, N, mg*K, npix)
    cols = np.matmul(ws.transpose(0, 2, 1)[:, None], xs.transpose(1, 0, 2, 3))
    cols = cols.reshape(group, n, mg, ksize, *insz)
    shift = [max(-b, 0) for b in begins]  # negative begin pads: output starts before col 0
    full_shape = [
        max(s * (i - 1) + (k - 1) * d + 1, max(b, 0) + o) + sh
        for s, i, k, d, b, o, sh in zip(strides, insz, kernel, dilations, begins, out, shift)
    ]
    full = np.zeros((group, n, mg, *full_shape), dtype=work)
    for k, offset in enumerate(np.ndindex(*kernel)):
        index = tuple(
            slice(sh + o * d, sh + o * d + s * (i - 1) + 1, s)
            for sh, o, d, s, i in zip(shift, offset, dilations, strides, insz)
        )
        full[(slice(None), slice(None), slice(None), *index)] += cols[:, :, :, k]
    crop = tuple(slice(b + sh, b + sh + o) for b, sh, o in zip(begins, shift, out))
    result = full[(slice(None), slice(None), slice(None), *crop)]
    result = result.transpose(1, 0, 2, *range(3, 3 + spatial)).reshape(n, group * mg, *out)
    if bias is not None:
        result = result + bias.astype(work).reshape((1, -1) + (1,) * spatial)
    return [np.ascontiguousarray(result).astype(x.dtype, copy=False)]


def _convt_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """(N, M, *out) from strides, pads, output_padding or output_shape."""
    x, w = specs[0], specs[1]
    if x.shape is None or w.shape is None:
        return [TensorSpec(None, x.dtype)]
    group = attrs.int("group", 1)
    channels = w.shape[1] * group if isinstance(w.shape[1], int) else None
    kernel = attrs.ints("kernel_shape") or list(w.shape[2:])
    if not all(isinstance(k, int) for k in kernel):
        return [TensorSpec((x.shape[0], channels) + (None,) * (len(x.shape) - 2), x.dtype)]
    out, _ = _transpose_geometry(x.shape[2:], kernel, attrs)
    return [TensorSpec((x.shape[0], channels, *out), x.dtype)]


def _convt_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """2 * M/group * prod(kernel) FLOPs per input element."""
    w = ins[1]
    per_input = 2 * (int(np.prod(w.shape[1:])) if w.is_static else 0)
    return OpCost(per_input * _numel(ins[0]), _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- DeformConv


def _bilinear(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample img (N, G, C, H, W) at (N, G, P) float positions; zero outside -> (N, G, C, P)."""
    h, w = img.shape[-2:]
    y0, x0 = np.floor(ys), np.floor(xs)
    result = np.zeros(img.shape[:3] + ys.shape[2:], dtype=img.dtype)
    n_idx = np.arange(img.shape[0])[:, None, None]
    g_idx = np.arange(img.shape[1])[None, :, None]
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            weight = (1 - np.abs(ys - yy)) * (1 - np.abs(xs - xx))
            valid = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            yi = np.clip(yy, 0, h - 1).astype(np.int64)
            xi = np.clip(xx, 0, w - 1).astype(np.int64)
            vals = img[n_idx, g_idx, :, yi, xi]  # (N, G, P, C)
            result += np.moveaxis(vals * (weight * valid)[..., None], -1, 2)
    return result


def _deform_conv(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """DeformConv (2-D): bilinear samples at offset taps (optionally masked), then GEMM."""
    x, w, offset = inputs[0], inputs[1], inputs[2]
    bias = inputs[3] if len(inputs) > 3 else None
    mask = inputs[4] if len(inputs) > 4 else None
    if x.ndim != 4:
        raise KernelError("DeformConv supports 2-D inputs only")
    work = compute_dtype(x.dtype)
    group = attrs.int("group", 1)
    ogroups = attrs.int("offset_group", 1)
    kernel, strides, dilations, pads, _ = window_attrs(attrs, 2, w.shape[2:])
    out, begins, _ = window_geometry(x.shape[2:], kernel, strides, dilations, pads, "NOTSET")
    n, c, _, _ = x.shape
    oh, ow = out
    kh, kw = kernel
    ksize = kh * kw
    off = offset.astype(work).reshape(n, ogroups, ksize, 2, oh, ow)
    ky, kx = np.meshgrid(np.arange(kh) * dilations[0], np.arange(kw) * dilations[1], indexing="ij")
    base_y = np.arange(oh) * strides[0] - begins[0]
    base_x = np.arange(ow) * strides[1] - begins[1]
    ys = base_y[None, :, None] + ky.reshape(-1, 1, 1) + off[:, :, :, 0]
    xs = base_x[None, None, :] + kx.reshape(-1, 1, 1) + off[:, :, :, 1]
    img = x.astype(work).reshape(n, ogroups, c // ogroups, *x.shape[2:])
    sampled = _bilinear(img, ys.reshape(n, ogroups, -1), xs.reshape(n, ogroups, -1))
    sampled = sampled.reshape(n, c, ksize, oh * ow)
    if mask is not None:
        m = mask.astype(work).reshape(n, ogroups, 1, ksize, oh * ow)
        sampled = (sampled.reshape(n, ogroups, c // ogroups, ksize, -1) * m).reshape(sampled.shape)
    mch = w.shape[0]
    cols = sampled.reshape(n, group, (c // group) * ksize, oh * ow)
    wg = w.astype(work).reshape(group, mch // group, (c // group) * ksize)
    result = np.matmul(wg[None], cols).reshape(n, mch, oh, ow)
    if bias is not None:
        result += bias.astype(work).reshape(1, -1, 1, 1)
    return [result.astype(x.dtype, copy=False)]


def _deform_conv_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """Conv FLOPs plus about 8 per bilinear sample (one per input channel, kernel tap, pixel)."""
    conv = _conv_cost(ins, outs, attrs)
    channels = ins[0].shape[1] if ins[0].shape and isinstance(ins[0].shape[1], int) else 0
    samples = _numel(ins[2]) // 2 * channels // attrs.int("offset_group", 1)
    return OpCost(conv.flops + 8 * samples, conv.bytes_read, conv.bytes_written)


OPS: list[OpSpec] = [
    OpSpec("Conv", _conv, _conv_shape, _conv_cost, family="conv"),
    OpSpec("ConvTranspose", _convt, _convt_shape, _convt_cost, family="conv"),
    OpSpec("DeformConv", _deform_conv, _conv_shape, _deform_conv_cost, family="conv"),
]

__all__ = ["OPS", "compute_dtype", "pad_input", "window_attrs", "window_geometry", "windows"]
