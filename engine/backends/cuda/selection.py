"""Tactic selection on a CUDA device: the CUDA catalogue's candidates, timed as launches.

:class:`CudaTacticSource` plugs into :func:`engine.build.selector.select_tactics`:

* candidates are :func:`~engine.backends.cuda.tactics.cuda_candidates` (catalogue tactics that
  fit the layer and the device and have a lowering); a layer with none runs on the host
  (tactic ``"host"``), and the build log says why each CUDA tactic was refused;
* a candidate is timed by lowering the layer alone with that tactic (its inputs and outputs in
  scratch memory), uploading the seeded timing inputs once, and timing only the launches with
  the device clock (:class:`~engine.backends.cuda.timing.CudaEventTimer` on a GPU);
* timing-cache keys are :func:`~engine.backends.cuda.timing.cuda_timing_key` (GPU name, compute
  capability, driver / runtime / NVRTC / CuPy versions, catalogue version);
* on the CPU shim (``timed=False``) nothing is timed: the first candidate in catalogue order is
  kept, so shim engines are deterministic and fast to build.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from engine.backends.cuda.device_info import DeviceInfo
from engine.backends.cuda.executor import CudaRunner, Device
from engine.backends.cuda.lowering import HOST_TACTIC, lower_launch_plan
from engine.backends.cuda.tactics import cuda_candidates, cuda_refusals, cuda_why_not
from engine.backends.cuda.timing import cuda_timing_key
from engine.build.log import BuildLog
from engine.build.memory import MemoryPlan
from engine.build.plan import Layer, Plan
from engine.config import BuilderConfig

STAGE = "tactics"


def single_layer_runner(
    layer: Layer, plan: Plan, tactic: str, inputs: list[Any], device: Device, owner: str
) -> tuple[CudaRunner, dict[str, Any]]:
    """``layer`` alone with ``tactic``, lowered at the shapes of ``inputs`` (its values and
    outputs in scratch memory) and prepared on ``device``; with the feeds it needs (its inputs
    that are not constants)."""
    single = replace(layer, index=0, tactic=tactic)
    feeds = {n: v for n, v in zip(layer.inputs, inputs) if n and n not in plan.constants}
    outputs = [n for n in layer.outputs if n]
    mini = Plan(plan.model, [single], list(feeds), outputs, plan.constants, plan.specs)
    shapes = {n: tuple(np.shape(v)) for n, v in feeds.items()}
    launch = lower_launch_plan(mini, MemoryPlan(64, 0, 0), shapes, specs=plan.specs)
    return CudaRunner(launch, device, streams=1, use_graph=False, owner=owner), feeds


class CudaTacticSource:
    """CUDA tactics for the selector (see the module docstring)."""

    def __init__(
        self,
        info: DeviceInfo,
        device: Device,
        config: BuilderConfig,
        log: BuildLog | None = None,
        timed: bool = True,
    ) -> None:
        self.info = info
        self.device = device
        self.config = config
        self.log = log
        self.timed = timed

    def candidates(self, layer: Layer, plan: Plan, config: BuilderConfig) -> list[str]:
        found = cuda_candidates(layer, plan, config, self.info)
        if not found:
            if self.log is not None:
                reasons = cuda_refusals(layer, plan, config, self.info)
                why = "; ".join(f"{k}: {v}" for k, v in reasons.items()) or (
                    f"no CUDA kernel for {layer.qualified_op}"
                )
                self.log.add(STAGE, f"runs on the host ({why})", layer.name)
            return [HOST_TACTIC]
        return found if self.timed else found[:1]

    def why_not(self, layer: Layer, plan: Plan, name: str) -> str | None:
        if name == HOST_TACTIC:
            return None
        try:
            return cuda_why_not(layer, plan, name, self.info)
        except ValueError as error:
            return str(error)

    def runner(
        self, layer: Layer, plan: Plan, name: str, inputs: list[Any]
    ) -> Callable[[], object]:
        """The layer alone, lowered with tactic ``name``, inputs uploaded: run = the launches."""
        runner, feeds = single_layer_runner(layer, plan, name, inputs, self.device, "timing")
        for n, value in feeds.items():
            self.device.write(runner.plan.inputs[n], np.asarray(value))
        return runner.issue

    def key(self, layer: Layer, plan: Plan) -> dict[str, Any]:
        """The CUDA timing-cache key; cold-L2 timings are cached apart from warm ones."""
        key = cuda_timing_key(layer, plan, self.info)
        if self.config.timing_flush_l2:
            key["flush_l2"] = True
        return key


class DeviceClock:
    """The EventClock protocol over a device's ``elapsed_ms`` (events on its own streams)."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def elapsed_ms(self, run: Callable[[], object]) -> float:
        return self.device.elapsed_ms(run)

    def flush_l2(self) -> None:
        flush = getattr(self.device, "flush_l2", None)
        if flush is not None:
            flush()


__all__ = ["CudaTacticSource", "DeviceClock", "single_layer_runner"]
