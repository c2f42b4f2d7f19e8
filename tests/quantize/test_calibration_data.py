"""Calibration data sources (arrays, feed dicts, .npz, image folders) and their validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from PIL import Image

from engine import onnx_io
from engine.quantize.calibration_data import (
    CalibrationData,
    CalibrationDataError,
    load_calibration_data,
    validate,
)

RNG = np.random.default_rng(3)


def _conv_relu(batch: int | str = "batch", size: int = 8) -> ir.Model:
    """x [batch, 3, size, size] -> Conv(4 filters, 3x3, pad 1) -> Relu -> y."""
    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, [4, 3, 3, 3], RNG.standard_normal(108).astype(np.float32)
    )
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["conv"], ["y"], name="relu"),
        ],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    return onnx_io.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _two_inputs() -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return onnx_io.load(model)


def _images(n: int) -> np.ndarray:
    return RNG.standard_normal((n, 3, 8, 8)).astype(np.float32)


# --------------------------------------------------------------------------- constructors


def test_arrays_are_cut_into_batches() -> None:
    samples = _images(5)
    data = CalibrationData.from_arrays(samples, ["x"], batch_size=2)
    assert len(data) == 3 and data.batch_starts == (0, 2, 4)
    shapes = [batch["x"].shape[0] for batch in data]
    assert shapes == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in data]), samples)
    assert len(CalibrationData.from_arrays({"x": samples}, batch_size=2, drop_last=True)) == 2


def test_feed_dict_list_is_used_batch_by_batch() -> None:
    feeds = [{"x": _images(2)}, {"x": _images(3)}]
    data = CalibrationData.from_arrays(feeds)
    assert len(data) == 2 and data.batch_starts == (0, 2)
    np.testing.assert_array_equal(data.batch(1)["x"], feeds[1]["x"])


def test_npz_and_arrays_give_the_same_batches(tmp_path: Path) -> None:
    a, b = RNG.standard_normal((6, 4)), RNG.standard_normal((6, 4))
    np.savez(tmp_path / "calib.npz", a=a, b=b)
    model = _two_inputs()
    from_file = load_calibration_data(str(tmp_path / "calib.npz"), model, batch_size=4)
    from_dict = load_calibration_data({"a": a, "b": b}, model, batch_size=4)
    assert len(from_file) == len(from_dict) == 2
    for left, right in zip(from_file, from_dict):
        assert left.keys() == right.keys() == {"a", "b"}
        for name in left:
            assert left[name].dtype == np.float32  # float64 cast silently
            np.testing.assert_array_equal(left[name], right[name])
    with pytest.raises(CalibrationDataError, match="other.npz"):
        CalibrationData.from_npz(tmp_path / "other.npz")


def test_every_source_kind_loads_for_a_model(tmp_path: Path) -> None:
    model = _conv_relu()
    samples = _images(4)
    for source in (samples, {"x": samples}, [{"x": samples[:2]}, {"x": samples[2:]}]):
        data = load_calibration_data(source, model, batch_size=2)
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in data]), samples)
    static = load_calibration_data(_images(5), _conv_relu(batch=2))  # batch from the model
    assert [b["x"].shape[0] for b in static] == [2, 2]
    (tmp_path / "data.txt").write_text("1")
    with pytest.raises(CalibrationDataError, match="neither an .npz"):
        load_calibration_data(str(tmp_path / "data.txt"), model)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_calibration_data(tmp_path / "missing.npz", model)
    with pytest.raises(CalibrationDataError, match="single-input"):
        load_calibration_data(samples, _two_inputs())


# --------------------------------------------------------------------------- image folders


def _write_images(folder: Path) -> list[tuple[int, int, int]]:
    colours = [(255, 0, 51), (0, 255, 102), (51, 102, 255)]
    names = ["b.png", "a.png", "c.png"]
    sizes = [(12, 10), (8, 8), (5, 7)]
    for name, colour, size in zip(names, colours, sizes):
        Image.new("RGB", size, colour).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return [colours[1], colours[0], colours[2]]  # sorted by file name


def test_image_folder_with_the_default_preprocess(tmp_path: Path) -> None:
    colours = _write_images(tmp_path)
    data = load_calibration_data(str(tmp_path), _conv_relu(size=6), batch_size=2)
    batches = list(data)
    assert [b["x"].shape for b in batches] == [(2, 3, 6, 6), (1, 3, 6, 6)]
    images = np.concatenate([b["x"] for b in batches])
    assert images.dtype == np.float32
    for image, colour in zip(images, colours):  # solid colours survive resizing exactly
        for channel, value in enumerate(colour):
            np.testing.assert_allclose(image[channel], value / 255.0, rtol=1e-6)


def test_image_folder_with_a_custom_preprocess(tmp_path: Path) -> None:
    _write_images(tmp_path)

    def preprocess(image: Image.Image) -> np.ndarray:
        gray = np.asarray(image.convert("L").resize((8, 8)), dtype=np.float32)
        return np.stack([gray, gray, -gray])

    data = CalibrationData.from_image_folder(tmp_path, "x", preprocess, batch_size=3)
    batch = validate(data, _conv_relu()).batch(0)["x"]
    assert batch.shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(batch[:, 2], -batch[:, 0])
    with pytest.raises(CalibrationDataError, match="CHW"):
        CalibrationData.from_image_folder(tmp_path, "x", lambda im: np.zeros(4)).batch(0)


# --------------------------------------------------------------------------- bad data


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_values_name_the_input_and_the_sample(kind: str) -> None:
    samples = _images(6)
    samples[4, 1, 2, 3] = np.nan if kind == "nan" else -np.inf
    with pytest.raises(CalibrationDataError, match=r"'x'.*sample 4") as caught:
        load_calibration_data(samples, _conv_relu(), batch_size=2)
    assert ("NaN" if kind == "nan" else "Inf") in str(caught.value)


@pytest.mark.parametrize(
    ("samples", "pattern"),
    [
        (np.zeros((2, 3, 8), np.float32), r"'x' has shape \[1, 3, 8\].*\[\?, 3, 8, 8\]"),
        (np.zeros((2, 1, 8, 8), np.float32), r"'x' has shape \[1, 1, 8, 8\]"),
        (np.zeros((2, 3, 8, 8), np.int64), r"'x' has dtype int64"),
    ],
)
def test_wrong_shapes_and_dtypes_are_refused(samples: np.ndarray, pattern: str) -> None:
    with pytest.raises(CalibrationDataError, match=pattern):
        load_calibration_data(samples, _conv_relu(), batch_size=1)


def test_a_static_batch_dim_is_checked() -> None:
    data = CalibrationData.from_arrays(_images(3), ["x"], batch_size=3)
    with pytest.raises(CalibrationDataError, match=r"'x' has shape \[3, 3, 8, 8\].*\[2, 3"):
        validate(data, _conv_relu(batch=2))


def test_empty_unknown_and_missing_inputs_are_refused() -> None:
    model = _two_inputs()
    with pytest.raises(CalibrationDataError, match="empty"):
        load_calibration_data({"a": np.zeros((0, 4)), "b": np.zeros((0, 4))}, model)
    with pytest.raises(CalibrationDataError, match="empty"):
        load_calibration_data([], model)
    with pytest.raises(CalibrationDataError, match=r"unknown input\(s\) \['c'\]"):
        load_calibration_data(
            {"a": np.zeros((2, 4)), "b": np.zeros((2, 4)), "c": np.ones((2, 4))}, model
        )
    with pytest.raises(CalibrationDataError, match=r"missing input\(s\) \['b'\]"):
        load_calibration_data({"a": np.zeros((2, 4))}, model)
    with pytest.raises(CalibrationDataError, match="disagree"):
        load_calibration_data({"a": np.zeros((2, 4)), "b": np.zeros((3, 4))}, model)
