"""Channel permutation before 2:4 pruning (the idea of Apex ASP's permutation search).

Magnitude pruning keeps the 2 largest of every group of 4 consecutive input channels. Which
channels share a group is an accident of the channel order: reordering the reduction dimension K
(the same column permutation for every row of the ``[rows, K]`` reduction matrix, see
:mod:`engine.sparsity.check`) can put large and small channels together so that more magnitude
survives. :func:`search_permutation` looks for such an order cheaply:

1. start from the better of the identity and a "spread by norm" order (columns ranked by their L1
   norm and dealt round-robin to the groups, so each group gets strong and weak channels);
2. then, for a bounded number of iterations, draw two groups at random (seeded, deterministic),
   evaluate all 16 swaps of one channel of the first with one of the second, and apply the best
   swap when it strictly increases the retained magnitude.

The result never retains less than the identity: when nothing better is found the identity is
returned.

Applying a permutation to a model
    A layer computes ``W @ x`` over its input channels. Permuting the columns of ``W`` (channel j
    of the new order is old channel ``permutation[j]``) only keeps the output unchanged when its
    input ``x`` is permuted the same way, i.e. when the producer of ``x`` emits its output
    channels in the new order. That is safe here (:func:`permutation_blocker` says why not
    otherwise) only when the input of a Conv/gie::ConvAct layer is produced by an ungrouped
    Conv/gie::ConvAct with constant weight and bias and no residual input, whose output feeds
    only this layer and is not a graph output: then the producer's output channels (weight rows
    and bias) are permuted too (its activation is elementwise, so it commutes). For a grouped
    consumer the same permutation is applied inside every group of input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from engine.ops.registry import GIE_DOMAIN, Attrs, normalize_domain
from engine.sparsity.check import GROUP, constant_weight

#: Default number of group pairs the local search examines.
DEFAULT_ITERATIONS = 256

_CONV_OPS = frozenset({(normalize_domain(""), "Conv"), (GIE_DOMAIN, "ConvAct")})


@dataclass(frozen=True, eq=False)
class PermutationResult:
    """A permutation of K (column ``j`` of the permuted matrix is original column
    ``permutation[j]``) and the fraction of |w| that 2:4 magnitude pruning keeps without it
    (``retained_before``) and with it (``retained_after >= retained_before``)."""

    permutation: np.ndarray
    retained_before: float
    retained_after: float

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.permutation, np.arange(self.permutation.size)))


def _top2_sum(magnitude: np.ndarray) -> np.ndarray:
    """Sum of the 2 largest values along the last axis (of length 4)."""
    ordered = np.sort(magnitude, axis=-1)
    return ordered[..., -1] + ordered[..., -2]


def _kept(magnitude: np.ndarray, permutation: np.ndarray) -> float:
    """Total |w| 2:4 pruning keeps when the columns are taken in ``permutation`` order."""
    rows = magnitude.shape[0]
    groups = magnitude[:, permutation].reshape(rows, -1, GROUP)
    return float(_top2_sum(groups).sum())


def _spread_by_norm(magnitude: np.ndarray) -> np.ndarray:
    """Columns ranked by L1 norm and dealt round-robin to the groups (group g gets ranks g,
    g + G, g + 2G, g + 3G)."""
    count = magnitude.shape[1] // GROUP
    ranked = np.argsort(-magnitude.sum(axis=0), kind="stable")
    return ranked.reshape(GROUP, count).T.reshape(-1).copy()


#: every (a, b) swap of position a of the first group with position b of the second
_SWAPS = [(a, b) for a in range(GROUP) for b in range(GROUP)]


def _best_swap(
    magnitude: np.ndarray, first: np.ndarray, second: np.ndarray
) -> tuple[float, int, int]:
    """(gain, a, b) of the best swap of first[a] with second[b] (gain may be <= 0)."""
    candidates_first = np.repeat(first[None, :], len(_SWAPS), axis=0)
    candidates_second = np.repeat(second[None, :], len(_SWAPS), axis=0)
    for index, (a, b) in enumerate(_SWAPS):
        candidates_first[index, a] = second[b]
        candidates_second[index, b] = first[a]
    current = _top2_sum(magnitude[:, first]).sum() + _top2_sum(magnitude[:, second]).sum()
    swapped = _top2_sum(magnitude[:, candidates_first]).sum(axis=0) + _top2_sum(
        magnitude[:, candidates_second]
    ).sum(axis=0)
    best = int(np.argmax(swapped))
    a, b = _SWAPS[best]
    return float(swapped[best] - current), a, b


def search_permutation(
    matrix: np.ndarray, iterations: int = DEFAULT_ITERATIONS, seed: int = 0
) -> PermutationResult:
    """A permutation of the columns of the ``[rows, K]`` matrix that keeps more magnitude under
    2:4 pruning (see the module docstring). Deterministic for a given ``seed``."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[1] % GROUP:
        raise ValueError(f"expected a [rows, K] matrix with K a multiple of 4, got {matrix.shape}")
    magnitude = np.abs(matrix.astype(np.float64))
    width = matrix.shape[1]
    total = float(magnitude.sum())
    identity = np.arange(width)
    before = _kept(magnitude, identity)
    count = width // GROUP
    if count < 2 or total == 0.0:
        fraction = before / total if total else 1.0
        return PermutationResult(identity, fraction, fraction)
    tolerance = 1e-9 * total  # gains below this are rounding noise of the sums
    spread = _spread_by_norm(magnitude)
    permutation = spread if _kept(magnitude, spread) > before + tolerance else identity.copy()
    rng = np.random.default_rng(seed)
    for _ in range(iterations):
        g1, g2 = rng.choice(count, size=2, replace=False)
        first = permutation[g1 * GROUP : (g1 + 1) * GROUP]
        second = permutation[g2 * GROUP : (g2 + 1) * GROUP]
        gain, a, b = _best_swap(magnitude, first, second)
        if gain > tolerance:
            first[a], second[b] = second[b], first[a]  # views: updates ``permutation``
    after = _kept(magnitude, permutation)
    if after <= before + tolerance:
        return PermutationResult(identity, before / total, before / total)
    return PermutationResult(permutation, before / total, after / total)


# --------------------------------------------------------------------------- model application


def _is_conv(node: ir.Node) -> bool:
    return (normalize_domain(node.domain), node.op_type) in _CONV_OPS


def _sole_constant(node: ir.Node, index: int, what: str) -> str:
    """ "" when input ``index`` of ``node`` is absent or a constant only ``node`` reads."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return ""
    value = node.inputs[index]
    if value.const_value is None or value.is_graph_input():
        return f"{what} is not a constant"
    if len(value.uses()) != 1:
        return f"{what} is shared with another node"
    return ""


def permutation_blocker(node: ir.Node) -> str:
    """Why the input channels of ``node`` cannot be permuted safely ("" when they can)."""
    if not _is_conv(node):
        return f"{node.op_type} is not a convolution (only Conv/ConvAct inputs are permuted)"
    if constant_weight(node) is None:
        return "the layer's weight is not a constant"
    reason = _sole_constant(node, 1, "the layer's weight")
    if reason:
        return reason
    source = node.inputs[0]
    producer = source.producer() if source is not None else None
    if producer is None:
        return "the input is not produced by a node"
    if not _is_conv(producer):
        return f"the input is produced by {producer.op_type}, not by a Conv/ConvAct"
    if source.is_graph_output():
        return "the producer's output is also a graph output"
    if len(source.uses()) != 1:
        return f"the producer's output feeds {len(source.uses())} inputs"
    if Attrs.from_node(producer).int("group", 1) != 1:
        return "the producer is a grouped convolution"
    if len(producer.inputs) > 3 and producer.inputs[3] is not None:
        return "the producer adds a residual input"
    return _sole_constant(producer, 1, "the producer's weight") or _sole_constant(
        producer, 2, "the producer's bias"
    )


def full_channel_permutation(permutation: np.ndarray, group: int) -> np.ndarray:
    """The permutation of all ``group * K`` input channels that applies ``permutation`` (of the
    K = C/group channels of a group) inside every group."""
    width = permutation.size
    return np.concatenate([index * width + permutation for index in range(group)])


def _set_constant(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.Tensor(np.ascontiguousarray(array), name=value.name)


def permute_input_channels(node: ir.Node, permutation: np.ndarray) -> None:
    """Permute the input channels of Conv/ConvAct ``node`` (its weight's axis 1) and the output
    channels of its producer (weight axis 0 and bias) in place; the model computes the same.

    Raises ValueError("permutation not applicable: ...") when :func:`permutation_blocker` refuses.
    """
    reason = permutation_blocker(node)
    if reason:
        raise ValueError(f"permutation not applicable: {reason}")
    permutation = np.asarray(permutation, dtype=np.int64)
    weight = constant_weight(node)
    assert weight is not None  # checked by permutation_blocker
    if sorted(permutation.tolist()) != list(range(weight.shape[1])):
        raise ValueError(f"not a permutation of {weight.shape[1]} input channels")
    group = Attrs.from_node(node).int("group", 1)
    channels = full_channel_permutation(permutation, group)
    _set_constant(node.inputs[1], weight[:, permutation])
    producer = node.inputs[0].producer()
    assert producer is not None
    producer_weight = producer.inputs[1].const_value.numpy()
    _set_constant(producer.inputs[1], producer_weight[channels])
    if len(producer.inputs) > 2 and producer.inputs[2] is not None:
        _set_constant(producer.inputs[2], producer.inputs[2].const_value.numpy()[channels])


__all__ = [
    "DEFAULT_ITERATIONS",
    "PermutationResult",
    "full_channel_permutation",
    "permutation_blocker",
    "permute_input_channels",
    "search_permutation",
]
