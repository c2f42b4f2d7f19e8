"""The Engine: runs optimized plans in one arena, checks feeds against profiles, profiles layers."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest

from engine.backends.numpy_ref import ReferenceInterpreter
from engine.build.log import BuildLog
from engine.build.memory import plan_memory
from engine.build.plan import lower
from engine.config import BuilderConfig, ShapeProfile
from engine.examples import light_model_inputs, light_model_path
from engine.onnx_io import load
from engine.passes import optimize
from engine.report import COLUMN_NAMES, ProfileReport
from engine.runtime import ArenaOverflowError, Engine, EngineInputError
from engine.zoo import ZOO, build, make_inputs

RTOL, ATOL = 1e-4, 1e-5


def _engine(model, config: BuilderConfig | None = None, level: str = "O2", memory=None) -> Engine:
    config = config or BuilderConfig()
    plan = lower(optimize(model, level).model)
    memory = memory or plan_memory(plan, config)
    return Engine(plan, memory, config, BuildLog(), {"name": "cpu"})


def _assert_matches(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("level", ["O2", "O3"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_matches_the_reference_on_the_original_model(name, level) -> None:
    proto = build(name)
    model = load(proto)
    feeds = make_inputs(proto, 0)
    want = ReferenceInterpreter(model).run(feeds).outputs
    engine = _engine(model, level=level)
    assert engine.memory.conflicts() == []
    _assert_matches(engine.run(feeds), want)


@pytest.mark.slow
def test_light_resnet50_matches_the_reference_including_the_logits() -> None:
    proto = onnx.load(light_model_path("resnet50"))
    logits = proto.graph.node[-1].input[0]
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(logits))
    model = load(proto)
    feeds = light_model_inputs(proto)
    want = ReferenceInterpreter(model).run(feeds).outputs
    engine = _engine(model)
    _assert_matches(engine.run(feeds), want)


def test_a_corrupted_memory_plan_gives_wrong_outputs() -> None:
    """Two values live at the same time put at one offset: the arena is the real storage."""
    proto = build("resnet")
    model = load(proto)
    feeds = make_inputs(proto, 0)
    want = ReferenceInterpreter(model).run(feeds).outputs
    engine = _engine(model)
    memory = engine.memory
    first, second = next(
        (a, b)
        for a in memory.offsets
        for b in memory.offsets
        if memory.intervals[a][1] > memory.intervals[b][0] > memory.intervals[a][0]
        and memory.root(a) != memory.root(b)
        and memory.sizes[a] == memory.sizes[b]
        and memory.offsets[a] != memory.offsets[b]
    )
    offsets = dict(memory.offsets)
    for name in memory.offsets:  # move b's whole in-place chain onto a's slot
        if memory.root(name) == memory.root(second):
            offsets[name] = memory.offsets[first]
    corrupted = replace(memory, offsets=offsets)
    assert corrupted.conflicts()
    broken = Engine(engine.plan, corrupted, engine.config, BuildLog(), {})
    got = broken.run(feeds)
    assert not all(np.allclose(got[n], want[n], rtol=RTOL, atol=ATOL) for n in want)
    _assert_matches(engine.run(feeds), want)  # the real plan still gives the right answer


def _dynamic_resnet() -> tuple[onnx.ModelProto, BuilderConfig]:
    proto = build("resnet")
    profile = ShapeProfile("input", (1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))
    return proto, BuilderConfig(profiles=(profile,))


def test_dynamic_batch_runs_every_batch_of_its_profile_and_refuses_others() -> None:
    proto, config = _dynamic_resnet()
    model = load(proto)
    engine = _engine(model, config)
    assert engine.memory.input_shapes == {"input": (8, 3, 64, 64)}
    reference = ReferenceInterpreter(model)
    rng = np.random.default_rng(3)
    for batch in (1, 3, 8):
        x = rng.standard_normal((batch, 3, 64, 64)).astype(np.float32)
        got = engine.run({"input": x})
        assert got["output"].shape == (batch, 10)
        _assert_matches(got, reference.run({"input": x}).outputs)
    x9 = rng.standard_normal((9, 3, 64, 64)).astype(np.float32)
    with pytest.raises(EngineInputError) as refused:
        engine.run({"input": x9})
    message = str(refused.value)
    assert "'input'" in message and "dim 0 is 9" in message and "[1, 8]" in message
    with pytest.raises(EngineInputError, match="dim 2 is 32, outside its profile range"):
        engine.run({"input": x9[:2, :, :32, :]})


def test_a_value_larger_than_its_slot_is_refused_not_written_past_it() -> None:
    proto, config = _dynamic_resnet()
    model = load(proto)
    plan = lower(optimize(model, "O2").model)
    small = plan_memory(plan, config, shapes={"input": (1, 3, 64, 64)})
    engine = Engine(plan, small, config, BuildLog(), {})
    x = np.zeros((2, 3, 64, 64), dtype=np.float32)
    with pytest.raises(ArenaOverflowError, match=r"needs \d+ bytes but its arena slot holds"):
        engine.run({"input": x})


def test_without_profiles_static_dims_must_match_and_symbolic_dims_are_free() -> None:
    proto = build("resnet")
    model = load(proto)
    engine = _engine(model)
    assert engine.memory.input_shapes == {"input": (1, 3, 64, 64)}
    x = np.random.default_rng(4).standard_normal((3, 3, 64, 64)).astype(np.float32)
    # Bigger than the plan's shapes: the engine plans memory for these shapes too.
    _assert_matches(engine.run({"input": x}), ReferenceInterpreter(model).run({"input": x}).outputs)
    with pytest.raises(EngineInputError, match="dim 1 is 4, the model declares 3"):
        engine.run({"input": np.zeros((1, 4, 64, 64), dtype=np.float32)})
    with pytest.raises(EngineInputError, match="rank 3"):
        engine.run({"input": np.zeros((3, 64, 64), dtype=np.float32)})


def test_feeds_with_wrong_names_or_dtypes_are_refused_clearly() -> None:
    engine = _engine(load(build("resnet")))
    x = np.zeros((1, 3, 64, 64), dtype=np.float32)
    with pytest.raises(EngineInputError, match=r"unknown input name\(s\) \['images'\]"):
        engine.run({"input": x, "images": x})
    with pytest.raises(EngineInputError, match="missing input 'input'"):
        engine.run({})
    with pytest.raises(EngineInputError, match="dtype float64, the engine expects float"):
        engine.run({"input": x.astype(np.float64)})


def test_outputs_are_copies_that_the_next_run_does_not_overwrite() -> None:
    proto = build("mobilenetv2_block")
    engine = _engine(load(proto))
    feeds = make_inputs(proto, 0)
    first = engine.run(feeds)
    kept = {name: value.copy() for name, value in first.items()}
    engine.run(make_inputs(proto, 1))
    for name in kept:
        np.testing.assert_array_equal(first[name], kept[name])


def test_profile_has_a_row_per_layer_with_the_declared_columns() -> None:
    proto = build("resnet")
    engine = _engine(load(proto))
    report = engine.profile(iterations=3, warmup=1)
    assert isinstance(report, ProfileReport)
    assert [row.layer for row in report.layers] == [layer.name for layer in engine.plan.layers]
    data = json.loads(json.dumps(report.to_json()))
    assert [c["name"] for c in data["columns"]] == list(COLUMN_NAMES)
    for row in data["layers"]:
        assert list(row) == list(COLUMN_NAMES)
        assert row["latency_ms_median"] > 0
    convs = [row for row in report.layers if row.op == "gie::ConvAct"]
    assert convs and all(row.flops and row.gflops and row.gbs for row in convs)
    assert all(row.tactic == "reference" and row.precision == "fp32" for row in report.layers)
    assert report.layers[-1].output_shape == ((1, 10),)  # the opt shape (batch 1)
    e2e = report.end_to_end
    assert e2e.iterations == 3 and e2e.min_ms <= e2e.median_ms <= e2e.p90_ms <= e2e.p99_ms
    assert e2e.throughput == pytest.approx(1000 / e2e.mean_ms)
    assert report.input_shapes == {"input": (1, 3, 64, 64)}
    assert any("end to end" in line for line in report.table_lines())


def test_profile_runs_at_the_opt_shape_of_a_profile_or_on_given_feeds() -> None:
    proto, config = _dynamic_resnet()
    engine = _engine(load(proto), config)
    assert engine.profile(iterations=1, warmup=0).input_shapes == {"input": (4, 3, 64, 64)}
    x = np.zeros((2, 3, 64, 64), dtype=np.float32)
    report = engine.profile(iterations=1, warmup=0, feeds={"input": x})
    assert report.layers[-1].output_shape == ((2, 10),)


def test_layer_table_names_every_layer_with_its_tactic_and_arena_offsets() -> None:
    engine = _engine(load(build("resnet")))
    table = engine.layer_table()
    assert [row["name"] for row in table] == [layer.name for layer in engine.plan.layers]
    for row in table:
        assert {"op", "precision", "tactic", "origins", "output_shapes"} <= set(row)
        assert row["output_offsets"] == [engine.memory.offsets.get(n) for n in row["outputs"]]
    assert engine.input_names == ["input"] and engine.output_names == ["output"]


def test_values_read_inside_if_branches_stay_live_until_the_if_runs() -> None:
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    then = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", f32, [4])],
    )
    other = helper.make_graph(
        [helper.make_node("Exp", ["a"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", f32, [4])],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", f32, [4])],
        [helper.make_tensor_value_info("y", f32, [4])],
        [helper.make_tensor("zero", f32, [], [0.0])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plan = lower(load(proto))
    memory = plan_memory(plan, BuilderConfig())
    assert memory.intervals["a"] == (0, 3)  # read by the If's branches, not by its inputs
    engine = Engine(plan, memory, BuilderConfig(), BuildLog(), {})
    reference = ReferenceInterpreter(load(proto))
    for x in ([1, -2, 3, 4], [-1, -2, -3, 4]):
        feeds = {"x": np.array(x, dtype=np.float32)}
        _assert_matches(engine.run(feeds), reference.run(feeds).outputs)
