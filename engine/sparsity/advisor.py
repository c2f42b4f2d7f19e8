"""The 2:4 sparsity advisor: per weight layer, is it worth pruning, and what would it cost?

For every Conv / Gemm / MatMul (and fused form) of the optimized model (the layers the engine
will run), :func:`advise` reports:

* eligibility and the reason when not (engine.sparsity.check), whether the weight already is
  2:4 and the fraction of groups that comply;
* the fraction of the weight magnitude that pruning would keep (engine.sparsity.prune);
* the output error when that layer ALONE is pruned: cosine and max |diff| of the model outputs
  vs the dense model on the given feeds (reference backend);
* the expected speed-up of the layer from the roofline cost model: sparse tensor cores halve
  the multiply-adds and read half the weight plus 2-bit metadata, so compute-bound layers
  approach 2x and memory-bound ones gain little (engine.cost_model, GPU fp32 roofline with the
  fp16 tensor-core rate the sparse kernels use);
* the measured speed-up when a GPU backend is present (None on the NumPy backend).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.cost_model import GPU_FP32, DeviceProfile, batch_one_spec, node_latency_ms
from engine.ops.registry import Attrs, default_registry
from engine.ops.shape_inference import infer_specs
from engine.passes import optimize
from engine.sparsity.check import DEFAULT_MIN_CHANNELS, check_model, reduction_matrix
from engine.sparsity.prune import prune_2_4, prune_model, retained_magnitude

#: fp16 dense tensor-core rate relative to fp32 CUDA cores (H100 SXM); sparse doubles it.
TENSOR_CORE_SCALE = 14.8

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LayerAdvice:
    """One weight layer's 2:4 report (see the module docstring); speed-ups are dense time /
    sparse time (> 1 is faster), errors compare model outputs with the dense model."""

    name: str
    op: str
    eligible: bool
    reason: str
    is_2_4: bool
    compliant_fraction: float
    retained_magnitude: float | None
    output_cosine: float | None
    output_max_abs: float | None
    expected_speedup: float | None
    measured_speedup: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denominator = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / denominator) if denominator else 1.0


def expected_speedup(
    flops: int, moved_bytes: int, weight_bytes: int, device: DeviceProfile = GPU_FP32
) -> float:
    """Roofline dense time / sparse time for one layer on fp16 tensor cores."""
    dense_device = DeviceProfile(
        device.name,
        device.peak_gflops * TENSOR_CORE_SCALE,
        device.bandwidth_gbs,
        device.launch_overhead_us,
    )
    sparse_device = DeviceProfile(
        device.name,
        device.peak_gflops * TENSOR_CORE_SCALE * 2,
        device.bandwidth_gbs,
        device.launch_overhead_us,
    )
    sparse_bytes = moved_bytes - weight_bytes // 2 + weight_bytes // 16  # values + metadata
    dense = node_latency_ms(flops, moved_bytes, dense_device)
    sparse = node_latency_ms(flops, max(sparse_bytes, 0), sparse_device)
    return dense / sparse if sparse > 0 else 1.0


def _layer_costs(model: ir.Model) -> dict[str, tuple[int, int]]:
    """(FLOPs, bytes moved) per node at batch 1."""
    registry = default_registry()
    inputs = {v.name or "": batch_one_spec(v) for v in model.graph.inputs}
    specs = infer_specs(model, inputs, registry).specs
    costs = {}
    for node in model.graph:
        spec = registry.lookup(node.op_type, node.domain)
        ins = [None if v is None else specs.get(v) for v in node.inputs]
        outs = [specs.get(v) for v in node.outputs]
        if spec is None or any(s is None or not s.is_static for s in outs):
            continue
        try:
            cost = spec.cost(ins, outs, Attrs.from_node(node))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a layer its rule cannot price has no estimate
            continue
        costs[node.name or ""] = (int(cost.flops), int(cost.bytes_total))
    return costs


def advise(
    model: ir.Model,
    feeds: Mapping[str, np.ndarray],
    min_channels: int = DEFAULT_MIN_CHANNELS,
    level: str = "O2",
    progress: Progress | None = None,
) -> list[LayerAdvice]:
    """The advisor's report for every weight layer of ``model`` optimized at ``level``."""
    optimized = optimize(model, level, estimate_costs=False).model
    dense = ReferenceInterpreter(optimized).run(feeds).outputs
    costs = _layer_costs(optimized)
    nodes = {node.name: node for node in optimized.graph}
    checks = check_model(optimized, min_channels=min_channels)
    report = []
    for done, layer in enumerate(checks):
        if progress:
            progress("advise", done, len(checks))
        node = nodes[layer.name]
        weight_value = node.inputs[1]
        weight = None
        if weight_value is not None and weight_value.const_value is not None:
            weight = weight_value.const_value.numpy()
        retained = cosine = max_abs = speedup = None
        structural = layer.eligible or layer.reason.startswith("too small")
        if weight is not None and structural:
            matrix = reduction_matrix(weight, node.op_type, Attrs.from_node(node))
            retained = retained_magnitude(matrix, prune_2_4(matrix))
            pruned, _ = prune_model(optimized, layers=[layer.name], min_channels=1)
            outputs = ReferenceInterpreter(pruned).run(feeds).outputs
            cosine = min(_cosine(dense[name], outputs[name]) for name in dense)
            max_abs = max(
                float(np.max(np.abs(dense[n].astype(np.float64) - outputs[n]))) for n in dense
            )
            if layer.name in costs:
                flops, moved = costs[layer.name]
                speedup = expected_speedup(flops, moved, int(weight.nbytes))
        report.append(
            LayerAdvice(
                layer.name,
                layer.op,
                layer.eligible,
                layer.reason,
                layer.is_2_4,
                layer.compliant_fraction,
                retained,
                cosine,
                max_abs,
                speedup,
            )
        )
    if progress:
        progress("advise", len(checks), len(checks))
    return report


__all__ = ["LayerAdvice", "advise", "expected_speedup"]
