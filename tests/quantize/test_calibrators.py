"""The |x| histogram and the four calibrators.

Oracles: hand-computed histograms and thresholds, NumPy's own histogram (for the one-pass
doubling), a straightforward per-candidate transcription of TensorRT's published KL algorithm
with scipy's entropy (for the vectorised one), and brute-force MSE on the raw samples.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
from scipy.stats import entropy as scipy_kl

from engine.quantize.calibrators import (
    Calibrator,
    all_thresholds,
    entropy_divergences,
    entropy_threshold,
    mse_threshold,
    parse_calibrator,
    percentile_threshold,
    threshold,
)
from engine.quantize.histogram import NUM_BINS, TensorHistogram


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded per test (from its name): results do not depend on which tests ran
    before on the same worker."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _histogram(*batches: np.ndarray, name: str = "t") -> TensorHistogram:
    histogram = TensorHistogram(name)
    for batch in batches:
        histogram.update(batch)
    return histogram


# --------------------------------------------------------------------------- histogram


def test_doubling_equals_a_histogram_built_with_the_final_range(rng: np.random.Generator) -> None:
    batches = [rng.standard_normal(5000) * scale for scale in (1.0, 3.0, 0.2, 11.0, 40.0)]
    batches[1][7] = 0.0
    histogram = _histogram(*batches)
    magnitudes = np.abs(np.concatenate(batches))
    assert histogram.range_max >= magnitudes.max()
    assert histogram.amax == magnitudes.max()
    # Bins are right-closed, (k w, (k + 1) w]: a value's bin is the number of edges k w
    # (k >= 1) strictly below it; the first batch's max lies exactly on an edge.
    edges = np.arange(1, NUM_BINS + 1) * histogram.bin_width
    index = np.minimum(np.searchsorted(edges, magnitudes, side="left"), NUM_BINS - 1)
    np.testing.assert_array_equal(histogram.counts, np.bincount(index, minlength=NUM_BINS))
    assert histogram.count == magnitudes.size == histogram.counts.sum()


def test_doubling_is_exact_for_a_value_on_the_old_range_edge() -> None:
    histogram = _histogram(np.array([1.0, 0.5]), np.array([4.0]))
    # range 1 -> 2 -> 4; width 4/2048: 1.0 is the upper edge of bin 511, 0.5 of bin 255
    assert histogram.range_max == 4.0
    expected = np.zeros(NUM_BINS, dtype=np.int64)
    expected[[255, 511, 2047]] = 1
    np.testing.assert_array_equal(histogram.counts, expected)


def test_all_zero_batches_wait_for_a_nonzero_one() -> None:
    histogram = _histogram(np.zeros(10, np.float32), np.array([0.0, -2.0, 1.0], np.float32))
    assert histogram.range_max == 2.0
    assert histogram.counts[0] == 11 and histogram.counts[1023] == 1
    assert histogram.counts[2047] == 1
    assert (histogram.min, histogram.max, histogram.amax, histogram.count) == (-2.0, 1.0, 2.0, 13)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_tensor(bad: float) -> None:
    histogram = TensorHistogram("conv1_out")
    with pytest.raises(ValueError, match="conv1_out"):
        histogram.update(np.array([[1.0, bad]], np.float32))


def test_json_round_trip_and_malformed_json(rng: np.random.Generator) -> None:
    histogram = _histogram(rng.standard_normal(1000).astype(np.float16), name="x")
    again = TensorHistogram.from_json(json.loads(json.dumps(histogram.to_json())))
    assert again == histogram
    broken = histogram.to_json()
    broken["counts"] = broken["counts"][:10]
    with pytest.raises(ValueError, match="'x'"):
        TensorHistogram.from_json(broken)


# --------------------------------------------------------------------------- minmax, percentile


def test_minmax_is_the_exact_amax() -> None:
    histogram = _histogram(np.array([0.5, -3.25, 2.0]), np.array([1.0]))
    assert threshold(histogram, "minmax") == 3.25
    assert threshold(TensorHistogram("empty"), "minmax") == 0.0


def test_percentile_by_hand() -> None:
    # |x| = 1..2048 with range 2048: bin k = (k, k + 1] holds exactly the value k + 1.
    histogram = _histogram(np.arange(1, NUM_BINS + 1, dtype=np.float64))
    assert histogram.bin_width == 1.0 and (histogram.counts == 1).all()
    # 50 %: target 1024 samples, reached at the top of bin 1023 -> 1024
    assert threshold(histogram, "percentile", 50.0) == pytest.approx(1024.0, abs=1e-9)
    # 99.99 %: target 2047.7952 samples; 2047 lie below bin 2047, 0.7952 of it -> 2047.7952
    assert threshold(histogram, Calibrator.PERCENTILE) == pytest.approx(2047.7952, abs=1e-9)
    # two bins of 3 and 1 samples, width 0.5: 60 % -> 2.4 samples, 0.8 of bin 0 -> 0.4
    assert percentile_threshold(np.array([3, 1]), 0.5, 60.0) == pytest.approx(0.4)


def test_percentile_of_uniform_data(rng: np.random.Generator) -> None:
    histogram = _histogram(rng.uniform(0.0, 1.0, 10**6))
    assert threshold(histogram, "percentile", 99.99) == pytest.approx(0.9999, abs=1e-4)
    assert threshold(histogram, "percentile", 90.0) == pytest.approx(0.9, abs=2e-3)


# --------------------------------------------------------------------------- entropy


def _reference_kl_threshold(counts: np.ndarray, bin_width: float) -> tuple[float, np.ndarray]:
    """TensorRT's pseudocode (GTC 2017) candidate by candidate, KL from scipy."""
    bins = counts.astype(np.float64)
    divergences = []
    for i in range(128, bins.size + 1):
        reference = bins[:i].copy()
        reference[i - 1] += bins[i:].sum()  # outliers join the last kept bin
        level = np.digitize(np.arange(i), np.linspace(0, i, 129)) - 1  # 128 even groups
        candidate = np.zeros(i)
        for group in range(128):
            members = level == group
            nonzero = members & (reference > 0)
            if nonzero.any():
                candidate[nonzero] = bins[:i][members].sum() / nonzero.sum()
        if candidate.sum() == 0:
            divergences.append(np.inf)
        else:
            divergences.append(scipy_kl(reference, candidate))  # normalises both
    divergences = np.array(divergences)
    best = 128 + int(np.argmin(divergences))
    return (best + 0.5) * bin_width, divergences


def test_entropy_of_mass_below_bin_128_keeps_all_of_it(rng: np.random.Generator) -> None:
    counts = np.zeros(NUM_BINS, dtype=np.int64)
    counts[:100] = rng.integers(1, 1000, 100)
    # at i = 128 every level is one bin, Q == P and KL == 0
    assert entropy_threshold(counts, 0.01) == pytest.approx(128.5 * 0.01)
    histogram = TensorHistogram.from_counts("h", counts, range_max=20.48, amax=20.48)
    assert threshold(histogram, "entropy") == pytest.approx(128.5 * 0.01)


def test_entropy_clips_a_gaussian_with_huge_outliers(rng: np.random.Generator) -> None:
    data = np.concatenate([rng.standard_normal(200_000), [30.0, -35.0, 40.0]])
    histogram = _histogram(data)
    found = threshold(histogram, "entropy")
    assert 2.5 < found < 0.2 * histogram.amax
    assert threshold(histogram, "minmax") == 40.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_matches_a_loop_transcription_of_the_published_algorithm(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = 1024 if seed == 0 else 384
    shape = np.exp(-0.5 * (np.arange(size) / (size * rng.uniform(0.05, 0.3))) ** 2)
    counts = rng.poisson(shape * 5000).astype(np.int64)
    counts[rng.integers(0, size, size // 8)] = 0  # holes: zero bins inside the range
    counts[-3:] = rng.integers(0, 3, 3)  # a few outliers
    expected, reference = _reference_kl_threshold(counts, 0.25)
    candidates, divergences = entropy_divergences(counts)
    assert candidates[0] == 128 and candidates[-1] == size
    finite = np.isfinite(reference)
    np.testing.assert_array_equal(np.isfinite(divergences), finite)
    np.testing.assert_allclose(divergences[finite], reference[finite], rtol=1e-9, atol=1e-11)
    assert entropy_threshold(counts, 0.25) == expected


def test_entropy_of_a_tensor_ignores_the_zero_spike_of_a_relu(rng: np.random.Generator) -> None:
    values = np.maximum(rng.standard_normal(400_000), 0.0)  # half exact zeros
    histogram = _histogram(values)
    counts = histogram.counts.copy()
    spiked = entropy_threshold(counts, histogram.bin_width)
    counts[0] = counts[1]
    assert threshold(histogram, "entropy") == pytest.approx(
        min(entropy_threshold(counts, histogram.bin_width), histogram.amax)
    )
    # the raw published algorithm clips a half-normal far lower than without the spike
    assert spiked < threshold(histogram, "entropy")
    assert threshold(histogram, "entropy") > 2.5


# --------------------------------------------------------------------------- mse


def _brute_force_mse(samples: np.ndarray, grid: np.ndarray) -> float:
    magnitudes = np.abs(samples)
    errors = []
    for candidate in grid:
        scale = candidate / 127.0
        quantized = np.minimum(np.rint(magnitudes / scale), 127) * scale
        errors.append(np.mean((magnitudes - quantized) ** 2))
    return float(grid[int(np.argmin(errors))])


def test_mse_of_uniform_data_without_outliers_is_near_amax(rng: np.random.Generator) -> None:
    histogram = _histogram(rng.uniform(-1.0, 1.0, 200_000))
    found = threshold(histogram, "mse")
    assert 0.99 * histogram.amax <= found <= histogram.amax


@pytest.mark.parametrize("outlier", [None, 40.0])
def test_mse_of_a_gaussian_matches_brute_force_on_the_samples(
    outlier: float | None, rng: np.random.Generator
) -> None:
    samples = rng.standard_normal(100_000)
    if outlier is not None:  # its clipping error pulls the optimum far above the bulk
        samples = np.append(samples, outlier)
    histogram = _histogram(samples)
    expected = _brute_force_mse(samples, np.linspace(2.0, 40.0, 381))
    assert threshold(histogram, "mse") == pytest.approx(expected, rel=0.03)


def test_mse_by_hand_for_a_single_bin() -> None:
    # All mass in bin 0 of 2048 (width 1): every candidate's step is >= 1, the samples
    # (uniform on (0, 1]) round to 0 or 1 step; the smallest step (i = 128) errs least.
    counts = np.zeros(NUM_BINS, dtype=np.int64)
    counts[0] = 10
    assert mse_threshold(counts, 1.0) == 128.0


# --------------------------------------------------------------------------- dispatch


def test_all_thresholds_and_calibrator_names(rng: np.random.Generator) -> None:
    histogram = _histogram(rng.standard_normal(50_000))
    values = all_thresholds(histogram, 99.9)
    assert set(values) == {"minmax", "percentile", "entropy", "mse"}
    assert all(0.0 < v <= histogram.amax for v in values.values())
    assert values["percentile"] == threshold(histogram, "percentile", 99.9)
    assert parse_calibrator("Entropy") is Calibrator.ENTROPY
    with pytest.raises(ValueError, match="known: minmax"):
        parse_calibrator("kl")
    assert all_thresholds(TensorHistogram("zeros")) == dict.fromkeys(values, 0.0)
