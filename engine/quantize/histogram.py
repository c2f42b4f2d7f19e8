"""A one-pass histogram of |x| for one tensor, the input of every calibrator.

Calibration streams batches through the fp32 model and keeps, per tensor, only this histogram
(never the activations). It has ``NUM_BINS`` = 2048 bins of equal width over ``[0, range_max]``,
the layout TensorRT's entropy calibrator expects.

Bins and the doubling design
----------------------------
Bin ``k`` holds the values ``|x|`` in ``(k * width, (k + 1) * width]`` with ``width =
range_max / NUM_BINS``; bin 0 also holds exact zeros. (Right-closed bins put ``|x| ==
range_max`` in the last bin without any clipping rule.) The index of ``v > 0`` is therefore
``ceil(v / width) - 1``.

The first batch with a nonzero value sets ``range_max`` to its max ``|x|`` (all-zero batches
before it only count zeros, which land in bin 0 whatever the range becomes). When a later batch
holds a value above ``range_max``, the range doubles, repeatedly, until it covers the batch,
and each doubling merges the counts pairwise: bins ``2i`` and ``2i + 1`` become bin ``i`` and
the upper half becomes empty. This merge is exact, not an approximation: with ``c = ceil(v /
width)``, the index in the doubled range is ``ceil(c / 2) - 1 == floor((c - 1) / 2)``, i.e.
exactly the merged position of the old index ``c - 1``. It stays exact in floating point
because ``v / (2 width)`` is ``v / width`` halved, which binary floating point does without
rounding. So the histogram equals the one that a second pass over all the data with the final
range would have built, in one pass and with O(NUM_BINS) memory.

Besides the counts the histogram keeps the exact ``amax`` (max ``|x|``), the sample count and
the signed min/max. A NaN or an infinity in a batch raises :class:`ValueError` naming the
tensor: thresholds computed from such data would be meaningless.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Number of bins of every calibration histogram (TensorRT's entropy calibrator uses 2048).
NUM_BINS = 2048


class TensorHistogram:
    """Streaming histogram of ``|x|`` for the tensor ``name`` (see the module docstring).

    ``counts`` (int64, ``NUM_BINS``) are sample counts per bin; ``range_max`` is the upper
    edge of the last bin (0 until a nonzero value was seen); ``amax`` the exact largest
    ``|x|``; ``count`` the number of values seen; ``min``/``max`` the signed extremes
    (None before any value).
    """

    def __init__(self, name: str, num_bins: int = NUM_BINS) -> None:
        if num_bins < 2 or num_bins % 2:
            raise ValueError(f"histogram of '{name}': num_bins must be even and >= 2")
        self.name = name
        self.counts = np.zeros(num_bins, dtype=np.int64)
        self.range_max = 0.0
        self.amax = 0.0
        self.count = 0
        self.min: float | None = None
        self.max: float | None = None

    # ------------------------------------------------------------------ properties

    @property
    def num_bins(self) -> int:
        return int(self.counts.size)

    @property
    def bin_width(self) -> float:
        """Width of one bin in the tensor's units (0 before a nonzero value was seen)."""
        return self.range_max / self.num_bins

    @property
    def edges(self) -> np.ndarray:
        """The ``num_bins + 1`` bin edges (float64) from 0 to ``range_max``."""
        return np.arange(self.num_bins + 1, dtype=np.float64) * self.bin_width

    @property
    def centres(self) -> np.ndarray:
        """The ``num_bins`` bin centres (float64)."""
        return (np.arange(self.num_bins, dtype=np.float64) + 0.5) * self.bin_width

    # ------------------------------------------------------------------ collection

    def update(self, values: Any) -> None:
        """Add every element of ``values`` (any float array) to the histogram."""
        array = np.asarray(values)
        if array.size == 0:
            return
        if not np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float64)
        low = float(array.min())
        high = float(array.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(self._non_finite_message(array))
        magnitude = np.abs(array.astype(np.float64, copy=False)).ravel()
        batch_amax = max(abs(low), abs(high))
        self.count += int(magnitude.size)
        self.min = low if self.min is None else min(self.min, low)
        self.max = high if self.max is None else max(self.max, high)
        self.amax = max(self.amax, batch_amax)
        if batch_amax == 0.0:
            self.counts[0] += magnitude.size
            return
        if self.range_max == 0.0:
            self.range_max = batch_amax
        while batch_amax > self.range_max:
            self._double_range()
        width = self.bin_width
        index = np.ceil(magnitude / width).astype(np.int64) - 1
        np.clip(index, 0, self.num_bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.num_bins)

    def _double_range(self) -> None:
        half = self.num_bins // 2
        merged = self.counts[0::2] + self.counts[1::2]
        self.counts[:half] = merged
        self.counts[half:] = 0
        self.range_max *= 2.0

    def _non_finite_message(self, array: np.ndarray) -> str:
        flat = array.ravel()
        nan = int(np.isnan(flat).sum())
        inf = int(np.isinf(flat).sum())
        first = int(np.flatnonzero(~np.isfinite(flat))[0])
        position = tuple(int(i) for i in np.unravel_index(first, array.shape))
        return (
            f"tensor '{self.name}' holds non-finite values ({nan} NaN, {inf} Inf of "
            f"{flat.size}; first at index {list(position)}); cannot calibrate it"
        )

    # ------------------------------------------------------------------ comparison / JSON

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorHistogram):
            return NotImplemented
        return (
            self.name == other.name
            and self.range_max == other.range_max
            and self.amax == other.amax
            and self.count == other.count
            and self.min == other.min
            and self.max == other.max
            and np.array_equal(self.counts, other.counts)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable accumulator

    def __repr__(self) -> str:
        return (
            f"TensorHistogram({self.name!r}, count={self.count}, amax={self.amax:g}, "
            f"range_max={self.range_max:g}, bins={self.num_bins})"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (counts as a list of ints; no pickle)."""
        return {
            "name": self.name,
            "num_bins": self.num_bins,
            "range_max": self.range_max,
            "amax": self.amax,
            "count": self.count,
            "min": self.min,
            "max": self.max,
            "counts": [int(c) for c in self.counts.tolist()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorHistogram:
        """Rebuild a histogram written by :meth:`to_json`; ValueError when it is malformed."""
        name = str(data.get("name", "<unnamed>"))
        try:
            counts = np.asarray(data["counts"], dtype=np.int64)
            num_bins = int(data.get("num_bins", counts.size))
            histogram = cls(name, num_bins)
            if counts.shape != (num_bins,) or (counts < 0).any():
                raise ValueError(f"counts must be {num_bins} non-negative integers")
            histogram.counts = counts
            histogram.range_max = float(data["range_max"])
            histogram.amax = float(data["amax"])
            histogram.count = int(data["count"])
            histogram.min = None if data.get("min") is None else float(data["min"])
            histogram.max = None if data.get("max") is None else float(data["max"])
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"malformed histogram for tensor '{name}': {error}") from error
        if int(counts.sum()) != histogram.count:
            raise ValueError(
                f"malformed histogram for tensor '{name}': counts sum to {int(counts.sum())}, "
                f"count says {histogram.count}"
            )
        if histogram.range_max < 0 or histogram.amax > histogram.range_max:
            raise ValueError(
                f"malformed histogram for tensor '{name}': amax {histogram.amax} outside "
                f"[0, range_max {histogram.range_max}]"
            )
        return histogram

    @classmethod
    def from_counts(
        cls, name: str, counts: Any, range_max: float, amax: float | None = None
    ) -> TensorHistogram:
        """A histogram with given ``counts`` over ``[0, range_max]`` (tests, synthetic data).

        ``amax`` defaults to the upper edge of the last nonempty bin.
        """
        array = np.asarray(counts, dtype=np.int64)
        histogram = cls(name, int(array.size))
        histogram.counts = array.copy()
        histogram.range_max = float(range_max)
        histogram.count = int(array.sum())
        nonzero = np.flatnonzero(array)
        if amax is None:
            amax = 0.0 if nonzero.size == 0 else (nonzero[-1] + 1) * histogram.bin_width
        histogram.amax = float(amax)
        if histogram.count:
            histogram.min, histogram.max = 0.0, histogram.amax
        return histogram
