"""Graph cost and an estimated latency from the ops' cost rules (a roofline per node).

The estimate is what the optimizer's timeline shows before anything is measured: each node
takes ``max(flops / peak, bytes / bandwidth) + launch overhead`` on a :class:`DeviceProfile`.
Fusing nodes removes launch overhead and intermediate traffic, so the estimate falls as the
graph is optimized. Measured latencies come from the builder/engine, not from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from engine.ops.registry import OpRegistry, TensorSpec, default_registry, normalize_domain
from engine.ops.shape_inference import declared_spec, infer_specs


@dataclass(frozen=True)
class DeviceProfile:
    """Peak arithmetic rate (GFLOP/s), memory bandwidth (GB/s) and per-kernel overhead (µs)."""

    name: str
    peak_gflops: float
    bandwidth_gbs: float
    launch_overhead_us: float


#: A mid-range GPU's fp32 roofline: the default for the optimizer's estimates.
GPU_FP32 = DeviceProfile(
    "gpu-fp32", peak_gflops=19_500.0, bandwidth_gbs=1_500.0, launch_overhead_us=4.0
)
#: The NumPy reference backend on a laptop-class CPU.
CPU_REFERENCE = DeviceProfile(
    "cpu-reference", peak_gflops=50.0, bandwidth_gbs=10.0, launch_overhead_us=10.0
)


@dataclass(frozen=True)
class GraphCost:
    """Totals over the main graph: nodes, FLOPs, bytes moved, estimated latency (ms).

    ``unknown_nodes`` counts nodes whose cost could not be computed (unknown shapes).
    """

    node_count: int
    flops: int
    bytes: int
    latency_ms: float
    unknown_nodes: int = 0

    def to_json(self) -> dict[str, float | int]:
        return {
            "node_count": self.node_count,
            "flops": self.flops,
            "bytes": self.bytes,
            "latency_ms": self.latency_ms,
            "unknown_nodes": self.unknown_nodes,
        }


def node_latency_ms(flops: int, moved_bytes: int, device: DeviceProfile) -> float:
    """Roofline time of one kernel in milliseconds."""
    compute = flops / (device.peak_gflops * 1e9)
    memory = moved_bytes / (device.bandwidth_gbs * 1e9)
    return (max(compute, memory) + device.launch_overhead_us * 1e-6) * 1e3


def batch_one_spec(value: ir.Value) -> TensorSpec:
    """A graph input's declared spec with every symbolic or unknown dim taken as 1."""
    spec = declared_spec(value, constant_limit=0)
    if spec.shape is None:
        return spec
    return TensorSpec(tuple(d if isinstance(d, int) else 1 for d in spec.shape), spec.dtype)


def graph_cost(
    model: ir.Model,
    device: DeviceProfile = GPU_FP32,
    registry: OpRegistry | None = None,
    input_specs: dict[str, TensorSpec] | None = None,
) -> GraphCost:
    """Cost of the main graph, with shapes from the engine's own shape inference.

    Without ``input_specs``, symbolic input dims (batch, sequence) are taken as 1.
    """
    registry = registry or default_registry()
    if input_specs is None:
        input_specs = {v.name or "": batch_one_spec(v) for v in model.graph.inputs}
    specs = infer_specs(model, input_specs, registry).specs
    flops = moved = unknown = 0
    latency = 0.0
    nodes = list(model.graph)
    for node in nodes:
        spec = registry.lookup(node.op_type, normalize_domain(node.domain))
        ins = [None if v is None else specs.get(v) for v in node.inputs]
        outs = [specs.get(v) for v in node.outputs]
        if spec is None or any(s is None or not s.is_static for s in outs):
            unknown += 1
            continue
        try:
            cost = spec.cost(ins, outs, _attrs(node))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a cost rule that cannot price a node counts it unknown
            unknown += 1
            continue
        flops += cost.flops
        moved += cost.bytes_total
        latency += node_latency_ms(cost.flops, cost.bytes_total, device)
    return GraphCost(len(nodes), flops, moved, latency, unknown)


def _attrs(node: ir.Node):
    from engine.ops.registry import Attrs

    return Attrs.from_node(node)
