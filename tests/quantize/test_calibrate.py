"""The calibration run and the calibration cache.

Oracles: onnxruntime's activations of a tiny Conv+Relu model (amax, count, percentiles from
NumPy), the calibrators applied directly to the kept histograms, and JSON round trips.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engine import onnx_io, zoo
from engine.quantize.calibrate import CalibrationResult, calibrate
from engine.quantize.calibration_cache import CalibrationCacheError, load_cache, save_cache
from engine.quantize.calibration_data import CalibrationData, CalibrationDataError
from engine.quantize.calibrators import threshold

RNG = np.random.default_rng(9)


def _conv_relu_proto() -> onnx.ModelProto:
    """x [n, 3, 8, 8] -> Conv(4 filters, 3x3, pad 1, bias) -> Relu -> y; every value an output."""
    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, [4, 3, 3, 3], RNG.standard_normal(108).astype(np.float32)
    )
    bias = helper.make_tensor("b", TensorProto.FLOAT, [4], [0.5, -0.5, 0.0, 1.0])
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="c"),
            helper.make_node("Relu", ["conv"], ["y"], name="relu"),
        ],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("conv", TensorProto.FLOAT, None),
        ],
        [weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def proto() -> onnx.ModelProto:
    return _conv_relu_proto()


@pytest.fixture(scope="module")
def model(proto: onnx.ModelProto) -> ir.Model:
    return onnx_io.load(proto)


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return (RNG.standard_normal((6, 3, 8, 8)) * 2.0).astype(np.float32)


def test_histograms_match_onnxruntime_activations(
    proto: onnx.ModelProto, model: ir.Model, samples: np.ndarray
) -> None:
    calls: list[tuple[str, int, int]] = []
    result = calibrate(model, samples, progress=lambda *call: calls.append(call))
    assert calls == [("calibrate", 0, 1), ("calibrate", 1, 1)]  # batch 8 > 6 samples
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y, conv = session.run(["y", "conv"], {"x": samples})
    assert set(result.tensors) == {"x", "conv", "y"}  # weights are not activations
    for name, values in {"x": samples, "conv": conv, "y": y}.items():
        tensor = result.tensors[name]
        magnitudes = np.abs(values.astype(np.float64))
        assert tensor.histogram.count == values.size
        assert tensor.histogram.amax == pytest.approx(magnitudes.max(), rel=1e-6)
        assert tensor.thresholds["minmax"] == tensor.histogram.amax
        width = tensor.histogram.bin_width
        # the cumulative count reaches 99 % in the bin of the ceil(0.99 n)-th smallest |x|
        rank = int(np.ceil(0.99 * values.size))
        expected = np.sort(magnitudes, axis=None)[rank - 1]
        found = threshold(tensor.histogram, "percentile", 99.0)
        assert found == pytest.approx(expected, abs=width)
        assert tensor.threshold == tensor.thresholds["entropy"]
        assert tensor.scale == float(np.float32(np.float32(tensor.threshold) / np.float32(127)))


def test_zoo_resnet_on_two_batches() -> None:
    proto = zoo.build("resnet")
    model = onnx_io.load(proto)
    feeds = [zoo.make_inputs(proto, seed) for seed in (0, 1)]
    result = calibrate(model, feeds, calibrator="percentile", percentile=99.9)
    assert result.calibrator == "percentile" and result.percentile == 99.9
    assert "input" in result.tensors and len(result.tensors) > 10
    for tensor in result.tensors.values():
        assert set(tensor.thresholds) == {"minmax", "percentile", "entropy", "mse"}
        for value in tensor.thresholds.values():
            assert 0.0 < value <= tensor.histogram.amax
        assert tensor.threshold == tensor.thresholds["percentile"]
    inputs = result.tensors["input"].histogram
    assert inputs.count == sum(f["input"].size for f in feeds)


def test_npz_and_arrays_give_the_same_result(
    tmp_path: Path, model: ir.Model, samples: np.ndarray
) -> None:
    np.savez(tmp_path / "calib.npz", x=samples)
    from_file = calibrate(model, str(tmp_path / "calib.npz"), calibrator="mse")
    from_arrays = calibrate(model, {"x": samples}, calibrator="mse")
    assert from_file == from_arrays


def test_tensor_subset_and_unknown_names(model: ir.Model, samples: np.ndarray) -> None:
    result = calibrate(model, samples, tensors=["y"])
    assert list(result.tensors) == ["y"]
    with pytest.raises(ValueError, match="nope"):
        calibrate(model, samples, tensors=["y", "nope"])
    with pytest.raises(ValueError, match="unknown calibrator"):
        calibrate(model, samples, calibrator="kl")


def test_with_calibrator_recomputes_the_choice_without_data(
    model: ir.Model, samples: np.ndarray
) -> None:
    result = calibrate(model, samples)
    minmax = result.with_calibrator("minmax")
    for name, tensor in minmax.tensors.items():
        assert tensor.threshold == result.tensors[name].histogram.amax
        assert tensor.histogram is result.tensors[name].histogram
    median = result.with_calibrator("percentile", 50.0)
    for name, tensor in median.tensors.items():
        assert tensor.threshold == threshold(tensor.histogram, "percentile", 50.0)
        assert tensor.thresholds["entropy"] == result.tensors[name].thresholds["entropy"]
    assert median.with_calibrator("entropy", 99.99) == result


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ("nan", r"'x'.*sample 3"),
        ("inf", r"'x'.*Inf in sample 3"),
        ("shape", r"'x' has shape"),
        ("empty", "empty"),
        ("unknown", r"unknown input\(s\) \['z'\]"),
    ],
)
def test_bad_data_is_refused_before_calibrating(
    model: ir.Model, samples: np.ndarray, bad: str, pattern: str
) -> None:
    data: object
    if bad in ("nan", "inf"):
        data = samples.copy()
        data[3, 0, 0, 0] = np.nan if bad == "nan" else np.inf
    elif bad == "shape":
        data = samples[:, :2]
    elif bad == "empty":
        data = CalibrationData.from_arrays({"x": samples[:0]})
    else:
        data = {"x": samples, "z": samples}
    with pytest.raises(CalibrationDataError, match=pattern):
        calibrate(model, data)


# --------------------------------------------------------------------------- cache


def test_cache_round_trip(tmp_path: Path, model: ir.Model, samples: np.ndarray) -> None:
    result = calibrate(model, samples, calibrator="mse")
    path = tmp_path / "sub" / "calib.json"
    save_cache(result, path)
    assert [p.name for p in path.parent.iterdir()] == ["calib.json"]  # no temp file left
    document = json.loads(path.read_text())
    assert (document["format"], document["version"]) == ("gie-calibration", 1)
    assert document["tensors"]["y"]["scale"] == result.tensors["y"].scale
    loaded = load_cache(path)
    assert isinstance(loaded, CalibrationResult) and loaded == result
    assert loaded.with_calibrator("entropy") == result.with_calibrator("entropy")


def test_bad_cache_files_are_named(tmp_path: Path) -> None:
    cases = {
        "garbage.json": "{not json",
        "other.json": json.dumps({"format": "tensorrt"}),
        "newer.json": json.dumps({"format": "gie-calibration", "version": 2}),
        "broken.json": json.dumps({"format": "gie-calibration", "version": 1, "tensors": {}}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(CalibrationCacheError, match=name):
            load_cache(tmp_path / name)
    with pytest.raises(CalibrationCacheError, match="missing.json"):
        load_cache(tmp_path / "missing.json")
    result = CalibrationResult("entropy", 99.99, {}, model_sha256="aa")
    save_cache(result, tmp_path / "c.json")
    assert load_cache(tmp_path / "c.json", expect_model_sha256="aa") == result
    with pytest.raises(CalibrationCacheError, match="another model"):
        load_cache(tmp_path / "c.json", expect_model_sha256="bb")
