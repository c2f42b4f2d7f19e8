"""engine.builder.build: the pipeline on real models, the timing cache, profiles, precisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.backends.numpy_ref import ReferenceInterpreter
from engine.build.timing import FakeTimer
from engine.builder import BuildError, build
from engine.config import BuilderConfig, Precision, PrecisionMode, ShapeProfile
from engine.onnx_io import load
from engine.zoo import ZOO, make_inputs
from engine.zoo import build as build_zoo


def _reference(model, feeds):
    return ReferenceInterpreter(model).run(feeds).outputs


@pytest.mark.parametrize("name", sorted(ZOO))
def test_engine_matches_the_reference_on_every_zoo_model(name: str) -> None:
    proto = build_zoo(name)
    model = load(proto)
    feeds = make_inputs(proto, 0)
    engine = build(model, BuilderConfig(timing_iterations=2))
    ours = engine.run(feeds)
    for output, want in _reference(model, feeds).items():
        np.testing.assert_allclose(ours[output], want, rtol=1e-4, atol=1e-5)
    assert any("tactic" in line for line in engine.log.lines())


def test_a_warm_timing_cache_skips_all_timing(tmp_path: Path) -> None:
    model = load(build_zoo("resnet"))
    cache = tmp_path / "cache.json"
    config = BuilderConfig(timing_cache_path=str(cache))
    cold_timer = FakeTimer(lambda layer, tactic: float(len(tactic)))
    cold = build(model, config, timer=cold_timer)
    assert cold_timer.calls, "the cold build timed nothing"
    warm_timer = FakeTimer(lambda layer, tactic: float(len(tactic)))
    warm = build(model, config, timer=warm_timer)
    assert warm_timer.calls == []
    assert [layer.tactic for layer in warm.plan.layers] == [
        layer.tactic for layer in cold.plan.layers
    ]


def _dynamic_batch_model() -> onnx.ModelProto:
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "w"
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_batch_profile_runs_every_batch_inside_and_refuses_outside() -> None:
    model = load(_dynamic_batch_model())
    config = BuilderConfig(profiles=(ShapeProfile("x", (1, 16), (4, 16), (8, 16)),))
    engine = build(model, config)
    for batch in (1, 3, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 16)).astype(np.float32)
        np.testing.assert_allclose(
            engine.run({"x": x})["y"], _reference(model, {"x": x})["y"], rtol=1e-5, atol=1e-6
        )
    with pytest.raises(ValueError, match=r"'x'.*9.*\[1, 8\]|'x'.*9"):
        engine.run({"x": np.zeros((9, 16), np.float32)})


def test_profile_for_an_unknown_input_is_refused() -> None:
    config = BuilderConfig(profiles=(ShapeProfile("nope", (1,), (1,), (1,)),))
    with pytest.raises(BuildError, match="profile names input 'nope'"):
        build(load(_dynamic_batch_model()), config)


def test_precision_requests_are_logged_or_fail_in_obey_mode() -> None:
    model = load(_dynamic_batch_model())
    prefer = BuilderConfig(layer_precisions=(("*", Precision.INT8),))
    engine = build(model, prefer)  # int8 without calibration: no scales
    assert any("int8 requested but no int8 scale" in line for line in engine.log.lines())
    assert all(layer.precision != Precision.INT8 for layer in engine.plan.layers)
    obey = prefer.with_changes(precision_mode=PrecisionMode.OBEY)
    with pytest.raises(BuildError, match="precision mode is obey"):
        build(model, obey)
