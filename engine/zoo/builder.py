"""Shared helpers for the zoo: a graph builder that names things the way exporters do.

:class:`GraphBuilder` collects nodes, initializers and graph inputs/outputs. Node names follow
torch.onnx's scope style (``/layer1/layer1.0/conv1/Conv``, then ``..._1`` for repeats in the
same scope) and every node output is ``<node name>_output_<i>``. Constants used as op inputs
(axes, shapes, scalars) are emitted as ``Constant`` nodes, as torch.onnx does; weights are
seeded float32 initializers named after the module parameters.

The layer helpers (:func:`conv`, :func:`batch_norm`, :func:`linear`, :func:`layer_norm`,
:func:`gelu_erf`, :func:`shape_concat`, ...) reproduce the exact node patterns exporters
emit for the corresponding PyTorch modules. :func:`make_inputs` gives seeded feeds for a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: IR version torch.onnx writes for opsets 13..17 (onnxruntime accepts it everywhere).
IR_VERSION = 8
PRODUCER = "gie-studio-zoo"

#: Metadata keys: concrete values for symbolic dims, and the vocabulary size of token inputs.
DIMS_KEY = "zoo.dims"
VOCAB_KEY = "zoo.vocab_size"

Dim = int | str
FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


class GraphBuilder:
    """Accumulates one graph; :meth:`model` turns it into a checked ``ModelProto``."""

    def __init__(self, name: str, seed: int, opset: int, doc: str = "") -> None:
        self.name = name
        self.opset = opset
        self.doc = doc
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.metadata: dict[str, str] = {}
        self._used: dict[str, int] = {}
        self._anonymous = 0

    # ------------------------------------------------------------------ names and values

    def unique(self, base: str) -> str:
        """``base`` the first time, then ``base_1``, ``base_2``... (torch.onnx's scheme)."""
        count = self._used.get(base, 0)
        self._used[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def input(self, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        """Declare a graph input."""
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        """Expose ``value`` as graph output ``name`` (renaming it, as exporters do)."""
        for node in self.nodes:
            node.output[:] = [name if o == value else o for o in node.output]
            node.input[:] = [name if i == value else i for i in node.input]
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def param(self, name: str, array: np.ndarray) -> str:
        """Add an initializer (kept in its dtype) and return its name."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def normal(self, name: str, shape: Sequence[int], std: float, mean: float = 0.0) -> str:
        """A float32 initializer drawn from N(mean, std^2)."""
        values = self.rng.normal(mean, std, size=tuple(shape)).astype(np.float32)
        return self.param(name, values)

    def uniform(self, name: str, shape: Sequence[int], low: float, high: float) -> str:
        """A float32 initializer drawn from U(low, high)."""
        values = self.rng.uniform(low, high, size=tuple(shape)).astype(np.float32)
        return self.param(name, values)

    def anonymous(self, op_type: str) -> str:
        """A torch-style name for a folded constant initializer (``onnx::MatMul_1234``)."""
        self._anonymous += 1
        return f"onnx::{op_type}_{1000 + self._anonymous}"

    # ------------------------------------------------------------------ nodes

    def ops(
        self, op_type: str, inputs: Sequence[str], scope: str = "", outputs: int = 1, **attrs: Any
    ) -> list[str]:
        """Add a node named ``<scope>/<op_type>`` (made unique); returns its output names."""
        name = self.unique(f"{scope}/{op_type}")
        names = [f"{name}_output_{i}" for i in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, **attrs))
        return names

    def op(self, op_type: str, inputs: Sequence[str], scope: str = "", **attrs: Any) -> str:
        """Add a single-output node; returns the output name."""
        return self.ops(op_type, inputs, scope, 1, **attrs)[0]

    def const(self, scope: str, value: Any, dtype: Any = None) -> str:
        """A ``Constant`` node holding ``value`` (int -> int64, float -> float32 by default)."""
        array = np.asarray(value)
        if dtype is not None:
            array = array.astype(dtype)
        elif array.dtype.kind == "f":
            array = array.astype(np.float32)
        elif array.dtype.kind in "iu":
            array = array.astype(np.int64)
        return self.op("Constant", [], scope, value=numpy_helper.from_array(array))

    # ------------------------------------------------------------------ model

    def model(self) -> onnx.ModelProto:
        """The finished model, checked with ``onnx.checker.check_model(full_check=True)``."""
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
            producer_version="1.0",
            doc_string=self.doc,
        )
        helper.set_model_props(model, self.metadata)
        onnx.checker.check_model(model, full_check=True)
        return model


# ---------------------------------------------------------------------- layer helpers


def conv(
    b: GraphBuilder,
    x: str,
    scope: str,
    pname: str,
    cin: int,
    cout: int,
    kernel: int,
    stride: int = 1,
    pad: int | None = None,
    group: int = 1,
    bias: bool = True,
    gain: float = 2.0,
) -> str:
    """``nn.Conv2d``: a Conv node with ``<pname>.weight`` (He init) and optional bias."""
    pad = kernel // 2 if pad is None else pad
    fan_in = cin // group * kernel * kernel
    inputs = [
        x,
        b.normal(f"{pname}.weight", (cout, cin // group, kernel, kernel), (gain / fan_in) ** 0.5),
    ]
    if bias:
        inputs.append(b.normal(f"{pname}.bias", (cout,), 0.05))
    return b.op(
        "Conv",
        inputs,
        scope,
        dilations=[1, 1],
        group=group,
        kernel_shape=[kernel, kernel],
        pads=[pad] * 4,
        strides=[stride, stride],
    )


def batch_norm(b: GraphBuilder, x: str, scope: str, pname: str, channels: int) -> str:
    """``nn.BatchNorm2d`` in eval mode, kept as a BatchNormalization node (not folded)."""
    inputs = [
        x,
        b.uniform(f"{pname}.weight", (channels,), 0.7, 1.2),
        b.normal(f"{pname}.bias", (channels,), 0.05),
        b.normal(f"{pname}.running_mean", (channels,), 0.05),
        b.uniform(f"{pname}.running_var", (channels,), 0.8, 1.5),
    ]
    return b.op("BatchNormalization", inputs, scope, epsilon=1e-5, momentum=0.9)


def gemm(b: GraphBuilder, x: str, scope: str, pname: str, fin: int, fout: int) -> str:
    """``nn.Linear`` on a 2-D input: Gemm with transB=1 and the [out, in] weight."""
    weight = b.normal(f"{pname}.weight", (fout, fin), fin**-0.5)
    bias = b.normal(f"{pname}.bias", (fout,), 0.05)
    return b.op("Gemm", [x, weight, bias], scope, alpha=1.0, beta=1.0, transB=1)


def linear(b: GraphBuilder, x: str, scope: str, pname: str, fin: int, fout: int) -> str:
    """``nn.Linear`` on a 3-D+ input: MatMul with a pre-transposed ``onnx::MatMul_*``
    initializer, then Add of ``<pname>.bias``."""
    weight = b.normal(b.anonymous("MatMul"), (fin, fout), fin**-0.5)
    product = b.op("MatMul", [x, weight], scope)
    return b.op("Add", [b.normal(f"{pname}.bias", (fout,), 0.05), product], scope)


def layer_norm(
    b: GraphBuilder, x: str, scope: str, pname: str, dim: int, eps: float, fused: bool
) -> str:
    """``nn.LayerNorm`` over the last axis: one LayerNormalization node (opset >= 17) or the
    opset-13 decomposition ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add."""
    weight = b.normal(f"{pname}.weight", (dim,), 0.1, mean=1.0)
    bias = b.normal(f"{pname}.bias", (dim,), 0.05)
    if fused:
        return b.op("LayerNormalization", [x, weight, bias], scope, axis=-1, epsilon=eps)
    mean = b.op("ReduceMean", [x], scope, axes=[-1], keepdims=1)
    centered = b.op("Sub", [x, mean], scope)
    squared = b.op("Pow", [centered, b.const(scope, 2.0)], scope)
    variance = b.op("ReduceMean", [squared], scope, axes=[-1], keepdims=1)
    shifted = b.op("Add", [variance, b.const(scope, eps)], scope)
    std = b.op("Sqrt", [shifted], scope)
    normed = b.op("Div", [centered, std], scope)
    scaled = b.op("Mul", [normed, weight], scope)
    return b.op("Add", [scaled, bias], scope)


def gelu_erf(b: GraphBuilder, x: str, scope: str) -> str:
    """Exact GELU as torch.onnx emits it below opset 20: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    scaled = b.op("Div", [x, b.const(scope, 1.4142135381698608)], scope)
    erf = b.op("Erf", [scaled], scope)
    shifted = b.op("Add", [erf, b.const(scope, 1.0)], scope)
    product = b.op("Mul", [x, shifted], scope)
    return b.op("Mul", [product, b.const(scope, 0.5)], scope)


def gelu_tanh(b: GraphBuilder, x: str, scope: str) -> str:
    """GPT-2's ``NewGELUActivation``:
    0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))."""
    half = b.op("Mul", [b.const(scope, 0.5), x], scope)
    cube = b.op("Pow", [x, b.const(scope, 3.0)], scope)
    small = b.op("Mul", [b.const(scope, 0.044715), cube], scope)
    inner = b.op("Add", [x, small], scope)
    scaled = b.op("Mul", [b.const(scope, 0.7978845608028654), inner], scope)
    tanh = b.op("Tanh", [scaled], scope)
    shifted = b.op("Add", [b.const(scope, 1.0), tanh], scope)
    return b.op("Mul", [half, shifted], scope)


def dim_of(b: GraphBuilder, x: str, scope: str, index: int) -> str:
    """``x.size(index)`` as a 1-D tensor: Shape -> Gather(index) -> Unsqueeze(0)."""
    shape = b.op("Shape", [x], scope)
    scalar = b.op("Gather", [shape, b.const(scope, index)], scope, axis=0)
    return b.op("Unsqueeze", [scalar, b.const(scope, [0])], scope)


def shape_concat(
    b: GraphBuilder, x: str, scope: str, dims: Sequence[int], tail: Sequence[int]
) -> str:
    """A reshape target ``x.size()[dims] + tail`` built the torch.onnx way:
    one Shape -> Gather -> Unsqueeze chain per dynamic dim, then Concat with constants."""
    parts = [dim_of(b, x, scope, index) for index in dims]
    parts += [b.const(scope, [value]) for value in tail]
    return b.op("Concat", parts, scope, axis=0)


# ---------------------------------------------------------------------- inputs


def set_dims(b: GraphBuilder, **dims: int) -> None:
    """Record the concrete sizes :func:`make_inputs` uses for symbolic dims."""
    b.metadata[DIMS_KEY] = ",".join(f"{key}={value}" for key, value in dims.items())


def concrete_shape(model: onnx.ModelProto, value: onnx.ValueInfoProto) -> tuple[int, ...]:
    """The shape of a graph input/output with symbolic dims replaced by the ``zoo.dims``
    sizes (1 for a dim the metadata does not name)."""
    meta = {prop.key: prop.value for prop in model.metadata_props}
    pairs = (item.split("=") for item in meta.get(DIMS_KEY, "").split(",") if item)
    sizes = {key: int(size) for key, size in pairs}
    return tuple(
        d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, 1)
        for d in value.type.tensor_type.shape.dim
    )


def make_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded feeds for every graph input of a zoo model.

    Symbolic dims take the sizes recorded in the ``zoo.dims`` metadata. Float inputs are
    standard normal; int64 ``*mask*`` inputs are ones with the last quarter of each row zeroed
    (padding); other int64 inputs are token ids in ``[0, zoo.vocab_size)``.
    """
    meta = {prop.key: prop.value for prop in model.metadata_props}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        elem_type = value.type.tensor_type.elem_type
        shape = concrete_shape(model, value)
        if elem_type == INT64 and "mask" in value.name:
            mask = np.ones(shape, dtype=np.int64)
            mask[..., shape[-1] - shape[-1] // 4 :] = 0
            feeds[value.name] = mask
        elif elem_type == INT64:
            vocab = int(meta.get(VOCAB_KEY, "100"))
            feeds[value.name] = rng.integers(0, vocab, size=shape, dtype=np.int64)
        else:
            dtype = helper.tensor_dtype_to_np_dtype(elem_type)
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds
