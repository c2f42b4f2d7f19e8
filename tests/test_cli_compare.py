"""`gie compare`: engines and the reference backend against onnxruntime (subprocess, real files),
and the error statistics themselves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_testing import clean_error, gie, ok
from onnx import TensorProto, helper, numpy_helper

from engine import zoo
from engine.cli_compare import compare_output, cosine_similarity, round_up
from engine.cli_engine import synthetic_feeds
from engine.examples import LIGHT_MODELS, light_model_path
from engine.zoo.builder import concrete_shape

RESNET50 = light_model_path("resnet50")
FAST_TIMING = ("--timing-iterations", "1", "--timing-warmup", "0")
METRICS = {"max_abs", "mean_abs", "p99_abs", "max_rel", "cosine"}


def compare_json(*args: str | os.PathLike[str], status: int = 0) -> dict:
    result = gie("compare", *args, "--json", "-")
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def resnet50_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Light ResNet-50 built once for the module."""
    engine = tmp_path_factory.mktemp("resnet50") / "resnet50.gie"
    ok(gie("build", RESNET50, "-o", engine, *FAST_TIMING))
    return engine


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_engine_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    proto = zoo.build(name)
    model = tmp_path / f"{name}.onnx"
    onnx.save(proto, model)
    engine = tmp_path / f"{name}.gie"
    shapes = []  # the zoo's concrete sizes (sequence 32 for the transformers) as fixed shapes
    for value in proto.graph.input:
        shapes += ["--shapes", f"{value.name}:{'x'.join(map(str, concrete_shape(proto, value)))}"]
    ok(gie("build", model, "-o", engine, *shapes, *FAST_TIMING))
    data = compare_json(model, engine)
    assert data["passed"] is True and data["engine"] == str(engine)
    assert list(data["outputs"]) == [o.name for o in proto.graph.output]
    for metrics in data["outputs"].values():
        assert set(metrics) >= METRICS and metrics["passed"] is True
        assert metrics["nonfinite"] == 0  # a real comparison, not NaN == NaN
        assert metrics["cosine"] > 0.9999
    for value in proto.graph.input:
        assert data["inputs"][value.name]["shape"] == list(concrete_shape(proto, value))


def test_light_resnet50_engine_matches_onnxruntime(resnet50_engine: Path) -> None:
    result = ok(gie("compare", RESNET50, resnet50_engine))
    assert "PASSED at rtol 0.0001, atol 1e-05" in result.stdout
    assert "gpu_0/softmax_1" in result.stdout
    data = compare_json(RESNET50, resnet50_engine)
    assert data["passed"] is True and data["outputs"]["gpu_0/softmax_1"]["nonfinite"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LIGHT_MODELS if n != "resnet50"])
def test_other_light_model_engines_match_onnxruntime(name: str, tmp_path: Path) -> None:
    engine = tmp_path / f"{name}.gie"
    ok(gie("build", light_model_path(name), "-o", engine, *FAST_TIMING))
    data = compare_json(light_model_path(name), engine)
    assert data["passed"] is True
    assert all(m["nonfinite"] == 0 for m in data["outputs"].values())


def test_reference_backend_without_engine_and_given_inputs(tmp_path: Path) -> None:
    model = tmp_path / "bert.onnx"
    onnx.save(zoo.build("bert_opset17"), model)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 512, size=(2, 16), dtype=np.int64)
    np.savez(tmp_path / "in.npz", input_ids=ids)  # attention_mask generated
    data = compare_json(
        model, "--inputs", tmp_path / "in.npz", "--dim", "batch=2", "--dim", "sequence=16"
    )
    assert data["passed"] is True and data["engine"] is None
    assert data["inputs"]["input_ids"]["shape"] == [2, 16]
    assert data["inputs"]["attention_mask"]["shape"] == [2, 16]
    assert set(data["outputs"]) == {"last_hidden_state", "pooler_output"}
    text = ok(
        gie(
            "compare",
            model,
            "--inputs",
            tmp_path / "in.npz",
            "--dim",
            "batch=2",
            "--dim",
            "sequence=16",
        )
    )
    assert f"from {tmp_path / 'in.npz'}" in text.stdout
    assert "attention_mask: int64[2,16] (generated: ones, an attention mask)" in text.stdout


def changed_weights(source: Path, target: Path, scale: float) -> Path:
    """A copy of ``source`` whose first float initializer is scaled by ``scale``."""
    proto = onnx.load(source)
    for index, tensor in enumerate(proto.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 1:
            replacement = numpy_helper.from_array(array * scale, tensor.name)
            proto.graph.initializer[index].CopyFrom(replacement)
            break
    onnx.save(proto, target)
    return target


def test_wrong_model_pair_exits_1_and_says_which_tolerance_would_pass(tmp_path: Path) -> None:
    model = tmp_path / "resnet.onnx"
    onnx.save(zoo.build("resnet"), model)
    other = changed_weights(model, tmp_path / "other.onnx", 1.01)
    engine = tmp_path / "other.gie"
    ok(gie("build", other, "-o", engine, *FAST_TIMING))
    data = compare_json(model, engine, status=1)
    assert data["passed"] is False
    metrics = data["outputs"]["output"]
    assert metrics["passed"] is False and metrics["max_abs"] > 1e-5 and metrics["mismatched"] > 0
    assert 0 < metrics["required_atol"] <= metrics["max_abs"]  # rtol covers part of it
    result = gie("compare", model, engine)
    assert result.returncode == 1
    assert "would pass with atol >= " in result.stdout and "FAILED" in result.stdout
    tolerant = gie("compare", model, engine, "--atol", f"{round_up(metrics['required_atol']):.2g}")
    assert tolerant.returncode == 0, tolerant.stdout


def test_compare_bad_input_exits_2(tmp_path: Path, resnet50_engine: Path) -> None:
    model = tmp_path / "gpt.onnx"
    onnx.save(zoo.build("gpt_block"), model)
    clean_error(gie("compare", model, resnet50_engine), "inputs")  # another model's engine
    clean_error(gie("compare", model, model), "not a .gie engine")
    np.savez(tmp_path / "bad.npz", input_ids=np.zeros((1, 4), np.float32))
    clean_error(gie("compare", model, "--inputs", tmp_path / "bad.npz"), "dtype")
    np.savez(tmp_path / "big.npz", **{"gpu_0/data_0": np.zeros((2, 3, 224, 224), np.float32)})
    clean_error(gie("compare", RESNET50, resnet50_engine, "--inputs", tmp_path / "big.npz"), "dim")
    tampered = tmp_path / "tampered.gie"
    raw = bytearray(resnet50_engine.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tampered.write_bytes(bytes(raw))
    clean_error(gie("compare", RESNET50, tampered), "tampered.gie")
    clean_error(gie("compare", model, "--rtol", "-1"), "--rtol")


def test_generated_inputs_follow_the_dtype_rules(tmp_path: Path) -> None:
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in ("f", "i", "b")]
    graph = helper.make_graph(
        nodes,
        "ids",
        [
            helper.make_tensor_value_info("f", TensorProto.FLOAT, [64]),
            helper.make_tensor_value_info("i", TensorProto.INT64, [64]),
            helper.make_tensor_value_info("b", TensorProto.BOOL, [64]),
        ],
        [
            helper.make_tensor_value_info(f"{n}_out", t, [64])
            for n, t in (
                ("f", TensorProto.FLOAT),
                ("i", TensorProto.INT64),
                ("b", TensorProto.BOOL),
            )
        ],
    )
    model = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = compare_json(model)
    assert data["passed"] is True and set(data["outputs"]) == {"f_out", "i_out", "b_out"}
    specs = {
        "f": ((4096,), np.dtype(np.float32)),
        "i": ((4096,), np.dtype(np.int64)),
        "b": ((64,), np.dtype(np.bool_)),
        "attention_mask": ((8,), np.dtype(np.int64)),
    }
    feeds = synthetic_feeds(specs, seed=0, integer_high=100, booleans_true=True, masks_ones=True)
    assert feeds["i"].min() >= 0 and feeds["i"].max() == 99
    assert feeds["b"].all()
    assert feeds["attention_mask"].tolist() == [1] * 8
    assert abs(feeds["f"].mean()) < 0.1 and 0.9 < feeds["f"].std() < 1.1
    again = synthetic_feeds(specs, seed=0, integer_high=100, booleans_true=True, masks_ones=True)
    assert all(np.array_equal(feeds[k], again[k]) for k in specs)


# --------------------------------------------------------------------------- statistics


def test_compare_output_statistics() -> None:
    reference = np.array([1.0, -2.0, 0.0, 4.0])
    ours = reference + np.array([1e-6, -3e-6, 2e-6, 0.0])
    item = compare_output("y", ours, reference, rtol=1e-4, atol=1e-5)
    assert item.passed and item.mismatched == 0
    assert item.max_abs == pytest.approx(3e-6, rel=1e-2)
    assert item.max_rel == pytest.approx(1.5e-6, rel=1e-2)  # the zero is left out
    assert item.cosine == pytest.approx(1.0)
    assert item.required_atol == pytest.approx(2e-6)  # the zero reference needs atol
    far = compare_output("y", reference * 1.001, reference, rtol=1e-4, atol=1e-5)
    assert not far.passed and far.mismatched == 3
    # exactly the tolerance it names passes (rounded up to 2 digits, as printed)
    assert np.allclose(reference * 1.001, reference, rtol=1e-4, atol=round_up(far.required_atol))
    assert np.allclose(reference * 1.001, reference, rtol=round_up(far.required_rtol), atol=1e-5)
    assert not np.allclose(reference * 1.001, reference, rtol=1e-4, atol=far.required_atol * 0.9)


def test_compare_output_edge_cases() -> None:
    nan = np.array([np.nan, 1.0], np.float32)
    assert compare_output("y", nan, nan.copy(), 1e-4, 1e-5).passed  # NaN matches NaN
    differs = compare_output("y", np.array([np.nan, 1.0]), np.array([0.5, 1.0]), 1e-4, 1e-5)
    assert not differs.passed and differs.required_atol is None and differs.problem
    assert differs.nonfinite == 1
    shape = compare_output("y", np.zeros((2, 3)), np.zeros((3, 2)), 1e-4, 1e-5)
    assert not shape.passed and "shape" in shape.problem
    ints = compare_output("i", np.arange(4), np.arange(4), 1e-4, 1e-5)
    assert ints.passed and ints.max_abs == 0
    assert compare_output("z", np.zeros(3), np.zeros(3), 1e-4, 1e-5).cosine == 1.0
    assert cosine_similarity(np.zeros(3), np.ones(3)) == 0.0
    assert cosine_similarity(np.ones(3), -np.ones(3)) == pytest.approx(-1.0)
    empty = compare_output("e", np.zeros((0, 4)), np.zeros((0, 4)), 1e-4, 1e-5)
    assert empty.passed and empty.max_abs == 0.0
    json.dumps(differs.to_json(), allow_nan=False)  # non-finite numbers become null
