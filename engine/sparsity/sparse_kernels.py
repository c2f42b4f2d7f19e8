"""Reference GEMM and convolution computed from the 2:4 compressed form (the oracle for mma.sp).

Both read only ``values`` and the metadata of a :class:`~engine.sparsity.compress.Compressed`
weight: every stored value is multiplied by the input row its 2-bit index selects, so the work is
K/2 multiply-adds per output (the dense product does K).

Accumulation: integer operands (int8 x int8) accumulate exactly in int64 and are returned as
int32 (an error if a sum leaves the int32 range), so the result equals the dense int8 product
bit for bit. Floating operands accumulate in float64 and are returned as float32 (float64 when
the input is float64): at least as accurate as a float32 dense GEMM, so the two agree within a
few float32 ulps of the sum of |terms|.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engine.ops.conv import window_attrs, window_geometry, windows
from engine.ops.registry import Attrs
from engine.sparsity.compress import Compressed, column_indices

_INT32 = np.iinfo(np.int32)


def _is_integer(values: np.ndarray, x: np.ndarray) -> bool:
    return np.issubdtype(values.dtype, np.integer) and np.issubdtype(x.dtype, np.integer)


def _accumulator(values: np.ndarray, x: np.ndarray) -> np.dtype:
    return np.dtype(np.int64) if _is_integer(values, x) else np.dtype(np.float64)


def _result(acc: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The accumulator in the output dtype (int32, float32 or float64; see the module)."""
    if _is_integer(values, x):
        if acc.size and (acc.min() < _INT32.min or acc.max() > _INT32.max):
            raise OverflowError("an integer dot product leaves the int32 accumulator range")
        return acc.astype(np.int32)
    return acc.astype(np.float64 if x.dtype == np.float64 else np.float32)


def _sparse_rows_times(
    values: np.ndarray, columns: np.ndarray, source: np.ndarray, acc: np.ndarray
) -> None:
    """acc[r] += sum_j values[r, j] * source[columns[r, j]] (source rows are vectors)."""
    work = acc.dtype
    for j in range(values.shape[1]):
        acc += values[:, j, None].astype(work) * source[columns[:, j]].astype(work)


def sparse_matmul(compressed: Compressed, x: np.ndarray) -> np.ndarray:
    """``matrix @ x`` for the compressed ``[rows, K]`` matrix and ``x [K, N]`` (or ``[K]``)."""
    x = np.asarray(x)
    rows, width = compressed.shape
    if x.shape[0] != width:
        raise ValueError(f"x has {x.shape[0]} rows, the matrix has K = {width}")
    vector = x.ndim == 1
    columns = x.reshape(width, -1)
    padded = np.zeros((compressed.padded_shape[1], columns.shape[1]), dtype=x.dtype)
    padded[:width] = columns
    values = compressed.values[:rows]
    acc = np.zeros((rows, columns.shape[1]), dtype=_accumulator(values, x))
    _sparse_rows_times(values, column_indices(compressed)[:rows], padded, acc)
    result = _result(acc, values, x)
    return result[:, 0] if vector else result


def sparse_conv(
    compressed: Compressed,
    attrs: Attrs | Mapping[str, Any],
    x: np.ndarray,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """ONNX Conv of ``x [N, C, *S]`` with the compressed reduction matrix of its weight.

    The matrix is the one :func:`engine.sparsity.check.reduction_matrix` builds for Conv:
    ``[M * prod(kernel), C/group]``, row ``m * prod(kernel) + offset``. ``attrs`` are the Conv
    attributes and must give ``kernel_shape``; ``group``, ``strides``, ``pads``, ``dilations``
    and ``auto_pad`` as ONNX. im2col gathers, for every kernel offset, the input channels in the
    same order as the matrix's columns.
    """
    attrs = attrs if isinstance(attrs, Attrs) else Attrs(dict(attrs))
    x = np.asarray(x)
    spatial = x.ndim - 2
    kernel_shape = attrs.ints("kernel_shape")
    if not kernel_shape:
        raise ValueError("sparse_conv needs the kernel_shape attribute")
    kernel, strides, dilations, pads, auto_pad = window_attrs(attrs, spatial, kernel_shape)
    out, begins, ends = window_geometry(x.shape[2:], kernel, strides, dilations, pads, auto_pad)
    out = [int(size) for size in out]  # type: ignore[arg-type]
    group = attrs.int("group", 1)
    rows, width = compressed.shape
    ksize, batch, channels = int(np.prod(kernel)), x.shape[0], x.shape[1]
    filters = rows // ksize
    if rows % ksize or channels != width * group or filters % group:
        raise ValueError(
            f"matrix {compressed.shape} does not fit input channels {channels}, kernel {kernel}"
            f" and group {group}"
        )
    pixels = batch * int(np.prod(out))
    view = windows(x, kernel, strides, dilations, begins, ends, out)  # (N, C, *out, *kernel)
    view = view.reshape(batch, group, width, *out, *kernel)
    order = (1, *range(3 + spatial, 3 + 2 * spatial), 2, 0, *range(3, 3 + spatial))
    cols = view.transpose(order).reshape(group, ksize, width, pixels)
    padded = np.zeros((group, ksize, compressed.padded_shape[1], pixels), dtype=x.dtype)
    padded[:, :, :width] = cols
    values, columns = compressed.values[:rows], column_indices(compressed)[:rows]
    acc = np.zeros((filters, pixels), dtype=_accumulator(values, x))
    group_of_filter = np.arange(filters) // (filters // group)
    for offset in range(ksize):
        picked = np.arange(filters) * ksize + offset
        for gi in range(group):
            members = picked[group_of_filter == gi]
            part = np.zeros((members.size, pixels), dtype=acc.dtype)
            _sparse_rows_times(values[members], columns[members], padded[gi, offset], part)
            acc[group_of_filter == gi] += part
    if bias is not None:
        acc += np.asarray(bias).astype(acc.dtype)[:, None]
    result = _result(acc, values, x)
    return np.ascontiguousarray(result.reshape(filters, batch, *out).swapaxes(0, 1))


__all__ = ["sparse_conv", "sparse_matmul"]
