"""O1 constant and shape-chain folding: structure, numerics, refusals, replay, zoo, ResNet-50."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.examples import light_model_path
from engine.onnx_io import load
from engine.passes import PassManager, StepRecorder, optimize, replay
from engine.passes.fold_constants import (
    FOLD_PASSES,
    SHAPE_FOLDING,
    ConstantFoldPass,
    is_constant,
)
from engine.passes.graph_text import canonical_text
from engine.passes.pipelines import prepare_for_optimization
from engine.zoo import build, make_inputs

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def _model(
    nodes: list[onnx.NodeProto],
    initializers: dict[str, np.ndarray],
    inputs: list[tuple[str, list[int | str]]],
    outputs: list[tuple[str, list[int | str] | None]],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "fold_case",
        [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, F, s) for n, s in outputs],
        [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(model: onnx.ModelProto, dims: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value or dims[d.dim_param] for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _fold(proto: onnx.ModelProto, passes: list | None = None, feeds: dict | None = None):
    """Run the fold passes (or ``passes``) through a PassManager with the numeric check on."""
    model = prepare_for_optimization(load(proto))
    recorder = StepRecorder(check_feeds=feeds)
    PassManager(passes or FOLD_PASSES, [recorder]).run(model)
    return model, recorder


def _ops(model: ir.Model) -> Counter[str]:
    return Counter(node.op_type for node in model.graph)


def _rule_steps(recorder: StepRecorder, rule: str) -> int:
    return sum(1 for step in recorder.steps if step.rule == rule)


def _reasons(recorder: StepRecorder, rule: str) -> list[str]:
    return [w.reason for w in recorder.why_not.values() if w.rule == rule]


def _assert_same_numbers(proto: onnx.ModelProto, optimized: ir.Model, feeds: dict) -> None:
    expected = ReferenceInterpreter(load(proto)).run(feeds).outputs
    actual = ReferenceInterpreter(optimized).run(feeds).outputs
    from_ort = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)
    for (name, want), theirs in zip(expected.items(), from_ort):
        np.testing.assert_allclose(actual[name], want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(actual[name], theirs, rtol=1e-5, atol=1e-5)


def _constant_graph() -> onnx.ModelProto:
    """y = x + Transpose(w) * ConstantOfShape([2, 3], 2.0): three foldable nodes."""
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], name="transpose_w", perm=[1, 0]),
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["twos"],
            name="twos",
            value=helper.make_tensor("v", F, [1], [2.0]),
        ),
        helper.make_node("Mul", ["wt", "twos"], ["scaled"], name="scale"),
        helper.make_node("Add", ["x", "scaled"], ["y"], name="add"),
    ]
    weights = np.arange(6, dtype=np.float32).reshape(3, 2)
    return _model(
        nodes,
        {"w": weights, "shape": np.array([2, 3], np.int64)},
        [("x", [2, 3])],
        [("y", [2, 3])],
    )


def test_fold_constant_node() -> None:
    proto = _constant_graph()
    feeds = _feeds(proto, {})
    model, recorder = _fold(proto, feeds=feeds)
    assert _rule_steps(recorder, "fold_constant_node") == 3
    assert _ops(model) == Counter({"Add": 1})
    assert list(model.graph.initializers) == ["scaled"]
    assert all(s.numeric_check and s.numeric_check.max_abs == 0.0 for s in recorder.steps)
    _assert_same_numbers(proto, model, feeds)


def test_fold_refuses_over_the_size_cap() -> None:
    proto = _constant_graph()
    model, recorder = _fold(proto, [ConstantFoldPass(max_elements=4)])
    assert _ops(model)["ConstantOfShape"] == 1 and _ops(model)["Transpose"] == 1
    reasons = _reasons(recorder, "fold_constant_node")
    assert any("6 elements (cap 4)" in r and "twos" in r for r in reasons), reasons


def test_fold_keeps_random_and_dequantize_nodes() -> None:
    nodes = [
        helper.make_node("RandomUniform", [], ["r"], name="rand", shape=[2, 3], seed=3.0),
        helper.make_node("DequantizeLinear", ["q", "s"], ["dq"], name="dequantize"),
        helper.make_node("Add", ["r", "dq"], ["t"], name="add_rd"),
        helper.make_node("Add", ["x", "t"], ["y"], name="add"),
    ]
    proto = _model(
        nodes,
        {"q": np.ones((2, 3), np.int8), "s": np.float32(0.5)},
        [("x", [2, 3])],
        [("y", [2, 3])],
    )
    model, recorder = _fold(proto)
    assert _ops(model) == Counter({"RandomUniform": 1, "DequantizeLinear": 1, "Add": 2})
    assert not recorder.steps


def test_fold_static_shape_chain() -> None:
    """Shape(x) of a static x becomes a constant; the chain folds and the Reshape reads it."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["d0"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["d0", "axes"], ["d0_1d"], name="unsqueeze"),
        helper.make_node("Concat", ["d0_1d", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
    ]
    consts = {
        "zero": np.array(0, np.int64),
        "axes": np.array([0], np.int64),
        "minus_one": np.array([-1], np.int64),
    }
    proto = _model(nodes, consts, [("x", [2, 3, 4])], [("y", [2, 12])])
    feeds = _feeds(proto, {})
    model, recorder = _fold(proto, feeds=feeds)
    assert _rule_steps(recorder, "fold_static_shape") == 1
    assert _rule_steps(recorder, "fold_constant_node") == 3
    assert _ops(model) == Counter({"Reshape": 1})
    reshape = next(iter(model.graph))
    assert reshape.inputs[1].const_value.numpy().tolist() == [2, -1]
    _assert_same_numbers(proto, model, feeds)


def test_fold_refuses_a_graph_output() -> None:
    nodes = [helper.make_node("Shape", ["x"], ["y"], name="shape_out")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, [2, 3])],
        [helper.make_tensor_value_info("y", I64, [2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, recorder = _fold(proto)
    assert _ops(model) == Counter({"Shape": 1})
    assert any("graph output" in r for r in _reasons(recorder, "fold_static_shape"))


def _symbolic_reshape(data: str, dims: list[tuple[str, int]], extra: np.ndarray | None):
    """Reshape(data, Concat(Unsqueeze(Gather(Shape(src), i)) for src, i in dims, [extra]))."""
    nodes, parts, consts = [], [], {"axes": np.array([0], np.int64)}
    for k, (source, index) in enumerate(dims):
        consts[f"i{k}"] = np.array(index, np.int64)
        nodes += [
            helper.make_node("Shape", [source], [f"s{k}"], name=f"shape_{k}"),
            helper.make_node("Gather", [f"s{k}", f"i{k}"], [f"g{k}"], name=f"gather_{k}"),
            helper.make_node("Unsqueeze", [f"g{k}", "axes"], [f"u{k}"], name=f"unsqueeze_{k}"),
        ]
        parts.append(f"u{k}")
    if extra is not None:
        consts["extra"] = extra
        parts.append("extra")
    nodes += [
        helper.make_node("Concat", parts, ["target"], name="concat", axis=0),
        helper.make_node("Reshape", [data, "target"], ["y"], name="reshape"),
    ]
    return nodes, consts


def test_fold_reshape_shape_chain_with_symbolic_dims() -> None:
    """[batch, seq, 8] -> [batch, seq, 2, 4]: the target becomes [0, 0, 2, 4]."""
    nodes, consts = _symbolic_reshape("x", [("x", 0), ("x", 1)], np.array([2, 4], np.int64))
    proto = _model(nodes, consts, [("x", ["batch", "seq", 8])], [("y", ["batch", "seq", 2, 4])])
    feeds = _feeds(proto, {"batch": 2, "seq": 5})
    model, recorder = _fold(proto, feeds=feeds)
    assert _rule_steps(recorder, "fold_reshape_shape_chain") == 1
    assert _ops(model) == Counter({"Reshape": 1})
    reshape = next(iter(model.graph))
    assert reshape.inputs[1].const_value.numpy().tolist() == [0, 0, 2, 4]
    for batch, seq in [(2, 5), (3, 7), (1, 1)]:  # valid for any batch and sequence
        _assert_same_numbers(proto, model, _feeds(proto, {"batch": batch, "seq": seq}))


def test_fold_reshape_shape_chain_uses_minus_one_for_one_unknown_dim() -> None:
    """Reshape(Reshape(x, [-1]), [dim 0 of x, 24]): dim 0 is not the flat input's, so -1."""
    nodes, consts = _symbolic_reshape("flat", [("x", 0)], np.array([24], np.int64))
    nodes.insert(0, helper.make_node("Reshape", ["x", "minus_one"], ["flat"], name="flatten"))
    consts["minus_one"] = np.array([-1], np.int64)
    proto = _model(nodes, consts, [("x", ["batch", 3, 8])], [("y", ["batch", 24])])
    model, recorder = _fold(proto, feeds=_feeds(proto, {"batch": 2}))
    assert _rule_steps(recorder, "fold_reshape_shape_chain") == 1
    reshape = next(n for n in model.graph if n.name != "flatten")
    assert reshape.inputs[1].const_value.numpy().tolist() == [-1, 24]
    for batch in (1, 2, 5):
        _assert_same_numbers(proto, model, _feeds(proto, {"batch": batch}))


def test_fold_reshape_shape_chain_refuses_two_unknown_dims() -> None:
    """The GPT Conv1D pattern: both target dims come from another tensor's dims."""
    nodes, consts = _symbolic_reshape("flat", [("x", 0), ("x", 1)], np.array([8], np.int64))
    nodes.insert(0, helper.make_node("Reshape", ["x", "flat_shape"], ["flat"], name="flatten"))
    consts["flat_shape"] = np.array([-1, 8], np.int64)
    proto = _model(nodes, consts, [("x", ["batch", "seq", 8])], [("y", ["batch", "seq", 8])])
    model, recorder = _fold(proto, [SHAPE_FOLDING])
    assert _rule_steps(recorder, "fold_reshape_shape_chain") == 0
    assert not is_constant(next(n for n in model.graph if n.name == "reshape").inputs[1])
    reasons = _reasons(recorder, "fold_reshape_shape_chain")
    assert reasons and "only one dim can be -1" in reasons[0] and "reshape" in reasons[0]


def test_fold_expand_shape_chain() -> None:
    """Expand([batch, 1, 4] -> [batch, 3, 4]): the target becomes [1, 3, 4]."""
    nodes, consts = _symbolic_reshape("x", [("x", 0)], np.array([3, 4], np.int64))
    nodes[-1] = helper.make_node("Expand", ["x", "target"], ["y"], name="expand")
    proto = _model(nodes, consts, [("x", ["batch", 1, 4])], [("y", ["batch", 3, 4])])
    model, recorder = _fold(proto, feeds=_feeds(proto, {"batch": 2}))
    assert _rule_steps(recorder, "fold_expand_shape_chain") == 1
    assert _ops(model) == Counter({"Expand": 1})
    assert next(iter(model.graph)).inputs[1].const_value.numpy().tolist() == [1, 3, 4]
    for batch in (1, 3):
        _assert_same_numbers(proto, model, _feeds(proto, {"batch": batch}))


def test_fold_expand_shape_chain_refuses_a_foreign_dim() -> None:
    nodes, consts = _symbolic_reshape("x", [("z", 0)], np.array([3, 4], np.int64))
    nodes[-1] = helper.make_node("Expand", ["x", "target"], ["y"], name="expand")
    inputs = [("x", [1, 1, 4]), ("z", ["n"])]
    proto = _model(nodes, consts, inputs, [("y", ["n", 3, 4])])
    _, recorder = _fold(proto, [SHAPE_FOLDING])
    assert _rule_steps(recorder, "fold_expand_shape_chain") == 0
    reasons = _reasons(recorder, "fold_expand_shape_chain")
    assert reasons and "dim 0 of 'z'" in reasons[0]


def test_o1_replay_reproduces_the_folding() -> None:
    nodes, consts = _symbolic_reshape("x", [("x", 0), ("x", 1)], np.array([2, 4], np.int64))
    proto = _model(nodes, consts, [("x", ["batch", "seq", 8])], [("y", ["batch", "seq", 2, 4])])
    for case in (proto, _constant_graph()):
        result = optimize(load(case), "O1")
        replayed = replay(load(case), result.steps, "O1")
        assert canonical_text(replayed) == canonical_text(result.model)


def test_many_folds_are_one_step_and_replay() -> None:
    """Over 16 foldable nodes (a chain of 20 Neg on a constant) make one bulk step."""
    nodes = [helper.make_node("Neg", [f"c{i}"], [f"c{i + 1}"], name=f"neg_{i}") for i in range(20)]
    nodes.append(helper.make_node("Add", ["x", "c20"], ["y"], name="add"))
    proto = _model(nodes, {"c0": np.arange(3, dtype=np.float32)}, [("x", [3])], [("y", [3])])
    result = optimize(load(proto), "O1")
    fold_steps = [s for s in result.steps if s.pass_name == "fold_constants"]
    assert len(fold_steps) == 1 and fold_steps[0].rule is None and len(fold_steps[0].removed) == 20
    assert _ops(result.model) == Counter({"Add": 1})
    _assert_same_numbers(proto, result.model, _feeds(proto, {}))
    replayed = replay(load(proto), result.steps, "O1")
    assert canonical_text(replayed) == canonical_text(result.model)


def _with_dims(proto: onnx.ModelProto, dims: str) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(proto)
    for prop in changed.metadata_props:
        if prop.key == "zoo.dims":
            prop.value = dims
    return changed


def test_bert_o1_reshapes_read_constants_and_match_for_any_sequence() -> None:
    proto = build("bert_opset13")
    original = load(proto)
    result = optimize(original, "O1")
    reshapes = [n for n in result.model.graph if n.op_type == "Reshape"]
    assert len(reshapes) == 8
    assert all(is_constant(n.inputs[1]) for n in reshapes)
    assert _rule_steps_of(result.steps, "fold_reshape_shape_chain") == 8
    replayed = replay(original, result.steps, "O1")
    assert canonical_text(replayed) == canonical_text(result.model)
    for feeds in (make_inputs(proto), make_inputs(_with_dims(proto, "batch=2,sequence=48"))):
        expected = ReferenceInterpreter(original).run(feeds).outputs
        actual = ReferenceInterpreter(result.model).run(feeds).outputs
        for name, want in expected.items():
            np.testing.assert_allclose(actual[name], want, rtol=1e-4, atol=1e-5)


def _rule_steps_of(steps: list, rule: str) -> int:
    return sum(1 for step in steps if step.rule == rule)


@pytest.mark.slow
def test_light_resnet50_o1_folds_every_constant_of_shape() -> None:
    original = load(light_model_path("resnet50"))
    assert Counter(n.op_type for n in original.graph)["ConstantOfShape"] == 239
    result = optimize(original, "O1")
    assert _ops(result.model)["ConstantOfShape"] == 0
    fold_steps = [s for s in result.steps if s.pass_name == "fold_constants"]
    assert len(fold_steps) == 1 and fold_steps[0].rule is None  # one bulk step
    # CSE first merges the ConstantOfShape nodes that build equal tensors
    merged = [s for s in result.steps if s.pass_name == "common_subexpression_elimination"]
    assert len(fold_steps[0].removed) + len(merged[0].removed) == 239
    feeds = {"gpu_0/data_0": np.random.default_rng(0).random((1, 3, 224, 224), np.float32)}
    expected = ReferenceInterpreter(original).run(feeds).outputs
    actual = ReferenceInterpreter(result.model).run(feeds).outputs
    for name, want in expected.items():
        np.testing.assert_allclose(actual[name], want, rtol=1e-4, atol=1e-6)
