"""Epilogue fusion: Conv / Gemm / MatMul+bias followed by an activation and a residual add.

Two passes:

``lower_conv_to_conv_act``
    Every Conv becomes a ``gie::ConvAct`` with no epilogue (``auto_pad`` resolved to explicit
    pads): ConvAct is the engine's convolution layer, so the builder has one conv layer type.
``fuse_epilogue``
    Grows ConvAct/GemmAct one op at a time, each absorption a recorded step:

    * ``fuse_<producer>_<activation>``: an activation applied to the producer's output.
      Producers: ``conv`` (ConvAct without activation), ``gemm`` (Gemm), ``gemm_act``
      (GemmAct without activation), ``matmul_bias`` / ``matmul_bias_swapped`` (MatMul + Add of
      a constant 1-D bias on the last axis, either Add operand order). Activations: relu,
      clip (constant bounds, Relu6 included), sigmoid, silu / silu_swapped (x * Sigmoid(x)),
      hardswish, leaky_relu, gelu (the Gelu op), gelu_erf and gelu_tanh (the exporters'
      decomposed forms), tanh.
    * ``fuse_<producer>_residual_<add|sum>[_swapped]``: an Add (or 2-input Sum) of the
      producer's output and a same-shaped tensor. Producers: conv, gemm, gemm_act. An
      existing activation gives ``residual_before_activation=0`` (act(y) + r); otherwise 1, so
      an activation absorbed later gives act(y + r), the ResNet form.

Every refusal names the nodes ("Relu 'r1' not fused into ConvAct 'c1': the ConvAct output 'y'
is also used by MaxPool 'p1'").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._ir_utils import get_numpy_value
from onnxscript.rewriter._rewrite_rule import RewriteRule, RewriteRuleClassBase

from engine.ops.conv import window_attrs, window_geometry
from engine.ops.registry import GIE_DOMAIN, Attrs
from engine.ops.shape_inference import infer_specs, value_dims
from engine.passes.conv_bn import constant_refusal
from engine.passes.manager import GraphPass
from engine.passes.rewrite import RewritePass


def _attr_values(node: ir.Node) -> dict[str, Any]:
    return {name: attr.value for name, attr in node.attributes.items()}


def _padded(inputs: Any, count: int) -> list[ir.Value | None]:
    values = list(inputs)
    return values + [None] * (count - len(values))


def _internal_refusal(context: Any, root: ir.Node) -> str | None:
    """Why the matched nodes other than ``root`` cannot be removed (None when they can)."""
    matched = set(context.nodes)
    for node in context.nodes:
        if node is root:
            continue
        for value in node.outputs:
            if value.is_graph_output():
                return f"the {node.op_type} output '{value.name}' is a graph output"
            for user, _ in value.uses():
                if user not in matched:
                    return (
                        f"the {node.op_type} output '{value.name}' is also used by "
                        f"{user.op_type} '{user.name}'"
                    )
    return None


def _close(value: ir.Value | None, expected: float) -> bool:
    array = get_numpy_value(value)
    return (
        array is not None and array.size == 1 and abs(float(array.reshape(-1)[0]) - expected) < 1e-3
    )


class LowerConvToConvAct(RewriteRuleClassBase):
    """Conv(X, W, [B]) -> gie::ConvAct(X, W, [B]) with explicit pads and no epilogue."""

    def __init__(self) -> None:
        super().__init__(name="conv_to_conv_act")

    def pattern(self, op: Any, x: ir.Value) -> ir.Value:
        return op.Conv(x, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context: Any, x: ir.Value, y: ir.Value) -> MatchResult:
        conv = y.producer()
        assert conv is not None
        prefix = f"Conv '{conv.name}' not lowered to ConvAct"
        auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
        spatial = x.shape is not None and all(isinstance(d, int) for d in x.shape[2:])
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") and not spatial:
            return MatchResult().fail(
                f"{prefix}: auto_pad {auto_pad} needs the spatial input shape, which is unknown"
            )
        if _kernel(conv) is None:
            return MatchResult().fail(f"{prefix}: the kernel shape is unknown")
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, y: ir.Value) -> ir.Value:
        conv = y.producer()
        kernel = _kernel(conv) if conv is not None else None
        assert conv is not None and kernel is not None
        attributes = _attr_values(conv)
        spatial = len(kernel)
        kernel, strides, dilations, pads, auto_pad = window_attrs(
            Attrs(attributes), spatial, kernel
        )
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            in_shape = [int(d) for d in x.shape[2:]]
            _, begins, ends = window_geometry(in_shape, kernel, strides, dilations, None, auto_pad)
            pads = begins + ends
        elif auto_pad == "VALID" or not pads:
            pads = [0] * (2 * spatial)
        attributes.pop("auto_pad", None)
        attributes.update(kernel_shape=kernel, strides=strides, dilations=dilations, pads=pads)
        attributes.setdefault("group", 1)
        return op.op("ConvAct", *conv.inputs, _domain=GIE_DOMAIN, **attributes)


def _kernel(conv: ir.Node) -> list[int] | None:
    """The Conv's kernel shape (attribute, else the weight's spatial dims; None when unknown)."""
    if "kernel_shape" in conv.attributes:
        return list(conv.attributes.get_ints("kernel_shape"))
    weight = conv.inputs[1]
    dims = list(weight.shape)[2:] if weight is not None and weight.shape is not None else None
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    return [int(d) for d in dims]


def _producer_pattern(op: Any, kind: str, a: ir.Value, bias: ir.Value) -> ir.Value:
    """The producer part of a pattern; its output is bound to ``y`` (MatMul's to ``y_mm``)."""
    if kind == "conv":
        return op.ConvAct(a, _domain=GIE_DOMAIN, _allow_other_inputs=True, _outputs=["y"])
    if kind == "gemm":
        return op.Gemm(a, _allow_other_inputs=True, _outputs=["y"])
    if kind == "gemm_act":
        return op.GemmAct(a, _domain=GIE_DOMAIN, _allow_other_inputs=True, _outputs=["y"])
    matmul = op.MatMul(a, _allow_other_inputs=True, _outputs=["y_mm"])
    if kind == "matmul_bias":
        return op.Add(matmul, bias, _outputs=["y"])
    return op.Add(bias, matmul, _outputs=["y"])


def _producer_refusal(
    kind: str, node: ir.Node, bias: ir.Value | None, model: ir.Model
) -> str | None:
    """Producer-specific conditions (bias constant and 1-D for MatMul+Add)."""
    if kind in ("conv", "gemm_act") and node.attributes.get_string("activation", ""):
        return f"{node.op_type} '{node.name}' already has an activation"
    if not kind.startswith("matmul"):
        return None
    reason = constant_refusal(bias, "the bias", model)
    if reason:
        return reason
    array = get_numpy_value(bias)
    weight = node.inputs[1]
    assert array is not None
    if array.ndim != 1:
        return f"the bias has shape {list(array.shape)}, not a 1-D bias on the last axis"
    if weight is None or weight.shape is None or weight.shape.rank() < 2:
        return "the MatMul's second operand is not a matrix of known shape"
    columns = weight.shape[-1]
    if isinstance(columns, int) and array.shape[0] != columns:
        return f"the bias has {array.shape[0]} entries for {columns} MatMul columns"
    return None


def _producer_inputs(kind: str, node: ir.Node, bias: ir.Value | None) -> tuple[list, dict]:
    """Inputs (without residual) and attributes of the fused op for this producer."""
    if kind == "conv" or kind == "gemm_act":
        return _padded(node.inputs, 4)[:3], _attr_values(node)
    if kind == "gemm":
        attributes = _attr_values(node)
        attributes["kind"] = "Gemm"
        return _padded(node.inputs, 3)[:3], attributes
    return [node.inputs[0], node.inputs[1], bias], {"kind": "MatMul"}


def _fused_op(kind: str) -> str:
    return "ConvAct" if kind == "conv" else "GemmAct"


Activation = tuple[str, Callable[..., ir.Value]]

#: rule suffix -> (gie activation, pattern builder(op, y, c) -> activation output), where c
#: holds five pattern variables for the constants of the decomposed forms.
ACTIVATION_PATTERNS: dict[str, Activation] = {
    "relu": ("Relu", lambda op, y, c: op.Relu(y, _outputs=["out"])),
    "clip": ("Clip", lambda op, y, c: op.Clip(y, _allow_other_inputs=True, _outputs=["out"])),
    "sigmoid": ("Sigmoid", lambda op, y, c: op.Sigmoid(y, _outputs=["out"])),
    "silu": ("SiLU", lambda op, y, c: op.Mul(y, op.Sigmoid(y), _outputs=["out"])),
    "silu_swapped": ("SiLU", lambda op, y, c: op.Mul(op.Sigmoid(y), y, _outputs=["out"])),
    "hardswish": ("HardSwish", lambda op, y, c: op.HardSwish(y, _outputs=["out"])),
    "leaky_relu": ("LeakyRelu", lambda op, y, c: op.LeakyRelu(y, _outputs=["out"])),
    "gelu": ("GELU", lambda op, y, c: op.Gelu(y, _outputs=["out"])),
    # torch.onnx below opset 20: Mul(Mul(y, Add(Erf(Div(y, sqrt 2)), 1)), 0.5)
    "gelu_erf": (
        "GELU",
        lambda op, y, c: op.Mul(
            op.Mul(y, op.Add(op.Erf(op.Div(y, c[0])), c[1])), c[2], _outputs=["out"]
        ),
    ),
    # GPT-2: Mul(Mul(0.5, y), Add(1, Tanh(Mul(sqrt(2/pi), Add(y, Mul(0.044715, Pow(y, 3)))))))
    "gelu_tanh": (
        "GELU_tanh",
        lambda op, y, c: op.Mul(
            op.Mul(c[2], y),
            op.Add(c[1], op.Tanh(op.Mul(c[0], op.Add(y, op.Mul(c[3], op.Pow(y, c[4])))))),
            _outputs=["out"],
        ),
    ),
    "tanh": ("Tanh", lambda op, y, c: op.Tanh(y, _outputs=["out"])),
}

#: Expected values of the constants c[0..4] of the decomposed forms.
_CONSTANTS: dict[str, tuple[float, ...]] = {
    "gelu_erf": (float(np.sqrt(2.0)), 1.0, 0.5),
    "gelu_tanh": (float(np.sqrt(2.0 / np.pi)), 1.0, 0.5, 0.044715, 3.0),
}


def _activation_attrs(
    suffix: str, node: ir.Node, constants: tuple[ir.Value | None, ...], model: ir.Model
) -> dict[str, Any] | str:
    """The epilogue attributes of activation node ``node``, or why it cannot be fused."""
    name = ACTIVATION_PATTERNS[suffix][0]
    if suffix in _CONSTANTS:
        for value, expected in zip(constants, _CONSTANTS[suffix]):
            if not _close(value, expected):
                label = value.name if value is not None else "?"
                return f"constant '{label}' is not {expected:g}, so this is not a GELU"
        return {"activation": name}
    if suffix == "leaky_relu":
        return {"activation": name, "activation_alpha": node.attributes.get_float("alpha", 0.01)}
    if suffix == "gelu":
        tanh = node.attributes.get_string("approximate", "none") == "tanh"
        return {"activation": "GELU_tanh" if tanh else "GELU"}
    if suffix != "clip":
        return {"activation": name}
    bounds: dict[str, Any] = {"activation": "Clip"}
    if len(node.inputs) <= 1 and ("min" in node.attributes or "max" in node.attributes):
        for key in ("min", "max"):
            if key in node.attributes:
                bounds[key] = node.attributes.get_float(key)
        return bounds
    for key, value in zip(("min", "max"), list(node.inputs)[1:3]):
        if value is None:
            continue
        reason = constant_refusal(value, f"the {key} bound", model)
        if reason:
            return reason
        array = get_numpy_value(value)
        assert array is not None
        bounds[key] = float(array.reshape(-1)[0])
    return bounds


class FuseActivation(RewriteRuleClassBase):
    """Activation(producer(...)) -> gie::ConvAct / gie::GemmAct with that activation."""

    def __init__(self, producer: str, suffix: str) -> None:
        super().__init__(name=f"fuse_{producer}_{suffix}", remove_nodes=False)
        self.producer = producer
        self.suffix = suffix

    def pattern(self, op: Any, a: Any, bias: Any, c0: Any, c1: Any, c2: Any, c3: Any, c4: Any):
        y = _producer_pattern(op, self.producer, a, bias)
        return ACTIVATION_PATTERNS[self.suffix][1](op, y, (c0, c1, c2, c3, c4))

    def _parts(self, y: ir.Value, out: ir.Value, y_mm: ir.Value | None = None):
        producer = (y_mm if self.producer.startswith("matmul") else y).producer()
        root = out.producer()
        assert producer is not None and root is not None
        return producer, root

    def check(self, context: Any, y: ir.Value, out: ir.Value, **bindings: Any) -> MatchResult:
        result = MatchResult()
        producer, root = self._parts(y, out, bindings.get("y_mm"))
        prefix = f"{root.op_type} '{root.name}' not fused into {producer.op_type} '{producer.name}'"
        bias = bindings.get("bias")
        reason = _internal_refusal(context, root) or _producer_refusal(
            self.producer, producer, bias, context.model
        )
        constants = tuple(bindings.get(f"c{i}") for i in range(5))
        attrs = _activation_attrs(self.suffix, root, constants, context.model)
        reason = reason or (attrs if isinstance(attrs, str) else None)
        if reason:
            return result.fail(f"{prefix}: {reason}")
        assert isinstance(attrs, dict)
        self._epilogue = attrs  # read by rewrite, which runs right after a successful check
        return result

    def rewrite(self, op: Any, y: ir.Value, out: ir.Value, **bindings: Any) -> ir.Value:
        producer, _ = self._parts(y, out, bindings.get("y_mm"))
        inputs, attributes = _producer_inputs(self.producer, producer, bindings.get("bias"))
        attributes.update(self._epilogue)
        residual = _padded(producer.inputs, 4)[3] if self.producer in ("conv", "gemm_act") else None
        if residual is not None:
            attributes["residual_before_activation"] = 1
        return _emit(op, _fused_op(self.producer), [*inputs, residual], attributes)


def _emit(op: Any, op_type: str, inputs: list[ir.Value | None], attributes: dict) -> ir.Value:
    """The fused gie node (trailing omitted optional inputs dropped)."""
    while inputs and inputs[-1] is None:
        inputs.pop()
    return op.op(op_type, *inputs, _domain=GIE_DOMAIN, **attributes)


def _dims(model: ir.Model, values: tuple[ir.Value, ...]) -> list[tuple | None]:
    """Shapes of ``values``: declared ones, else the engine's shape inference (dims may be
    symbolic names; None when the rank is unknown)."""
    declared = [value_dims(v) for v in values]
    if all(d is not None and all(x is not None for x in d) for d in declared):
        return declared
    specs = infer_specs(model).specs
    return [specs[v].shape if v in specs else d for v, d in zip(values, declared)]


def _broadcast_refusal(model: ir.Model, y: ir.Value, residual: ir.Value) -> str | None:
    """Why ``residual`` may not be added inside the kernel (it must not grow the output)."""
    ys, rs = _dims(model, (y, residual))
    if ys is None or rs is None or None in ys or None in rs:
        unknown = residual.name if rs is None or None in rs else y.name
        return f"the shape of '{unknown}' is unknown"
    if len(rs) > len(ys) or any(r != 1 and r != d for r, d in zip(rs[::-1], ys[::-1])):
        return (
            f"the residual '{residual.name}' of shape {list(rs)} does not broadcast to {list(ys)}"
        )
    return None


class FuseResidual(RewriteRuleClassBase):
    """Add(producer(...), r) (or 2-input Sum, either order) -> fused op with residual r."""

    def __init__(self, producer: str, add_op: str, swapped: bool) -> None:
        suffix = "_swapped" if swapped else ""
        name = f"fuse_{producer}_residual_{add_op.lower()}{suffix}"
        super().__init__(name=name, remove_nodes=False)
        self.producer, self.add_op, self.swapped = producer, add_op, swapped

    def pattern(self, op: Any, a: Any, r: Any) -> ir.Value:
        y = _producer_pattern(op, self.producer, a, None)
        operands = (r, y) if self.swapped else (y, r)
        return getattr(op, self.add_op)(*operands, _outputs=["out"])

    def check(self, context: Any, y: ir.Value, r: ir.Value, out: ir.Value, **_: Any) -> MatchResult:
        result = MatchResult()
        producer, root = y.producer(), out.producer()
        assert producer is not None and root is not None
        prefix = f"{root.op_type} '{root.name}' not fused into {producer.op_type} '{producer.name}'"
        has_residual = len(producer.inputs) > 3 and producer.inputs[3] is not None
        if self.producer != "gemm" and has_residual:
            return result.fail(f"{prefix}: it already has a residual input")
        reason = _internal_refusal(context, root) or _broadcast_refusal(context.model, y, r)
        if r is y:
            reason = f"both operands are the {producer.op_type} output"
        if reason:
            return result.fail(f"{prefix}: {reason}")
        return result

    def rewrite(self, op: Any, y: ir.Value, r: ir.Value, out: ir.Value, **_: Any) -> ir.Value:
        producer = y.producer()
        assert producer is not None
        inputs, attributes = _producer_inputs(self.producer, producer, None)
        activation = attributes.get("activation", "")
        attributes["residual_before_activation"] = 0 if activation else 1
        return _emit(op, _fused_op(self.producer), [*inputs, r], attributes)


CONV_LOWERING_RULES: tuple[RewriteRule, ...] = (LowerConvToConvAct.rule(),)

_ACTIVATION_PRODUCERS = ("conv", "gemm", "gemm_act", "matmul_bias", "matmul_bias_swapped")
_RESIDUAL_PRODUCERS = ("conv", "gemm", "gemm_act")

EPILOGUE_RULES: tuple[RewriteRule, ...] = (
    *(
        FuseActivation.rule(producer, suffix)
        for producer in _ACTIVATION_PRODUCERS
        for suffix in ACTIVATION_PATTERNS
    ),
    *(
        FuseResidual.rule(producer, add_op, swapped)
        for producer in _RESIDUAL_PRODUCERS
        for add_op in ("Add", "Sum")
        for swapped in (False, True)
    ),
)

EPILOGUE_PASSES: list[GraphPass] = [
    RewritePass("lower_conv_to_conv_act", CONV_LOWERING_RULES),
    RewritePass("fuse_epilogue", EPILOGUE_RULES),
]
