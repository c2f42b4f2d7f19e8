"""Materialize precision decisions in the model: int8 layers, fp16 weights, explicit conversions.

After :func:`engine.build.precision.decide_precisions`, :func:`apply_precisions` rewrites the
(optimized) model in place so the plan shows every conversion as a layer of its own:

* int8 layers become ``gie::QConv`` / ``gie::QGemm`` / ``gie::QMatMul`` (engine.ops.gie_quant)
  with int8 per-channel weights, an int32 bias and float32 scales as initializers. An int8
  layer writes int8 when its output has a scale and (explicit quantization) the model
  quantized that tensor or (calibration) every consumer reads it as an int8 input; otherwise it
  writes float directly (float16 when every consumer is fp16 and the values fit float16, else
  float32).
* fp16 layers keep their op; their float32 weights get float16 copies (``<name>::fp16``) and
  their float outputs are float16.
* Every value is stored in its producer's format (fp32, fp16 or int8 at a scale). A consumer
  that needs another format reads a converted copy named ``<value>::<format>``, made once by
  *reformat* layers placed right after the producer: ``Cast`` between float32 and float16,
  ``QuantizeLinear`` into int8, ``DequantizeLinear`` out of it (int8 -> fp16 goes through fp32).
  Graph outputs keep their name and declared dtype (the producer's copy is renamed).
* Explicit quantization (QAT): a tensor the model quantized is stored int8 even when its
  producer is a float layer; the ``QuantizeLinear`` after that producer is an *explicit Q/DQ*
  layer (role ``explicit_qdq``, with the reason) and float consumers read its dequantized
  copy, so the engine computes what the Q/DQ model computes.

Every node gets ``gie.precision`` metadata; conversion layers get ``gie.role`` and ``gie.reason``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from engine.build.int8_layers import int8_layer
from engine.build.precision import FLOAT32_ONLY_INPUTS, PrecisionDecision
from engine.config import Precision
from engine.ops.registry import GIE_DOMAIN, TensorSpec
from engine.passes.provenance import PROVENANCE_KEY, RULE_KEY, provenance, set_provenance
from engine.quantize.scales import QuantScales

PRECISION_KEY = "gie.precision"
ROLE_KEY = "gie.role"
REASON_KEY = "gie.reason"
FP32, FP16, INT8 = "fp32", "fp16", "int8"
_DTYPES = {FP32: ir.DataType.FLOAT, FP16: ir.DataType.FLOAT16, INT8: ir.DataType.INT8}


@dataclass
class ReformatStats:
    """What the rewrite made: int8 layers, fp16 weight copies, conversion and explicit Q/DQ
    layers (by name)."""

    int8_layers: list[str] = field(default_factory=list)
    fp16_weights: list[str] = field(default_factory=list)
    reformats: list[str] = field(default_factory=list)
    explicit_qdq: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Format:
    kind: str  # fp32 | fp16 | int8
    scale: float | None = None


def _float_kind(dtype: ir.DataType | None) -> str | None:
    return {ir.DataType.FLOAT: FP32, ir.DataType.FLOAT16: FP16}.get(dtype)  # type: ignore[arg-type]


class _Rewriter:
    def __init__(
        self,
        model: ir.Model,
        decisions: Mapping[str, PrecisionDecision],
        specs: Mapping[ir.Value, TensorSpec],
        scales: QuantScales,
    ) -> None:
        self.model = model
        self.graph = model.graph
        self.decisions = decisions
        self.specs = specs
        self.scales = scales
        self.stats = ReformatStats()
        self.names = {v.name for v in self.graph.initializers.values()}
        for node in self.graph:
            self.names.update(v.name for v in node.outputs)
        self.names.update(v.name for v in self.graph.inputs)
        self.format: dict[ir.Value, _Format] = {}
        self.converted: dict[tuple[ir.Value, _Format], ir.Value] = {}
        self.scale_constants: dict[float, ir.Value] = {}
        self.zero_point: ir.Value | None = None

    # ------------------------------------------------------------------ helpers

    def unique(self, base: str) -> str:
        name, suffix = base, 1
        while name in self.names:
            suffix += 1
            name = f"{base}_{suffix}"
        self.names.add(name)
        return name

    def constant(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.unique(base)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape = ir.Shape(array.shape)
        value.dtype = ir.tensor(array).dtype
        self.graph.register_initializer(value)
        return value

    def scale_value(self, scale: float) -> ir.Value:
        scale = float(np.float32(scale))
        if scale not in self.scale_constants:
            self.scale_constants[scale] = self.constant(
                f"scale_{len(self.scale_constants)}", np.array(scale, dtype=np.float32)
            )
        return self.scale_constants[scale]

    def zero(self) -> ir.Value:
        if self.zero_point is None:
            self.zero_point = self.constant("zero_point_int8", np.array(0, dtype=np.int8))
        return self.zero_point

    def dtype(self, value: ir.Value) -> ir.DataType | None:
        spec = self.specs.get(value)
        return spec.dtype if spec is not None and spec.dtype is not None else value.dtype

    def precision_of(self, node: ir.Node) -> Precision:
        decision = self.decisions.get(node.name or "")
        return decision.chosen if decision is not None else Precision.FP32

    def const_array(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None or value.const_value is None or not value.is_initializer():
            return None
        return value.const_value.numpy()

    # ------------------------------------------------------------------ requirements

    def required(self, node: ir.Node, index: int, value: ir.Value) -> str | None:
        """The format ``node`` needs for float input ``index``: fp32/fp16/int8, "float" (any
        float), "any" (Shape/Size read no data) or None (not a float input)."""
        if node.meta.get("gie.required") is not None:
            return node.meta["gie.required"].get(index)
        if self.producer_format(value) is None:
            return None  # not a float (or quantized float) value
        if node.domain == "" and node.op_type in ("Shape", "Size"):
            return "any"
        precision = self.precision_of(node)
        if precision == Precision.FP16 and index not in FLOAT32_ONLY_INPUTS.get(node.op_type, ()):
            return FP16
        return FP32

    # ------------------------------------------------------------------ int8 layers

    def float_output_kind(self, value: ir.Value) -> str:
        consumers = [use.node for use in value.uses()]
        fp16 = all(self.precision_of(n) == Precision.FP16 for n in consumers)
        overflows = self.scales.overflows_fp16(value.name or "") is not None
        if consumers and fp16 and not overflows and not value.is_graph_output():
            return FP16
        return FP32

    def wants_int8_output(self, value: ir.Value) -> float | None:
        """The int8 scale the int8 layer writing ``value`` quantizes to, or None (float)."""
        scale = self.scales.scale(value.name or "")
        if scale is None:
            return None
        if self.scales.explicit:
            return scale
        uses = list(value.uses())
        if not uses or value.is_graph_output():
            return None
        for use in uses:
            decision = self.decisions.get(use.node.name or "")
            if decision is None or decision.chosen != Precision.INT8:
                return None
            if use.idx not in dict(decision.input_scales):
                return None
        return scale

    def to_int8_layer(self, node: ir.Node, decision: PrecisionDecision) -> None:
        """Replace ``node`` by its gie::Q* layer (engine.build.int8_layers), output name kept."""
        out = node.outputs[0]
        y_scale = self.wants_int8_output(out)
        out_kind = INT8 if y_scale is not None else self.float_output_kind(out)
        layer = int8_layer(
            node, decision, _DTYPES[out_kind], y_scale, self.scales, self.constant, self.scale_value
        )
        new = ir.node(
            decision.int8_kind,
            layer.inputs,
            attributes=layer.attributes,  # type: ignore[arg-type]
            domain=GIE_DOMAIN,
            name=node.name,
            num_outputs=1,
        )
        for key in (PROVENANCE_KEY, RULE_KEY):
            if key in node.metadata_props:
                new.metadata_props[key] = node.metadata_props[key]
        if PROVENANCE_KEY not in new.metadata_props:
            set_provenance(new, provenance(node))
        new.meta["gie.required"] = {
            i: (_Format(kind, scale) if kind != "float" else "float")
            for i, (kind, scale) in layer.required.items()
        }
        new_out = new.outputs[0]
        new_out.shape = out.shape
        new_out.dtype = _DTYPES[out_kind]
        self.graph.insert_after(node, new)
        name = out.name
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        self.graph.remove(node, safe=True)
        new_out.name = name
        self.format[new_out] = _Format(out_kind, y_scale)
        self.stats.int8_layers.append(node.name or "")
        if GIE_DOMAIN not in self.model.opset_imports:
            self.model.opset_imports[GIE_DOMAIN] = 1

    # ------------------------------------------------------------------ fp16 layers

    def to_fp16_layer(self, node: ir.Node, copies: dict[str, ir.Value]) -> None:
        skip = FLOAT32_ONLY_INPUTS.get(node.op_type, frozenset())
        for index, value in enumerate(node.inputs):
            array = self.const_array(value)
            if array is None or array.dtype != np.float32 or index in skip:
                continue
            assert value is not None
            name = value.name or ""
            if name not in copies:
                copies[name] = self.constant(f"{name}::fp16", array.astype(np.float16))
                self.stats.fp16_weights.append(name)
            node.replace_input_with(index, copies[name])
        for value in node.outputs:
            if _float_kind(self.dtype(value)) == FP32:
                value.dtype = ir.DataType.FLOAT16

    # ------------------------------------------------------------------ conversions

    def producer_format(self, value: ir.Value) -> _Format | None:
        if value in self.format:
            return self.format[value]
        # A value's own dtype when set (fp16 layers set float16 on their outputs), else the
        # dtype shape inference gave it (a model that never went through engine.onnx_io.load
        # may carry no value types at all).
        dtype = value.dtype if value.producer() and value.dtype is not None else self.dtype(value)
        kind = _float_kind(dtype)
        if kind is None:
            return None
        return _Format(kind)

    def convert(self, value: ir.Value, target: _Format, role: str = "reformat") -> ir.Value:
        """``value`` in ``target`` format, through cached reformat layers."""
        source = self.producer_format(value)
        assert source is not None
        if source == target:
            return value
        key = (value, target)
        if key in self.converted:
            return self.converted[key]
        if (source.kind != FP32 and target.kind != FP32 and source.kind != target.kind) or (
            source.kind == INT8 and target.kind == INT8
        ):
            value_fp32 = self.convert(value, _Format(FP32))
            result = self.convert_step(value_fp32, value, target, role)
        else:
            result = self.convert_step(value, value, target, role)
        self.converted[key] = result
        return result

    def convert_step(
        self, source: ir.Value, origin: ir.Value, target: _Format, role: str
    ) -> ir.Value:
        """One reformat layer from ``source`` (named after ``origin``) into ``target``."""
        source_format = self.producer_format(source)
        assert source_format is not None
        base = origin.name or "value"
        if target.kind == INT8:
            assert target.scale is not None
            op, inputs, attrs = (
                "QuantizeLinear",
                [source, self.scale_value(target.scale), self.zero()],
                {},
            )
        elif source_format.kind == INT8:
            assert source_format.scale is not None
            op, inputs, attrs = (
                "DequantizeLinear",
                [source, self.scale_value(source_format.scale), self.zero()],
                {},
            )
        else:
            op, inputs, attrs = "Cast", [source], {"to": int(_DTYPES[target.kind])}
        suffix = target.kind if target.kind != INT8 or role != "reformat" else "int8"
        out_name = self.unique(f"{base}::{suffix}")
        node = ir.node(
            op,
            inputs,
            attributes=attrs,  # type: ignore[arg-type]
            name=self.unique(f"reformat:{base}:{source_format.kind}->{target.kind}"),
            num_outputs=1,
        )
        out = node.outputs[0]
        out.name = out_name
        out.shape = origin.shape
        out.dtype = _DTYPES[target.kind]
        set_provenance(node, [])
        node.metadata_props[ROLE_KEY] = role
        node.metadata_props[PRECISION_KEY] = target.kind
        node.metadata_props[REASON_KEY] = (
            f"{source_format.kind} -> {target.kind} for the consumers of '{base}'"
        )
        producer = source.producer()
        if producer is not None:
            self.graph.insert_after(producer, node)
        else:
            first = next(iter(self.graph), None)
            if first is None:
                self.graph.append(node)
            else:
                self.graph.insert_before(first, node)
        self.format[out] = target
        (self.stats.explicit_qdq if role == "explicit_qdq" else self.stats.reformats).append(
            node.name or ""
        )
        return out

    def fix_graph_outputs(self) -> None:
        for position, value in enumerate(list(self.graph.outputs)):
            source = self.producer_format(value)
            declared = _float_kind(self.dtype(value))
            if source is None or declared is None or source.kind == declared:
                continue
            name = value.name or ""
            value.name = self.unique(f"{name}::{source.kind}")
            self.names.discard(name)
            converted = self.convert(value, _Format(declared))
            self.graph.outputs[position] = converted
            converted.name = name

    def explicit_quantize(self) -> None:
        """Explicit mode: store every quantized tensor int8, whatever its producer."""
        for value in self._float_values():
            scale = self.scales.scale(value.name or "")
            current = self.producer_format(value)
            if scale is None or current is None or current.kind == INT8:
                continue
            if value.is_graph_output():
                continue
            quantized = self.convert(value, _Format(INT8, scale), role="explicit_qdq")
            producer = quantized.producer()
            assert producer is not None
            what = value.producer().op_type if value.producer() else "the graph input"
            producer.metadata_props[REASON_KEY] = (
                f"the model quantizes '{value.name}' but {what} has no int8 kernel: "
                "explicit quantize kept"
            )
            for use in list(value.uses()):
                if use.node is producer:
                    continue
                need = self.required(use.node, use.idx, value)
                if need in (FP32, FP16, "float"):
                    dequantized = self.convert(quantized, _Format(FP32), role="explicit_qdq")
                    use.node.replace_input_with(use.idx, dequantized)

    def _float_values(self) -> list[ir.Value]:
        values = [v for v in self.graph.inputs]
        for node in self.graph:
            values.extend(node.outputs)
        return [v for v in values if self.producer_format(v) is not None]

    def connect(self) -> None:
        """Give every consumer its input in the format it needs."""
        for node in list(self.graph):
            if node.metadata_props.get(ROLE_KEY):
                continue
            for index, value in enumerate(list(node.inputs)):
                if value is None or self.producer_format(value) is None:
                    continue
                if value.is_initializer() and value.producer() is None:
                    continue  # constants were converted where they are used
                need = self.required(node, index, value)
                current = self.producer_format(value)
                assert current is not None
                if need in (None, "any") or (need == "float" and current.kind != INT8):
                    continue
                if isinstance(need, _Format):
                    target = need
                else:
                    target = _Format(FP32 if need == "float" else need)
                if target != current:
                    node.replace_input_with(index, self.convert(value, target))

    # ------------------------------------------------------------------ driver

    def run(self) -> ReformatStats:
        copies: dict[str, ir.Value] = {}
        for node in list(self.graph):
            decision = self.decisions.get(node.name or "")
            precision = decision.chosen if decision is not None else Precision.FP32
            node.metadata_props[PRECISION_KEY] = precision.value
            if decision is not None and decision.reason:
                node.metadata_props[REASON_KEY] = decision.reason
            if precision == Precision.INT8 and decision is not None:
                self.to_int8_layer(node, decision)
            elif precision == Precision.FP16:
                self.to_fp16_layer(node, copies)
        for node in self.graph:
            if node.domain == GIE_DOMAIN and node.op_type in ("QConv", "QGemm", "QMatMul"):
                node.metadata_props[PRECISION_KEY] = Precision.INT8.value
                decision = self.decisions.get(node.name or "")
                if decision is not None and decision.reason:
                    node.metadata_props[REASON_KEY] = decision.reason
        if self.scales.explicit:
            self.explicit_quantize()
        self.fix_graph_outputs()
        self.connect()
        for node in self.graph:
            node.meta.pop("gie.required", None)
        self.drop_unused_initializers()
        return self.stats

    def drop_unused_initializers(self) -> None:
        """Weights an int8 layer or an fp16 copy replaced leave the model."""
        outputs = set(map(id, self.graph.outputs))
        for name, value in list(self.graph.initializers.items()):
            if not list(value.uses()) and id(value) not in outputs and not value.is_graph_input():
                del self.graph.initializers[name]


def apply_precisions(
    model: ir.Model,
    decisions: Mapping[str, PrecisionDecision],
    specs: Mapping[ir.Value, TensorSpec],
    scales: QuantScales,
) -> ReformatStats:
    """Rewrite ``model`` in place for ``decisions`` (see the module docstring)."""
    return _Rewriter(model, decisions, specs, scales).run()


__all__ = ["PRECISION_KEY", "REASON_KEY", "ROLE_KEY", "ReformatStats", "apply_precisions"]
