"""Attention fusion rules of the O3 transformer pass, and the rule helpers both modules share.

``attention``: BERT/GPT as torch.onnx exports them. Q, K and V (projected, [b, s, hidden])
are each Reshaped to [b, s, heads, d] and Transposed (K to [b, h, d, s] directly or through a
second Transpose); optional scale of Q, MatMul QK^T, optional Div/Mul scale, optional additive
mask (Add) or causal mask (Where(lower-triangular constant, scores, -large), possibly Sliced
to the sequence length), Softmax on the last axis, MatMul with V, Transpose [0, 2, 1, 3] and a
Reshape back to [b, s, hidden] whose target is constant (0 copies a dim, -1 infers) or a
Shape -> Gather -> Unsqueeze -> Concat chain of the merged tensor (removed with the match).
The number of heads is read from the constant part of the head-split Reshape targets (or from
the inferred shape of their outputs).

``attention_packed_qkv``: ViT: one qkv projection Reshaped to [b, s, 3, heads, d], Transposed
with perm [2, 0, 3, 1, 4], Split on axis 0 and Squeezed; the rewrite Splits the projection
into Q, K and V along its last axis (the same features) and feeds them to gie::Attention.

Every refusal names the Softmax node: "attention not fused at <Softmax>: <reason>".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRule

GIE = "gie"
#: A Where fill value at or below this hides a score as well as -inf does (exp underflows).
MASK_FILL_LIMIT = -1e4


# --------------------------------------------------------------------------- shared helpers


class RuleGroup:
    """One named rule made of several pattern variants (alternative forms, operand orders).

    Behaves like an onnxscript ``RewriteRule`` for :class:`engine.passes.rewrite.RewritePass`:
    ``try_rewrite`` returns the first variant's replacement; every variant's refusal reaches
    the tracer, so a near match is reported under the group's name.
    """

    def __init__(self, name: str, rules: Sequence[RewriteRule], commute: bool = True) -> None:
        self.name = name
        self._variants = [v for r in rules for v in (r.commute() if commute else [r])]
        self._replacement_pattern = rules[0]._replacement_pattern
        self.graph_pre_visitor = None
        self.graph_post_visitor = None

    def __str__(self) -> str:
        return self.name

    def try_rewrite(
        self,
        model: ir.Model,
        graph_or_function: ir.Graph | ir.Function,
        node: ir.Node,
        *,
        verbose: int | None = None,
        tracer: Any = None,
    ) -> Any:
        for variant in self._variants:
            delta = variant.try_rewrite(model, graph_or_function, node, tracer=tracer)
            if delta is not None:
                return delta
        return None


def group(
    name: str, patterns: Sequence[Any], rewrite: Any, check: Any, commute: bool = True
) -> Any:
    """A :class:`RuleGroup` named ``name`` from pattern functions sharing check and rewrite."""
    return RuleGroup(name, [RewriteRule(p, rewrite, check, name=name) for p in patterns], commute)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content (initializer or Constant node), else None."""
    return None if value is None else _ir_utils.get_numpy_value(value)


def const_scalar(value: ir.Value | None) -> float | None:
    """The single element of a constant value, else None."""
    array = const_array(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def node_name(value: ir.Value | None) -> str:
    """Name of the node producing ``value`` (or the value's name when it is not computed)."""
    if value is None:
        return "?"
    producer = value.producer()
    if producer is not None:
        return producer.name or producer.op_type
    return value.name or "?"


def dims(value: ir.Value | None) -> tuple[Any, ...] | None:
    """The value's shape (ints, symbolic dims as str), None when unknown."""
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else str(d) for d in value.shape)


def fail(reason: str) -> MatchResult:
    """A refused check carrying its user-facing reason."""
    return MatchResult().fail(reason)


# --------------------------------------------------------------------------- patterns


def _core(op: Any, q4: Any, kt: Any, v4: Any, **v: Any) -> Any:
    """QK^T, scale, mask, Softmax, PV and the head merge (shared by both attention forms)."""
    q4 = pattern.OrValue(
        [op.Mul(q4, v["q_scale"]), op.Div(q4, v["q_scale"]), q4],
        tag_var="q_scaling",
        tag_values=["Mul", "Div", "None"],
    )
    scores = op.MatMul(q4, kt)
    scores = pattern.OrValue(
        [op.Div(scores, v["scale"]), op.Mul(scores, v["scale"]), scores],
        tag_var="scaling",
        tag_values=["Div", "Mul", "None"],
    )
    scores = pattern.OrValue(
        [op.Add(scores, v["mask"]), op.Where(v["cond"], scores, v["fill"]), scores],
        tag_var="masking",
        tag_values=["Add", "Where", "None"],
    )
    probs = op.Softmax(scores, _outputs=["probs"])
    merged = op.Transpose(op.MatMul(probs, v4), perm=[0, 2, 1, 3], _outputs=["merged"])
    batch = op.Unsqueeze(op.Gather(op.Shape(merged), v["i0"], axis=0), v["ax0"])
    seq = op.Unsqueeze(op.Gather(op.Shape(merged), v["i1"], axis=0), v["ax1"])
    chain = op.Concat(batch, seq, v["tail"], axis=0)
    target = pattern.OrValue(
        [chain, v["out_target"]], tag_var="out_form", tag_values=["chain", "given"]
    )
    return op.Reshape(merged, target, _outputs=["out"])


def _attention_pattern(
    op: Any,
    q: Any,
    k: Any,
    v: Any,
    q_target: Any,
    k_target: Any,
    v_target: Any,
    q_scale: Any,
    scale: Any,
    mask: Any,
    cond: Any,
    fill: Any,
    i0: Any,
    i1: Any,
    ax0: Any,
    ax1: Any,
    tail: Any,
    out_target: Any,
) -> Any:
    q4 = op.Transpose(op.Reshape(q, q_target, _outputs=["q_heads"]), perm=[0, 2, 1, 3])
    k_heads = op.Reshape(k, k_target, _outputs=["k_heads"])
    kt = pattern.OrValue(
        [
            op.Transpose(k_heads, perm=[0, 2, 3, 1]),
            op.Transpose(op.Transpose(k_heads, perm=[0, 2, 1, 3]), perm=[0, 1, 3, 2]),
        ],
        tag_var="key_form",
        tag_values=list(range(2)),
    )
    v4 = op.Transpose(op.Reshape(v, v_target, _outputs=["v_heads"]), perm=[0, 2, 1, 3])
    core = dict(
        q_scale=q_scale,
        scale=scale,
        mask=mask,
        cond=cond,
        fill=fill,
        i0=i0,
        i1=i1,
        ax0=ax0,
        ax1=ax1,
        tail=tail,
        out_target=out_target,
    )
    return _core(op, q4, kt, v4, **core)


def _packed_pattern(
    op: Any,
    qkv: Any,
    qkv_target: Any,
    sizes: Any,
    q_scale: Any,
    scale: Any,
    mask: Any,
    cond: Any,
    fill: Any,
    i0: Any,
    i1: Any,
    ax0: Any,
    ax1: Any,
    tail: Any,
    out_target: Any,
) -> Any:
    heads = op.Reshape(qkv, qkv_target, _outputs=["qkv_heads"])
    moved = op.Transpose(heads, perm=[2, 0, 3, 1, 4])
    q, k, v = op.Split(moved, sizes, axis=0, _allow_other_inputs=True, _outputs=3)
    q4, k4, v4 = (op.Squeeze(p, _allow_other_inputs=True) for p in (q, k, v))
    core = dict(
        q_scale=q_scale,
        scale=scale,
        mask=mask,
        cond=cond,
        fill=fill,
        i0=i0,
        i1=i1,
        ax0=ax0,
        ax1=ax1,
        tail=tail,
        out_target=out_target,
    )
    return _core(op, q4, op.Transpose(k4, perm=[0, 1, 3, 2]), v4, **core)


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class _Plan:
    heads: int
    scale: float
    causal: int
    mask: ir.Value | None


def _elements(target: ir.Value | None) -> list[float | None] | None:
    """Per-element constants of a Reshape target: a constant, or a Concat of pieces."""
    array = const_array(target)
    if array is not None:
        return [float(a) for a in array.reshape(-1)]
    producer = target.producer() if target is not None else None
    if producer is None or producer.op_type != "Concat":
        return None
    items: list[float | None] = []
    for piece in producer.inputs:
        values = const_array(piece)
        if values is not None:
            items.extend(float(a) for a in values.reshape(-1))
        elif piece is not None and piece.shape is not None and list(piece.shape) == [1]:
            items.append(None)
        else:
            return None
    return items


def _split_dims(target: ir.Value, reshaped: ir.Value, rank: int) -> tuple[int, int] | str:
    """(heads, head_dim) of a head-split Reshape, or a reason."""
    items = _elements(target)
    shape = dims(reshaped)
    if items is None or len(items) != rank:
        items = [None] * rank
    found = [
        int(c) if c is not None and c > 0 else (s if isinstance(s, int) else None)
        for c, s in zip(items[-2:], (shape or (None, None))[-2:])
    ]
    if None in found:
        return f"the number of heads of {node_name(reshaped)} is not known (target {items})"
    return found[0], found[1]  # type: ignore[return-value]


def _causal_reason(cond: ir.Value, fill: ir.Value) -> str | None:
    """Why Where(cond, scores, fill) is not a causal mask (None when it is)."""
    value, ends, axes = cond, [], []
    while value.producer() is not None and value.producer().op_type == "Slice":
        node = value.producer()
        parts = [const_array(i) if i is not None else None for i in node.inputs[1:5]]
        starts, axes_part, steps = parts[0], parts[2] if len(parts) > 2 else None, None
        steps = parts[3] if len(parts) > 3 else None
        if starts is None or np.any(starts != 0) or (steps is not None and np.any(steps != 1)):
            return f"{node.name} does not slice the mask from 0 with step 1"
        ends.append(node.inputs[2])
        axes.extend(int(a) for a in (axes_part if axes_part is not None else [-1]))
        value = node.inputs[0]
    mask = const_array(value)
    if mask is None or mask.dtype != np.bool_ or mask.ndim < 2 or mask.shape[-1] != mask.shape[-2]:
        return f"the Where condition {node_name(cond)} is not a constant square boolean mask"
    if not np.array_equal(
        mask, np.broadcast_to(np.tril(np.ones(mask.shape[-2:], bool)), mask.shape)
    ):
        return f"the Where condition {node_name(cond)} is not lower-triangular (causal)"
    rank = mask.ndim
    square = sorted(a % rank for a in axes) == [rank - 2, rank - 1] and (
        ends[0] is ends[-1] or const_scalar(ends[0]) == const_scalar(ends[-1]) is not None
    )
    if ends and not square:
        return "the causal mask is not sliced to the same length on its last two axes"
    fill_value = const_scalar(fill)
    if fill_value is None or fill_value > MASK_FILL_LIMIT:
        return f"the masked-out value {fill_value} is not a large negative constant"
    return None


def _plan(b: dict[str, Any]) -> _Plan | str:
    """What to build from a match's bindings, or the reason it cannot be fused."""
    softmax = b["probs"].producer()
    opset = 13 if softmax.version is None else softmax.version
    axis = softmax.attributes.get_int("axis", -1 if opset >= 13 else 1)
    if axis not in (-1, 3):
        return f"Softmax is over axis {axis}, not the key axis"
    if "qkv" in b:
        split = _split_dims(b["qkv_target"], b["qkv_heads"], 5)
        q_dims = k_dims = v_dims = split
        items = _elements(b["qkv_target"])
        if items is not None and items[2] not in (None, 3.0):
            return f"the packed projection is split in {items[2]} parts, not 3 (q, k, v)"
    else:
        q_dims, k_dims, v_dims = (
            _split_dims(b[f"{n}_target"], b[f"{n}_heads"], 4) for n in ("q", "k", "v")
        )
    for found in (q_dims, k_dims, v_dims):
        if isinstance(found, str):
            return found
    if not (q_dims[0] == k_dims[0] == v_dims[0]) or q_dims[1] != k_dims[1]:  # type: ignore[index]
        return f"Q, K and V split into different heads {q_dims}, {k_dims}, {v_dims}"
    heads = q_dims[0]  # type: ignore[misc]
    hidden_v = heads * v_dims[1]  # type: ignore[index]
    scale = 1.0
    for tag, var in (("q_scaling", "q_scale"), ("scaling", "scale")):
        if b.get(tag, "None") == "None":
            continue
        factor = const_scalar(b[var])
        if factor is None or factor == 0:
            return f"the score scale {node_name(b[var])} is not a constant scalar"
        scale *= factor if b[tag] == "Mul" else 1.0 / factor
    causal, mask = 0, None
    if b.get("masking") == "Add":
        mask = b["mask"]
        shape = dims(mask)
        if shape is None:
            return f"the shape of the mask {node_name(mask)} is unknown"
        if len(shape) > 4 or (len(shape) == 4 and shape[1] not in (1, heads)):
            return f"the mask {shape} is not broadcastable to [batch, heads, seq, seq]"
        if mask.dtype is not None and not mask.dtype.is_floating_point():
            return f"the mask {node_name(mask)} is {mask.dtype}, not an additive float mask"
    elif b.get("masking") == "Where":
        reason = _causal_reason(b["cond"], b["fill"])
        if reason is not None:
            return reason
        causal = 1
    if b.get("out_form") == "chain":
        if (const_scalar(b["i0"]), const_scalar(b["i1"])) != (0.0, 1.0):
            return "the head-merge Reshape does not keep the batch and sequence dims"
        if const_scalar(b["tail"]) not in (float(hidden_v), -1.0):
            return f"the head-merge Reshape does not merge the heads into {hidden_v}"
    else:
        items = _elements(b["out_target"])
        if items is None or len(items) != 3 or items[2] not in (float(hidden_v), -1.0):
            return f"the head-merge Reshape target {items} is not [batch, seq, {hidden_v}]"
        known = dims(b["merged"]) or (None, None)
        kept = [c is None or c in (0.0, -1.0, known[i]) for i, c in enumerate(items[:2])]
        if not all(kept) or items.count(-1.0) > 1:
            return f"the head-merge Reshape target {items} does not keep the batch and sequence"
    return _Plan(heads, scale, causal, mask)


def _check(context: Any, **bindings: Any) -> MatchResult:
    plan = _plan(bindings)
    if isinstance(plan, str):
        return fail(f"attention not fused at {node_name(bindings['probs'])}: {plan}")
    return MatchResult()


def _attributes(plan: _Plan) -> dict[str, Any]:
    return {"num_heads": plan.heads, "scale": plan.scale, "causal": plan.causal}


def _rewrite(op: Any, q: ir.Value, k: ir.Value, v: ir.Value, **bindings: Any) -> Any:
    plan = _plan(bindings)
    assert isinstance(plan, _Plan)
    return op.Attention(q, k, v, plan.mask, _domain=GIE, **_attributes(plan))


def _packed_rewrite(op: Any, qkv: ir.Value, **bindings: Any) -> Any:
    plan = _plan({"qkv": qkv, **bindings})
    assert isinstance(plan, _Plan)
    split = _split_dims(bindings["qkv_target"], bindings["qkv_heads"], 5)
    width = plan.heads * split[1]  # type: ignore[index]
    sizes = op.initializer(ir.tensor(np.array([width] * 3, dtype=np.int64)), "qkv_split_sizes")
    q, k, v = op.Split(qkv, sizes, axis=-1, _outputs=3)
    return op.Attention(q, k, v, plan.mask, _domain=GIE, **_attributes(plan))


def _packed_check(context: Any, qkv: ir.Value, **bindings: Any) -> MatchResult:
    return _check(context, qkv=qkv, **bindings)


attention = group(
    "attention",
    [_attention_pattern],
    _rewrite,
    _check,
)
attention_packed_qkv = group(
    "attention_packed_qkv",
    [_packed_pattern],
    _packed_rewrite,
    _packed_check,
)

ATTENTION_RULES = (attention, attention_packed_qkv)
