"""Precision decisions: which precision every layer of an optimized model computes in, and why.

Semantics (TensorRT's builder flags and layer precision constraints):

* ``BuilderConfig.precisions`` enables reduced precisions for the whole network. Each float
  layer takes the narrowest enabled precision it supports, in the order int8, fp16, tf32, fp32
  (on a GPU the narrower kernel is the faster one; the NumPy backend emulates them exactly).
* ``BuilderConfig.layer_precisions`` requests a precision for layers by name or glob (last match
  wins). A request also enables that precision for that layer. A pattern that matches one of a
  fused layer's *origin* nodes applies to the fused layer unless the layer's own name matches
  another request; a request lost that way is logged ("Relu_5 was fused into conv1 (fp16)").
* A request that cannot be honoured (no int8 kernel for the op, no calibration scale for the
  input, a non-constant weight, fp16 overflow, ...) falls back to the next enabled precision
  with the reason in the build log and in the layer's record (``precision_reason``) in "prefer"
  mode; in "obey" mode the build fails naming the layer and the reason.
* Only float computations have a precision: layers whose outputs are integer/bool/shape tensors
  stay fp32 (nothing to reduce). tf32 only changes convolutions and matrix products.
* fp16: float32 weights are converted with overflow/subnormal detection; a layer whose weights
  would overflow, or (``fp16_overflow_fallback``) whose input or output activations exceeded
  65504 on the calibration data, stays fp32 with that reason. Every fp16 layer computes in fp32
  internally (reductions accumulate in fp32) and stores float16.
* int8: for the ops in :data:`INT8_OPS` with a constant weight (or, for MatMul between two
  activations, scales on both), given an activation scale for the quantized input(s).

:func:`decide_precisions` returns one :class:`PrecisionDecision` per node; the model itself is
rewritten by :mod:`engine.build.reformat`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.build.log import BuildLog
from engine.config import BuilderConfig, Precision, PrecisionMode
from engine.ops.registry import Attrs, TensorSpec
from engine.passes.provenance import provenance
from engine.quantize.numerics import to_fp16_checked
from engine.quantize.scales import QuantScales

STAGE = "precision"
FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
#: Preference order among enabled precisions (narrowest first).
ORDER = (Precision.INT8, Precision.FP16, Precision.TF32, Precision.FP32)
#: Ops whose arithmetic tf32 changes (tensor-core convolutions and matrix products).
TF32_OPS = frozenset(
    {"Conv", "ConvTranspose", "Gemm", "MatMul", "gie::ConvAct", "gie::GemmAct", "gie::Attention"}
)
#: Ops with int8 kernels (engine.ops.gie_quant) and the gie op they become.
INT8_OPS: dict[str, str] = {
    "Conv": "QConv",
    "gie::ConvAct": "QConv",
    "Gemm": "QGemm",
    "gie::GemmAct": "QGemm",
    "MatMul": "QGemm",
}
#: Inputs that keep float32 whatever the layer's precision (ONNX fixes their type).
FLOAT32_ONLY_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}),
    "Upsample": frozenset({1}),
}


class PrecisionError(ValueError):
    """A precision request cannot be honoured in "obey" mode (the message names the layer)."""


@dataclass(frozen=True)
class PrecisionDecision:
    """How one node computes: ``chosen`` precision, the ``requested`` one (None: no request),
    ``reason`` (why ``chosen`` differs from what was requested or enabled; "" when it does
    not), ``int8_kind`` (the gie op an int8 layer becomes: QConv, QGemm or QMatMul), the
    activation ``input_scales`` (input index -> scale) of an int8 layer, and fp16 weight
    conversion notes."""

    node: str
    chosen: Precision
    requested: Precision | None = None
    reason: str = ""
    int8_kind: str = ""
    input_scales: tuple[tuple[int, float], ...] = ()
    weight_notes: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "chosen": self.chosen.value,
            "requested": None if self.requested is None else self.requested.value,
            "reason": self.reason,
            "int8_kind": self.int8_kind,
            "input_scales": [[i, s] for i, s in self.input_scales],
            "weight_notes": self.weight_notes,
        }


def qualified(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain else node.op_type


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def requested_precision(node: ir.Node, config: BuilderConfig) -> tuple[Precision | None, str]:
    """The request for ``node``: by its own name (last match), else by one of its origins.
    Returns (precision, note); the note names conflicting requests on fused origins."""
    own = config.precision_override(node.name or "")
    origin_requests: dict[str, Precision] = {}
    last: Precision | None = None  # the last layer_precisions entry matching any origin
    for pattern, precision in config.layer_precisions:
        for origin in provenance(node):
            if origin != node.name and _matches(origin, pattern):
                origin_requests[origin] = precision
                last = precision
    if own is not None:
        lost = [f"{o} ({p.value})" for o, p in origin_requests.items() if p != own]
        note = (
            f"requests for {', '.join(lost)} lost: fused into {node.name}, which runs {own.value}"
            if lost
            else ""
        )
        return own, note
    if last is None:
        return None, ""
    note = ""
    if len(set(origin_requests.values())) > 1:
        parts = ", ".join(f"{o} ({p.value})" for o, p in origin_requests.items())
        note = (
            f"origins request different precisions ({parts}); the last request wins: {last.value}"
        )
    return last, note


class _Context:
    """What the checks need: value specs, constants and consumers of the model."""

    def __init__(
        self, model: ir.Model, specs: Mapping[ir.Value, TensorSpec], scales: QuantScales
    ) -> None:
        self.specs = specs
        self.scales = scales
        self.constants = {
            name: v for name, v in model.graph.initializers.items() if v.const_value is not None
        }

    def dtype(self, value: ir.Value | None) -> ir.DataType | None:
        if value is None:
            return None
        spec = self.specs.get(value)
        if spec is not None and spec.dtype is not None:
            return spec.dtype
        return value.dtype

    def is_float(self, value: ir.Value | None) -> bool:
        return self.dtype(value) in FLOAT_TYPES

    def constant(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None or value.name not in self.constants:
            return None
        tensor = self.constants[value.name or ""].const_value
        return None if tensor is None else tensor.numpy()


def is_float_layer(node: ir.Node, ctx: _Context) -> bool:
    """A layer with a float output computed from at least one float input."""
    return any(ctx.is_float(v) for v in node.outputs) and any(ctx.is_float(v) for v in node.inputs)


def _int8_kind_and_inputs(node: ir.Node, ctx: _Context) -> tuple[str, tuple[int, ...], str | None]:
    """(gie op, indices of inputs quantized with activation scales, refusal or None)."""
    op = qualified(node)
    if op not in INT8_OPS:
        return "", (), f"no int8 kernel for {op}"
    attrs = Attrs.from_node(node)
    inputs = list(node.inputs)
    weight = inputs[1] if len(inputs) > 1 else None
    if op in ("Conv", "gie::ConvAct"):
        x = ctx.specs.get(inputs[0]) if inputs[0] is not None else None
        if x is not None and x.rank is not None and x.rank != 4:
            return "", (), f"int8 convolution is 2-D only (input rank {x.rank})"
        if ctx.constant(weight) is None:
            return "", (), "the convolution weight is not a constant"
        return "QConv", (0,), None
    kind = "Gemm" if op == "Gemm" else "MatMul" if op == "MatMul" else attrs.str("kind", "Gemm")
    if kind == "Gemm":
        if attrs.float("alpha", 1.0) != 1.0 or attrs.float("beta", 1.0) != 1.0:
            return "", (), "int8 Gemm needs alpha = beta = 1"
        if attrs.int("transA", 0):
            return "", (), "int8 Gemm needs transA = 0"
    w = ctx.constant(weight)
    if w is None:
        if kind == "MatMul" and op == "MatMul":
            return "QMatMul", (0, 1), None
        return "", (), "the Gemm weight (B) is not a constant"
    if w.ndim != 2:
        return "", (), f"int8 Gemm/MatMul needs a 2-D weight (got {w.ndim}-D)"
    if op == "Gemm" and len(inputs) > 2 and inputs[2] is not None:
        bias = ctx.constant(inputs[2])
        n = w.shape[0] if attrs.int("transB", 0) else w.shape[1]
        if bias is None or bias.size not in (1, n):
            return "", (), "int8 Gemm needs a constant bias C of shape [N]"
    return "QGemm", (0,), None


def _fp16_check(node: ir.Node, ctx: _Context, fallback: bool) -> tuple[str | None, str]:
    """(refusal or None, weight notes) for running ``node`` in fp16."""
    notes = []
    for index, value in enumerate(node.inputs):
        if index in FLOAT32_ONLY_INPUTS.get(node.op_type, ()):
            continue
        array = ctx.constant(value)
        if array is None or array.dtype != np.float32:
            continue
        conversion = to_fp16_checked(array)[1]
        if conversion.overflow:
            return (
                f"weight '{value.name}' overflows fp16: {conversion.overflow} values with "
                f"|w| > 65504 (max {conversion.max_abs:.4g})",
                "",
            )
        if conversion.subnormal or conversion.flushed_to_zero:
            notes.append(
                f"weight '{value.name}': {conversion.subnormal} values fp16-subnormal, "
                f"{conversion.flushed_to_zero} flushed to zero"
            )
    if fallback:
        for value in [*node.inputs, *node.outputs]:
            amax = ctx.scales.overflows_fp16(value.name or "") if value is not None else None
            if amax is not None:
                return (
                    f"activation '{value.name}' overflows fp16 on the calibration data "
                    f"(max |x| = {amax:.4g} > 65504)",
                    "",
                )
    return None, "; ".join(notes)


def why_not(
    node: ir.Node, precision: Precision, ctx: _Context, config: BuilderConfig
) -> tuple[str | None, PrecisionDecision]:
    """Why ``node`` cannot compute in ``precision`` (None when it can), with the decision
    it would get."""
    name = node.name or ""
    if precision == Precision.FP32:
        return None, PrecisionDecision(name, Precision.FP32)
    if not is_float_layer(node, ctx):
        return "not a float computation (integer, bool or shape tensors)", PrecisionDecision(
            name, Precision.FP32
        )
    if precision == Precision.TF32:
        if qualified(node) not in TF32_OPS:
            return "tf32 only changes convolutions and matrix products", PrecisionDecision(
                name, Precision.FP32
            )
        return None, PrecisionDecision(name, Precision.TF32)
    if precision == Precision.FP16:
        fixed = [a for a in ("to", "dtype", "output_dtype") if a in node.attributes]
        if fixed:
            return f"the op fixes its output type (attribute '{fixed[0]}')", PrecisionDecision(
                name, Precision.FP32
            )
        refusal, notes = _fp16_check(node, ctx, config.fp16_overflow_fallback)
        return refusal, PrecisionDecision(name, Precision.FP16, weight_notes=notes)
    kind, quantized, refusal = _int8_kind_and_inputs(node, ctx)
    if refusal is not None:
        return refusal, PrecisionDecision(name, Precision.FP32)
    scales = []
    for index in quantized:
        value = node.inputs[index]
        scale = ctx.scales.scale(value.name or "") if value is not None else None
        if scale is None:
            what = "the model has no Q/DQ" if ctx.scales.explicit else "not calibrated"
            return (
                f"no int8 scale for input '{value.name if value else '?'}' ({what})",
                PrecisionDecision(name, Precision.FP32),
            )
        scales.append((index, scale))
    return None, PrecisionDecision(name, Precision.INT8, int8_kind=kind, input_scales=tuple(scales))


def decide_precisions(
    model: ir.Model,
    specs: Mapping[ir.Value, TensorSpec],
    config: BuilderConfig,
    scales: QuantScales,
    log: BuildLog,
) -> dict[str, PrecisionDecision]:
    """One decision per node of ``model`` (by node name); see the module docstring.

    ``specs`` are the value specs at the optimization shapes (dtypes decide which layers are
    float computations). Raises :class:`PrecisionError` for a refused request in obey mode.
    """
    ctx = _Context(model, specs, scales)
    enabled = set(config.precisions) | {Precision.FP32}
    if scales.explicit:
        enabled.add(Precision.INT8)
    decisions: dict[str, PrecisionDecision] = {}
    for node in model.graph:
        name = node.name or ""
        requested, note = requested_precision(node, config)
        if note:
            log.add(STAGE, note, name)
        order = [p for p in ORDER if p in enabled]
        refusals: list[str] = []
        decision: PrecisionDecision | None = None
        if requested is not None:
            refusal, candidate = why_not(node, requested, ctx, config)
            if refusal is None:
                decision = candidate
            else:
                if config.precision_mode == PrecisionMode.OBEY:
                    raise PrecisionError(
                        f"layer {name}: {requested.value} requested but {refusal} "
                        "(precision mode is obey)"
                    )
                refusals.append(f"{requested.value} requested but {refusal}")
                order = [p for p in order if ORDER.index(p) > ORDER.index(requested)]
        if decision is None:
            for precision in order:
                refusal, candidate = why_not(node, precision, ctx, config)
                if refusal is None:
                    decision = candidate
                    break
                if is_float_layer(node, ctx) and precision != Precision.TF32:
                    refusals.append(f"{precision.value}: {refusal}")
        assert decision is not None  # fp32 always succeeds
        reason = "; ".join(refusals)
        decision = PrecisionDecision(
            name,
            decision.chosen,
            requested,
            reason,
            decision.int8_kind,
            decision.input_scales,
            decision.weight_notes,
        )
        decisions[name] = decision
        if reason and (requested is not None or qualified(node) in INT8_OPS):
            log.add(STAGE, f"runs {decision.chosen.value}: {reason}", name)
        if decision.weight_notes:
            log.add(STAGE, f"fp16 weights: {decision.weight_notes}", name)
    counts: dict[str, int] = {}
    for decision in decisions.values():
        counts[decision.chosen.value] = counts.get(decision.chosen.value, 0) + 1
    mix = ", ".join(f"{counts[p.value]} {p.value}" for p in ORDER if p.value in counts)
    source = f" (int8 scales: {scales.source})" if scales.source else ""
    log.add(STAGE, f"layer precisions: {mix}{source}")
    return decisions


__all__ = [
    "FLOAT32_ONLY_INPUTS",
    "INT8_OPS",
    "TF32_OPS",
    "PrecisionDecision",
    "PrecisionError",
    "decide_precisions",
    "is_float_layer",
    "requested_precision",
    "why_not",
]
