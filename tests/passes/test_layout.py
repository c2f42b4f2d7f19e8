"""Layout simplification: every rule fires where it should (structure, step count, numerics
against the reference backend and onnxruntime) and refuses, with a reason, where it nearly
matched but must not fire."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load
from engine.passes import optimize
from engine.passes.layout import LAYOUT_PASSES, LAYOUT_RULES
from engine.passes.manager import PassManager, StepRecorder

RNG = np.random.default_rng(11)
X_SHAPE = [2, 3, 4]


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass
class Case:
    """A tiny graph over input x (float [2, 3, 4]) producing z."""

    rule: str
    nodes: list[onnx.NodeProto]
    constants: dict[str, np.ndarray]
    fires: int  # applications expected (0 for a negative case)
    removed: dict[str, int]  # op type -> count that must disappear
    reason: str = ""  # a refusal reason that must be recorded (negative cases)


def _node(op: str, inputs: list[str], output: str, name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=name, **attrs)


POSITIVE = [
    Case(
        "merge_transpose_pair",
        [
            _node("Transpose", ["x"], "t", "T_0", perm=[1, 2, 0]),
            _node("Transpose", ["t"], "z", "T_1", perm=[0, 2, 1]),
        ],
        {},
        1,
        {"Transpose": 1},
    ),
    Case(
        "merge_transpose_pair",
        [
            _node("Transpose", ["x"], "t", "T_0", perm=[1, 2, 0]),
            _node("Transpose", ["t"], "z", "T_1", perm=[2, 0, 1]),
        ],
        {},
        1,
        {"Transpose": 2},
    ),
    Case(
        "remove_identity_transpose",
        [_node("Transpose", ["x"], "z", "T_0", perm=[0, 1, 2])],
        {},
        1,
        {"Transpose": 1},
    ),
    Case(
        "merge_reshape_pair",
        [
            _node("Reshape", ["x", "s1"], "r", "R_0"),
            _node("Reshape", ["r", "s2"], "z", "R_1"),
        ],
        {"s1": _i64(6, 4), "s2": _i64(4, 6)},
        1,
        {"Reshape": 1},
    ),
    Case(
        "remove_identity_reshape",
        [_node("Reshape", ["x", "s"], "z", "R_0")],
        {"s": _i64(0, 3, -1)},
        1,
        {"Reshape": 1},
    ),
    Case(
        "remove_identity_transpose_reshape",
        [
            _node("Unsqueeze", ["x", "a"], "u", "U_0"),
            _node("Transpose", ["u"], "t", "T_1", perm=[0, 2, 1, 3]),
            _node("Reshape", ["t", "s"], "z", "R_2"),
        ],
        {"a": _i64(1), "s": _i64(2, 1, 3, -1)},
        1,
        {"Transpose": 1, "Reshape": 1},
    ),
    Case(
        "merge_unsqueeze_pair",
        [
            _node("Unsqueeze", ["x", "a1"], "u", "U_0"),
            _node("Unsqueeze", ["u", "a2"], "z", "U_1"),
        ],
        {"a1": _i64(0), "a2": _i64(2)},
        1,
        {"Unsqueeze": 1},
    ),
    Case(
        "cancel_squeeze_unsqueeze",
        [
            _node("Unsqueeze", ["x", "a"], "u", "U_0"),
            _node("Relu", ["u"], "r", "Relu_1"),
            _node("Squeeze", ["r", "b"], "q", "S_2"),
            _node("Unsqueeze", ["q", "a"], "z", "U_3"),
        ],
        {"a": _i64(1), "b": _i64(-3)},
        1,
        {"Unsqueeze": 1, "Squeeze": 1},
    ),
    Case(
        "cancel_unsqueeze_squeeze",
        [
            _node("Unsqueeze", ["x", "a"], "u", "U_0"),
            _node("Squeeze", ["u", "b"], "z", "S_1"),
        ],
        {"a": _i64(3), "b": _i64(-1)},
        1,
        {"Unsqueeze": 1, "Squeeze": 1},
    ),
    Case(
        "remove_single_input_concat",
        [_node("Concat", ["x"], "z", "C_0", axis=1)],
        {},
        1,
        {"Concat": 1},
    ),
    Case(
        "fold_constant_concat",
        [
            _node("Concat", ["k1", "k2"], "k", "C_0", axis=0),
            _node("Reshape", ["x", "k"], "z", "R_1"),
        ],
        {"k1": _i64(6), "k2": _i64(4)},
        1,
        {"Concat": 1},
    ),
    Case(
        "remove_split_concat",
        [
            helper.make_node("Split", ["x"], ["p0", "p1"], name="Sp_0", axis=-1, num_outputs=2),
            _node("Concat", ["p0", "p1"], "z", "C_1", axis=2),
        ],
        {},
        1,
        {"Concat": 1},
    ),
    Case(
        "remove_full_slice",
        [_node("Slice", ["x", "s", "e", "a"], "z", "Sl_0")],
        {"s": _i64(0, -3), "e": _i64(2**62, 3), "a": _i64(2, 1)},
        1,
        {"Slice": 1},
    ),
    Case(
        "merge_slice_pair",
        [
            _node("Slice", ["x", "s1", "e1", "a1"], "m", "Sl_0"),
            _node("Slice", ["m", "s2", "e2", "a2"], "z", "Sl_1"),
        ],
        {
            "s1": _i64(1, 0),
            "e1": _i64(4, 1),
            "a1": _i64(2, 0),
            "s2": _i64(1, -2),
            "e2": _i64(-1, 9),
            "a2": _i64(-1, 1),
        },
        1,
        {"Slice": 1},
    ),
]

NEGATIVE = [
    Case(
        "remove_identity_reshape",
        [_node("Reshape", ["x", "s"], "z", "R_0")],
        {"s": _i64(3, 2, 4)},
        0,
        {},
        "R_0 not removed: it reshapes [2, 3, 4] to [3, 2, 4]",
    ),
    Case(
        "cancel_squeeze_unsqueeze",
        [
            _node("Reshape", ["x", "shape"], "r", "R_0"),
            _node("Squeeze", ["r", "a"], "s", "S_1"),
            _node("Unsqueeze", ["s", "b"], "z", "U_2"),
        ],
        {"shape": _i64(1, 6, 4), "a": _i64(0), "b": _i64(1)},
        0,
        {},
        "U_2 not cancelled: Squeeze axes [0] != Unsqueeze axes [1]",
    ),
    Case(
        "fold_constant_concat",
        [_node("Concat", ["x", "k"], "z", "C_0", axis=0)],
        {"k": np.ones((1, 3, 4), np.float32)},
        0,
        {},
        "C_0 not folded: input 0 'x' is not a constant",
    ),
    Case(
        "remove_split_concat",
        [
            helper.make_node("Split", ["x"], ["p0", "p1"], name="Sp_0", axis=2, num_outputs=2),
            _node("Concat", ["p0", "p1"], "z", "C_1", axis=1),
        ],
        {},
        0,
        {},
        "C_1 not removed: Sp_0 cuts axis 2, Concat joins axis 1",
    ),
    Case(
        "remove_split_concat",
        [
            helper.make_node("Split", ["x"], ["p0", "p1"], name="Sp_0", axis=2, num_outputs=2),
            _node("Concat", ["p1", "p0"], "z", "C_1", axis=2),
        ],
        {},
        0,
        {},
        "C_1 is not Sp_0 undone: not all its outputs in order",
    ),
    Case(
        "remove_full_slice",
        [_node("Slice", ["x", "s", "e", "a"], "z", "Sl_0")],
        {"s": _i64(0), "e": _i64(3), "a": _i64(2)},
        0,
        {},
        "Sl_0 not removed: it keeps [0:3] of axis 2",
    ),
    Case(
        "merge_slice_pair",
        [
            _node("Slice", ["x", "s", "e", "a", "st"], "m", "Sl_0"),
            _node("Slice", ["m", "s", "e1", "a"], "z", "Sl_1"),
        ],
        {"s": _i64(0), "e": _i64(3), "e1": _i64(1), "a": _i64(2), "st": _i64(2)},
        0,
        {},
        "Sl_1 not merged: axis 2 sliced twice with a step or a dynamic dim",
    ),
    Case(
        "remove_identity_transpose_reshape",
        [
            _node("Transpose", ["x"], "t", "T_0", perm=[1, 0, 2]),
            _node("Reshape", ["t", "s"], "z", "R_1"),
        ],
        {"s": _i64(2, 3, 4)},
        0,
        {},
        "R_1 not removed: T_0 reorders the data",
    ),
    Case(
        "remove_identity_transpose",
        [_node("Transpose", ["x"], "z", "T_0", perm=[1, 0, 2])],
        {},
        0,
        {},
        "T_0 not removed: Permutation is not identity.",
    ),
]


def _proto(case: Case) -> onnx.ModelProto:
    graph = helper.make_graph(
        case.nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        [helper.make_tensor_value_info("z", 0, None)],
        [numpy_helper.from_array(a, n) for n, a in case.constants.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(proto)


def _ops(model) -> Counter[str]:
    return Counter(n.op_type for n in model.graph)


def _apply(case: Case):
    proto = _proto(case)
    model = load(proto)
    recorder = StepRecorder()
    PassManager(LAYOUT_PASSES, [recorder]).run(model)
    return proto, model, recorder


def _check_numerics(proto: onnx.ModelProto, model) -> None:
    feeds = {"x": RNG.standard_normal(X_SHAPE).astype(np.float32)}
    want = ReferenceInterpreter(load(proto)).run(feeds).outputs["z"]
    got = ReferenceInterpreter(model).run(feeds).outputs["z"]
    ort_value = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, ort_value)


@pytest.mark.parametrize("case", POSITIVE, ids=lambda c: c.rule)
def test_rule_fires_with_expected_structure_and_numerics(case: Case) -> None:
    proto, model, recorder = _apply(case)
    before, after = _ops(load(proto)), _ops(model)
    for op_type, count in case.removed.items():
        assert before[op_type] - after[op_type] == count, (op_type, before, after)
    applied = [s for s in recorder.steps if s.rule == case.rule]
    assert len(applied) == case.fires == len(recorder.steps)
    _check_numerics(proto, model)


@pytest.mark.parametrize("case", NEGATIVE, ids=lambda c: c.rule)
def test_rule_refuses_with_a_reason(case: Case) -> None:
    proto, model, recorder = _apply(case)
    assert not [s for s in recorder.steps if s.rule == case.rule]
    reasons = [w.reason for w in recorder.why_not.values() if w.rule == case.rule]
    assert case.reason in reasons, reasons
    _check_numerics(proto, model)


def test_transpose_pair_composes_the_permutation() -> None:
    _, model, _ = _apply(POSITIVE[0])
    [transpose] = [n for n in model.graph if n.op_type == "Transpose"]
    assert list(transpose.attributes["perm"].value) == [1, 0, 2]


def test_rule_names_are_unique_snake_case() -> None:
    names = [str(r.name) for r in LAYOUT_RULES]
    assert len(names) == len(set(names)) == 13
    assert all(n == n.lower() and " " not in n for n in names)


def test_o3_removes_the_identities_layout_left() -> None:
    case = POSITIVE[0]
    nodes = [
        _node("Transpose", ["x"], "t", "T_0", perm=[0, 2, 1]),
        _node("Transpose", ["t"], "z", "T_1", perm=[0, 2, 1]),
    ]
    proto = _proto(Case(case.rule, nodes, {}, 1, {}))
    result = optimize(load(proto), "O3")
    assert _ops(result.model)["Transpose"] == 0
    assert [s.rule for s in result.steps].count("merge_transpose_pair") == 1
    _check_numerics(proto, result.model)
