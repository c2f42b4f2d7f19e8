"""The op registry: for every supported op, a NumPy reference kernel, a shape/dtype rule and a cost.

An op family module (``engine/ops/<family>.py``) exports ``OPS: list[OpSpec]``; the registry is
the union of those lists, built on demand by :func:`default_registry`. Nothing registers itself
at import.

Kernel contract
    ``kernel(inputs, attrs, ctx) -> list of outputs``. ``inputs`` holds one entry per node input,
    ``None`` for an omitted optional input. Tensors are NumPy arrays (strings as object arrays,
    low-precision floats as ml_dtypes arrays); sequences are Python lists; an absent optional is
    :data:`NONE_OPTIONAL`. A kernel returns exactly as many entries as the node has outputs, or
    fewer (trailing optional outputs left unset).

Shape rule contract
    ``shape_rule(specs, attrs, ctx) -> list[TensorSpec]`` from the input specs (shape and dtype,
    dims may be symbolic strings or ``None``) and, where an input is constant, its value
    (``TensorSpec.value``). Rules never run a full kernel on real data.

Cost contract
    ``cost(in_specs, out_specs, attrs) -> OpCost`` with concrete shapes. FLOPs count a multiply-add
    as two operations; bytes are what an unfused kernel reads and writes in main memory.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

DEFAULT_DOMAIN = ""
ONNX_ML_DOMAIN = "ai.onnx.ml"
#: Domain of the engine's fused ops (gie::ConvAct, gie::GemmAct, gie::Pointwise, ...).
GIE_DOMAIN = "gie"

#: Op family modules whose ``OPS`` lists make up the default registry.
FAMILY_MODULES: tuple[str, ...] = (
    "engine.ops.elementwise",
    "engine.ops.cast",
    "engine.ops.activation",
    "engine.ops.conv",
    "engine.ops.pool",
    "engine.ops.normalization",
    "engine.ops.linalg",
    "engine.ops.reduce",
    "engine.ops.shape_ops",
    "engine.ops.layout",
    "engine.ops.indexing",
    "engine.ops.generators",
    "engine.ops.resize",
    "engine.ops.quantization",
    "engine.ops.rnn",
    "engine.ops.control_flow",
    "engine.ops.sequence",
    "engine.ops.misc",
    "engine.ops.detection",
    "engine.ops.signal",
    "engine.ops.llm",
    "engine.ops.gie_fused",
    "engine.ops.gie_pointwise",
    "engine.ops.gie_transformer",
    "engine.ops.gie_quant",
    "engine.ops.text_features",
    "engine.ops.classic_ml",
    "engine.ops.training",
    "engine.ops.attention_variants",
)


#: Ops whose outputs are random samples: never precomputed, and conformance compares only
#: their shapes and dtypes.
RANDOM_OP_TYPES = frozenset(
    {
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)


class OptionalNone:
    """The value of an ONNX optional that holds nothing (distinct from an omitted input)."""

    def __repr__(self) -> str:
        return "NONE_OPTIONAL"


NONE_OPTIONAL = OptionalNone()


class KernelError(RuntimeError):
    """A kernel refused its inputs (bad attribute, unsupported mode, inconsistent shapes)."""


@dataclass(frozen=True)
class TensorSpec:
    """What is known about a value without running the graph.

    ``shape`` is None when the rank is unknown; a dim is an int, a symbolic name, or None.
    ``dtype`` is None when unknown. ``value`` holds the array when the value is a constant.
    """

    shape: tuple[int | str | None, ...] | None
    dtype: ir.DataType | None
    value: np.ndarray | None = None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        """Element count; requires a static shape."""
        if not self.is_static:
            raise ValueError(f"shape {self.shape} is not static")
        return int(np.prod(self.shape, dtype=np.int64))

    def nbytes(self) -> int:
        """Size in bytes; 0 when the dtype has no fixed width (strings) or is unknown."""
        if self.dtype is None or self.dtype == ir.DataType.STRING or not self.is_static:
            return 0
        return (self.numel() * self.dtype.bitwidth + 7) // 8

    @staticmethod
    def of_array(array: Any) -> TensorSpec:
        """Spec of a concrete NumPy array (non-arrays give an unknown spec)."""
        if not isinstance(array, np.ndarray):
            return TensorSpec(None, None)
        return TensorSpec(tuple(int(d) for d in array.shape), dtype_of_array(array))


@dataclass(frozen=True)
class OpCost:
    """Work of one op execution: floating/integer operations and main-memory traffic in bytes."""

    flops: int
    bytes_read: int
    bytes_written: int

    @property
    def bytes_total(self) -> int:
        return self.bytes_read + self.bytes_written


class Attrs:
    """Read-only view of a node's attributes with ONNX defaults supplied by the caller."""

    def __init__(self, attributes: dict[str, Any]) -> None:
        self._values = attributes

    @staticmethod
    def from_node(node: ir.Node) -> Attrs:
        return Attrs({name: attr.value for name, attr in node.attributes.items()})

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def names(self) -> list[str]:
        return list(self._values)

    def get(self, name: str, default: Any = None) -> Any:
        value = self._values.get(name, default)
        if isinstance(value, ir.TensorProtocol):
            return value.numpy()
        return value

    def int(self, name: str, default: int | None = None) -> int:
        value = self._values.get(name, default)
        if value is None:
            raise KernelError(f"required attribute '{name}' is missing")
        return int(value)

    def float(self, name: str, default: float | None = None) -> float:
        value = self._values.get(name, default)
        if value is None:
            raise KernelError(f"required attribute '{name}' is missing")
        return float(value)

    def ints(self, name: str, default: Sequence[int] | None = None) -> list[int] | None:
        value = self._values.get(name, default)
        return None if value is None else [int(v) for v in value]

    def floats(self, name: str, default: Sequence[float] | None = None) -> list[float] | None:
        value = self._values.get(name, default)
        return None if value is None else [float(v) for v in value]

    def str(self, name: str, default: str | None = None) -> str | None:
        value = self._values.get(name, default)
        if isinstance(value, bytes):
            return value.decode()
        return value

    def strs(self, name: str, default: Sequence[str] | None = None) -> list[str] | None:
        value = self._values.get(name, default)
        if value is None:
            return None
        return [v.decode() if isinstance(v, bytes) else v for v in value]

    def graph(self, name: str) -> ir.Graph:
        value = self._values.get(name)
        if not isinstance(value, ir.Graph):
            raise KernelError(f"required graph attribute '{name}' is missing")
        return value


@dataclass
class KernelContext:
    """What a kernel may know beyond its inputs: opset, node identity, and subgraph execution.

    ``declared_outputs`` are the output types the model (or ONNX shape inference) declared; shape
    rules of ops whose output shape depends on data fall back to them.
    ``run_subgraph(graph, inputs)`` runs a nested graph (If/Loop/Scan bodies) with the given
    positional inputs, resolving outer-scope values from the calling graph, and returns its outputs.
    """

    opset: int
    node_name: str = ""
    output_count: int = 1
    run_subgraph: Callable[[ir.Graph, Sequence[Any]], list[Any]] | None = None
    declared_outputs: list[TensorSpec] = field(default_factory=list)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))


Kernel = Callable[[list[Any], Attrs, KernelContext], Sequence[Any]]
ShapeRule = Callable[[list[TensorSpec], Attrs, KernelContext], list[TensorSpec]]
CostRule = Callable[[list[TensorSpec], list[TensorSpec], Attrs], OpCost]


@dataclass(frozen=True)
class OpSpec:
    """One registered op: identity, reference kernel, shape rule and cost rule."""

    op_type: str
    kernel: Kernel
    shape_rule: ShapeRule
    cost: CostRule
    domain: str = DEFAULT_DOMAIN
    family: str = "misc"

    @property
    def key(self) -> tuple[str, str]:
        return (normalize_domain(self.domain), self.op_type)


def normalize_domain(domain: str) -> str:
    """ONNX spells the default domain both '' and 'ai.onnx'."""
    return DEFAULT_DOMAIN if domain in ("", "ai.onnx") else domain


class OpRegistry:
    """Lookup table from (domain, op_type) to :class:`OpSpec`."""

    def __init__(self, specs: Sequence[OpSpec] = ()) -> None:
        self._specs: dict[tuple[str, str], OpSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: OpSpec) -> None:
        if spec.key in self._specs:
            raise ValueError(f"op {spec.domain or 'ai.onnx'}::{spec.op_type} registered twice")
        self._specs[spec.key] = spec

    def lookup(self, op_type: str, domain: str = DEFAULT_DOMAIN) -> OpSpec | None:
        return self._specs.get((normalize_domain(domain), op_type))

    def unsupported_reason(self, node: ir.Node) -> str | None:
        """Why this registry cannot run ``node``, or None when it can."""
        if self.lookup(node.op_type, node.domain) is None:
            domain = node.domain or "ai.onnx"
            return f"no reference kernel for {domain}::{node.op_type}"
        return None

    def __contains__(self, key: tuple[str, str]) -> bool:
        return (normalize_domain(key[0]), key[1]) in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def specs(self) -> list[OpSpec]:
        return sorted(self._specs.values(), key=lambda s: (s.domain, s.op_type))


@functools.cache
def default_registry() -> OpRegistry:
    """Registry of every op family shipped with the engine (built once, then shared read-only)."""
    specs: list[OpSpec] = []
    for module_name in FAMILY_MODULES:
        module = importlib.import_module(module_name)
        specs.extend(module.OPS)
    return OpRegistry(specs)


def dtype_of_array(array: np.ndarray) -> ir.DataType | None:
    """The ONNX data type of a NumPy array (object arrays are strings)."""
    if array.dtype == object or array.dtype.kind in ("U", "S"):
        return ir.DataType.STRING
    try:
        return ir.DataType.from_numpy(array.dtype)
    except TypeError:
        return None
