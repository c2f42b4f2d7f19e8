"""Small real engines and reports of the zoo ResNet, shared by the studio tests (built once).

fp32 and int8 (fp32 + int8 allowed, entropy calibration on two seeded batches) engines with the
reference tactics only (fast), each profiled once (2 iterations, no warm-up), and the int8
engine's per-layer errors against the fp32 one on the calibration batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx
import pytest

from engine import zoo
from engine.builder import build
from engine.config import BuilderConfig, Precision
from engine.onnx_io import load
from engine.quantize.accuracy import LayerError, compare_engines
from engine.report import ProfileReport
from engine.runtime import Engine

FAST = BuilderConfig(tactic_sources=frozenset({"reference"}))


@dataclass(frozen=True)
class ResnetEngines:
    """The zoo ResNet built in fp32 and in int8, their reports and the int8 layer errors."""

    proto: onnx.ModelProto
    batches: list[dict[str, Any]]
    fp32: Engine
    int8: Engine
    fp32_report: ProfileReport
    int8_report: ProfileReport
    errors: list[LayerError]


@pytest.fixture(scope="session")
def resnet_engines() -> ResnetEngines:
    proto = zoo.build("resnet")
    batches = [zoo.make_inputs(proto, seed=seed) for seed in range(2)]
    fp32 = build(load(proto), FAST)
    int8 = build(
        load(proto),
        FAST.with_changes(precisions=frozenset({Precision.FP32, Precision.INT8})),
        calibration_data=batches,
    )
    errors, _ = compare_engines(fp32, int8, batches)
    return ResnetEngines(
        proto=proto,
        batches=batches,
        fp32=fp32,
        int8=int8,
        fp32_report=fp32.profile(iterations=2, warmup=0),
        int8_report=int8.profile(iterations=2, warmup=0),
        errors=errors,
    )
