"""Classic ML, training-optimizer, TfIdf and mel-filterbank kernels agree with independent runtimes.

Each case builds a one-node model on random inputs and attributes, runs it on the reference
interpreter (with a registry of just these op families) and compares with onnxruntime's CPU
provider, or with onnx's ReferenceEvaluator for the ai.onnx.preview.training ops onnxruntime
does not ship. Shape rules are checked against the kernels' results.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.special
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from engine.backends.numpy_ref.interpreter import NodeExecutionError, ReferenceInterpreter
from engine.onnx_io import load
from engine.ops import classic_ml, signal, text_features, training
from engine.ops.registry import Attrs, KernelContext, OpRegistry, TensorSpec, dtype_of_array

REGISTRY = OpRegistry(classic_ml.OPS + training.OPS + text_features.OPS + signal.OPS)
ML, TRAINING = "ai.onnx.ml", "ai.onnx.preview.training"


def _model(
    op: str, inputs: dict[str, np.ndarray], n_outputs: int = 1, domain: str = "", **attrs: Any
) -> onnx.ModelProto:
    outputs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op, list(inputs), outputs, domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for name, a in inputs.items()
        ],
        [onnx.ValueInfoProto(name=o) for o in outputs],
    )
    opsets = [helper.make_opsetid("", 21)]
    if domain == ML:
        opsets.append(helper.make_opsetid(ML, 5 if op == "TreeEnsemble" else 4))
    elif domain == TRAINING:
        opsets.append(helper.make_opsetid(TRAINING, 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _ours(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[Any]:
    """Our outputs, after checking that the op's shape rule predicts them."""
    loaded = load(model)
    outputs = ReferenceInterpreter(loaded, REGISTRY).run(inputs).outputs
    results = [outputs[o.name] for o in model.graph.output]
    node = next(iter(loaded.graph))
    spec = REGISTRY.lookup(node.op_type, node.domain)
    assert spec is not None
    specs = [TensorSpec(a.shape, dtype_of_array(a), a) for a in inputs.values()]
    attrs = Attrs.from_node(node)
    ctx = KernelContext(opset=1, output_count=len(results))
    for rule, got in zip(spec.shape_rule(specs, attrs, ctx), results, strict=True):
        assert rule.shape == got.shape and rule.dtype == dtype_of_array(got)
    return results


def _check(model: onnx.ModelProto, inputs: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    ours = _ours(model, inputs)
    if model.graph.node[0].domain == TRAINING:
        # onnx's single-tensor Adam with T > 0 promotes to float64; the spec keeps X's dtype.
        theirs = [np.asarray(v, np.float32) for v in ReferenceEvaluator(model).run(None, inputs)]
    else:
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        theirs = session.run(None, inputs)
    for got, expected in zip(ours, theirs, strict=True):
        expected = np.asarray(expected)
        assert got.shape == expected.shape
        if expected.dtype.kind in "OU":
            assert got.dtype == object
            np.testing.assert_array_equal(got.astype(str), expected.astype(str))
            continue
        assert got.dtype == expected.dtype
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)


# --------------------------------------------------------------------------- TreeEnsemble


def _random_forest(rng: np.random.Generator, trees: int, features: int, targets: int) -> dict:
    """Attributes of a random ensemble using every node mode (BRANCH_MEMBER included)."""
    nodes: dict[str, list] = {k: [] for k in ("mode", "split", "feat", "t", "f", "tl", "fl", "m")}
    leaves: dict[str, list] = {"target": [], "weight": []}
    members: list[float] = []

    def leaf() -> int:
        leaves["target"].append(int(rng.integers(targets)))
        leaves["weight"].append(float(rng.normal()))
        return len(leaves["target"]) - 1

    def grow(depth: int) -> int:
        index = len(nodes["mode"])
        mode = int(rng.integers(7))
        nodes["mode"].append(mode)
        nodes["split"].append(float(rng.integers(5)))
        nodes["feat"].append(int(rng.integers(features)))
        nodes["m"].append(int(rng.integers(2)))
        if mode == 6:
            members.extend([*map(float, rng.choice(5, size=2, replace=False)), np.nan])
        for side, leaf_key in (("t", "tl"), ("f", "fl")):
            nodes[side].append(-1)
            nodes[leaf_key].append(0)
        for side, leaf_key in (("t", "tl"), ("f", "fl")):
            is_leaf = depth >= 3 or rng.random() < 0.3
            nodes[leaf_key][index] = int(is_leaf)
            nodes[side][index] = leaf() if is_leaf else grow(depth + 1)
        return index

    roots = [grow(0) for _ in range(trees)]
    attrs = {
        "tree_roots": roots,
        "nodes_modes": numpy_helper.from_array(np.array(nodes["mode"], np.uint8), "modes"),
        "nodes_splits": numpy_helper.from_array(np.array(nodes["split"], np.float32), "splits"),
        "nodes_featureids": nodes["feat"],
        "nodes_truenodeids": nodes["t"],
        "nodes_falsenodeids": nodes["f"],
        "nodes_trueleafs": nodes["tl"],
        "nodes_falseleafs": nodes["fl"],
        "nodes_missing_value_tracks_true": nodes["m"],
        "leaf_targetids": leaves["target"],
        "leaf_weights": numpy_helper.from_array(np.array(leaves["weight"], np.float32), "w"),
        "n_targets": targets,
    }
    if members:
        attrs["membership_values"] = numpy_helper.from_array(np.array(members, np.float32), "m")
    return attrs


def _tree_input(rng: np.random.Generator, rows: int, features: int) -> np.ndarray:
    x = rng.integers(5, size=(rows, features)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    return x


@pytest.mark.parametrize("aggregate", [0, 1, 2, 3])
def test_tree_ensemble_aggregates_match_onnxruntime(aggregate: int) -> None:
    rng = np.random.default_rng(aggregate)
    attrs = _random_forest(rng, trees=6, features=4, targets=3)
    x = _tree_input(rng, 40, 4)
    _check(
        _model("TreeEnsemble", {"x": x}, domain=ML, aggregate_function=aggregate, **attrs), {"x": x}
    )


def test_tree_ensemble_post_transforms_follow_the_spec() -> None:
    # onnxruntime 1.32 numbers post_transform as its own enum (1 = LOGISTIC, 2 = SOFTMAX) and
    # skips LOGISTIC for single targets (microsoft/onnxruntime#26596): check against the spec's
    # formulas applied to the raw scores instead.
    rng = np.random.default_rng(11)
    attrs = _random_forest(rng, trees=5, features=4, targets=3)
    attrs["n_targets"] = 4  # no leaf feeds target 3: its raw score is exactly 0
    x = _tree_input(rng, 30, 4)

    def run(post_transform: int) -> np.ndarray:
        model = _model("TreeEnsemble", {"x": x}, domain=ML, post_transform=post_transform, **attrs)
        return _ours(model, {"x": x})[0].astype(np.float64)

    raw = run(0)
    assert np.all(raw[:, 3] == 0)
    np.testing.assert_allclose(run(1), scipy.special.softmax(raw, axis=1), rtol=1e-6)
    np.testing.assert_allclose(run(2), scipy.special.expit(raw), rtol=1e-6)
    kept = np.where(raw != 0, np.exp(raw - raw.max(axis=1, keepdims=True)), 0.0)
    np.testing.assert_allclose(run(3), kept / kept.sum(axis=1, keepdims=True), rtol=1e-6)


def test_tree_ensemble_probit_and_double_input() -> None:
    rng = np.random.default_rng(7)
    attrs = _random_forest(rng, trees=4, features=3, targets=2)
    weights = np.abs(numpy_helper.to_array(attrs["leaf_weights"])) / 20 + 0.05
    attrs["leaf_weights"] = numpy_helper.from_array(weights.astype(np.float64), "w")
    attrs["nodes_splits"] = numpy_helper.from_array(
        numpy_helper.to_array(attrs["nodes_splits"]).astype(np.float64), "splits"
    )
    if "membership_values" in attrs:
        members = numpy_helper.to_array(attrs["membership_values"]).astype(np.float64)
        attrs["membership_values"] = numpy_helper.from_array(members, "m")
    x = _tree_input(rng, 30, 3).astype(np.float64)
    model = _model("TreeEnsemble", {"x": x}, domain=ML, post_transform=4, **attrs)
    # onnxruntime approximates erfinv (about 1e-3 relative); the kernel uses the exact one.
    _check(model, {"x": x}, rtol=5e-3)


def test_tree_ensemble_member_node_without_sets_is_refused() -> None:
    attrs = _random_forest(np.random.default_rng(3), trees=1, features=2, targets=1)
    modes = numpy_helper.to_array(attrs["nodes_modes"]).copy()
    modes[0] = 6
    attrs["nodes_modes"] = numpy_helper.from_array(modes, "modes")
    attrs.pop("membership_values", None)
    x = np.zeros((2, 2), np.float32)
    model = _model("TreeEnsemble", {"x": x}, domain=ML, **attrs)
    with pytest.raises(NodeExecutionError, match="BRANCH_MEMBER nodes but no membership_values"):
        ReferenceInterpreter(load(model), REGISTRY).run({"x": x})


# --------------------------------------------------------------------------- LabelEncoder


LABEL_CASES = [
    (
        np.array([["a", "zz"], ["c", "b"]], dtype=object),
        {"keys_strings": ["a", "b", "c"], "values_int64s": [1, 2, 3], "default_int64": 7},
    ),
    (
        np.array([3, -1, 5, 3, 8], dtype=np.int64),
        {"keys_int64s": [3, 5, 8], "values_strings": ["x", "y", "z"], "default_string": "?"},
    ),
    (
        np.array([0.5, np.nan, 2.0, -1.0], dtype=np.float32),
        {"keys_floats": [0.5, np.nan, 2.0], "values_floats": [10.0, 20.0, 30.0]},
    ),
]


@pytest.mark.parametrize(("x", "attrs"), LABEL_CASES)
def test_label_encoder_matches_onnxruntime(x: np.ndarray, attrs: dict) -> None:
    model = _model("LabelEncoder", {"x": x}, domain=ML, **attrs)
    _check(model, {"x": x})


def test_label_encoder_tensor_keys_and_repeated_keys_follow_the_spec() -> None:
    # onnxruntime 1.32 has no ai.onnx.ml opset-4 kernel for tensor keys, and keeps the first of
    # repeated keys where the spec says the last takes precedence: onnx's evaluator does both.
    x = np.array(["b", "q", "a", "a"], dtype=object)
    attrs = {
        "keys_tensor": numpy_helper.from_array(np.array(["a", "b", "a"], dtype=object), "k"),
        "values_tensor": numpy_helper.from_array(np.array([4, 5, 6], np.int32), "v"),
        "default_tensor": numpy_helper.from_array(np.array([-3], np.int32), "d"),
    }
    model = _model("LabelEncoder", {"x": x}, domain=ML, **attrs)
    ours = _ours(model, {"x": x})[0]
    np.testing.assert_array_equal(ours, ReferenceEvaluator(model).run(None, {"x": x})[0])
    np.testing.assert_array_equal(ours, np.array([5, -3, 6, 6], np.int32))


# --------------------------------------------------------------------------- small ml ops


@pytest.mark.parametrize("shape", [(7,), (3, 6), (2, 3, 5)])
def test_array_feature_extractor_and_binarizer(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    x = rng.normal(size=shape).astype(np.float32)
    indices = rng.integers(shape[-1], size=4).astype(np.int64)
    _check(
        _model("ArrayFeatureExtractor", {"x": x, "i": indices}, domain=ML), {"x": x, "i": indices}
    )
    _check(_model("Binarizer", {"x": x}, domain=ML, threshold=0.2), {"x": x})


# --------------------------------------------------------------------------- TfIdfVectorizer


@pytest.mark.parametrize("mode", ["TF", "IDF", "TFIDF"])
@pytest.mark.parametrize(("min_len", "max_len", "skips"), [(1, 1, 0), (1, 3, 2), (2, 3, 1)])
@pytest.mark.parametrize("rank", [1, 2])
def test_tfidf_matches_onnxruntime(mode: str, min_len: int, max_len: int, skips: int, rank: int):
    rng = np.random.default_rng(hash((mode, min_len, max_len, skips, rank)) % 2**32)
    levels = [rng.integers(3, size=(n, size)) for size, n in ((1, 4), (2, 6), (3, 5))]
    unique = [np.unique(level, axis=0) for level in levels]
    pool = np.concatenate([u.reshape(-1) for u in unique])
    counts = np.cumsum([0] + [u.size for u in unique[:-1]]).tolist()
    grams = sum(len(u) for u in unique)
    indexes = rng.permutation(grams).tolist()
    attrs = {
        "mode": mode,
        "min_gram_length": min_len,
        "max_gram_length": max_len,
        "max_skip_count": skips,
        "ngram_counts": counts,
        "ngram_indexes": indexes,
        "weights": rng.uniform(0.5, 2, size=grams).round(3).tolist(),
    }
    shape = (9,) if rank == 1 else (3, 9)
    tokens = rng.integers(4, size=shape)
    x = tokens.astype(np.int64)
    _check(_model("TfIdfVectorizer", {"x": x}, pool_int64s=pool.tolist(), **attrs), {"x": x})
    words = np.array(["w0", "w1", "w2", "w3"], dtype=object)
    strings = words[tokens]
    model = _model("TfIdfVectorizer", {"x": strings}, pool_strings=words[pool].tolist(), **attrs)
    _check(model, {"x": strings})


def test_mel_weight_matrix_matches_onnxruntime() -> None:
    values = [(8, 64, 8000, 0.0, 4000.0), (20, 512, 16000, 125.0, 7600.0), (5, 33, 22050, 30, 900)]
    for mel, dft, rate, low, high in values:
        inputs = {
            "m": np.array(mel, np.int64),
            "d": np.array(dft, np.int64),
            "s": np.array(rate, np.int64),
            "lo": np.array(low, np.float32),
            "hi": np.array(high, np.float32),
        }
        _check(_model("MelWeightMatrix", inputs), inputs)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("step", [0, 4])
@pytest.mark.parametrize(
    ("op", "states", "attrs"),
    [
        ("Momentum", 1, {"mode": "standard", "alpha": 0.9, "beta": 0.5, "norm_coefficient": 0.01}),
        ("Momentum", 1, {"mode": "nesterov", "alpha": 0.8, "beta": 1.0, "norm_coefficient": 0.0}),
        ("Adagrad", 1, {"decay_factor": 0.1, "epsilon": 1e-5, "norm_coefficient": 0.02}),
        ("Adam", 2, {"alpha": 0.9, "beta": 0.99, "norm_coefficient": 0.01}),
        ("Adam", 2, {"epsilon": 1e-3, "norm_coefficient_post": 0.05}),
    ],
)
def test_optimizers_match_reference_evaluator(
    op: str, states: int, attrs: dict, count: int, step: int
) -> None:
    rng = np.random.default_rng(count * 10 + step)
    shapes = [(3,), (2, 4), (5,)][:count]
    inputs = {"r": np.array(0.1, np.float32), "t": np.array(step, np.int64)}
    for group in ["x", "g"] + [f"s{k}" for k in range(states)]:
        for i, shape in enumerate(shapes):
            values = rng.normal(size=shape)
            # Accumulated squared gradients (Adagrad's H, Adam's second state) are non-negative.
            squares = group == "s1" or (op == "Adagrad" and group == "s0")
            inputs[f"{group}{i}"] = (np.abs(values) if squares else values).astype(np.float32)
    model = _model(op, inputs, n_outputs=count * (1 + states), domain=TRAINING, **attrs)
    _check(model, inputs, rtol=1e-4)


def test_optimizer_with_wrong_input_count_is_refused() -> None:
    inputs = {n: np.ones(2, np.float32) for n in ("x", "g")}
    inputs = {"r": np.array(0.1, np.float32), "t": np.array(1, np.int64), **inputs}
    model = _model("Adam", inputs, n_outputs=1, domain=TRAINING)
    with pytest.raises(NodeExecutionError, match="4 inputs per optimized tensor"):
        ReferenceInterpreter(load(model), REGISTRY).run(inputs)
