"""Activation calibrators: from a |x| histogram to the threshold that int8 maps to 127.

All four methods read the same :class:`~engine.quantize.histogram.TensorHistogram` (one pass
over the calibration data serves them all):

- ``minmax``: the exact largest ``|x|`` (no clipping, coarsest steps).
- ``percentile``: the ``|x|`` below which ``p`` % of all samples lie (default 99.99), linearly
  interpolated inside the bin where the cumulative count reaches it.
- ``entropy``: TensorRT's KL-divergence calibration (Migacz, "8-bit Inference with TensorRT",
  GTC 2017): for every candidate ``i`` in ``128 .. NUM_BINS`` bins, the reference ``P`` is the
  first ``i`` bins with all the mass of bins ``>= i`` added to bin ``i - 1`` (clipping);
  the candidate ``Q`` is the first ``i`` bins (without the outliers) merged into 128 levels and
  expanded back, each level's mass spread evenly over the bins of its group where ``P`` is
  nonzero (bins where ``P`` is zero stay zero). Bin ``j`` belongs to level ``floor(j * 128 /
  i)``, so the groups are as even as ``i`` allows. The threshold is ``(m + 0.5) * bin_width``
  for the ``m`` with the smallest ``KL(P || Q)`` (the first one on ties). Applied to a
  tensor (:func:`threshold`), bin 0 first takes bin 1's count, as NVIDIA's pytorch-quantization
  toolkit does: after a ReLU about half of all values are exactly zero, and that spike alone
  would pull the threshold far below the useful range (on the zoo ResNet it clips post-ReLU
  activations at a third of their range and drops the output cosine from 0.9999 to 0.96).
- ``mse``: the candidate edge ``i * bin_width`` (``i`` in ``128 .. NUM_BINS``) minimising the
  expected squared error of symmetric int8 quantization with that threshold (rounding plus
  clipping), the samples of each bin taken as uniform over the bin (integrated exactly).

The array-level functions (``*_threshold(counts, bin_width)``) are the algorithms themselves;
:func:`threshold` applies them to a histogram and caps the result at the histogram's ``amax``
(a threshold above the largest value seen only wastes int8 range).
"""

from __future__ import annotations

import functools
from enum import StrEnum

import numpy as np

from engine.quantize.histogram import TensorHistogram

#: Number of positive int8 levels a threshold is divided into (symmetric quantization).
QUANT_LEVELS = 128
#: The smallest candidate bin count of the entropy and MSE searches.
FIRST_CANDIDATE_BIN = 128
#: Divergences (in nats) closer than this to the minimum count as ties (prefix-sum rounding).
KL_TIE_TOLERANCE = 1e-9
#: The default percentile of the percentile calibrator.
DEFAULT_PERCENTILE = 99.99


class Calibrator(StrEnum):
    """The activation calibration methods."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


def parse_calibrator(name: str | Calibrator) -> Calibrator:
    """The :class:`Calibrator` named ``name``; ValueError listing the known ones otherwise."""
    try:
        return Calibrator(str(name).lower())
    except ValueError:
        known = ", ".join(c.value for c in Calibrator)
        raise ValueError(f"unknown calibrator {name!r}; known: {known}") from None


# ---------------------------------------------------------------------- the algorithms


def percentile_threshold(counts: np.ndarray, bin_width: float, percentile: float) -> float:
    """The ``|x|`` where the cumulative count reaches ``percentile`` % of all samples.

    Samples are taken as uniform inside their bin ``(k * w, (k + 1) * w]``, so inside the bin
    ``k`` where the target is reached the result is ``k * w + (target - below) / counts[k] *
    w`` (``below``: the samples in bins ``< k``).
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    cumulative = np.cumsum(np.asarray(counts, dtype=np.float64))
    total = cumulative[-1] if cumulative.size else 0.0
    if total <= 0 or bin_width <= 0:
        return 0.0
    target = percentile / 100.0 * total
    k = int(np.searchsorted(cumulative, target, side="left"))
    k = min(k, cumulative.size - 1)
    below = cumulative[k - 1] if k > 0 else 0.0
    inside = cumulative[k] - below
    fraction = (target - below) / inside if inside > 0 else 1.0
    return float((k + min(max(fraction, 0.0), 1.0)) * bin_width)


def entropy_divergences(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``KL(P || Q)`` of every candidate bin count ``i`` (see the module docstring).

    Returns ``(candidates, divergences)``; a candidate where ``Q`` is zero on a bin where
    ``P`` is not gets ``inf``. Since ``Q`` is constant over the nonzero bins of a level's
    group, the divergence needs only per-group sums, taken from prefix sums for all
    candidates and levels at once (a [candidates, 128] array instead of a loop over bins):
    with ``p`` normalised, ``sum p log p`` per group comes from a prefix sum of ``p log p``,
    and ``sum p log q`` is ``P(group) * log(Q(group) / nonzero bins(group))``.
    """
    hist = np.asarray(counts, dtype=np.float64)
    num_bins = hist.size
    if num_bins < FIRST_CANDIDATE_BIN:
        raise ValueError(f"entropy calibration needs >= {FIRST_CANDIDATE_BIN} bins")
    total = hist.sum()
    prob = hist / total
    candidates = np.arange(FIRST_CANDIDATE_BIN, num_bins + 1, dtype=np.int64)
    # tail[i] = probability of bins >= i (the outliers of candidate i), i in 0..num_bins
    tail = np.concatenate((np.cumsum(prob[::-1])[::-1], [0.0]))
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(prob > 0, prob * np.log(prob), 0.0)
    mass_prefix = np.concatenate(([0.0], np.cumsum(prob)))
    plogp_prefix = np.concatenate(([0.0], np.cumsum(plogp)))
    nonzero_prefix = np.concatenate(([0], np.cumsum(prob > 0)))
    # Level g of candidate i holds bins j with floor(j * 128 / i) == g: [ceil(g i/128), ...).
    levels = np.arange(QUANT_LEVELS + 1, dtype=np.int64)
    bounds = (levels[None, :] * candidates[:, None] + QUANT_LEVELS - 1) // QUANT_LEVELS
    low, high = bounds[:, :-1], bounds[:, 1:]
    q_mass = mass_prefix[high] - mass_prefix[low]  # Q before normalising: bins < i only
    p_mass = q_mass.copy()
    p_mass[:, -1] += tail[candidates]  # the outliers join bin i - 1 (in the last level)
    nonzero = (nonzero_prefix[high] - nonzero_prefix[low]).astype(np.float64)
    last_bin = candidates - 1
    last_p = prob[last_bin] + tail[candidates]
    nonzero[:, -1] += (last_p > 0).astype(np.float64) - (prob[last_bin] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_log_p = plogp_prefix[last_bin] + np.where(last_p > 0, last_p * np.log(last_p), 0.0)
        q_level = np.log(q_mass) - np.log(nonzero)
        p_log_q = np.where(p_mass > 0, p_mass * q_level, 0.0).sum(axis=1)
        q_total = mass_prefix[candidates]
        divergences = p_log_p - p_log_q + np.log(q_total)
    divergences[~np.isfinite(divergences)] = np.inf
    return candidates, divergences


def entropy_threshold(counts: np.ndarray, bin_width: float) -> float:
    """TensorRT's KL threshold ``(m + 0.5) * bin_width`` for the best candidate ``m``."""
    hist = np.asarray(counts, dtype=np.float64)
    if hist.sum() <= 0 or bin_width <= 0:
        return 0.0
    candidates, divergences = entropy_divergences(hist)
    # The first candidate within rounding noise of the minimum (exact ties are common: merging
    # a zero bin into a nonzero one changes nothing), as the loop over i in order would pick.
    lowest = divergences.min()
    best = int(candidates[int(np.argmax(divergences <= lowest + KL_TIE_TOLERANCE))])
    return float((best + 0.5) * bin_width)


def _squared_error_primitive(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``E(x) = integral from 0 to x of (t - quantize(t))^2 dt`` for int8 with ``scale``.

    ``quantize(t) = min(rint(t / s), 127) * s``. Below the clip point ``c = 127.5 s`` the
    integrand is periodic, ``s^3 H(t / s)`` with ``H(u) = m / 12 + r^3 / 3`` (``m =
    floor(u + 1/2)``, ``r = u - m``); above it the error is ``(t - 127 s)^2``.
    """
    top = QUANT_LEVELS - 1
    clip = (top + 0.5) * scale
    units = np.minimum(x, clip) / scale
    nearest = np.floor(units + 0.5)
    rest = units - nearest
    rounding = scale**3 * (nearest / 12.0 + rest * rest * rest / 3.0)
    beyond = np.maximum(x - top * scale, 0.5 * scale)
    clipping = (beyond * beyond * beyond - (0.5 * scale) ** 3) / 3.0
    return rounding + clipping


@functools.lru_cache(maxsize=2)
def _unit_bin_errors(num_bins: int) -> np.ndarray:
    """Mean squared int8 error over every bin for every candidate, for unit bin width.

    Entry ``[c, k]`` is the mean over ``x`` uniform in ``(k, k + 1]`` of ``(x -
    quantize(x))^2`` with threshold ``i = 128 + c`` (scale ``i / 127``). Errors scale with the
    square of the bin width, so this data-independent table (float64, read-only, about 31 MB
    for 2048 bins, built once per process in a fraction of a second) serves every histogram:
    the expected errors are one matrix-vector product.
    """
    candidates = np.arange(FIRST_CANDIDATE_BIN, num_bins + 1, dtype=np.float64)
    lower = np.arange(num_bins, dtype=np.float64)[None, :]
    table = np.empty((candidates.size, num_bins))
    chunk = max(1, (1 << 19) // num_bins)
    for begin in range(0, candidates.size, chunk):
        scales = candidates[begin : begin + chunk, None] / (QUANT_LEVELS - 1)
        table[begin : begin + chunk] = _squared_error_primitive(
            lower + 1.0, scales
        ) - _squared_error_primitive(lower, scales)
    table.setflags(write=False)
    return table


def mse_errors(counts: np.ndarray, bin_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Expected squared int8 error for every candidate threshold ``i * bin_width``.

    For threshold ``T`` (scale ``s = T / 127``) a sample ``x`` becomes ``min(rint(x / s),
    127) * s``. The samples of a bin are taken as spread uniformly over it, so a bin
    contributes its count times the mean of the squared error over the bin, integrated in
    closed form (:func:`_squared_error_primitive`). Bin centres alone would be too coarse:
    the smallest candidates have a quantization step as wide as a bin. Returns
    ``(thresholds, mean squared errors)``.
    """
    hist = np.asarray(counts, dtype=np.float64)
    num_bins = hist.size
    thresholds = np.arange(FIRST_CANDIDATE_BIN, num_bins + 1, dtype=np.float64) * bin_width
    errors = _unit_bin_errors(num_bins) @ (hist / hist.sum()) * bin_width**2
    return thresholds, errors


def mse_threshold(counts: np.ndarray, bin_width: float) -> float:
    """The candidate edge ``i * bin_width`` with the least expected squared error."""
    hist = np.asarray(counts, dtype=np.float64)
    if hist.sum() <= 0 or bin_width <= 0:
        return 0.0
    thresholds, errors = mse_errors(hist, bin_width)
    return float(thresholds[int(np.argmin(errors))])


# ---------------------------------------------------------------------- on histograms


def threshold(
    hist: TensorHistogram,
    method: str | Calibrator,
    percentile: float = DEFAULT_PERCENTILE,
) -> float:
    """The threshold ``method`` chooses for ``hist``, capped at ``hist.amax`` (0 when the
    tensor was all zeros or never seen)."""
    calibrator = parse_calibrator(method)
    if hist.amax <= 0.0 or hist.range_max <= 0.0:
        return 0.0
    width = hist.bin_width
    if calibrator is Calibrator.MINMAX:
        value = hist.amax
    elif calibrator is Calibrator.PERCENTILE:
        value = percentile_threshold(hist.counts, width, percentile)
    elif calibrator is Calibrator.ENTROPY:
        counts = hist.counts.copy()
        counts[0] = counts[1]  # the zero spike of a ReLU output (see the module docstring)
        value = entropy_threshold(counts, width)
    else:
        value = mse_threshold(hist.counts, width)
    return float(min(value, hist.amax))


def all_thresholds(
    hist: TensorHistogram, percentile: float = DEFAULT_PERCENTILE
) -> dict[str, float]:
    """The threshold of every calibrator, keyed by its name (``Calibrator`` values)."""
    return {c.value: threshold(hist, c, percentile) for c in Calibrator}
