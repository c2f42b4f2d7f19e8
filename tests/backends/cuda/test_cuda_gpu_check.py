"""The engine sections of ``make gpu-check`` rehearsed on the CPU shim (toy sizes), so the
script that an H100/H200 session runs once has run end to end before it gets there."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
import pytest

from engine import zoo
from engine.backends.cuda.gpu_bench import bench_gemm, engine_summary
from engine.backends.cuda.gpu_engines import check_tactics, check_zoo, judge
from engine.backends.cuda.setup import SHIM_DEVICE
from engine.backends.cuda.shim_device import ShimDevice
from engine.builder import build
from engine.config import BuilderConfig, Precision

pytestmark = pytest.mark.xdist_group("cuda-shim")


def test_judge_applies_each_precisions_tolerance() -> None:
    want = {"y": np.array([1.0, -2.0, 3.0])}
    assert judge("fp32", {"y": want["y"] + 1e-5}, want)["passed"]
    assert not judge("fp32", {"y": want["y"] + 1e-2}, want)["passed"]
    assert judge("fp16", {"y": want["y"] * 1.01}, want)["passed"]  # cosine is scale-free
    assert not judge("int8", {"y": np.array([3.0, 1.0, -2.0])}, want)["passed"]


def test_gemm_benchmark_cases_run_their_tactic_families() -> None:
    results = bench_gemm("cuda-shim", 32, 64, iterations=1)
    tactics = {name: case.get("tactic", case.get("error")) for name, case in results.items()}
    assert tactics["cublas_fp16"] == "cublas_fp16"
    assert tactics["own_int8"].startswith("gemm_imma")
    assert tactics["sparse_fp16"] == "gemm_sparse_f16"
    assert tactics["own_fp16"].startswith("gemm_mma")
    assert all(value is not None for value in results["ratios"].values()), results["ratios"]


def test_tactic_checks_and_zoo_check_pass_on_the_shim() -> None:
    proto = zoo.build("mobilenetv2_block")
    config = BuilderConfig(optimization_level="O3", precisions=frozenset({Precision.FP32}))
    plan = build(ir.serde.deserialize_model(proto), config).plan
    depthwise = next(i for i, layer in enumerate(plan.layers) if layer.attrs.int("group", 1) > 1)
    plan = replace(plan, layers=plan.layers[depthwise - 1 : depthwise + 1])  # 1x1, depthwise
    tactics = check_tactics({"mobilenet": plan}, ShimDevice(), SHIM_DEVICE, None)
    assert tactics["cases"] and all(c["passed"] for c in tactics["cases"].values()), tactics
    assert "conv_depthwise_f32" in tactics["by_tactic"]
    zoo_results = check_zoo({"resnet": zoo.build("resnet")}, "cuda-shim", ("fp32",))
    summary = engine_summary({"tactics": tactics, "zoo": zoo_results})
    assert summary["zoo_passed"] == ["resnet/fp32"] and summary["tactic_failed"] == []
