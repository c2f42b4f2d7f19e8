"""Text features: TfIdfVectorizer, n-gram counting over integer or string token tensors.

The n-gram pool is given flat (``pool_int64s`` or ``pool_strings``) and cut into levels by
``ngram_counts``: level ``k`` (0-based) holds the n-grams of ``k + 1`` tokens, from offset
``ngram_counts[k]`` to the next level's offset. The ``i``-th n-gram of the whole pool counts into
output coordinate ``ngram_indexes[i]``, scaled by ``weights[i]`` in IDF and TFIDF modes (the
spec's and onnxruntime's reading; onnx's Python reference indexes the weights by output
coordinate, which agrees when ``ngram_indexes`` is the identity). Tokens of an n-gram are
``skip + 1`` positions apart for every skip in ``0..max_skip_count``; unigrams are counted once,
whatever the skips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import declared_rule
from engine.ops.registry import Attrs, KernelContext, KernelError, OpCost, OpSpec, TensorSpec

_MODES = ("TF", "IDF", "TFIDF")


@dataclass(frozen=True)
class _NgramPool:
    """The pool's n-grams of the sizes the node counts, as token codes.

    ``vocabulary`` is the sorted set of pool tokens; a token's code is its position there.
    ``grams[n]`` holds the pool's n-grams of ``n`` tokens as a [count, n] code matrix and
    ``ids[n]`` their positions among all the pool's n-grams; n-gram ``i`` counts into output
    coordinate ``slots[i]``.
    """

    vocabulary: np.ndarray
    grams: dict[int, np.ndarray]
    ids: dict[int, np.ndarray]
    slots: np.ndarray
    output_size: int


def _pool(attrs: Attrs) -> _NgramPool:
    """Cut the flat pool into n-gram levels, keeping the sizes in [min_gram_length, max]."""
    strings = attrs.strs("pool_strings")
    integers = attrs.ints("pool_int64s")
    if (strings is None) == (integers is None):
        raise KernelError("TfIdfVectorizer needs exactly one of pool_strings and pool_int64s")
    pool = np.array(strings, dtype=object) if strings is not None else np.array(integers, np.int64)
    counts = attrs.ints("ngram_counts") or []
    indexes = np.asarray(attrs.ints("ngram_indexes") or [], dtype=np.int64)
    if indexes.size == 0:
        raise KernelError("TfIdfVectorizer needs a non-empty ngram_indexes")
    low, high = attrs.int("min_gram_length"), attrs.int("max_gram_length")
    if not 1 <= low <= high:
        raise KernelError(f"TfIdfVectorizer gram lengths [{low}, {high}] are not 1 <= min <= max")
    vocabulary = np.unique(pool) if pool.size else pool
    codes = np.searchsorted(vocabulary, pool) if pool.size else pool.astype(np.int64)
    grams: dict[int, np.ndarray] = {}
    ids: dict[int, np.ndarray] = {}
    first_id = 0  # global index of the level's first n-gram (ids run across all levels)
    for level, start in enumerate(counts):
        size = level + 1
        end = counts[level + 1] if level + 1 < len(counts) else pool.size
        number = max(end - start, 0) // size
        if low <= size <= high and number:
            if first_id + number > indexes.size:
                raise KernelError("TfIdfVectorizer ngram_indexes is shorter than the pool")
            grams[size] = codes[start : start + number * size].reshape(number, size)
            ids[size] = np.arange(first_id, first_id + number)
        first_id += number
    return _NgramPool(vocabulary, grams, ids, indexes, int(indexes.max()) + 1)


def _token_codes(x: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Codes of the input tokens in the pool vocabulary; -1 for tokens outside it."""
    if vocabulary.size == 0 or x.size == 0:
        return np.full(x.shape, -1, dtype=np.int64)
    if vocabulary.dtype == object:
        if x.dtype != object and x.dtype.kind not in "SU":
            raise KernelError(
                f"TfIdfVectorizer with pool_strings needs string input, got {x.dtype}"
            )
        tokens = np.array([t.decode() if isinstance(t, bytes) else t for t in x.ravel()], object)
        tokens = tokens.reshape(x.shape)
    elif x.dtype == object or x.dtype.kind not in "iu":
        raise KernelError(f"TfIdfVectorizer with pool_int64s needs integer input, got {x.dtype}")
    else:
        tokens = x.astype(np.int64)
    position = np.minimum(np.searchsorted(vocabulary, tokens), vocabulary.size - 1)
    return np.where(vocabulary[position] == tokens, position, -1).astype(np.int64)


def _count_grams(
    codes: np.ndarray, grams: np.ndarray, ids: np.ndarray, out: np.ndarray, distance: int
) -> None:
    """Add to ``out`` [rows, n-grams] the matches of each n-gram with tokens ``distance`` apart."""
    size = grams.shape[1]
    span = distance * (size - 1)
    starts = codes.shape[1] - span
    if starts <= 0:
        return
    offsets = np.arange(starts)[:, None] + distance * np.arange(size)[None, :]
    windows = codes[:, offsets]  # [rows, starts, size]
    rows = windows.shape[0]
    # Label every distinct row of (pool n-grams ++ windows); a window matches the pool n-gram
    # sharing its label (with duplicates in the pool, the last one wins as in the trie).
    stacked = np.concatenate([grams, windows.reshape(-1, size)], axis=0)
    _, labels = np.unique(stacked, axis=0, return_inverse=True)
    labels = labels.reshape(-1)
    owner = np.full(labels.max() + 1, -1, dtype=np.int64)
    owner[labels[: len(grams)]] = np.arange(len(grams))
    matched = owner[labels[len(grams) :]].reshape(rows, starts)
    row_index, start_index = np.nonzero(matched >= 0)
    np.add.at(out, (row_index, ids[matched[row_index, start_index]]), 1)


def _tfidf(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Count the pool's n-grams in each row of [C] or [N, C] tokens and weight the counts."""
    x = np.asarray(inputs[0])
    if x.ndim > 2:
        raise KernelError(f"TfIdfVectorizer input must be [C] or [N, C], got shape {x.shape}")
    mode = attrs.str("mode")
    if mode not in _MODES:
        raise KernelError(f"TfIdfVectorizer mode must be one of {_MODES}, got {mode!r}")
    pool = _pool(attrs)
    rows = x.reshape(1, -1) if x.ndim < 2 else x
    codes = _token_codes(rows, pool.vocabulary)
    counts = np.zeros((rows.shape[0], pool.slots.size), dtype=np.int64)  # per pool n-gram
    max_skip = attrs.int("max_skip_count", 0)
    for size, grams in pool.grams.items():
        distances = range(1, 2) if size == 1 else range(1, max_skip + 2)
        for distance in distances:
            _count_grams(codes, grams, pool.ids[size], counts, distance)
    weights = attrs.floats("weights")
    if weights and len(weights) != pool.slots.size:
        raise KernelError(
            f"TfIdfVectorizer has {len(weights)} weights for {pool.slots.size} n-grams"
        )
    scale = np.asarray(weights, dtype=np.float32) if weights else np.float32(1)
    if mode == "TF":
        values = counts.astype(np.float32)
    elif mode == "IDF":
        values = (counts > 0).astype(np.float32) * scale
    else:
        values = counts.astype(np.float32) * scale
    # Several n-grams may share an output coordinate: their values add up.
    result = np.zeros((rows.shape[0], pool.output_size), dtype=np.float32)
    np.add.at(result, (slice(None), pool.slots), values.astype(np.float32))
    return [result.reshape(pool.output_size) if x.ndim < 2 else result]


def _tfidf_rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """[C] -> [max(ngram_indexes) + 1]; [N, C] -> [N, max(ngram_indexes) + 1]; float32."""
    indexes = attrs.ints("ngram_indexes")
    shape = specs[0].shape
    if not indexes or shape is None or len(shape) > 2:
        return declared_rule(specs, attrs, ctx)
    width = max(indexes) + 1
    out_shape = (width,) if len(shape) < 2 else (shape[0], width)
    return [TensorSpec(out_shape, ir.DataType.FLOAT)]


def _tfidf_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """One comparison per token, gram size and skip distance; reads tokens, writes the counts."""
    tokens = ins[0].numel() if ins[0].is_static else 0
    sizes = max(attrs.int("max_gram_length", 1) - attrs.int("min_gram_length", 1) + 1, 1)
    skips = attrs.int("max_skip_count", 0) + 1
    written = outs[0].nbytes() if outs and outs[0] is not None else 0
    return OpCost(tokens * sizes * skips, ins[0].nbytes(), written)


OPS: list[OpSpec] = [
    OpSpec("TfIdfVectorizer", _tfidf, _tfidf_rule, _tfidf_cost, family="string"),
]
