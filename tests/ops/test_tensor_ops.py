"""Reduce, shape, layout, indexing and generator ops: kernels against onnxruntime, shape rules
against onnx.shape_inference, and clear refusals of bad inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from engine.backends.numpy_ref.interpreter import NodeExecutionError, ReferenceInterpreter
from engine.onnx_io import load
from engine.ops import generators, indexing, layout, reduce, shape_ops
from engine.ops.registry import Attrs, KernelContext, OpRegistry, TensorSpec

#: Only the families under test, so the tests do not depend on other op modules.
REGISTRY = OpRegistry([*reduce.OPS, *shape_ops.OPS, *layout.OPS, *indexing.OPS, *generators.OPS])
RNG = np.random.default_rng(1234)


def _model(
    op_type: str,
    feeds: dict[str, np.ndarray],
    consts: dict[str, np.ndarray] | None = None,
    inputs: list[str] | None = None,
    outputs: int = 1,
    opset: int = 18,
    **attributes: Any,
) -> onnx.ModelProto:
    """A one-node model: ``feeds`` are graph inputs, ``consts`` initializers; ``inputs`` orders
    them as the node's inputs ("" for an omitted optional input)."""
    consts = consts or {}
    names = inputs if inputs is not None else [*feeds, *consts]
    out_names = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op_type, names, out_names, **attributes)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape
            )
            for name, value in feeds.items()
        ],
        [helper.make_empty_tensor_value_info(name) for name in out_names],
        [numpy_helper.from_array(value, name) for name, value in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def _ours(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Any]:
    return list(ReferenceInterpreter(load(model), REGISTRY).run(feeds).outputs.values())


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Any]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _floats(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _ints(low: int, high: int, *shape: int, dtype: Any = np.int64) -> np.ndarray:
    return RNG.integers(low, high, shape).astype(dtype)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


X = _floats(3, 4, 5)


@dataclass(frozen=True)
class Case:
    """One single-node model to run on both runtimes: graph inputs ``feeds``, initializers
    ``consts``, node ``inputs`` (default: feeds then consts), outputs, opset and attributes."""

    id: str
    op_type: str
    feeds: dict[str, np.ndarray]
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: list[str] | None = None
    outputs: int = 1
    opset: int = 18
    attributes: dict[str, Any] = field(default_factory=dict)


def _case(case_id: str, op_type: str, feeds: dict, consts: dict | None = None, **kw: Any) -> Case:
    options = {k: kw.pop(k) for k in ("inputs", "outputs", "opset") if k in kw}
    return Case(case_id, op_type, feeds, consts or {}, attributes=kw, **options)


CASES: list[Case] = [
    _case("reduce_sum_axes_input", "ReduceSum", {"x": X}, {"a": _i64(0, -1)}, keepdims=0),
    _case(
        "reduce_sum_int32", "ReduceSum", {"x": _ints(-9, 9, 4, 6, dtype=np.int32)}, {"a": _i64(1)}
    ),
    _case("reduce_mean_opset13_attr", "ReduceMean", {"x": X}, opset=13, axes=[1]),
    _case("reduce_max_all", "ReduceMax", {"x": X}, keepdims=0),
    _case("reduce_log_sum_exp", "ReduceLogSumExp", {"x": X * 30}, {"a": _i64(2)}),
    _case("reduce_l2", "ReduceL2", {"x": X}, {"a": _i64(0, 2)}),
    _case(
        "reduce_prod_noop",
        "ReduceProd",
        {"x": X},
        {"a": np.zeros(0, np.int64)},
        noop_with_empty_axes=1,
    ),
    _case(
        "argmax_last_ties",
        "ArgMax",
        {"x": _ints(0, 3, 4, 7, dtype=np.int32)},
        opset=13,
        axis=1,
        select_last_index=1,
        keepdims=0,
    ),
    _case("argmin_first_ties", "ArgMin", {"x": _ints(0, 3, 4, 7, dtype=np.int32)}, axis=0),
    _case(
        "topk_largest_ties",
        "TopK",
        {"x": _ints(0, 4, 3, 9).astype(np.float32)},
        {"k": _i64(5)},
        outputs=2,
        axis=1,
    ),
    _case("topk_smallest", "TopK", {"x": X}, {"k": _i64(2)}, outputs=2, axis=0, largest=0),
    _case("softmax_opset11_flatten", "Softmax", {"x": X}, opset=11, axis=1),
    _case("logsoftmax_opset13", "LogSoftmax", {"x": X}, opset=13, axis=1),
    _case("hardmax_opset11", "Hardmax", {"x": X}, opset=11, axis=2),
    _case(
        "cumsum_excl_rev",
        "CumSum",
        {"x": X},
        {"axis": np.array(1, np.int64)},
        exclusive=1,
        reverse=1,
    ),
    _case("reshape_zero_minus_one", "Reshape", {"x": X}, {"s": _i64(0, -1)}),
    _case("transpose_perm", "Transpose", {"x": X}, perm=[2, 0, 1]),
    _case("flatten_neg_axis", "Flatten", {"x": X}, axis=-1),
    _case("unsqueeze_input", "Unsqueeze", {"x": X}, {"a": _i64(-1, 0)}),
    _case("squeeze_attr", "Squeeze", {"x": _floats(1, 3, 1)}, opset=11, axes=[0]),
    _case("split_uneven", "Split", {"x": _floats(2, 7)}, outputs=3, axis=1, num_outputs=3),
    _case("split_input", "Split", {"x": _floats(6, 2)}, {"s": _i64(1, 5)}, outputs=2, opset=13),
    _case("concat_neg_axis", "Concat", {"a": _floats(2, 3), "b": _floats(2, 1)}, axis=-1),
    _case("shape_start_end", "Shape", {"x": X}, start=-2, end=10),
    _case("size", "Size", {"x": X}),
    _case("expand", "Expand", {"x": _floats(3, 1)}, {"s": _i64(2, 1, 4)}),
    _case("tile", "Tile", {"x": _floats(2, 3)}, {"r": _i64(2, 3)}),
    _case(
        "pad_reflect_axes",
        "Pad",
        {"x": X},
        {"p": _i64(1, 2, 2, 1), "ax": _i64(0, -1)},
        inputs=["x", "p", "", "ax"],
        mode="reflect",
    ),
    _case("pad_constant", "Pad", {"x": X}, {"p": _i64(0, 1, 0, 2, 0, 1), "v": np.float32(3)}),
    _case("pad_edge_crop", "Pad", {"x": X}, {"p": _i64(0, -1, 2, 0, 1, -2)}, mode="edge"),
    _case("d2s_crd", "DepthToSpace", {"x": _floats(1, 8, 2, 3)}, blocksize=2, mode="CRD"),
    _case("space_to_depth", "SpaceToDepth", {"x": _floats(2, 2, 4, 6)}, blocksize=2),
    _case(
        "slice_negative_steps",
        "Slice",
        {"x": X},
        {"s": _i64(-1, 100), "e": _i64(-100, 0), "a": _i64(2, 0), "st": _i64(-2, -1)},
    ),
    _case("gather_neg", "Gather", {"x": X}, {"i": _i64(-1, 0, 2, -3).reshape(2, 2)}, axis=1),
    _case("gather_scalar_index", "Gather", {"x": X}, {"i": np.array(-2, np.int64)}, axis=1),
    _case("gather_elements", "GatherElements", {"x": X}, {"i": _ints(-5, 5, 3, 4, 2)}, axis=2),
    _case("gathernd_batch", "GatherND", {"x": X}, {"i": _ints(0, 4, 3, 2, 1)}, batch_dims=1),
    _case(
        "scatter_elements_add",
        "ScatterElements",
        {"x": X},
        {"i": _ints(0, 4, 3, 2, 5), "u": _floats(3, 2, 5)},
        axis=1,
        reduction="add",
    ),
    _case(
        "scatter_elements_max",
        "ScatterElements",
        {"x": X},
        {"i": _ints(-5, 5, 3, 4, 5), "u": _floats(3, 4, 5)},
        axis=2,
        reduction="max",
    ),
    _case(
        "scatternd_mul",
        "ScatterND",
        {"x": X},
        {"i": _i64(0, 2, 1, 1, 0, 2).reshape(3, 2), "u": _floats(3, 5)},
        reduction="mul",
    ),
    _case("nonzero", "NonZero", {"x": _ints(0, 2, 3, 4, dtype=np.int32)}),
    _case("trilu_lower_k", "Trilu", {"x": X}, {"k": np.array(-1, np.int64)}, upper=0),
    _case("compress_axis", "Compress", {"x": X}, {"c": np.array([1, 0, 1], bool)}, axis=0),
    _case(
        "onehot_axis",
        "OneHot",
        {"i": _ints(-4, 6, 2, 3)},
        {"d": np.array(5, np.int64), "v": np.array([-1, 7], np.float32)},
        axis=1,
    ),
    _case(
        "unique_unsorted_axis",
        "Unique",
        {"x": _ints(0, 2, 6, 2, dtype=np.float32)},
        outputs=4,
        sorted=0,
        axis=0,
    ),
    _case(
        "reverse_sequence",
        "ReverseSequence",
        {"x": X},
        {"l": _i64(1, 4, 2)},
        batch_axis=0,
        time_axis=1,
    ),
    _case(
        "range_float",
        "Range",
        {},
        {"a": np.float32(1.5), "b": np.float32(-3), "c": np.float32(-0.7)},
    ),
    _case("eyelike_k", "EyeLike", {"x": _floats(3, 5)}, k=2, dtype=onnx.TensorProto.DOUBLE),
    _case(
        "constant_of_shape",
        "ConstantOfShape",
        {},
        {"s": _i64(2, 3)},
        value=numpy_helper.from_array(np.array([7], np.int32)),
    ),
]


def _case_model(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = _model(
        case.op_type,
        case.feeds,
        case.consts,
        case.inputs,
        case.outputs,
        case.opset,
        **case.attributes,
    )
    return model, case.feeds


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_matches_onnxruntime(case: Case) -> None:
    model, feeds = _case_model(case)
    ours, theirs = _ours(model, feeds), _ort(model, feeds)
    assert len(ours) == len(theirs)
    for got, want in zip(ours, theirs, strict=True):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _rule_outputs(
    model: onnx.ModelProto, symbolic: dict[str, tuple] | None = None
) -> list[TensorSpec]:
    """Our shape rule's answer for the single node of ``model``."""
    loaded = ir.from_proto(model)
    node = next(iter(loaded.graph))
    values = {v.name: v.const_value.numpy() for v in loaded.graph.initializers.values()}
    specs: list[TensorSpec | None] = []
    for value in node.inputs:
        if value is None:
            specs.append(None)
            continue
        shape = (symbolic or {}).get(value.name) or tuple(
            d if isinstance(d, int) else None for d in value.shape
        )
        array = values.get(value.name)
        specs.append(TensorSpec(shape, value.dtype, array))
    op = REGISTRY.lookup(node.op_type)
    assert op is not None
    ctx = KernelContext(opset=model.opset_import[0].version, output_count=len(node.outputs))
    return op.shape_rule(specs, Attrs.from_node(node), ctx)  # type: ignore[arg-type]


def _inferred(model: onnx.ModelProto) -> list[tuple[tuple, int]]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    result = []
    for output in inferred.graph.output:
        tensor = output.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        result.append((dims, tensor.elem_type))
    return result


DATA_DEPENDENT = {"nonzero", "compress_axis", "unique_unsorted_axis"}


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.id not in DATA_DEPENDENT], ids=lambda c: c.id
)
def test_shape_rule_agrees_with_onnx_shape_inference(case: Case) -> None:
    model, _ = _case_model(case)
    ours = _rule_outputs(model)
    for spec, (dims, elem_type) in zip(ours, _inferred(model), strict=True):
        assert spec.dtype == ir.DataType(elem_type)
        assert spec.shape == dims


def test_shape_rules_keep_symbolic_dims() -> None:
    x = _floats(2, 3, 4)
    model = _model("Reshape", {"x": x}, {"s": _i64(0, -1)})
    assert _rule_outputs(model, {"x": ("N", 3, 4)})[0].shape == ("N", 12)
    model = _model("Transpose", {"x": x}, perm=[2, 0, 1])
    assert _rule_outputs(model, {"x": ("N", 3, "T")})[0].shape == ("T", "N", 3)
    model = _model("ReduceSum", {"x": x}, {"a": _i64(1)}, keepdims=0)
    assert _rule_outputs(model, {"x": ("N", 3, "T")})[0].shape == ("N", "T")
    model = _model("Slice", {"x": x}, {"s": _i64(1), "e": _i64(3), "a": _i64(1)})
    assert _rule_outputs(model, {"x": ("N", 3, 4)})[0].shape == ("N", 2, 4)
    model = _model("Shape", {"x": x})
    spec = _rule_outputs(model)[0]
    assert spec.shape == (3,) and spec.value is not None and list(spec.value) == [2, 3, 4]


def test_nonzero_and_compress_rules_leave_data_dependent_dims_open() -> None:
    model = _model("NonZero", {"x": _floats(2, 3)})
    assert _rule_outputs(model)[0].shape == (2, None)
    model = _model("Compress", {"x": _floats(2, 3)}, {"c": np.array([1, 0], bool)}, axis=1)
    assert _rule_outputs(model)[0].shape == (2, None)


def test_random_ops_give_declared_shape_and_dtype() -> None:
    model = _model("RandomNormal", {}, shape=[2, 5], dtype=onnx.TensorProto.DOUBLE, seed=3.0)
    first, second = _ours(model, {})[0], _ours(model, {})[0]
    assert first.shape == (2, 5) and first.dtype == np.float64
    np.testing.assert_array_equal(first, second)  # same seed, same draws
    probabilities = np.full((1000,), 0.25, np.float32)
    model = _model("Bernoulli", {"p": probabilities}, seed=1.0)
    draws = _ours(model, {"p": probabilities})[0]
    assert draws.dtype == np.float32 and set(np.unique(draws)) <= {0.0, 1.0}
    assert 0.15 < draws.mean() < 0.35


def test_reshape_with_wrong_element_count_names_the_node() -> None:
    model = _model("Reshape", {"x": _floats(2, 3)}, {"s": _i64(4, -1)})
    with pytest.raises(NodeExecutionError, match=r"Reshape.*cannot infer -1"):
        _ours(model, {"x": _floats(2, 3)})


def test_topk_with_k_beyond_axis_is_refused() -> None:
    x = _floats(2, 3)
    model = _model("TopK", {"x": x}, {"k": _i64(4)}, outputs=2)
    with pytest.raises(NodeExecutionError, match="TopK k=4 is out of range"):
        _ours(model, {"x": x})


@pytest.mark.parametrize(
    ("attribute", "value", "expected"),
    [
        ("value_float", 1.5, np.array(1.5, np.float32)),
        ("value_floats", [1.0, 2.0], np.array([1.0, 2.0], np.float32)),
        ("value_int", 7, np.array(7, np.int64)),
        ("value_ints", [1, -2], np.array([1, -2], np.int64)),
        ("value_string", "abc", np.array("abc", dtype=object)),
        ("value_strings", ["a", "bc"], np.array(["a", "bc"], dtype=object)),
        (
            "value",
            numpy_helper.from_array(np.eye(2, dtype=np.float16)),
            np.eye(2, dtype=np.float16),
        ),
    ],
)
def test_constant_kernel_and_rule_read_every_value_attribute(
    attribute: str, value: Any, expected: np.ndarray
) -> None:
    node = ir.from_proto(
        helper.make_graph(
            [helper.make_node("Constant", [], ["y"], **{attribute: value})], "g", [], []
        )
    ).node(0)
    attrs, ctx = Attrs.from_node(node), KernelContext(opset=19)
    op = REGISTRY.lookup("Constant")
    assert op is not None
    result = op.kernel([], attrs, ctx)[0]
    assert result.dtype == expected.dtype and result.shape == expected.shape
    np.testing.assert_array_equal(result, expected)
    spec = op.shape_rule([], attrs, ctx)[0]
    assert spec.shape == expected.shape and spec.value is not None


def test_random_like_and_multinomial_follow_dtype_attributes() -> None:
    x = _floats(3, 4)
    model = _model("RandomUniformLike", {"x": x}, dtype=onnx.TensorProto.DOUBLE, low=2.0, high=3.0)
    draws = _ours(model, {"x": x})[0]
    assert draws.shape == (3, 4) and draws.dtype == np.float64
    assert np.all((draws >= 2.0) & (draws < 3.0))
    logits = np.log(np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]], np.float32) + 1e-30)
    model = _model("Multinomial", {"x": logits}, sample_size=50, dtype=onnx.TensorProto.INT64)
    samples = _ours(model, {"x": logits})[0]
    assert samples.shape == (2, 50) and samples.dtype == np.int64
    assert np.all(samples[0] == 1) and set(np.unique(samples[1])) <= {0, 2}


MOVEMENT = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Shape"}
MOVEMENT |= {"Size", "Expand", "Tile", "Pad", "DepthToSpace", "SpaceToDepth", "Slice", "Gather"}
MOVEMENT |= {"GatherElements", "GatherND", "Trilu", "ConstantOfShape", "EyeLike"}


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.id not in DATA_DEPENDENT], ids=lambda c: c.id
)
def test_cost_rule_counts_work_and_traffic(case: Case) -> None:
    model, _ = _case_model(case)
    loaded = ir.from_proto(model)
    node = next(iter(loaded.graph))
    out_specs = _rule_outputs(model)
    in_specs = [
        TensorSpec(tuple(v.shape), v.dtype) if v is not None else None  # type: ignore[arg-type]
        for v in node.inputs
    ]
    op = REGISTRY.lookup(node.op_type)
    assert op is not None
    cost = op.cost(in_specs, out_specs, Attrs.from_node(node))  # type: ignore[arg-type]
    assert cost.bytes_written == sum(s.nbytes() for s in out_specs)
    if node.op_type in MOVEMENT:
        assert cost.flops == 0
    elif node.op_type.startswith("Reduce") or node.op_type in ("Softmax", "CumSum"):
        assert cost.flops >= in_specs[0].numel()  # type: ignore[union-attr]


def test_shape_arithmetic_folds_small_constants_through_to_reshape() -> None:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape resolves as onnx's data propagation."""
    ctx = KernelContext(opset=18)
    get = {op.op_type: op for op in REGISTRY.specs()}
    x = TensorSpec((2, 3, 4), ir.DataType.FLOAT)
    shape = get["Shape"].shape_rule([x], Attrs({}), ctx)[0]
    index = TensorSpec((), ir.DataType.INT64, np.array(0, np.int64))
    batch = get["Gather"].shape_rule([shape, index], Attrs({"axis": 0}), ctx)[0]
    axes = TensorSpec((1,), ir.DataType.INT64, _i64(0))
    batch = get["Unsqueeze"].shape_rule([batch, axes], Attrs({}), ctx)[0]
    rest = TensorSpec((1,), ir.DataType.INT64, _i64(-1))
    target = get["Concat"].shape_rule([batch, rest], Attrs({"axis": 0}), ctx)[0]
    assert target.value is not None and list(target.value) == [2, -1]
    assert get["Reshape"].shape_rule([x, target], Attrs({}), ctx)[0].shape == (2, 12)
    big = TensorSpec((), ir.DataType.INT64, np.array(10_000, np.int64))
    zero, one = (TensorSpec((), ir.DataType.INT64, np.array(v, np.int64)) for v in (0, 1))
    ranged = get["Range"].shape_rule([zero, big, one], Attrs({}), ctx)[0]
    assert ranged.shape == (10_000,) and ranged.value is None  # too big to fold
