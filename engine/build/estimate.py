"""Estimated GPU latency of a plan by precision: the roofline of engine.cost_model per layer.

Each layer takes ``max(flops / peak(precision), bytes / bandwidth) + launch overhead``. Bytes
come from the plan's value specs, so fp16 and int8 layers already move fewer bytes; the peak
rate scales with the precision as the tensor cores of an H100 SXM do relative to its fp32 CUDA
cores (dense: TF32 ~7.4x, FP16 ~14.8x, INT8 ~29.5x). Conversion layers (reformat, explicit
Q/DQ) count like any other layer: that is the cost of switching precision.

This is an estimate for comparing precision choices before measuring on the device (the
automatic mixed precision report shows it); measured latencies come from the engine profiler.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.build.plan import Plan
from engine.config import Precision
from engine.cost_model import GPU_FP32, DeviceProfile, node_latency_ms
from engine.ops.registry import default_registry

#: Peak arithmetic rate of each precision relative to fp32 (H100 SXM, dense).
PEAK_SCALE: dict[Precision, float] = {
    Precision.FP32: 1.0,
    Precision.TF32: 7.4,
    Precision.FP16: 14.8,
    Precision.INT8: 29.5,
}


@dataclass(frozen=True)
class LatencyEstimate:
    """Estimated latency (ms) in total and per precision (conversion layers under "reformat")."""

    total_ms: float
    by_precision: dict[str, float]
    layers: int

    def to_json(self) -> dict[str, object]:
        return {"total_ms": self.total_ms, "by_precision": self.by_precision, "layers": self.layers}


def estimate_latency(plan: Plan, device: DeviceProfile = GPU_FP32) -> LatencyEstimate:
    """The roofline estimate of ``plan`` on ``device`` (see the module docstring)."""
    registry = default_registry()
    total = 0.0
    parts: dict[str, float] = {}
    for layer in plan.layers:
        spec = registry.lookup(layer.op_type, layer.domain)
        ins, outs = plan.input_specs(layer), plan.output_specs(layer)
        if spec is None or any(s is None or not s.is_static for s in outs):
            continue
        try:
            cost = spec.cost(ins, outs, layer.attrs)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a layer its cost rule cannot price is left out
            continue
        scaled = DeviceProfile(
            device.name,
            device.peak_gflops * PEAK_SCALE[layer.precision],
            device.bandwidth_gbs,
            device.launch_overhead_us,
        )
        ms = node_latency_ms(int(cost.flops), int(cost.bytes_total), scaled)
        key = layer.precision.value if layer.role == "compute" else "reformat"
        parts[key] = parts.get(key, 0.0) + ms
        total += ms
    return LatencyEstimate(total, parts, len(plan.layers))


__all__ = ["PEAK_SCALE", "LatencyEstimate", "estimate_latency"]
