"""Dynamic tensor memory: every activation of a Plan gets an offset in one shared arena.

Liveness
    A value produced by layer ``i`` is live from ``i`` (its definition) to its last use ``j``
    (the last layer that reads it, directly or from inside a nested If/Loop/Scan body), both
    inclusive: a layer's inputs and outputs are live together while it runs. Graph outputs
    stay live to the end of the run (``len(layers)``). A value nobody reads is live only at
    its own layer. Graph inputs (the caller's arrays) and constants (weights) are not in the
    arena.

Sizes
    Each value is sized at the largest shapes the engine accepts: the ``max`` of each input's
    optimization profile (inputs without a profile take their declared dims, a symbolic dim
    taking the size a profiled input binds to the same name, else 1), by re-running the
    engine's shape inference at those shapes. A value whose size is not known statically
    (data-dependent shape, sequence, string) is *unplanned*: it lives outside the arena and
    :attr:`MemoryPlan.unplanned` says why.

In-place reuse (:data:`IN_PLACE`)
    An output may take the slot of one of its layer's inputs when the op allows it (the op
    reads input element ``k`` only to write output element ``k``: elementwise ops, epilogue
    residuals, and reshapes, whose bytes are identical), the input dies at this layer (it is
    neither read later nor a graph output), and both have the same dtype and byte size.
    Chains of such reuses form one buffer.

Offsets
    Greedy by size with best fit (as TFLite's arena planner): buffers in decreasing size take
    the smallest gap, between the buffers already placed that are live at the same time, that
    holds them; else the end of the arena. Offsets and slot sizes are multiples of
    ``alignment`` bytes (64 by default: a cache line, and enough for any vector load).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from engine.backends.numpy_ref.interpreter import captured_values, node_subgraphs
from engine.build.log import BuildLog
from engine.build.plan import Layer, Plan, optimization_specs
from engine.config import BuilderConfig
from engine.ops.registry import GIE_DOMAIN, TensorSpec, default_registry
from engine.ops.shape_inference import declared_spec, infer_specs

DEFAULT_ALIGNMENT = 64
ALL_INPUTS: tuple[int, ...] = ()

_UNARY = (
    "Relu LeakyRelu Elu Celu Selu Sigmoid Tanh HardSigmoid HardSwish Softplus Softsign Mish "
    "Gelu ThresholdedRelu Shrink Swish Clip Neg Abs Sqrt Exp Log Reciprocal Floor Ceil Round "
    "Sign Erf Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Not BitwiseNot"
).split()
_BINARY = "Add Sub Mul Div Pow Min Max Sum Mean PRelu BitwiseAnd BitwiseOr BitwiseXor".split()
_RESHAPES = "Reshape Flatten Squeeze Unsqueeze Identity".split()

#: Ops whose output may take the slot of an input, with the input positions allowed
#: (:data:`ALL_INPUTS`: any). Unary and binary elementwise ops and gie::Pointwise/gie::Gelu
#: compute output element k from input element k only; gie::ConvAct/gie::GemmAct read their
#: residual (input 3) element k only in the epilogue that writes output element k; reshapes
#: (input 0) produce the same bytes in the same order.
IN_PLACE: dict[tuple[str, str], tuple[int, ...]] = {
    **{("", op): (0,) for op in _UNARY},
    **{("", op): ALL_INPUTS for op in _BINARY},
    **{("", op): (0,) for op in _RESHAPES},
    (GIE_DOMAIN, "Pointwise"): ALL_INPUTS,
    (GIE_DOMAIN, "Gelu"): (0,),
    (GIE_DOMAIN, "ConvAct"): (3,),
    (GIE_DOMAIN, "GemmAct"): (3,),
}


def align_up(size: int, alignment: int) -> int:
    """``size`` rounded up to a multiple of ``alignment``."""
    return -(-size // alignment) * alignment


@dataclass(frozen=True)
class MemoryPlan:
    """Where every activation lives in the arena, and how much memory that saves.

    ``offsets``/``sizes``: byte offset and size (the value's own bytes at the planning shapes)
    of each planned value; ``intervals``: (first, last) layer index where it is live;
    ``in_place``: output name -> the input whose slot it took; ``unplanned``: value -> why it is
    not in the arena; ``arena_bytes``: the arena; ``naive_bytes``: the sum of all planned
    values' sizes (one buffer each, never reused); ``live_bytes``: bytes of the buffers live
    at each layer, in execution order (``peak_live_bytes`` is their maximum, a lower bound of
    any arena); ``input_shapes``: the input shapes the plan was sized for.
    """

    alignment: int
    arena_bytes: int
    naive_bytes: int
    offsets: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    intervals: dict[str, tuple[int, int]] = field(default_factory=dict)
    in_place: dict[str, str] = field(default_factory=dict)
    unplanned: dict[str, str] = field(default_factory=dict)
    live_bytes: tuple[int, ...] = ()
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def peak_live_bytes(self) -> int:
        return max(self.live_bytes, default=0)

    @property
    def ratio(self) -> float:
        """Arena bytes over the naive sum (0 when nothing is planned)."""
        return self.arena_bytes / self.naive_bytes if self.naive_bytes else 0.0

    def slot(self, name: str) -> tuple[int, int] | None:
        """(offset, capacity in bytes) of a value's slot, or None when it is not in the arena.

        The capacity is the largest size among the values sharing the slot in place."""
        if name not in self.offsets:
            return None
        root = self.root(name)
        capacity = max(self.sizes[n] for n in self.offsets if self.root(n) == root)
        return self.offsets[name], capacity

    def root(self, name: str) -> str:
        """The first value of the in-place chain ``name`` belongs to."""
        while name in self.in_place:
            name = self.in_place[name]
        return name

    def conflicts(self) -> list[tuple[str, str]]:
        """Pairs of values live at the same time whose byte ranges overlap (in-place chains
        excepted); empty for a correct plan."""
        names = sorted(self.offsets, key=lambda n: self.offsets[n])
        found = []
        for i, a in enumerate(names):
            a_end = self.offsets[a] + self.sizes[a]
            for b in names[i + 1 :]:
                if self.offsets[b] >= a_end:
                    break
                if self.sizes[a] == 0 or self.sizes[b] == 0 or self.root(a) == self.root(b):
                    continue
                (a0, a1), (b0, b1) = self.intervals[a], self.intervals[b]
                if a0 <= b1 and b0 <= a1:
                    found.append((a, b))
        return found

    def summary_lines(self) -> list[str]:
        """A short human report (bytes, ratio, peak, reuse)."""
        return [
            f"arena {self.arena_bytes} bytes for {len(self.offsets)} values "
            f"(naive sum {self.naive_bytes} bytes, {100 * self.ratio:.1f}%)",
            f"peak live {self.peak_live_bytes} bytes over {len(self.live_bytes)} layers",
            f"{len(self.in_place)} outputs in place, {len(self.unplanned)} values outside "
            f"the arena, alignment {self.alignment} bytes",
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "alignment": self.alignment,
            "arena_bytes": self.arena_bytes,
            "naive_bytes": self.naive_bytes,
            "peak_live_bytes": self.peak_live_bytes,
            "values": {
                name: {
                    "offset": self.offsets[name],
                    "size": self.sizes[name],
                    "interval": list(self.intervals[name]),
                    **({"in_place_of": self.in_place[name]} if name in self.in_place else {}),
                }
                for name in self.offsets
            },
            "unplanned": dict(self.unplanned),
            "live_bytes": list(self.live_bytes),
            "input_shapes": {name: list(shape) for name, shape in self.input_shapes.items()},
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> MemoryPlan:
        values = data.get("values", {})
        return MemoryPlan(
            alignment=int(data["alignment"]),
            arena_bytes=int(data["arena_bytes"]),
            naive_bytes=int(data["naive_bytes"]),
            offsets={n: int(v["offset"]) for n, v in values.items()},
            sizes={n: int(v["size"]) for n, v in values.items()},
            intervals={
                n: (int(v["interval"][0]), int(v["interval"][1])) for n, v in values.items()
            },
            in_place={n: str(v["in_place_of"]) for n, v in values.items() if "in_place_of" in v},
            unplanned={str(k): str(v) for k, v in data.get("unplanned", {}).items()},
            live_bytes=tuple(int(b) for b in data.get("live_bytes", [])),
            input_shapes={
                str(k): tuple(int(d) for d in v) for k, v in data.get("input_shapes", {}).items()
            },
        )


@dataclass(frozen=True)
class Buffer:
    """One allocation request: live over layers [first, last] (inclusive), ``size`` bytes."""

    name: str
    size: int
    first: int
    last: int


def assign_offsets(buffers: list[Buffer], alignment: int = DEFAULT_ALIGNMENT) -> dict[str, int]:
    """Best-fit offsets (see the module docstring) so that no two buffers live at the same
    time overlap; every offset is a multiple of ``alignment``."""
    placed: list[tuple[int, int, Buffer]] = []  # (offset, end, buffer)
    offsets: dict[str, int] = {}
    for buf in sorted(buffers, key=lambda b: (-b.size, b.first, b.name)):
        need = align_up(buf.size, alignment)
        busy = sorted(
            (start, end)
            for start, end, other in placed
            if other.first <= buf.last and buf.first <= other.last
        )
        best: tuple[int, int] | None = None  # (gap size, offset)
        cursor = 0
        for start, end in busy:
            gap = start - cursor
            if gap >= need and (best is None or gap < best[0]):
                best = (gap, cursor)
            cursor = max(cursor, align_up(end, alignment))
        offset = cursor if best is None else best[1]
        offsets[buf.name] = offset
        placed.append((offset, offset + need, buf))
    return offsets


def planning_shapes(
    model: ir.Model, config: BuilderConfig, which: str = "max"
) -> dict[str, tuple[int, ...]]:
    """Input shapes at the ``which`` ("min", "opt" or "max") end of the profiles; unprofiled
    inputs take their declared dims, symbolic ones bound by a profiled input of the same dim
    name, else 1. Inputs of unknown rank are left out."""
    if which not in ("min", "opt", "max"):
        raise ValueError(f"which must be 'min', 'opt' or 'max', not {which!r}")
    bound: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    declared = {v.name or "": declared_spec(v, constant_limit=0) for v in model.graph.inputs}
    for name, spec in declared.items():
        profile = config.profile_for(name)
        if profile is None:
            continue
        shapes[name] = tuple(getattr(profile, which))
        for dim, size in zip(spec.shape or (), shapes[name]):
            if isinstance(dim, str):
                bound.setdefault(dim, size)
    for name, spec in declared.items():
        if (
            name not in shapes
            and spec.shape is not None
            and model.graph.initializers.get(name) is None
        ):
            shapes[name] = tuple(
                d if isinstance(d, int) else bound.get(d or "", 1) for d in spec.shape
            )
    return shapes


def _subgraph_reads(node: ir.Node) -> Iterator[str]:
    """Names of enclosing-graph values a node's nested graphs read (If/Loop/Scan captures)."""
    for graph in node_subgraphs(node):
        yield from (v.name or "" for v in captured_values(graph))


def liveness(plan: Plan) -> dict[str, tuple[int, int]]:
    """(first, last) layer of every value a layer defines (see the module docstring)."""
    intervals: dict[str, list[int]] = {}
    for layer in plan.layers:
        for name in (*layer.inputs, *_subgraph_reads(layer.node)):
            if name in intervals:
                intervals[name][1] = max(intervals[name][1], layer.index)
        for name in layer.outputs:
            if name:
                intervals[name] = [layer.index, layer.index]
    end = len(plan.layers)
    for name in plan.outputs:
        if name in intervals:
            intervals[name][1] = end
    return {name: (first, last) for name, (first, last) in intervals.items()}


def _in_place_source(
    layer: Layer,
    output: str,
    specs: Mapping[str, TensorSpec],
    intervals: Mapping[str, tuple[int, int]],
    taken: set[str],
    graph_outputs: set[str],
) -> str | None:
    """The input whose slot ``output`` may take (see :data:`IN_PLACE`), or None."""
    allowed = IN_PLACE.get((layer.domain if layer.domain != "ai.onnx" else "", layer.op_type))
    if allowed is None:
        return None
    out = specs[output]
    for position, name in enumerate(layer.inputs):
        if allowed and position not in allowed:
            continue
        if not name or name not in intervals or name in taken or name in graph_outputs:
            continue
        if intervals[name][1] != layer.index:  # read later: it must survive this layer
            continue
        if allowed and any(n == name and p not in allowed for p, n in enumerate(layer.inputs)):
            continue  # also read at a position where the op reads it freely
        spec = specs.get(name)
        if spec is None or spec.dtype != out.dtype or spec.nbytes() != out.nbytes():
            continue
        return name
    return None


def plan_memory(
    plan: Plan,
    config: BuilderConfig,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    alignment: int = DEFAULT_ALIGNMENT,
    log: BuildLog | None = None,
) -> MemoryPlan:
    """The memory plan of ``plan``, sized at ``shapes`` (default: the max of each profile)."""
    input_shapes = dict(shapes) if shapes is not None else planning_shapes(plan.model, config)
    inferred = infer_specs(
        plan.model, optimization_specs(plan.model, input_shapes), default_registry()
    ).specs
    specs = {value.name or "": spec for value, spec in inferred.items()}
    intervals = liveness(plan)
    unplanned: dict[str, str] = {}
    planned: dict[str, tuple[int, int]] = {}
    for name, interval in intervals.items():
        spec = specs.get(name)
        if spec is None or spec.dtype is None:
            unplanned[name] = "type unknown (not a tensor, or not inferred)"
        elif spec.dtype == ir.DataType.STRING:
            unplanned[name] = "string tensor"
        elif not spec.is_static:
            unplanned[name] = f"shape {spec.shape} not known before running"
        elif spec.nbytes() == 0:
            unplanned[name] = "empty tensor"
        else:
            planned[name] = interval
    outputs = set(plan.outputs)
    in_place: dict[str, str] = {}
    taken: set[str] = set()
    for layer in plan.layers:
        for output in layer.outputs:
            if output not in planned:
                continue
            source = _in_place_source(layer, output, specs, planned, taken, outputs)
            if source is not None:
                in_place[output] = source
                taken.add(source)
                if log is not None:
                    log.add(
                        "memory", f"output '{output}' reuses the slot of '{source}'", layer.name
                    )
    root: dict[str, str] = {}
    for name in planned:  # layer order: a source is rooted before its reuser
        root[name] = root[in_place[name]] if name in in_place else name
    groups: dict[str, list[str]] = {}
    for name in planned:
        groups.setdefault(root[name], []).append(name)
    buffers = [
        Buffer(
            key,
            max(specs[n].nbytes() for n in members),
            min(planned[n][0] for n in members),
            max(planned[n][1] for n in members),
        )
        for key, members in groups.items()
    ]
    group_offsets = assign_offsets(buffers, alignment)
    arena = max((group_offsets[b.name] + align_up(b.size, alignment) for b in buffers), default=0)
    live = [0] * len(plan.layers)
    for buf in buffers:
        for index in range(buf.first, min(buf.last, len(plan.layers) - 1) + 1):
            live[index] += buf.size
    result = MemoryPlan(
        alignment=alignment,
        arena_bytes=arena,
        naive_bytes=sum(specs[n].nbytes() for n in planned),
        offsets={n: group_offsets[root[n]] for n in planned},
        sizes={n: specs[n].nbytes() for n in planned},
        intervals=dict(planned),
        in_place=in_place,
        unplanned=unplanned,
        live_bytes=tuple(live),
        input_shapes={k: tuple(v) for k, v in input_shapes.items()},
    )
    if log is not None:
        for line in result.summary_lines():
            log.add("memory", line)
    return result
