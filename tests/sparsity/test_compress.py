"""2:4 compression: exact round trips in both layouts, hand-computed metadata words and their
reordered positions, and an independent formulation of the CUTLASS metadata reordering.

Tile sizes the layouts need (the round-trip shapes are multiples of them): sm80_f16 rows % 32
and K % 32, sm80_s8 rows % 16 and K % 64; other shapes are padded (tested separately).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sparsity.compress import (
    Not24Error,
    SparseLayout,
    compress_2_4,
    decompress,
    natural_metadata,
    reorder_offsets,
)
from engine.sparsity.prune import prune_2_4


def _sparse(rng: np.random.Generator, shape: tuple[int, int], dtype: type) -> np.ndarray:
    """A random 2:4 matrix with some extra zeros (groups holding 0 or 1 non-zero)."""
    if dtype == np.int8:
        dense = rng.integers(-128, 128, size=shape).astype(np.int8)
    else:
        dense = rng.standard_normal(shape).astype(dtype)
    dense[rng.random(shape) < 0.2] = 0
    return prune_2_4(dense)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**16))
def test_f16_round_trip_is_exact(row_tiles: int, k_tiles: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    matrix = _sparse(rng, (32 * row_tiles, 32 * k_tiles), np.float16)
    compressed = compress_2_4(matrix)
    assert compressed.layout == SparseLayout.SM80_F16
    assert compressed.values.shape == (matrix.shape[0], matrix.shape[1] // 2)
    assert compressed.values.dtype == np.float16
    assert compressed.metadata.shape == (matrix.shape[0], matrix.shape[1] // 16)
    assert compressed.metadata.dtype == np.uint16
    restored = decompress(compressed)
    assert restored.dtype == np.float16
    np.testing.assert_array_equal(restored, matrix)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**16))
def test_s8_round_trip_is_exact(row_tiles: int, k_tiles: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    matrix = _sparse(rng, (16 * row_tiles, 64 * k_tiles), np.int8)
    compressed = compress_2_4(matrix)
    assert compressed.layout == SparseLayout.SM80_S8
    assert compressed.values.shape == (matrix.shape[0], matrix.shape[1] // 2)
    assert compressed.metadata.shape == (matrix.shape[0], matrix.shape[1] // 32)
    assert compressed.metadata.dtype == np.uint32
    np.testing.assert_array_equal(decompress(compressed), matrix)


def test_other_shapes_are_padded_to_the_tiles() -> None:
    rng = np.random.default_rng(1)
    matrix = _sparse(rng, (5, 12), np.float32)
    compressed = compress_2_4(matrix)
    assert compressed.shape == (5, 12) and compressed.padded_shape == (32, 32)
    assert compressed.values.dtype == np.float32
    np.testing.assert_array_equal(decompress(compressed), matrix)
    as_s8 = compress_2_4(np.round(matrix * 10), dtype=np.int8)
    assert as_s8.padded_shape == (16, 64)
    np.testing.assert_array_equal(decompress(as_s8), np.round(matrix * 10).astype(np.int8))


def test_f16_metadata_word_by_hand() -> None:
    matrix = np.zeros((32, 32), np.float16)
    matrix[0, :16] = [0, 1.5, 0, -2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 6]
    matrix[8, :4] = [7, 0, 0, 0]  # indices (0, 1) in group 0, zeros elsewhere
    matrix[1, 16:20] = [0, 0, 9, 0]  # row 1, word 1: group 0 of that word holds (0, 2)
    compressed = compress_2_4(matrix)
    # nibbles 0xD (1,3), 0x4 (0,1 padded), 0x4 (all zero), 0xE (2,3), group j at bits 4j
    assert natural_metadata(compressed)[0, 0] == 0xE44D
    np.testing.assert_array_equal(compressed.values[0, :8], [1.5, -2, 3, 0, 0, 0, 5, 6])
    assert natural_metadata(compressed)[1, 1] == 0x4448
    stored = compressed.metadata.ravel()
    # (row 0, word 0) -> offset 0; (row 8, word 0): r' = 1, swapped to (0, 1) -> offset 1;
    # (row 1, word 1): r' = 4, (even, odd) swapped to (5, 0) -> offset 5 * 2 = 10
    assert stored[0] == 0xE44D
    assert stored[1] == 0x4444
    assert stored[10] == 0x4448


def test_s8_metadata_word_by_hand() -> None:
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (0, 1), (2, 3)]
    matrix = np.zeros((16, 64), np.int8)
    for group, (first, second) in enumerate(pairs):
        matrix[1, 4 * group + first] = group + 1
        matrix[1, 4 * group + second] = -(group + 1)
    compressed = compress_2_4(matrix)
    # nibbles 0x4, 0x8, 0xC, 0x9, 0xD, 0xE, 0x4, 0xE from the lowest bits up
    assert natural_metadata(compressed)[1, 0] == 0xE4ED9C84
    # row 1: r' = (1 % 8) * 2 = 2 (even, word 0: no swap) -> offset 2 * 2 = 4
    assert compressed.metadata.ravel()[4] == 0xE4ED9C84
    np.testing.assert_array_equal(compressed.values[1, :4], [1, -1, 2, -2])


def _gather_offsets(rows: int, words: int, word_bits: int) -> np.ndarray:
    """The reordering written the other way round: for natural (r, w), its stored offset, as
    a sum of per-coordinate strides (how PyTorch's earlier gather code expresses CUTLASS's
    layout; valid for rows a multiple of 32)."""
    row = np.arange(rows)[:, None]
    word = np.arange(words)[None, :]
    row_stride = 8 if word_bits == 16 else 4
    eighth = np.array([0, 1, 4, 5] if word_bits == 16 else [0, 1, 32, 33])
    return (
        (word % 2) * 2
        + (word // 2) * 2 * rows
        + (row % 8) * row_stride
        + eighth[(row // 8) % 4]
        + (row // 32) * 64
    )


@pytest.mark.parametrize("layout", list(SparseLayout))
@pytest.mark.parametrize(("rows", "words"), [(32, 2), (64, 4), (96, 6)])
def test_reordering_matches_an_independent_formulation(
    layout: SparseLayout, rows: int, words: int
) -> None:
    bits = 16 if layout == SparseLayout.SM80_F16 else 32
    offsets = reorder_offsets(rows, words, layout)
    np.testing.assert_array_equal(offsets, _gather_offsets(rows, words, bits))
    assert sorted(offsets.ravel().tolist()) == list(range(rows * words))  # a permutation


def test_non_2_4_matrix_is_refused_naming_the_first_bad_group() -> None:
    matrix = np.zeros((32, 32), np.float32)
    matrix[3, 9:12] = 1.0
    matrix[5, 0:4] = 1.0
    with pytest.raises(Not24Error, match=r"\(row 3, col 8\).*holds 3 non-zero values"):
        compress_2_4(matrix)
    with pytest.raises(ValueError, match="multiple of 4"):
        compress_2_4(np.zeros((32, 30)))
    with pytest.raises(ValueError, match="int8"):
        compress_2_4(np.full((16, 64), 0.5) * (np.arange(64) % 2), dtype=np.int8)
