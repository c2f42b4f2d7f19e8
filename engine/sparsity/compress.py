"""2:4 compressed weights: the kept values plus 2-bit indices packed as mma.sp metadata.

A 2:4 matrix ``[rows, K]`` (at most 2 non-zeros in every group of 4 consecutive values along K)
is stored as

``values [rows, K/2]``
    the 2 kept values of every group, lower column first, in row-major natural order;
``metadata``
    for every group, the two in-group indices ``i0 < i1`` (0..3) of the kept values, as a 4-bit
    nibble ``i0 | i1 << 2`` (the encodings mma.sp accepts: 0x4, 0x8, 0xC, 0x9, 0xD, 0xE).
    Nibbles are packed into words along K, group j of a word in bits ``4j .. 4j+3`` (the lowest
    K first): a uint16 word holds 4 groups (16 columns) for ``sm80_f16`` (mma.sp m16n8k32 f16),
    a uint32 word holds 8 groups (32 columns) for ``sm80_s8`` (mma.sp m16n8k64 s8). A group with
    fewer than 2 non-zeros stores its non-zero (if any) and the lowest-index zero(s), so its
    indices stay ascending and distinct.

Worked example (``sm80_f16``), the first 16 columns of a row::

    columns  0..3: [0, 1.5, 0, -2]  -> indices (1, 3) -> nibble 0b11_01 = 0xD, values 1.5, -2
    columns  4..7: [3, 0, 0, 0]     -> indices (0, 1) -> nibble 0b01_00 = 0x4, values 3, 0
    columns 8..11: [0, 0, 0, 0]     -> indices (0, 1) -> nibble 0x4,           values 0, 0
    columns 12..15: [0, 0, 5, 6]    -> indices (2, 3) -> nibble 0b11_10 = 0xE, values 5, 6
    word = 0xD | 0x4 << 4 | 0x4 << 8 | 0xE << 12 = 0xE44D

Metadata reordering (CUTLASS's layout for its SM80 sparse tensor-core GEMM)
    The natural metadata matrix ``[rows, W]`` (row r, word w as above) is not stored row-major:
    it is permuted the way CUTLASS's ``reorder_meta`` (tools/util/host_reorder.h) does for its
    ``ColumnMajorInterleaved<2>`` metadata layout, as PyTorch's
    ``torch/sparse/_semi_structured_conversions.py`` documents, so that each thread of a warp
    loads the metadata register mma.sp expects with plain loads. Natural element (r, w) goes to
    flat offset ``(w' // 2) * 2 * rows + r' * 2 + w' % 2`` of the stored buffer, where

    1. rows are interleaved inside blocks of ``B`` rows (B = 32 for f16, 16 for s8):
       ``r' = r // B * B + (r % 8) * (B // 8) + (r % B) // 8`` (rows r, r+8, r+16, r+24 of a
       block become neighbours);
    2. every 2x2 block of (r', w) is transposed: (even r', odd w) -> (r'+1, w-1) and
       (odd r', even w) -> (r'-1, w+1), giving (r', w');
    3. the result is stored column-major with column pairs interleaved (interleave 2).

    The stored buffer is kept with shape ``[rows, W]``, like PyTorch's ``meta_reordered``.

Tiles: ``sm80_f16`` needs rows a multiple of 32 and K of 32 (one m16n8k32 step = 2 uint16 words
per row); ``sm80_s8`` rows a multiple of 16 and K of 64 (one m16n8k64 step = 2 uint32 words).
:func:`compress_2_4` pads the matrix with zero rows/columns up to the tiles and records the
logical ``shape``; :func:`decompress` returns the logical matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from engine.sparsity.check import GROUP


class SparseLayout(StrEnum):
    """Which mma.sp operand-A metadata layout the words follow."""

    SM80_F16 = "sm80_f16"
    SM80_S8 = "sm80_s8"


@dataclass(frozen=True)
class LayoutSpec:
    """Geometry of a layout: word dtype, groups per word, tile sizes, row-interleave block."""

    meta_dtype: np.dtype
    groups_per_word: int
    row_tile: int
    k_tile: int
    row_block: int


LAYOUTS: dict[SparseLayout, LayoutSpec] = {
    SparseLayout.SM80_F16: LayoutSpec(np.dtype(np.uint16), 4, 32, 32, 32),
    SparseLayout.SM80_S8: LayoutSpec(np.dtype(np.uint32), 8, 16, 64, 16),
}


@dataclass(frozen=True, eq=False)
class Compressed:
    """A 2:4 matrix in compressed form (see the module docstring).

    ``values [rows_p, K_p/2]`` and ``metadata [rows_p, K_p/(4*groups_per_word)]`` cover the
    matrix padded to the layout's tiles; ``shape`` is the logical (rows, K).
    """

    values: np.ndarray
    metadata: np.ndarray
    layout: SparseLayout
    shape: tuple[int, int]

    @property
    def padded_shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), int(self.values.shape[1]) * 2)


class Not24Error(ValueError):
    """The matrix has a group of 4 along K with more than 2 non-zero values."""


def _round_up(size: int, tile: int) -> int:
    return -(-size // tile) * tile


def default_layout(dtype: np.dtype) -> SparseLayout:
    """``sm80_s8`` for int8 values, ``sm80_f16`` for floating point values."""
    if dtype == np.int8:
        return SparseLayout.SM80_S8
    if np.issubdtype(dtype, np.floating):
        return SparseLayout.SM80_F16
    raise ValueError(f"no 2:4 layout for {dtype} values (float16/float32 or int8)")


def first_bad_group(matrix: np.ndarray) -> tuple[int, int, int] | None:
    """(row, first column, non-zero count) of the first group breaking 2:4, row-major; None
    when the matrix is 2:4."""
    rows, width = matrix.shape
    counts = (matrix != 0).reshape(rows, width // GROUP, GROUP).sum(axis=-1)
    bad = np.argwhere(counts > GROUP // 2)
    if bad.size == 0:
        return None
    row, group = (int(v) for v in bad[0])
    return row, group * GROUP, int(counts[row, group])


def reorder_offsets(rows: int, words: int, layout: SparseLayout) -> np.ndarray:
    """Flat offset in the stored metadata of natural element (r, w), as ``[rows, words]``."""
    block = LAYOUTS[layout].row_block
    row = np.arange(rows)[:, None] + np.zeros((1, words), dtype=np.int64)
    word = np.arange(words)[None, :] + np.zeros((rows, 1), dtype=np.int64)
    row = row // block * block + (row % 8) * (block // 8) + (row % block) // 8
    down = ((row % 2 == 0) & (word % 2 == 1)).astype(np.int64)
    up = ((row % 2 == 1) & (word % 2 == 0)).astype(np.int64)
    row, word = row + down - up, word - down + up
    return (word // 2) * 2 * rows + row * 2 + word % 2


def _pack(indices: np.ndarray, spec: LayoutSpec) -> np.ndarray:
    """Natural metadata words ``[rows, W]`` from in-group indices ``[rows, groups, 2]``."""
    nibbles = (indices[..., 0] | (indices[..., 1] << 2)).astype(np.uint64)
    rows = nibbles.shape[0]
    nibbles = nibbles.reshape(rows, -1, spec.groups_per_word)
    shifts = (4 * np.arange(spec.groups_per_word)).astype(np.uint64)
    return np.bitwise_or.reduce(nibbles << shifts, axis=-1).astype(spec.meta_dtype)


def _unpack(words: np.ndarray, spec: LayoutSpec) -> np.ndarray:
    """In-group indices ``[rows, groups, 2]`` from natural metadata words ``[rows, W]``."""
    shifts = (4 * np.arange(spec.groups_per_word)).astype(np.uint64)
    nibbles = (words.astype(np.uint64)[..., None] >> shifts) & np.uint64(0xF)
    nibbles = nibbles.reshape(words.shape[0], -1).astype(np.int64)
    return np.stack([nibbles & 0b11, nibbles >> 2], axis=-1)


def compress_2_4(
    matrix: np.ndarray,
    dtype: np.dtype | type | str | None = None,
    layout: SparseLayout | str | None = None,
) -> Compressed:
    """Compress a 2:4 ``[rows, K]`` matrix (values cast to ``dtype``, default its own).

    ``layout`` defaults to ``sm80_s8`` for int8 values and ``sm80_f16`` for floating point
    (float32 values are kept as float32 for the reference kernels). Raises :class:`Not24Error`
    naming the first offending group, and ValueError for a K that is not a multiple of 4 or int8
    values the matrix does not hold exactly.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[1] % GROUP:
        raise ValueError(f"expected a [rows, K] matrix with K a multiple of 4, got {matrix.shape}")
    bad = first_bad_group(matrix)
    if bad is not None:
        row, col, count = bad
        raise Not24Error(
            f"matrix is not 2:4: the group at (row {row}, col {col}) (columns {col}..{col + 3})"
            f" holds {count} non-zero values, at most 2 are allowed"
        )
    value_dtype = np.dtype(dtype) if dtype is not None else matrix.dtype
    chosen = SparseLayout(layout) if layout is not None else default_layout(value_dtype)
    values = matrix.astype(value_dtype)
    if value_dtype == np.int8 and not np.array_equal(values.astype(matrix.dtype), matrix):
        raise ValueError("int8 compression needs integer values in [-128, 127]")
    spec = LAYOUTS[chosen]
    rows, width = matrix.shape
    padded = np.zeros(
        (_round_up(max(rows, 1), spec.row_tile), _round_up(max(width, 1), spec.k_tile)),
        dtype=value_dtype,
    )
    padded[:rows, :width] = values
    groups = padded.reshape(padded.shape[0], -1, GROUP)
    # non-zeros first (by index), then zeros (by index); keep the first two, ascending
    order = np.argsort(groups == 0, axis=-1, kind="stable")[..., :2]
    indices = np.sort(order, axis=-1)
    kept = np.take_along_axis(groups, indices, axis=-1).reshape(padded.shape[0], -1)
    natural = _pack(indices, spec)
    stored = np.empty(natural.size, dtype=spec.meta_dtype)
    stored[reorder_offsets(*natural.shape, chosen).ravel()] = natural.ravel()
    return Compressed(kept, stored.reshape(natural.shape), chosen, (rows, width))


def natural_metadata(compressed: Compressed) -> np.ndarray:
    """The metadata words in natural order ``[rows_p, W]`` (row r, word w: columns of w)."""
    offsets = reorder_offsets(*compressed.metadata.shape, compressed.layout)
    return compressed.metadata.ravel()[offsets]


def column_indices(compressed: Compressed) -> np.ndarray:
    """For every stored value ``[rows_p, K_p/2]``, its column in the padded dense matrix."""
    spec = LAYOUTS[compressed.layout]
    indices = _unpack(natural_metadata(compressed), spec)
    if np.any(indices[..., 0] >= indices[..., 1]):
        raise ValueError("corrupt metadata: a group's indices are not ascending")
    base = GROUP * np.arange(indices.shape[1])[None, :, None]
    return (base + indices).reshape(indices.shape[0], -1)


def decompress(compressed: Compressed) -> np.ndarray:
    """The dense logical ``[rows, K]`` matrix (exact inverse of :func:`compress_2_4`)."""
    rows_p, width_p = compressed.padded_shape
    dense = np.zeros((rows_p, width_p), dtype=compressed.values.dtype)
    np.put_along_axis(dense, column_indices(compressed), compressed.values, axis=1)
    rows, width = compressed.shape
    return dense[:rows, :width].copy()


__all__ = [
    "LAYOUTS",
    "Compressed",
    "LayoutSpec",
    "Not24Error",
    "SparseLayout",
    "column_indices",
    "compress_2_4",
    "decompress",
    "default_layout",
    "first_bad_group",
    "natural_metadata",
    "reorder_offsets",
]
