"""The memory planner: liveness, best-fit offsets, in-place reuse, sizing at the profile max."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from engine.backends.numpy_ref import ReferenceInterpreter
from engine.build.log import BuildLog
from engine.build.memory import (
    IN_PLACE,
    Buffer,
    MemoryPlan,
    align_up,
    assign_offsets,
    liveness,
    plan_memory,
    planning_shapes,
)
from engine.build.plan import lower
from engine.config import BuilderConfig, ShapeProfile
from engine.examples import light_model_path
from engine.onnx_io import load
from engine.passes import optimize
from engine.runtime import Engine
from engine.zoo import build

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _plan(proto: onnx.ModelProto):
    return lower(load(proto))


def _engine(plan, memory, config=None) -> Engine:
    return Engine(plan, memory, config or BuilderConfig(), BuildLog(), {})


# ---------------------------------------------------------------------- offsets (property)

intervals = st.lists(
    st.tuples(
        st.integers(1, 5000),  # size in bytes
        st.integers(0, 30),  # first layer
        st.integers(0, 10),  # length of the interval
    ),
    min_size=1,
    max_size=40,
)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(intervals, st.sampled_from([1, 16, 64, 256]))
def test_no_two_live_buffers_overlap_and_offsets_are_aligned(raw, alignment) -> None:
    buffers = [Buffer(f"v{i}", size, first, first + n) for i, (size, first, n) in enumerate(raw)]
    offsets = assign_offsets(buffers, alignment)
    assert set(offsets) == {b.name for b in buffers}
    for a in buffers:
        assert offsets[a.name] % alignment == 0
        for b in buffers:
            if a.name >= b.name or not (a.first <= b.last and b.first <= a.last):
                continue
            a0, b0 = offsets[a.name], offsets[b.name]
            assert a0 + a.size <= b0 or b0 + b.size <= a0, (a, b, a0, b0)
    arena = max(offsets[b.name] + align_up(b.size, alignment) for b in buffers)
    peak = max(
        sum(align_up(b.size, alignment) for b in buffers if b.first <= t <= b.last)
        for t in range(0, 41)
    )
    assert arena >= peak


def test_best_fit_takes_the_smallest_gap_that_holds_the_buffer() -> None:
    buffers = [
        Buffer("big", 4096, 0, 10),
        Buffer("early_a", 2048, 0, 2),  # frees a 2048-byte gap after layer 2
        Buffer("mid", 1024, 0, 10),
        Buffer("early_b", 512, 0, 2),  # frees a 512-byte gap after layer 2
        Buffer("tail", 480, 0, 10),
        Buffer("late", 448, 5, 6),
    ]
    offsets = assign_offsets(buffers, 64)
    assert offsets == {
        "big": 0,
        "early_a": 4096,
        "mid": 6144,
        "early_b": 7168,
        "tail": 7680,
        "late": 7168,  # the 512-byte gap, not the first (2048-byte) one
    }


# ---------------------------------------------------------------------- random graphs (property)

UNARY = ["Relu", "Neg", "Sigmoid", "Abs"]


@st.composite
def random_graphs(draw):
    """Random DAGs of elementwise, Concat and Transpose ops over [2, n] float tensors."""
    values = [("x", 4)]
    nodes = []
    for i in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["unary", "binary", "concat", "transpose"]))
        out = f"v{i}"
        a_name, a_width = draw(st.sampled_from(values))
        if kind == "unary":
            nodes.append(
                helper.make_node(draw(st.sampled_from(UNARY)), [a_name], [out], name=f"n{i}")
            )
            width = a_width
        elif kind == "binary":
            same = [v for v in values if v[1] == a_width]
            b_name = draw(st.sampled_from(same))[0]
            op = draw(st.sampled_from(["Add", "Mul", "Sub"]))
            nodes.append(helper.make_node(op, [a_name, b_name], [out], name=f"n{i}"))
            width = a_width
        elif kind == "concat" and a_width < 32:
            b_name, b_width = draw(st.sampled_from(values))
            nodes.append(helper.make_node("Concat", [a_name, b_name], [out], axis=1, name=f"n{i}"))
            width = a_width + b_width
        else:  # Transpose twice keeps the [2, n] layout; once would change it, so pair them
            mid = f"t{i}"
            nodes.append(helper.make_node("Transpose", [a_name], [mid], perm=[1, 0], name=f"n{i}a"))
            nodes.append(helper.make_node("Transpose", [mid], [out], perm=[1, 0], name=f"n{i}b"))
            width = a_width
        values.append((out, width))
    chosen = draw(st.lists(st.sampled_from(values[1:]), min_size=1, max_size=3, unique=True))
    outputs = [helper.make_tensor_value_info(n, F32, [2, w]) for n, w in chosen]
    return _model(nodes, [helper.make_tensor_value_info("x", F32, [2, 4])], outputs)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(random_graphs())
def test_random_graphs_plan_without_conflicts_and_run_exactly(proto) -> None:
    plan = _plan(proto)
    memory = plan_memory(plan, BuilderConfig())
    assert memory.conflicts() == []
    assert all(offset % memory.alignment == 0 for offset in memory.offsets.values())
    assert memory.arena_bytes >= memory.peak_live_bytes
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    want = ReferenceInterpreter(load(proto)).run({"x": x}).outputs
    got = _engine(plan, memory).run({"x": x})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


# ---------------------------------------------------------------------- liveness and in-place


def _chain() -> onnx.ModelProto:
    """x -> Exp a; Relu(a) b; Sigmoid(a) d; Neg(b) c; Add(c, d) y; Transpose(y) unused."""
    nodes = [
        helper.make_node("Exp", ["x"], ["a"], name="exp"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),  # a read later: no reuse
        helper.make_node("Sigmoid", ["a"], ["d"], name="sigmoid"),  # a dies here: d takes a
        helper.make_node("Neg", ["b"], ["c"], name="neg"),  # b dies here: c takes b
        helper.make_node("Add", ["c", "d"], ["y"], name="add"),  # both die: y takes c
        helper.make_node("Transpose", ["y"], ["unused"], perm=[1, 0], name="spare"),
    ]
    x = helper.make_tensor_value_info("x", F32, [8, 16])
    return _model(nodes, [x], [helper.make_tensor_value_info("y", F32, [8, 16])])


def test_liveness_intervals_run_from_definition_to_last_use_and_outputs_to_the_end() -> None:
    plan = _plan(_chain())
    assert liveness(plan) == {
        "a": (0, 2),
        "b": (1, 3),
        "d": (2, 4),
        "c": (3, 4),
        "y": (4, 6),  # a graph output lives to the end (6 layers)
        "unused": (5, 5),
    }


def test_in_place_reuse_follows_the_allow_list_and_last_uses() -> None:
    plan = _plan(_chain())
    log = BuildLog()
    memory = plan_memory(plan, BuilderConfig(), log=log)
    assert memory.in_place == {"d": "a", "c": "b", "y": "c"}
    assert memory.offsets["d"] == memory.offsets["a"]
    assert memory.offsets["y"] == memory.offsets["c"] == memory.offsets["b"]
    assert memory.offsets["a"] != memory.offsets["b"]
    assert memory.conflicts() == []
    assert memory.naive_bytes == 6 * 8 * 16 * 4
    assert memory.arena_bytes == 2 * 512  # two buffers are enough
    assert memory.live_bytes == (512, 1024, 1024, 1024, 1024, 1024)
    assert any("reuses the slot of 'a'" in line for line in log.lines())
    assert ("", "Relu") in IN_PLACE and ("", "Transpose") not in IN_PLACE
    x = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    want = ReferenceInterpreter(load(_chain())).run({"x": x}).outputs["y"]
    np.testing.assert_array_equal(_engine(plan, memory).run({"x": x})["y"], want)


def test_residual_of_conv_act_is_reused_but_not_its_convolved_input() -> None:
    proto = build("resnet")
    plan = lower(optimize(load(proto), "O2").model)
    memory = plan_memory(plan, BuilderConfig())
    reused = set()
    for layer in plan.layers:
        for output in layer.outputs:
            if output in memory.in_place:
                reused.add(layer.op_type)
                source = memory.in_place[output]
                if layer.op_type == "ConvAct":
                    assert layer.inputs.index(source) == 3
    assert "ConvAct" in reused
    assert memory.conflicts() == []


def test_plan_round_trips_through_json() -> None:
    memory = plan_memory(_plan(_chain()), BuilderConfig())
    text = json.dumps(memory.to_json())
    again = MemoryPlan.from_json(json.loads(text))
    assert again == memory
    assert again.slot("y") == (memory.offsets["y"], 512)
    assert json.loads(text)["naive_bytes"] == memory.naive_bytes


# ---------------------------------------------------------------------- sizes


def _two_inputs() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu"),
    ]
    a = helper.make_tensor_value_info("a", F32, ["batch", 16])
    b = helper.make_tensor_value_info("b", F32, ["batch", 16])
    return _model(nodes, [a, b], [helper.make_tensor_value_info("y", F32, ["batch", 16])])


def test_sizes_are_taken_at_the_profile_max_and_bind_shared_symbolic_dims() -> None:
    plan = _plan(_two_inputs())
    config = BuilderConfig(profiles=(ShapeProfile("a", (1, 16), (2, 16), (8, 16)),))
    assert planning_shapes(plan.model, config) == {"a": (8, 16), "b": (8, 16)}
    assert planning_shapes(plan.model, config, "opt") == {"a": (2, 16), "b": (2, 16)}
    assert planning_shapes(plan.model, BuilderConfig()) == {"a": (1, 16), "b": (1, 16)}
    memory = plan_memory(plan, config)
    assert memory.sizes == {"s": 8 * 16 * 4, "y": 8 * 16 * 4}
    assert memory.input_shapes == {"a": (8, 16), "b": (8, 16)}


def test_data_dependent_values_stay_outside_the_arena_and_still_run() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("NonZero", ["r"], ["nz"], name="nonzero"),
        helper.make_node("Neg", ["nz"], ["y"], name="neg"),
    ]
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2, None])],
    )
    plan = _plan(proto)
    memory = plan_memory(plan, BuilderConfig())
    assert set(memory.offsets) == {"r"}
    assert "not known before running" in memory.unplanned["nz"]
    x = np.random.default_rng(2).standard_normal((4, 4)).astype(np.float32)
    want = ReferenceInterpreter(load(proto)).run({"x": x}).outputs["y"]
    np.testing.assert_array_equal(_engine(plan, memory).run({"x": x})["y"], want)


@pytest.mark.slow
def test_light_resnet50_arena_is_at_most_40_percent_of_the_naive_sum() -> None:
    plan = lower(optimize(load(light_model_path("resnet50")), "O2").model)
    memory = plan_memory(plan, BuilderConfig())
    assert memory.conflicts() == []
    # Measured: 5,218,304 of 45,283,136 bytes (11.5%), equal to the peak of live bytes.
    assert memory.ratio <= 0.40, memory.summary_lines()
    assert memory.arena_bytes == memory.peak_live_bytes
