"""2:4 magnitude pruning (hand cases and properties), prune_model on hand-made models, and the
channel-permutation search and its model-level application."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import helper
from sparse_models import graph_model

from engine.backends.numpy_ref.interpreter import run_model
from engine.onnx_io import load
from engine.ops.registry import GIE_DOMAIN
from engine.sparsity.check import check_model, is_2_4, reduction_matrix
from engine.sparsity.permute import (
    full_channel_permutation,
    permutation_blocker,
    permute_input_channels,
    search_permutation,
)
from engine.sparsity.prune import prune_2_4, prune_model, prune_weight, retained_magnitude

RNG = np.random.default_rng(11)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int, ...]],
    consts: dict[str, np.ndarray],
    outputs: list[str],
) -> ir.Model:
    return load(graph_model(nodes, inputs, consts, outputs))


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(node for node in model.graph if node.name == name)


# --------------------------------------------------------------------------- prune_2_4


def test_prune_keeps_the_two_largest_magnitudes_by_hand() -> None:
    matrix = np.array(
        [[1, -3, 2, 0.5, 0, 0, 0, 0], [2, 2, 2, 2, -1, 1, 0, 0], [0, 0, 0, 4, 5, -5, 5, -6]],
        np.float32,
    )
    expected = np.array(
        [[0, -3, 2, 0, 0, 0, 0, 0], [2, 2, 0, 0, -1, 1, 0, 0], [0, 0, 0, 4, 5, 0, 0, -6]],
        np.float32,
    )
    pruned = prune_2_4(matrix)
    np.testing.assert_array_equal(pruned, expected)
    assert pruned.dtype == np.float32
    int8 = np.array([[-128, 127, 1, 0]], np.int8)  # |-128| must not overflow
    np.testing.assert_array_equal(prune_2_4(int8), [[-128, 127, 0, 0]])
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_2_4(np.ones((2, 6)))


def test_retained_magnitude_by_hand() -> None:
    original = np.array([[1, -3, 2, 0.5]])
    assert retained_magnitude(original, prune_2_4(original)) == pytest.approx(5 / 6.5)
    assert retained_magnitude(np.zeros((2, 4)), np.zeros((2, 4))) == 1.0


_VALUES = st.sampled_from([0.0, 0.0, 1.0, -1.0, 0.5, 2.0, -3.0, 7.25])


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda rows: st.integers(1, 8).flatmap(
            lambda groups: hnp.arrays(np.float32, (rows, 4 * groups), elements=_VALUES)
        )
    )
)
def test_pruned_matrix_is_2_4_and_keeps_the_largest(matrix: np.ndarray) -> None:
    pruned = prune_2_4(matrix)
    assert is_2_4(pruned)
    kept = pruned != 0
    np.testing.assert_array_equal(pruned[kept], matrix[kept])  # survivors are unchanged
    groups = np.abs(matrix).reshape(matrix.shape[0], -1, 4)
    kept_groups = np.abs(pruned).reshape(groups.shape)
    dropped = np.where(kept_groups == 0, groups, 0.0).max(axis=-1)
    smallest_kept = np.sort(groups, axis=-1)[..., -2]
    assert np.all(dropped <= smallest_kept)  # nothing dropped is larger than what is kept
    counts = (kept_groups != 0).sum(axis=-1)
    np.testing.assert_array_equal(counts, np.minimum((groups != 0).sum(axis=-1), 2))
    assert retained_magnitude(matrix, pruned) <= 1.0


def test_prune_weight_returns_the_weight_layout() -> None:
    weight = RNG.standard_normal((4, 8, 3, 3)).astype(np.float16)
    pruned = prune_weight(weight, "Conv", {})
    assert pruned.shape == weight.shape and pruned.dtype == np.float16
    matrix = reduction_matrix(weight, "Conv")
    np.testing.assert_array_equal(reduction_matrix(pruned, "Conv"), prune_2_4(matrix))
    permutation = RNG.permutation(8)
    permuted = prune_weight(weight, "Conv", {}, permutation=permutation)
    np.testing.assert_array_equal(
        reduction_matrix(permuted, "Conv"), prune_2_4(matrix[:, permutation])
    )


# --------------------------------------------------------------------------- prune_model


def _layers_model() -> ir.Model:
    consts = {
        "w_gemm": RNG.standard_normal((256, 6)).astype(np.float32),
        "w_conv": RNG.standard_normal((4, 256, 1, 1)).astype(np.float32),
        "w_small": RNG.standard_normal((4, 8, 3, 3)).astype(np.float32),
        "w_dw": RNG.standard_normal((8, 1, 3, 3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["a", "w_gemm"], ["y_gemm"], name="gemm"),
        helper.make_node("Conv", ["x", "w_conv"], ["y_conv"], name="conv"),
        helper.make_node("Conv", ["x8", "w_small"], ["y_small"], name="small", pads=[1] * 4),
        helper.make_node("Conv", ["x8", "w_dw"], ["y_dw"], name="dw", group=8),
    ]
    inputs = {"a": (3, 256), "x": (1, 256, 2, 2), "x8": (1, 8, 4, 4)}
    return _model(nodes, inputs, consts, ["y_gemm", "y_conv", "y_small", "y_dw"])


def test_prune_model_prunes_eligible_layers_into_a_new_model() -> None:
    model = _layers_model()
    before = _weights(model)
    pruned, records = prune_model(model)
    for name, array in _weights(model).items():
        np.testing.assert_array_equal(array, before[name])  # the input model is untouched
    assert [r.name for r in records] == ["gemm", "conv"]
    after = _weights(pruned)
    for record, weight in zip(records, ["w_gemm", "w_conv"]):
        op = "Gemm" if record.name == "gemm" else "Conv"
        matrix = reduction_matrix(before[weight], op)
        assert record.retained_before_permutation == pytest.approx(
            retained_magnitude(matrix, prune_2_4(matrix))
        )
        assert record.retained_after == record.retained_before_permutation
        assert not record.permuted and record.note == ""
        np.testing.assert_array_equal(reduction_matrix(after[weight], op), prune_2_4(matrix))
    np.testing.assert_array_equal(after["w_small"], before["w_small"])
    reports = {r.name: r for r in check_model(pruned)}
    assert reports["gemm"].is_2_4 and reports["conv"].is_2_4
    assert not reports["small"].is_2_4
    feeds = {"a": RNG.standard_normal((3, 256)).astype(np.float32)}
    feeds |= {"x": RNG.standard_normal((1, 256, 2, 2)).astype(np.float32)}
    feeds |= {"x8": RNG.standard_normal((1, 8, 4, 4)).astype(np.float32)}
    run_model(pruned, feeds)  # the pruned model still runs


def test_prune_model_named_layers() -> None:
    model = _layers_model()
    pruned, records = prune_model(model, layers=["small"])
    assert [r.name for r in records] == ["small"]  # too small, but asked for by name
    reports = {r.name: r for r in check_model(pruned)}
    assert reports["small"].is_2_4 and not reports["gemm"].is_2_4
    with pytest.raises(ValueError, match="depthwise"):
        prune_model(model, layers=["dw"])
    with pytest.raises(ValueError, match="no Conv"):
        prune_model(model, layers=["nope"])


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 24), st.integers(1, 5), st.integers(0, 2**16))
def test_every_eligible_layer_is_2_4_after_prune(groups: int, columns: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 4 * groups
    consts = {
        "b": rng.standard_normal((columns, k)).astype(np.float32),
        "w": rng.standard_normal((columns, k, 1, 2)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["a", "b"], ["y"], name="gemm", transB=1),
        helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
    ]
    model = _model(nodes, {"a": (2, k), "x": (1, k, 3, 3)}, consts, ["y", "z"])
    pruned, records = prune_model(model, min_channels=0)
    assert len(records) == 2
    assert all(r.eligible and r.is_2_4 for r in check_model(pruned, min_channels=0))


# --------------------------------------------------------------------------- permutation search


def test_permutation_regroups_large_and_small_channels() -> None:
    matrix = np.array([[10, 10, 10, 10, 1, 1, 1, 1]] * 3, np.float32)
    result = search_permutation(matrix)
    assert result.retained_before == pytest.approx(22 / 44)
    assert result.retained_after == pytest.approx(40 / 44)
    assert sorted(result.permutation.tolist()) == list(range(8))
    permuted = matrix[:, result.permutation]
    assert retained_magnitude(permuted, prune_2_4(permuted)) == pytest.approx(40 / 44)


def test_permutation_keeps_identity_without_gain() -> None:
    sparse = prune_2_4(RNG.standard_normal((8, 16)))
    result = search_permutation(sparse)
    assert result.is_identity and result.retained_before == result.retained_after
    assert result.retained_after == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 10),
    st.integers(0, 2**16),
    st.sampled_from(["normal", "columns", "sparse"]),
)
def test_permutation_never_lowers_retained_magnitude(
    rows: int, groups: int, seed: int, kind: str
) -> None:
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((rows, 4 * groups))
    if kind == "columns":
        matrix *= rng.choice([0.01, 1.0, 100.0], size=4 * groups)
    elif kind == "sparse":
        matrix *= rng.random(matrix.shape) < 0.4
    result = search_permutation(matrix, iterations=64, seed=seed)
    assert sorted(result.permutation.tolist()) == list(range(4 * groups))
    assert result.retained_after >= result.retained_before
    identity = retained_magnitude(matrix, prune_2_4(matrix))
    assert result.retained_before == pytest.approx(identity)
    permuted = matrix[:, result.permutation]
    assert result.retained_after == pytest.approx(retained_magnitude(permuted, prune_2_4(permuted)))
    again = search_permutation(matrix, iterations=64, seed=seed)
    np.testing.assert_array_equal(again.permutation, result.permutation)  # deterministic


def _chain_model(group: int = 1, extra_use: bool = False) -> ir.Model:
    """x -> ConvAct(Relu, 16 channels, bias) -> Conv(3x3, group, bias) [-> also Relu]."""
    consts = {
        "w1": RNG.standard_normal((16, 4, 3, 3)).astype(np.float32),
        "b1": RNG.standard_normal(16).astype(np.float32),
        "w2": RNG.standard_normal((8, 16 // group, 3, 3)).astype(np.float32),
        "b2": RNG.standard_normal(8).astype(np.float32),
    }
    nodes = [
        helper.make_node(
            "ConvAct",
            ["x", "w1", "b1"],
            ["h"],
            name="conv1",
            domain=GIE_DOMAIN,
            activation="Relu",
            pads=[1] * 4,
            kernel_shape=[3, 3],
        ),
        helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="conv2", pads=[1] * 4, group=group),
    ]
    outputs = ["y"]
    if extra_use:
        nodes.append(helper.make_node("Relu", ["h"], ["side"], name="side"))
        outputs.append("side")
    return _model(nodes, {"x": (2, 4, 6, 6)}, consts, outputs)


@pytest.mark.parametrize("group", [1, 2])
def test_permuted_model_computes_the_same(group: int) -> None:
    model = _chain_model(group)
    feeds = {"x": RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)}
    expected = run_model(model, feeds)["y"]
    w1, b1, w2 = (_weights(model)[name] for name in ("w1", "b1", "w2"))
    permutation = RNG.permutation(16 // group)
    assert permutation_blocker(_node(model, "conv2")) == ""
    permute_input_channels(_node(model, "conv2"), permutation)
    channels = full_channel_permutation(permutation, group)
    after = _weights(model)
    np.testing.assert_array_equal(after["w2"], w2[:, permutation])
    np.testing.assert_array_equal(after["w1"], w1[channels])
    np.testing.assert_array_equal(after["b1"], b1[channels])
    np.testing.assert_allclose(run_model(model, feeds)["y"], expected, rtol=1e-5, atol=1e-5)
    assert full_channel_permutation(np.array([1, 0]), 2).tolist() == [1, 0, 3, 2]


def test_permutation_blockers() -> None:
    model = _chain_model(extra_use=True)
    assert permutation_blocker(_node(model, "conv2")) == "the producer's output feeds 2 inputs"
    assert permutation_blocker(_node(model, "conv1")) == "the input is not produced by a node"
    with pytest.raises(ValueError, match="permutation not applicable: the producer's output"):
        permute_input_channels(_node(model, "conv2"), np.arange(16))
    gemm = _layers_model()
    assert "not a convolution" in permutation_blocker(_node(gemm, "gemm"))


def test_prune_model_with_permutation() -> None:
    model = _chain_model()
    original = _weights(model)
    feeds = {"x": RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)}
    pruned, records = prune_model(model, permute=True, min_channels=0)
    by_name = {r.name: r for r in records}
    assert (
        by_name["conv1"].note == "permutation not applicable: the input is not produced by a node"
    )
    assert not by_name["conv1"].permuted
    conv2 = by_name["conv2"]
    assert conv2.permuted and conv2.note == ""
    assert conv2.retained_after > conv2.retained_before_permutation
    plain = prune_model(model, min_channels=0)[1]
    assert plain[1].retained_after == pytest.approx(conv2.retained_before_permutation)
    # conv1's rows were permuted after it was pruned: both layers are still 2:4
    assert all(r.is_2_4 for r in check_model(pruned, min_channels=0))
    np.testing.assert_array_equal(_weights(model)["w2"], original["w2"])
    run_model(pruned, feeds)
