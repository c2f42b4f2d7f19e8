"""BatchNormalization folding into Conv / ConvTranspose / Gemm, and Pad folding into Conv.

The rules subclass onnxscript's stock rules (``_fuse_batchnorm.py``, ``_fuse_pad_into_conv.py``)
and keep their arithmetic (``W' = W * gamma/std``, ``B' = (B - mean) * gamma/std + beta``; Pad
added to the Conv's ``pads``), but replace their checks so that every refusal is a sentence for
the user naming both nodes, e.g. "BatchNorm 'bn3' not folded into Conv 'conv3': scale is a graph
input, not a constant". The matcher's own "other uses" test is turned off (``remove_nodes=False``)
and done in the check instead, so that case gets a reason too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._ir_utils import get_numpy_value
from onnxscript.rewriter.rules.common import _fuse_batchnorm as stock_bn
from onnxscript.rewriter.rules.common import _fuse_pad_into_conv as stock_pad

from engine.passes.manager import GraphPass
from engine.passes.rewrite import RewritePass


def constant_refusal(value: ir.Value | None, role: str, model: ir.Model) -> str | None:
    """Why ``value`` cannot be read as a constant at optimization time (None when it can).

    A graph input is overridable at run time, so it is not a constant, unless the model is
    IR version < 4, where every initializer is also listed as an input (ONNX Runtime treats
    those as constants too).
    """
    if value is None:
        return None
    overridable = value.is_graph_input() and (model.ir_version or 0) >= 4
    if value.is_graph_input() and (overridable or not value.is_initializer()):
        return f"{role} is a graph input, not a constant"
    if get_numpy_value(value) is None:
        producer = value.producer()
        source = f"{producer.op_type} '{producer.name}'" if producer else "the graph"
        return f"{role} '{value.name}' is computed by {source}, not a constant"
    return None


def sole_consumer_refusal(value: ir.Value, consumer: ir.Node) -> str | None:
    """Why ``value`` cannot disappear inside a fusion with ``consumer`` (None when it can)."""
    producer = value.producer()
    what = f"the {producer.op_type} output '{value.name}'" if producer else f"'{value.name}'"
    if value.is_graph_output():
        return f"{what} is a graph output"
    others = [user for user, _ in value.uses() if user is not consumer]
    if others:
        names = ", ".join(f"{u.op_type} '{u.name}'" for u in others[:3])
        return f"{what} is also used by {names}"
    return None


def _first_refusal(reasons: Sequence[str | None]) -> str | None:
    return next((r for r in reasons if r), None)


class _BatchNormFolding:
    """Checks shared by the three BatchNorm folding rules (mixed into the stock classes)."""

    op_type: str

    def check(
        self, context: Any, x: ir.Value, inbound_out: ir.Value, batchnorm_out: ir.Value
    ) -> MatchResult:
        result = MatchResult()
        inbound = inbound_out.producer()
        batchnorm = batchnorm_out.producer()
        assert inbound is not None and batchnorm is not None
        prefix = f"BatchNorm '{batchnorm.name}' not folded into {inbound.op_type} '{inbound.name}'"
        if batchnorm.attributes.get_int("training_mode", 0):
            return result.fail(f"{prefix}: it runs in training mode")
        used_stats = [v for v in batchnorm.outputs[1:] if v.uses() or v.is_graph_output()]
        if used_stats:
            return result.fail(f"{prefix}: its running statistics '{used_stats[0].name}' are used")
        if len(batchnorm.inputs) != 5:
            return result.fail(f"{prefix}: it has {len(batchnorm.inputs)} inputs, expected 5")
        model = context.model
        roles = ("scale", "bias", "mean", "variance")
        reason = _first_refusal(
            [
                sole_consumer_refusal(inbound_out, batchnorm),
                constant_refusal(inbound.inputs[1], "the weight", model),
                *[constant_refusal(v, role, model) for v, role in zip(batchnorm.inputs[1:], roles)],
                constant_refusal(_input(inbound, 2), "the bias", model),
            ]
        )
        if reason:
            return result.fail(f"{prefix}: {reason}")
        weight = get_numpy_value(inbound.inputs[1])
        channels = get_numpy_value(batchnorm.inputs[1])
        if weight is None or channels is None:
            return result.fail(f"{prefix}: weights are unreadable")
        expected = self._channels(weight, inbound)
        if expected is None or channels.size != expected:
            return result.fail(
                f"{prefix}: BatchNorm has {channels.size} channels, {inbound.op_type} "
                f"produces {expected}"
            )
        return result

    def _channels(self, weight: np.ndarray, inbound: ir.Node) -> int | None:
        """Output channels of the inbound node (None when its weights do not say)."""
        if self.op_type == "Conv":
            return int(weight.shape[0]) if weight.ndim >= 2 else None
        if self.op_type == "ConvTranspose":
            group = inbound.attributes.get_int("group", 1)
            if weight.ndim < 2 or weight.shape[0] % group:
                return None
            return int(weight.shape[1]) * group
        if weight.ndim != 2:
            return None
        return int(weight.shape[0] if inbound.attributes.get_int("transB", 0) else weight.shape[1])


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


class FoldBatchNormIntoConv(_BatchNormFolding, stock_bn.FuseBatchNormIntoConv):
    """BatchNormalization(Conv(x)) -> Conv(x) with scaled weights and bias."""

    def __init__(self) -> None:
        super().__init__(name="fold_batchnorm_into_conv", remove_nodes=False)


class FoldBatchNormIntoConvTranspose(_BatchNormFolding, stock_bn.FuseBatchNormIntoConvTranspose):
    """BatchNormalization(ConvTranspose(x)) -> ConvTranspose(x) with scaled weights and bias."""

    def __init__(self) -> None:
        super().__init__(name="fold_batchnorm_into_conv_transpose", remove_nodes=False)


class FoldBatchNormIntoGemm(_BatchNormFolding, stock_bn.FuseBatchNormIntoGemm):
    """BatchNormalization(Gemm(x)) -> Gemm(x) with scaled weights and bias."""

    def __init__(self) -> None:
        super().__init__(name="fold_batchnorm_into_gemm", remove_nodes=False)


class FoldPadIntoConv(stock_pad.FuseConvPad):
    """Conv(Pad(x)) -> Conv(x) with the spatial pads added to the Conv's ``pads``.

    Only zero constant padding of the spatial axes folds (a Conv pads with zeros).
    """

    def __init__(self) -> None:
        stock_pad._FuseConvPadBase.__init__(self)
        self.name = "fold_pad_into_conv"
        self._pads_list: list[int] = []

    def rewrite(self, op: Any, x: ir.Value, pad: ir.Value, conv: ir.Value) -> ir.Value:
        conv_node = conv.producer()
        assert conv_node is not None
        rank = len(self._pads_list) // 2
        added = self._pads_list[2:rank] + self._pads_list[rank + 2 :]
        attributes = conv_node.attributes.copy()
        if "pads" in attributes:
            added = [a + b for a, b in zip(attributes["pads"].as_ints(), added)]
        attributes.add(ir.AttrInt64s("pads", added))
        return op.op("Conv", x, *conv_node.inputs[1:], **attributes)

    def check(self, context: Any, x: ir.Value, pad: ir.Value, conv: ir.Value) -> MatchResult:
        result = MatchResult()
        pad_node, conv_node = pad.producer(), conv.producer()
        assert pad_node is not None and conv_node is not None
        prefix = f"Pad '{pad_node.name}' not folded into Conv '{conv_node.name}'"
        mode = pad_node.attributes.get_string("mode", "constant")
        if mode != "constant":
            return result.fail(f"{prefix}: mode is '{mode}', a Conv only pads with zeros")
        if len(pad_node.inputs) < 2 or pad_node.inputs[1] is None:
            return result.fail(f"{prefix}: pads are an attribute (Pad before opset 11)")
        reason = _first_refusal(
            [
                sole_consumer_refusal(pad, conv_node),
                constant_refusal(pad_node.inputs[1], "the pads input", context.model),
                constant_refusal(_input(pad_node, 2), "the pad value", context.model),
                constant_refusal(_input(pad_node, 3), "the axes input", context.model),
            ]
        )
        if reason:
            return result.fail(f"{prefix}: {reason}")
        fill = get_numpy_value(_input(pad_node, 2))
        if fill is not None and fill.size and float(fill.reshape(-1)[0]) != 0.0:
            value = fill.reshape(-1)[0]
            return result.fail(f"{prefix}: the pad value is {value}, a Conv pads with zeros")
        if conv_node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            return result.fail(f"{prefix}: the Conv uses auto_pad")
        pads = get_numpy_value(pad_node.inputs[1])
        assert pads is not None
        rank = x.shape.rank() if x.shape is not None else len(pads) // 2
        axes_value = get_numpy_value(_input(pad_node, 3))
        axes = [int(a) % rank for a in axes_value] if axes_value is not None else range(rank)
        if len(pads) != 2 * len(axes):
            return result.fail(f"{prefix}: {len(pads)} pads for {len(axes)} axes")
        self._pads_list = stock_pad.fill_pads_with_axes(pads.tolist(), list(axes), rank)
        if any(self._pads_list[:2] + self._pads_list[rank : rank + 2]):
            return result.fail(f"{prefix}: it pads the batch or channel axis")
        if any(p < 0 for p in self._pads_list):
            return result.fail(f"{prefix}: negative pads crop the input")
        return result


CONV_BN_RULES = (
    FoldBatchNormIntoConv.rule(),
    FoldBatchNormIntoConvTranspose.rule(),
    FoldBatchNormIntoGemm.rule(),
    FoldPadIntoConv.rule(),
)

CONV_BN_PASSES: list[GraphPass] = [RewritePass("fold_batchnorm_and_pad", CONV_BN_RULES)]
