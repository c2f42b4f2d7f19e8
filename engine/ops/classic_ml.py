"""Classic ML ops (ai.onnx.ml): LabelEncoder, TreeEnsemble, ArrayFeatureExtractor, Binarizer.

String tensors are object arrays of ``str`` (string tensor attributes arrive as bytes and are
decoded). TreeEnsemble evaluates every (sample, tree) pair at once, one tree level per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import scipy.special

from engine.ops.common import elementwise_cost, movement_cost, same_as_input
from engine.ops.registry import (
    ONNX_ML_DOMAIN,
    Attrs,
    CostRule,
    Kernel,
    KernelContext,
    KernelError,
    OpCost,
    OpSpec,
    ShapeRule,
    TensorSpec,
    dtype_of_array,
)


def _strings(values: Any) -> np.ndarray:
    """Strings or bytes as an object array of ``str``."""
    array = np.asarray(values, dtype=object)
    flat = [v.decode() if isinstance(v, bytes) else str(v) for v in array.ravel()]
    return np.array(flat, dtype=object).reshape(array.shape)


# --------------------------------------------------------------------------- LabelEncoder


def _encoder_table(attrs: Attrs, x_is_string: bool) -> tuple[np.ndarray, np.ndarray, Any]:
    """(keys, values, default) of a LabelEncoder node, values already in the output dtype.

    Opset 1 spells the mapping as ``classes_strings`` (string <-> position); opset 2+ as one
    ``keys_*`` and one ``values_*`` attribute (lists or 1-D tensors) with ``default_*``.
    """
    if "classes_strings" in attrs:
        classes = _strings(attrs.strs("classes_strings"))
        positions = np.arange(len(classes), dtype=np.int64)
        if x_is_string:
            return classes, positions, np.int64(attrs.int("default_int64", -1))
        return positions, classes, attrs.str("default_string", "_Unused")
    if "keys_tensor" in attrs:
        keys = np.asarray(attrs.get("keys_tensor")).reshape(-1)
        keys = _strings(keys) if keys.dtype.kind in "OSU" else keys
    elif "keys_strings" in attrs:
        keys = _strings(attrs.strs("keys_strings"))
    elif "keys_int64s" in attrs:
        keys = np.asarray(attrs.ints("keys_int64s"), dtype=np.int64)
    elif "keys_floats" in attrs:
        keys = np.asarray(attrs.floats("keys_floats"), dtype=np.float32)
    else:
        raise KernelError("LabelEncoder needs one of keys_strings, keys_int64s, keys_floats")
    if "values_tensor" in attrs:
        values = np.asarray(attrs.get("values_tensor")).reshape(-1)
        string_values = values.dtype.kind in "OSU"
        values = _strings(values) if string_values else values
        if "default_tensor" in attrs:
            default = np.asarray(attrs.get("default_tensor")).reshape(-1)[0]
            default = _strings([default])[0] if string_values else values.dtype.type(default)
        elif string_values:
            default = "_Unused"
        else:
            default = values.dtype.type(-1 if values.dtype.kind in "iu" else -0.0)
    elif "values_strings" in attrs:
        values = _strings(attrs.strs("values_strings"))
        default = attrs.str("default_string", "_Unused")
    elif "values_int64s" in attrs:
        values = np.asarray(attrs.ints("values_int64s"), dtype=np.int64)
        default = np.int64(attrs.int("default_int64", -1))
    elif "values_floats" in attrs:
        values = np.asarray(attrs.floats("values_floats"), dtype=np.float32)
        default = np.float32(attrs.float("default_float", -0.0))
    else:
        raise KernelError("LabelEncoder needs one of values_strings, values_int64s, values_floats")
    if len(keys) != len(values):
        raise KernelError(f"LabelEncoder has {len(keys)} keys but {len(values)} values")
    return keys, values, default


def _label_encoder(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Map each element through keys -> values; missing keys give the default; NaN matches NaN."""
    x = np.asarray(inputs[0])
    x_is_string = x.dtype == object or x.dtype.kind in "SU"
    keys, values, default = _encoder_table(attrs, x_is_string)
    if (keys.dtype == object) != x_is_string:
        raise KernelError(f"LabelEncoder keys of dtype {keys.dtype} cannot match input {x.dtype}")
    if x_is_string:
        x = _strings(x)
    out = np.full(x.shape, default, dtype=values.dtype)
    if keys.size == 0 or x.size == 0:
        return [out]
    # The last of repeated keys wins: deduplicate the reversed table, keeping first sightings.
    unique, first = np.unique(keys[::-1], return_index=True)
    mapped = values[::-1][first]
    common = object if x_is_string else np.result_type(unique.dtype, x.dtype)
    unique, x_cmp = unique.astype(common), x.astype(common)
    position = np.minimum(np.searchsorted(unique, x_cmp), unique.size - 1)
    found = unique[position]
    hit = found == x_cmp
    if unique.dtype.kind == "f":
        hit |= np.isnan(found) & np.isnan(x_cmp)
    out[hit] = mapped[position[hit]]
    return [out]


def _label_encoder_rule(
    specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext
) -> list[TensorSpec]:
    """Same shape as the input; dtype of the values attribute."""
    if "classes_strings" in attrs:
        from_string = specs[0].dtype == ir.DataType.STRING
        dtype = ir.DataType.INT64 if from_string else ir.DataType.STRING
    elif "values_tensor" in attrs:
        dtype = dtype_of_array(np.asarray(attrs.get("values_tensor")))
    elif "values_strings" in attrs:
        dtype = ir.DataType.STRING
    elif "values_int64s" in attrs:
        dtype = ir.DataType.INT64
    else:
        dtype = ir.DataType.FLOAT
    return [TensorSpec(specs[0].shape, dtype)]


def _label_encoder_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """A binary search over the keys per element."""
    keys = next((len(attrs.get(n)) for n in attrs.names() if n.startswith(("keys_", "class"))), 1)
    elements = ins[0].numel() if ins[0].is_static else 0
    steps = max(int(np.ceil(np.log2(max(keys, 2)))), 1)
    return OpCost(elements * steps, ins[0].nbytes(), outs[0].nbytes() if outs else 0)


# --------------------------------------------------------------------------- TreeEnsemble

_LEQ, _LT, _GTE, _GT, _EQ, _NEQ, _MEMBER = range(7)
_SUM_AGGREGATES = {0: "AVERAGE", 1: "SUM"}
_AGGREGATES = ("AVERAGE", "SUM", "MIN", "MAX")


def _member_table(modes: np.ndarray, members: np.ndarray | None) -> np.ndarray:
    """[nodes, widest set] of each BRANCH_MEMBER node's set, padded with NaN (matches nothing).

    ``membership_values`` lists the sets in node order, each closed by a NaN.
    """
    member_nodes = np.flatnonzero(modes == _MEMBER)
    if members is None:
        if member_nodes.size:
            raise KernelError("TreeEnsemble has BRANCH_MEMBER nodes but no membership_values")
        return np.full((len(modes), 0), np.nan)
    members = np.asarray(members, dtype=np.float64).reshape(-1)
    ends = np.flatnonzero(np.isnan(members))
    if ends.size != member_nodes.size:
        raise KernelError(
            f"TreeEnsemble has {member_nodes.size} BRANCH_MEMBER nodes but "
            f"{ends.size} NaN-terminated sets in membership_values"
        )
    sets = np.split(members, ends + 1)[: ends.size]
    table = np.full((len(modes), max((len(s) for s in sets), default=1)), np.nan)
    for node, values in zip(member_nodes, sets):
        table[node, : len(values)] = values  # each set keeps its NaN terminator
    return table


def _branch(
    mode: np.ndarray, value: np.ndarray, split: np.ndarray, member_rows: np.ndarray | None
) -> np.ndarray:
    """The comparison each node makes of its feature value (True: take the true branch)."""
    choices = [value <= split, value < split, value >= split, value > split]
    choices += [value == split, value != split]
    taken = np.select([mode == m for m in range(6)], choices, default=False)
    if member_rows is not None:
        is_member = (member_rows == value[:, None]).any(axis=1)
        taken = np.where(mode == _MEMBER, is_member, taken)
    return taken


def _tree_leaves(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    """[N, trees] index into the leaf_* attributes reached by each sample in each tree."""
    modes = np.asarray(attrs.get("nodes_modes")).reshape(-1).astype(np.int64)
    splits = np.asarray(attrs.get("nodes_splits")).reshape(-1).astype(np.float64)
    features = np.asarray(attrs.ints("nodes_featureids"), dtype=np.int64)
    true_ids = np.asarray(attrs.ints("nodes_truenodeids"), dtype=np.int64)
    false_ids = np.asarray(attrs.ints("nodes_falsenodeids"), dtype=np.int64)
    true_leaf = np.asarray(attrs.ints("nodes_trueleafs"), dtype=bool)
    false_leaf = np.asarray(attrs.ints("nodes_falseleafs"), dtype=bool)
    tracks = attrs.ints("nodes_missing_value_tracks_true") or [0] * len(modes)
    missing_true = np.asarray(tracks, dtype=bool)
    lengths = {len(a) for a in (modes, splits, features, true_ids, false_ids, true_leaf)}
    if len(lengths | {len(false_leaf), len(missing_true)}) != 1:
        raise KernelError("TreeEnsemble nodes_* attributes differ in length")
    if modes.size and (modes.max() > _MEMBER or features.max() >= x.shape[1]):
        raise KernelError("TreeEnsemble has an unknown node mode or a feature id out of range")
    members = _member_table(modes, attrs.get("membership_values"))
    roots = np.asarray(attrs.ints("tree_roots"), dtype=np.int64)
    node = np.broadcast_to(roots, (x.shape[0], roots.size)).copy()
    at_leaf = np.zeros(node.shape, dtype=bool)
    values = x.astype(np.float64)
    for _ in range(len(modes) + 1):
        rows, trees = np.nonzero(~at_leaf)
        if rows.size == 0:
            return node
        current = node[rows, trees]
        value = values[rows, features[current]]
        member_rows = members[current] if members.shape[1] else None
        taken = _branch(modes[current], value, splits[current], member_rows)
        taken |= np.isnan(value) & missing_true[current]
        node[rows, trees] = np.where(taken, true_ids[current], false_ids[current])
        at_leaf[rows, trees] = np.where(taken, true_leaf[current], false_leaf[current])
    raise KernelError("TreeEnsemble trees contain a cycle (no leaf reached)")


def _post_transform(scores: np.ndarray, kind: int) -> np.ndarray:
    """NONE, SOFTMAX, LOGISTIC, SOFTMAX_ZERO (zeros stay zero) or PROBIT, row-wise."""
    if kind == 0:
        return scores
    if kind == 2:
        return scipy.special.expit(scores)
    if kind == 4:
        return scipy.special.ndtri(scores)  # sqrt(2) erfinv(2p - 1)
    if kind not in (1, 3):
        raise KernelError(f"TreeEnsemble post_transform {kind} is not one of 0..4")
    top = scores.max(axis=1, keepdims=True)
    if kind == 1:
        exps = np.exp(scores - top)
        return exps / exps.sum(axis=1, keepdims=True)
    exps = np.where(np.abs(scores) > 1e-7, np.exp(scores - top), scores * np.exp(-top))
    total = exps.sum(axis=1, keepdims=True)
    safe = np.where(total == 0, 1.0, total)
    return np.where(total == 0, 0.5, exps / safe)


def _n_targets(attrs: Attrs) -> int:
    if "n_targets" in attrs:
        return attrs.int("n_targets")
    return max(attrs.ints("leaf_targetids") or [-1]) + 1


def _tree_ensemble(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Per-target aggregate of the leaf weights each sample reaches, then the post transform.

    Targets that no tree reaches score 0 (as onnxruntime) under every aggregate.
    """
    x = np.asarray(inputs[0])
    if x.ndim != 2:
        raise KernelError(f"TreeEnsemble input must be [N, F], got shape {x.shape}")
    aggregate = attrs.int("aggregate_function", 1)
    if aggregate not in range(len(_AGGREGATES)):
        raise KernelError(f"TreeEnsemble aggregate_function {aggregate} is not one of 0..3")
    leaves = _tree_leaves(x, attrs)
    weights = np.asarray(attrs.get("leaf_weights")).reshape(-1).astype(np.float64)[leaves]
    targets = np.asarray(attrs.ints("leaf_targetids"), dtype=np.int64)[leaves]
    n_targets = _n_targets(attrs)
    if targets.size and not 0 <= targets.min() <= targets.max() < n_targets:
        raise KernelError(f"TreeEnsemble leaf_targetids fall outside [0, {n_targets})")
    rows = np.broadcast_to(np.arange(x.shape[0])[:, None], leaves.shape)
    if aggregate in _SUM_AGGREGATES:
        scores = np.zeros((x.shape[0], n_targets))
        np.add.at(scores, (rows, targets), weights)
        if aggregate == 0 and leaves.shape[1]:
            scores /= leaves.shape[1]
    else:
        scores = np.full((x.shape[0], n_targets), np.inf if aggregate == 2 else -np.inf)
        (np.minimum if aggregate == 2 else np.maximum).at(scores, (rows, targets), weights)
        reached = np.zeros(scores.shape, dtype=bool)
        reached[rows, targets] = True
        scores[~reached] = 0.0
    return [_post_transform(scores, attrs.int("post_transform", 0)).astype(x.dtype)]


def _tree_ensemble_rule(
    specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext
) -> list[TensorSpec]:
    """[N, F] -> [N, n_targets] in the input dtype."""
    shape = specs[0].shape
    batch = shape[0] if shape else None
    return [TensorSpec((batch, _n_targets(attrs)), specs[0].dtype)]


def _tree_ensemble_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """Two operations per visited node, a balanced tree's depth per (sample, tree)."""
    samples = ins[0].shape[0] if ins[0].is_static and ins[0].shape else 0
    trees = max(len(attrs.ints("tree_roots") or []), 1)
    nodes = len(attrs.ints("nodes_featureids") or [])
    depth = int(np.ceil(np.log2(nodes / trees + 1))) + 1
    written = outs[0].nbytes() if outs else 0
    return OpCost(2 * samples * trees * depth, ins[0].nbytes(), written)


# --------------------------------------------------------------------------- small ops


def _array_feature_extractor(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Pick the flattened indices along the last axis; a 1-D input gives one row [1, k]."""
    x, indices = np.asarray(inputs[0]), np.asarray(inputs[1]).reshape(-1)
    if indices.size and not (indices.min() >= 0 and indices.max() < x.shape[-1]):
        raise KernelError(f"ArrayFeatureExtractor indices out of range [0, {x.shape[-1]})")
    picked = np.take(x, indices.astype(np.int64), axis=-1)
    return [picked.reshape(1, -1) if x.ndim == 1 else picked]


def _array_feature_rule(
    specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext
) -> list[TensorSpec]:
    """X[..., C] and k indices -> [..., k] (a 1-D X gives [1, k])."""
    x, indices = specs[0], specs[1]
    count = indices.numel() if indices.is_static else None
    if x.shape is None:
        return [TensorSpec(None, x.dtype)]
    prefix = x.shape[:-1] if len(x.shape) > 1 else (1,)
    return [TensorSpec((*prefix, count), x.dtype)]


def _binarizer(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """1 where the input exceeds ``threshold`` (default 0), else 0, in the input dtype."""
    x = np.asarray(inputs[0])
    return [(x > attrs.float("threshold", 0.0)).astype(x.dtype)]


def _ml(op_type: str, kernel: Kernel, rule: ShapeRule, cost: CostRule) -> OpSpec:
    """Spec of an ai.onnx.ml op in the classic_ml family."""
    return OpSpec(op_type, kernel, rule, cost, domain=ONNX_ML_DOMAIN, family="classic_ml")


OPS: list[OpSpec] = [
    _ml("LabelEncoder", _label_encoder, _label_encoder_rule, _label_encoder_cost),
    _ml("TreeEnsemble", _tree_ensemble, _tree_ensemble_rule, _tree_ensemble_cost),
    _ml("ArrayFeatureExtractor", _array_feature_extractor, _array_feature_rule, movement_cost),
    _ml("Binarizer", _binarizer, same_as_input(0), elementwise_cost(1)),
]
