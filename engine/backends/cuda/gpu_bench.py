"""Benchmarks of ``make gpu-check``: each prints a ratio against a peer measured in the same
run on the same card (never an absolute threshold in a test).

* ``gemm``: own fp16 GEMM (pipelined mma.sync) vs cuBLAS at size^3 (target own >= 0.9x cuBLAS
  throughput); own int8 IMMA vs own fp16 (target int8 time <= 0.6x); 2:4 sparse (mma.sp) vs
  dense at large K (target >= 1.5x) against both the same-generation dense kernel and the
  pipelined one. Times are the GEMM layer's device time (CUDA events, median).
* ``torch``: a ResNet-50 (batch 1 and 32) and a BERT-base-shaped encoder (seq 128, batch 1),
  fp16, our engine (one CUDA-graph replay) vs PyTorch eager and ``torch.compile`` on the same
  card (targets: CNN batch 32 <= 0.7x torch.compile; BERT <= 0.5 ms on an H100).
* ``graph``: the CUDA-graph engine latency vs the sum of its layers' kernel times at batch 1
  (target <= 1.2x).

``backend="cuda-shim"`` rehearses the GEMM and graph code on the CPU at toy sizes (the numbers
mean nothing there; the point is that the script runs end to end before a GPU session).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from engine.builder import build
from engine.config import BuilderConfig, Precision, SparsityMode
from engine.runtime import Engine

FP16 = frozenset({Precision.FP32, Precision.FP16})


def gemm_model(m: int, n: int, k: int, sparse: bool = False, fp16: bool = True) -> ir.Model:
    """Y[m, n] = X[m, k] @ W[k, n] (W a constant; 2:4 along K when ``sparse``)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    if sparse:
        groups = weight.T.reshape(n, k // 4, 4)
        keep = np.argsort(-np.abs(groups), axis=-1)[..., :2]
        mask = np.zeros_like(groups, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        weight = np.where(mask, groups, 0).reshape(n, k).T.copy()
    dtype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    array = weight.astype(np.float16 if fp16 else np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="gemm")],
        "gemm",
        [helper.make_tensor_value_info("x", dtype, [m, k])],
        [helper.make_tensor_value_info("y", dtype, [m, n])],
        [numpy_helper.from_array(array, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def layer_ms(engine: Engine, feeds: dict[str, np.ndarray], layer: str, iterations: int) -> float:
    """Median device time of one layer (the profiling run times layers with events)."""
    report = engine.profile(iterations=iterations, warmup=2, feeds=feeds)
    return next(row.latency_ms_median for row in report.layers if row.layer == layer)


def engine_ms(engine: Engine, feeds: dict[str, np.ndarray], iterations: int) -> float:
    """Median device time of a whole run (a CUDA-graph replay where the engine has one)."""
    runner = engine.runner_for(engine.check_feeds(feeds))  # type: ignore[attr-defined]
    for _ in range(3):
        runner.run(feeds)
    return statistics.median(runner.time_run_ms(feeds) for _ in range(iterations))


def _gemm_case(
    backend: str, size: tuple[int, int, int], config: BuilderConfig, sparse: bool = False,
    calibrate: bool = False, iterations: int = 10,
) -> dict[str, Any]:  # fmt: skip
    m, n, k = size
    fp16 = Precision.INT8 not in config.precisions
    model = gemm_model(m, n, k, sparse, fp16=fp16)
    dtype = np.float16 if fp16 else np.float32
    feeds = {"x": np.random.default_rng(1).standard_normal((m, k)).astype(dtype)}
    data = [feeds] if calibrate else None
    engine = build(model, config.with_changes(backend=backend), calibration_data=data)
    gemm = next(layer for layer in engine.plan.layers if layer.role == "compute")
    ms = layer_ms(engine, feeds, gemm.name, iterations)
    return {"tactic": gemm.tactic, "ms": ms, "tflops": 2 * m * n * k / ms / 1e9}


def bench_gemm(backend: str, size: int, sparse_k: int, iterations: int = 10) -> dict[str, Any]:
    """Own fp16 vs cuBLAS, int8 vs fp16, 2:4 sparse vs dense (see the module docstring)."""
    square = (size, size, size)
    half = BuilderConfig(precisions=FP16)
    int8 = BuilderConfig(precisions=frozenset({Precision.FP32, Precision.INT8}))
    cases: dict[str, Callable[[], dict[str, Any]]] = {
        "own_fp16": lambda: _gemm_case(backend, square, half.with_changes(
            tactic_sources=frozenset({"gemm_tensor_core"})), iterations=iterations),
        "cublas_fp16": lambda: _gemm_case(backend, square, half.with_changes(
            tactic_sources=frozenset({"cublas"})), iterations=iterations),
        "own_int8": lambda: _gemm_case(backend, square, int8.with_changes(
            tactic_sources=frozenset({"gemm_int8", "reformat", "pointwise", "reshape"})),
            calibrate=True, iterations=iterations),
        "sparse_fp16": lambda: _gemm_case(backend, (size, size, sparse_k), half.with_changes(
            sparsity=SparsityMode.ON, sparsity_min_channels=16,
            tactic_sources=frozenset({"sparse"})), sparse=True, iterations=iterations),
        "dense_fp16_same_k": lambda: _gemm_case(backend, (size, size, sparse_k), half.with_changes(
            tactic_pins=(("gemm", "gemm_mma_f16"),)), iterations=iterations),
        "dense_fp16_pipelined_same_k": lambda: _gemm_case(
            backend, (size, size, sparse_k),
            half.with_changes(tactic_sources=frozenset({"gemm_tensor_core"})),
            iterations=iterations),
    }  # fmt: skip
    results: dict[str, Any] = {}
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception as error:  # noqa: BLE001 - one failing case is recorded
            results[name] = {"error": f"{type(error).__name__}: {error}"}

    def ratio(a: str, b: str) -> float | None:
        if "ms" in results.get(a, {}) and "ms" in results.get(b, {}):
            return results[b]["ms"] / results[a]["ms"]
        return None

    results["ratios"] = {
        "own_vs_cublas_throughput (target >= 0.9)": ratio("own_fp16", "cublas_fp16"),
        "int8_time_vs_own_fp16 (target <= 0.6)": (
            None if ratio("own_fp16", "own_int8") is None else 1 / ratio("own_fp16", "own_int8")
        ),
        "sparse_speedup_vs_same_kernel_generation (target >= 1.5)": ratio(
            "sparse_fp16", "dense_fp16_same_k"
        ),
        "sparse_speedup_vs_pipelined_dense": ratio("sparse_fp16", "dense_fp16_pipelined_same_k"),
    }
    return results


def bench_graph(engine: Engine, feeds: dict[str, np.ndarray], iterations: int) -> dict[str, Any]:
    """CUDA-graph latency vs the sum of the layers' kernel times (same engine, same feeds)."""
    whole = engine_ms(engine, feeds, iterations)
    report = engine.profile(iterations=iterations, warmup=2, feeds=feeds)
    layers = sum(row.latency_ms_median for row in report.layers)
    runner = engine.runner_for(engine.check_feeds(feeds))  # type: ignore[attr-defined]
    return {
        "graph": bool(runner.use_graph),
        "engine_ms": whole,
        "sum_of_layers_ms": layers,
        "ratio (target <= 1.2)": whole / layers if layers else None,
    }


def _torch_ms(run: Callable[[], Any], iterations: int) -> float:
    import torch

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def bench_torch(name: str, batch: int, iterations: int = 20) -> dict[str, Any]:
    """Our fp16 engine vs PyTorch eager and torch.compile (fp16) on one model and batch."""
    import torch

    from engine.backends.cuda import torch_models

    if name == "resnet50":
        model = torch_models.resnet50()
        example: tuple[Any, ...] = (torch.randn(batch, 3, 224, 224),)
        names = ["input"]
    else:
        model = torch_models.bert_encoder()
        example = (torch.randn(batch, 128, 768), torch.zeros(batch, 1, 1, 128))
        names = ["hidden", "mask"]
    with tempfile.TemporaryDirectory() as folder:
        proto = torch_models.export(model, example, names, Path(folder) / f"{name}.onnx")
    started = time.perf_counter()
    engine = build(
        ir.serde.deserialize_model(proto),
        BuilderConfig(backend="cuda", optimization_level="O3", precisions=FP16,
                      timing_iterations=3),
    )  # fmt: skip
    build_s = time.perf_counter() - started
    feeds = {n: t.numpy() for n, t in zip(names, example)}
    ours = engine_ms(engine, feeds, iterations)
    ours_out = engine.run(feeds)["output"]
    half = model.half().cuda()
    inputs = tuple(t.half().cuda() for t in example)
    with torch.no_grad():
        eager = _torch_ms(lambda: half(*inputs), iterations)
        reference = half(*inputs).float().cpu().numpy()
        compiled_model = torch.compile(half)
        compiled = _torch_ms(lambda: compiled_model(*inputs), iterations)
    from engine.quantize.accuracy import worst_output_cosine

    return {
        "batch": batch,
        "build_s": build_s,
        "ours_ms": ours,
        "torch_eager_ms": eager,
        "torch_compile_ms": compiled,
        "ours_vs_compile": ours / compiled,
        "ours_vs_eager": ours / eager,
        "cosine_vs_torch": worst_output_cosine({"output": reference}, {"output": ours_out}),
        "host_layers": engine.launch_plan(feeds).host_layers,
        "graph": bench_graph(engine, feeds, iterations) if batch == 1 else None,
    }


def _guarded(results: dict[str, Any], key: str, deadline: float, run: Callable[[], Any]) -> None:
    if time.monotonic() > deadline:
        results[key] = {"skipped": "time budget"}
        return
    started = time.monotonic()
    try:
        results[key] = run()
    except Exception as error:  # noqa: BLE001 - one failing section is recorded
        results[key] = {"error": f"{type(error).__name__}: {error}"}
        results[key]["traceback"] = traceback.format_exc(limit=8)
    if isinstance(results[key], dict):
        results[key]["seconds"] = round(time.monotonic() - started, 1)


def engine_sections(backend: str, device: Any, info: Any, budget_s: float) -> dict[str, Any]:
    """Tactics vs reference (until 30% of ``budget_s``), zoo engines vs onnxruntime (until 55%)
    and the benchmarks, in that order; what does not fit is marked skipped."""
    from engine import zoo
    from engine.backends.cuda.gpu_engines import check_tactics, check_zoo

    rehearse = backend != "cuda"
    started = time.monotonic()
    deadline = started + budget_s
    # Each section stops at its share of the budget, so the benchmarks always get their turn.
    tactics_end, zoo_end = started + 0.3 * budget_s, started + 0.55 * budget_s
    results: dict[str, Any] = {"backend": backend}
    names = ["resnet", "bert_opset17"] if rehearse else list(zoo.ZOO)
    models = {name: zoo.build(name) for name in names}

    def tactic_plans() -> dict[str, Any]:
        plans = {}
        for name in names[:1] if rehearse else names:
            proto = models[name]
            data = [zoo.make_inputs(proto, seed=seed) for seed in (1, 2)]
            for precision, precisions in (("fp32", FP32_ONLY), ("fp16", FP16), ("int8", INT8)):
                config = BuilderConfig(optimization_level="O3", precisions=precisions)
                model = ir.serde.deserialize_model(proto)
                calibration = data if precision == "int8" else None
                plans[f"{name}/{precision}"] = build(
                    model, config, calibration_data=calibration
                ).plan
        return check_tactics(plans, device, info, tactics_end)

    _guarded(results, "tactics", deadline, tactic_plans)
    precisions = ("fp32",) if rehearse else ("fp32", "fp16", "int8", "sparse")
    _guarded(results, "zoo", deadline, lambda: check_zoo(models, backend, precisions, zoo_end))
    size, sparse_k, iterations = (32, 64, 1) if rehearse else (4096, 16384, 10)
    _guarded(results, "gemm", deadline, lambda: bench_gemm(backend, size, sparse_k, iterations))
    if rehearse:
        config = BuilderConfig(backend=backend, optimization_level="O3")
        engine = build(ir.serde.deserialize_model(models["resnet"]), config)
        feeds = zoo.make_inputs(models["resnet"])
        _guarded(results, "graph", deadline, lambda: bench_graph(engine, feeds, 1))
        return results
    for name, batch in (("resnet50", 1), ("resnet50", 32), ("bert_encoder", 1)):
        _guarded(
            results, f"torch_{name}_bs{batch}", deadline, lambda n=name, b=batch: bench_torch(n, b)
        )
    return results


def engine_summary(engines: dict[str, Any]) -> dict[str, Any]:
    """Counts and ratios of the engine sections for the summary line."""
    tactics = engines.get("tactics", {}).get("cases", {})
    zoo = {k: v for k, v in engines.get("zoo", {}).items() if isinstance(v, dict)}
    ratios = engines.get("gemm", {}).get("ratios", {})
    torch_runs = {
        k: {
            m: v.get(m)
            for m in ("ours_ms", "torch_eager_ms", "torch_compile_ms", "ours_vs_compile")
        }
        for k, v in engines.items()
        if k.startswith("torch_") and isinstance(v, dict)
    }
    return {
        "tactic_cases": len(tactics),
        "tactic_failed": sorted(k for k, v in tactics.items() if v.get("passed") is False),
        "zoo_passed": sorted(k for k, v in zoo.items() if v.get("passed")),
        "zoo_failed": sorted(k for k, v in zoo.items() if v.get("passed") is False),
        "gemm_ratios": ratios,
        "torch": torch_runs,
        "graph": engines.get("graph"),
    }


def rehearse(budget_s: float) -> dict[str, Any]:
    """The engine sections on the CPU shim at toy sizes: the script's logic end to end."""
    from engine.backends.cuda.gpu_bench import engine_sections
    from engine.backends.cuda.setup import SHIM_DEVICE
    from engine.backends.cuda.shim_device import ShimDevice

    started = time.perf_counter()
    from engine.device import ENGINE_VERSION

    results: dict[str, Any] = {"gpu": None, "rehearsal": "cuda-shim", "engine": ENGINE_VERSION}
    results["engines"] = engine_sections("cuda-shim", ShimDevice(), SHIM_DEVICE, budget_s)
    results["summary"] = {
        "seconds": round(time.perf_counter() - started, 1),
        **engine_summary(results["engines"]),
    }
    return results


FP32_ONLY = frozenset({Precision.FP32})
INT8 = frozenset({Precision.FP32, Precision.FP16, Precision.INT8})

__all__ = [
    "bench_gemm",
    "bench_graph",
    "bench_torch",
    "engine_ms",
    "engine_sections",
    "engine_summary",
    "gemm_model",
    "layer_ms",
    "rehearse",
]
