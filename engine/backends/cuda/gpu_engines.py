"""Engine-level checks of ``make gpu-check``: zoo engines on the CUDA backend against
onnxruntime, and every candidate tactic of their layers against the reference kernel.

Both take a ``backend``: ``"cuda"`` on a GPU, ``"cuda-shim"`` to rehearse the same code on the
CPU (tiny models only; ``gpu_check --rehearse``). Every result is a JSON-ready dict; a failure
of one model or tactic is recorded, never raised, so one bad kernel cannot hide the others.

Tolerances (the issue's): fp32 max |diff| <= 1e-4 * (1 + max |reference|) per output, fp16
output cosine >= 0.999, int8 cosine >= 0.99 against onnxruntime's fp32; single tactics: fp32
rtol 1e-4, fp16 rtol 1e-2 against the reference kernel at the layer's precision, int8 exact.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.backends.cuda.lowering import HOST_TACTIC
from engine.backends.cuda.selection import single_layer_runner
from engine.backends.cuda.tactics import cuda_candidates
from engine.build.emulation import emulate_precision
from engine.build.plan import Layer, Plan
from engine.build.selector import timing_inputs
from engine.builder import build
from engine.config import BuilderConfig, Precision, SparsityMode
from engine.ops.registry import default_registry
from engine.quantize.accuracy import output_errors

#: Precision name -> (builder precisions, sparsity).
PRECISIONS: dict[str, tuple[frozenset[Precision], SparsityMode]] = {
    "fp32": (frozenset({Precision.FP32}), SparsityMode.OFF),
    "fp16": (frozenset({Precision.FP32, Precision.FP16}), SparsityMode.OFF),
    "int8": (frozenset({Precision.FP32, Precision.FP16, Precision.INT8}), SparsityMode.OFF),
    "sparse": (frozenset({Precision.FP32, Precision.FP16}), SparsityMode.FORCE),
}
MIN_COSINE = {"fp16": 0.999, "int8": 0.99, "sparse": 0.999}


def onnxruntime_outputs(proto: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def judge(precision: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict:
    """Per-output errors (engine.quantize.accuracy.output_errors) and whether they are within
    the precision's tolerance."""
    errors = output_errors(want, got)
    outputs = {}
    for name, error in errors.items():
        if precision == "fp32":
            scale = 1.0 + float(np.max(np.abs(np.asarray(want[name], np.float64)), initial=0.0))
            passed = error.max_abs <= 1e-4 * scale
        else:
            passed = error.cosine >= MIN_COSINE[precision]
        outputs[name] = {"max_abs": error.max_abs, "cosine": error.cosine, "passed": bool(passed)}
    return {"outputs": outputs, "passed": all(o["passed"] for o in outputs.values())}


def zoo_engine(
    proto: Any,
    precision: str,
    backend: str,
    feeds: dict[str, np.ndarray],
    calibration: Sequence[dict[str, np.ndarray]],
    config: BuilderConfig | None = None,
) -> dict[str, Any]:
    """Build ``proto`` at ``precision`` on ``backend``, run it, compare with onnxruntime (with
    the NumPy engine of the same pruned model for ``sparse``)."""
    precisions, sparsity = PRECISIONS[precision]
    base = (config or BuilderConfig()).with_changes(
        optimization_level="O3",
        precisions=precisions,
        sparsity=sparsity,
        sparsity_min_channels=16,
        backend=backend,
    )
    data = calibration if precision == "int8" else None
    started = time.perf_counter()
    engine = build(ir.serde.deserialize_model(proto), base, calibration_data=data)
    build_s = time.perf_counter() - started
    launch = engine.launch_plan(feeds)
    got = engine.run(feeds)
    if precision == "sparse":
        reference = build(
            ir.serde.deserialize_model(proto), replace(base, backend="numpy"), calibration_data=data
        )
        want = reference.run(feeds)
    else:
        want = onnxruntime_outputs(proto, feeds)
    verdict = judge(precision, got, want)
    tactics: dict[str, int] = {}
    for layer in engine.plan.layers:
        tactics[layer.tactic] = tactics.get(layer.tactic, 0) + 1
    return {
        **verdict,
        "build_s": round(build_s, 3),
        "layers": len(engine.plan.layers),
        "kernels": launch.kernel_count(),
        "host_layers": launch.host_layers,
        "graph": bool(getattr(engine.runner_for(feeds), "use_graph", False)),
        "tactics": tactics,
    }


def check_zoo(
    models: dict[str, Any],
    backend: str,
    precisions: Sequence[str] = ("fp32", "fp16", "int8", "sparse"),
    deadline: float | None = None,
    feeds_of: Callable[[Any, int], dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Every model at every precision (see :func:`zoo_engine`); stops at ``deadline``
    (``time.monotonic()``), marking the rest skipped."""
    from engine import zoo

    feeds_of = feeds_of or (lambda proto, seed: zoo.make_inputs(proto, seed=seed))
    results: dict[str, Any] = {}
    for name, proto in models.items():
        feeds = feeds_of(proto, 0)
        calibration = [feeds_of(proto, seed) for seed in (1, 2, 3)]
        for precision in precisions:
            key = f"{name}/{precision}"
            if deadline is not None and time.monotonic() > deadline:
                results[key] = {"skipped": "time budget"}
                continue
            try:
                results[key] = zoo_engine(proto, precision, backend, feeds, calibration)
            except Exception as error:  # noqa: BLE001 - recorded per model
                results[key] = {"passed": False, "error": f"{type(error).__name__}: {error}"}
                results[key]["traceback"] = traceback.format_exc(limit=6)
    return results


# --------------------------------------------------------------------------- single tactics


def run_tactic(layer: Layer, plan: Plan, tactic: str, device: Any) -> list[np.ndarray]:
    """The layer alone with ``tactic`` on ``device``, on the selector's seeded inputs."""
    inputs = timing_inputs(layer, plan, seed=layer.index)
    if inputs is None:
        raise ValueError("input shapes unknown")
    runner, feeds = single_layer_runner(layer, plan, tactic, inputs, device, "tactic-check")
    outputs = runner.run(feeds)
    return [outputs[n] for n in layer.outputs if n]


def reference_outputs(layer: Layer, plan: Plan) -> list[np.ndarray]:
    inputs = timing_inputs(layer, plan, seed=layer.index)
    spec = default_registry().lookup(layer.op_type, layer.domain)
    assert spec is not None and inputs is not None
    results = emulate_precision(spec.kernel, layer)(inputs, layer.attrs, layer.context)
    return [np.asarray(r) for r, n in zip(results, layer.outputs) if n]


def compare_tactic(layer: Layer, got: list[np.ndarray], want: list[np.ndarray]) -> dict:
    worst = 0.0
    exact = True
    for value, expected in zip(got, want):
        if value.shape != expected.shape:
            return {"passed": False, "error": f"shape {value.shape} != {expected.shape}"}
        if value.dtype.kind in "iub":
            exact = exact and bool(np.array_equal(value, expected))
            continue
        scale = 1.0 + float(np.max(np.abs(expected.astype(np.float64)), initial=0.0))
        diff = np.abs(value.astype(np.float64) - expected.astype(np.float64))
        worst = max(worst, float(np.max(diff, initial=0.0)) / scale)
    tolerance = 1e-2 if layer.precision in (Precision.FP16, Precision.INT8) else 1e-4
    return {"passed": bool(exact and worst <= tolerance), "relative_error": worst}


def check_tactics(plans: dict[str, Plan], device: Any, info: Any, deadline: float | None) -> dict:
    """Every CUDA candidate of every layer of ``plans`` against the reference kernel."""
    results: dict[str, Any] = {}
    config = BuilderConfig(sparsity=SparsityMode.ON)
    for model, plan in plans.items():
        for layer in plan.layers:
            for tactic in cuda_candidates(layer, plan, config, info) or [HOST_TACTIC]:
                if tactic == HOST_TACTIC:
                    continue
                key = f"{model}/{layer.name}/{tactic}"
                if deadline is not None and time.monotonic() > deadline:
                    results[key] = {"skipped": "time budget"}
                    continue
                try:
                    want = reference_outputs(layer, plan)
                    results[key] = compare_tactic(
                        layer, run_tactic(layer, plan, tactic, device), want
                    )
                except Exception as error:  # noqa: BLE001 - recorded per tactic
                    results[key] = {"passed": False, "error": f"{type(error).__name__}: {error}"}
    by_tactic: dict[str, dict[str, int]] = {}
    for key, result in results.items():
        name = key.rsplit("/", 1)[1]
        counts = by_tactic.setdefault(name, {"passed": 0, "failed": 0, "skipped": 0})
        counts[
            "skipped" if "skipped" in result else "passed" if result["passed"] else "failed"
        ] += 1
    return {"cases": results, "by_tactic": by_tactic}


__all__ = ["check_tactics", "check_zoo", "judge", "run_tactic", "zoo_engine"]
