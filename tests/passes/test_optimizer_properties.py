"""Property: random small float DAGs keep their outputs through O3, verify, and O3 is idempotent.

Graphs have 2-3 float inputs of small static shapes and 3-12 nodes drawn from Add, Sub, Mul,
Div (by a value kept away from zero), Relu, Sigmoid, Tanh, Exp (of a clipped input), Abs,
Neg, Transpose, Reshape, MatMul (by a constant weight), Softmax, ReduceMean and Concat, always
with valid shapes. Hypothesis runs derandomized so failures reproduce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load
from engine.passes import optimize
from engine.passes.graph_text import canonical_text
from engine.passes.verifier import verify_graph

RTOL, ATOL = 1e-4, 1e-5
OPS = (
    "Add Sub Mul Div Relu Sigmoid Tanh Exp Abs Neg Transpose Reshape MatMul Softmax "
    "ReduceMean Concat"
).split()


class _Builder:
    """Accumulates nodes, constants and value shapes while a DAG is drawn."""

    def __init__(self, draw: Callable[[Any], Any], rng: np.random.Generator) -> None:
        self.draw = draw
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.used: set[str] = set()

    def value(self) -> str:
        return self.draw(st.sampled_from(sorted(self.shapes)))

    def constant(self, array: np.ndarray) -> str:
        name = f"c{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(array, name))
        return name

    def emit(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs: Any) -> str:
        output = f"v{len(self.nodes)}"
        name = f"{op}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        self.used.update(i for i in inputs if i in self.shapes)
        self.shapes[output] = shape
        return output

    def add_op(self, op: str) -> None:
        x = self.value()
        shape = self.shapes[x]
        if op in ("Add", "Sub", "Mul", "Div"):
            partners = [v for v, s in self.shapes.items() if _broadcasts(shape, s)]
            y = self.draw(st.sampled_from(sorted(partners)))
            out_shape = tuple(np.broadcast_shapes(shape, self.shapes[y]))
            if op == "Div":
                one = self.constant(np.array(1.0, np.float32))
                y = self.emit("Add", [self.emit("Abs", [y], self.shapes[y]), one], self.shapes[y])
            self.emit(op, [x, y], out_shape)
        elif op == "Exp":
            low = self.constant(np.array(-4.0, np.float32))
            high = self.constant(np.array(4.0, np.float32))
            self.emit("Exp", [self.emit("Clip", [x, low, high], shape)], shape)
        elif op in ("Relu", "Sigmoid", "Tanh", "Abs", "Neg"):
            self.emit(op, [x], shape)
        elif op == "Softmax":
            self.emit(op, [x], shape, axis=-1)
        elif op == "ReduceMean":
            self.emit(op, [x], (*shape[:-1], 1), axes=[-1], keepdims=1)
        elif op == "Transpose":
            perm = self.draw(st.permutations(range(len(shape))))
            self.emit(op, [x], tuple(shape[p] for p in perm), perm=list(perm))
        elif op == "Reshape":
            size = int(np.prod(shape))
            target = self.draw(st.sampled_from([(size,), (1, size), shape[::-1], (-1, shape[-1])]))
            resolved = tuple(size // shape[-1] if d == -1 else d for d in target)
            self.emit(op, [x, self.constant(np.array(target, np.int64))], resolved)
        elif op == "MatMul":
            columns = self.draw(st.integers(1, 4))
            weight = self.rng.standard_normal((shape[-1], columns)).astype(np.float32) * 0.5
            self.emit(op, [x, self.constant(weight)], (*shape[:-1], columns))
        elif op == "Concat":
            same = [v for v, s in self.shapes.items() if s == shape]
            y = self.draw(st.sampled_from(sorted(same)))
            axis = self.draw(st.integers(-len(shape), len(shape) - 1))
            out = list(shape)
            out[axis] *= 2
            self.emit(op, [x, y], tuple(out), axis=axis)


def _broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    try:
        np.broadcast_shapes(a, b)
    except ValueError:
        return False
    return True


@st.composite
def dags(draw: Callable[[Any], Any]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A random valid float DAG and seeded feeds for it."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    builder = _Builder(draw, rng)
    base = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    n_inputs = draw(st.integers(2, 3))
    inputs = []
    for index in range(n_inputs):
        shape = draw(st.sampled_from([base, base[-1:]]))
        name = f"x{index}"
        builder.shapes[name] = shape
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
    target = draw(st.integers(3, 12))
    while len(builder.nodes) < target:
        builder.add_op(draw(st.sampled_from(OPS)))
    sinks = [v for v in builder.shapes if v.startswith("v") and v not in builder.used]
    graph = helper.make_graph(
        builder.nodes,
        "random_dag",
        inputs,
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in sinks],
        builder.constants,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    feeds = {
        f"x{i}": rng.standard_normal(builder.shapes[f"x{i}"]).astype(np.float32)
        for i in range(n_inputs)
    }
    return proto, feeds


@settings(
    derandomize=True,
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(dags())
def test_o3_keeps_outputs_verifies_and_is_idempotent(
    case: tuple[onnx.ModelProto, dict[str, np.ndarray]],
) -> None:
    proto, feeds = case
    original = load(proto)
    want = ReferenceInterpreter(original).run(feeds).outputs
    first = optimize(original, "O3")
    verify_graph(first.model)
    got = ReferenceInterpreter(first.model).run(feeds).outputs
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
    second = optimize(first.model, "O3")
    assert canonical_text(second.model) == canonical_text(first.model)
