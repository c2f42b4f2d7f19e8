"""CudaEngine: an :class:`~engine.runtime.Engine` whose layers run as CUDA kernels.

Built by ``engine.builder.build`` when ``BuilderConfig.backend`` is ``"cuda"`` (a GPU through
CuPy: :class:`~engine.backends.cuda.cupy_device.CupyDevice`) or ``"cuda-shim"`` (the same
kernels on the CPU: :class:`~engine.backends.cuda.shim_device.ShimDevice`). Everything the
NumPy engine offers works the same (feeds checked against the profiles, ``run``,
``run_observed``, ``profile``, ``layer_table``, .gie export), with these differences:

* the first run at a set of input shapes lowers the plan to a launch plan (kernels, grids,
  arguments, offsets; :func:`~engine.backends.cuda.lowering.lower_launch_plan`) and prepares a
  :class:`~engine.backends.cuda.executor.CudaRunner` (weights uploaded once, one allocation
  per memory region); both are kept per shape set;
* plain runs replay a CUDA graph when the device supports it, ``config.cuda_graphs`` is on and
  no layer falls back to the host; ``config.cuda_streams`` > 1 spreads independent branches
  over streams;
* ``profile`` reports the end-to-end device time of a run (CUDA events around the graph
  replay, uploads and downloads excluded, like trtexec's GPU compute time) and times layers
  with the device clock in a separate layer-by-layer run; ``run_observed`` reads every layer's
  values back after it ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from engine.backends.cuda.executor import CudaRunner, Device
from engine.backends.cuda.launch_plan import LaunchPlan, LayerSteps
from engine.backends.cuda.lowering import lower_launch_plan
from engine.build.log import BuildLog
from engine.build.memory import MemoryPlan, plan_memory
from engine.build.plan import Layer, Plan
from engine.config import BuilderConfig
from engine.ops.registry import Kernel
from engine.runtime import Engine

CUDA_BACKENDS = ("cuda", "cuda-shim")
#: Launch plans (with their runners) kept per engine for other input shapes.
SHAPE_SETS_KEPT = 4


def make_device(backend: str) -> Device:
    """The device of a CUDA backend name (CuPy needs a GPU; the shim needs g++)."""
    if backend == "cuda":
        from engine.backends.cuda.cupy_device import CupyDevice

        return CupyDevice()
    if backend == "cuda-shim":
        from engine.backends.cuda.shim_device import ShimDevice

        return ShimDevice()
    raise ValueError(f"backend {backend!r} is not a CUDA backend {CUDA_BACKENDS}")


class CudaEngine(Engine):
    """An engine running CUDA kernels (see the module docstring)."""

    def __init__(
        self,
        plan: Plan,
        memory: MemoryPlan,
        config: BuilderConfig,
        log: BuildLog,
        device: dict[str, Any],
        cuda_device: Device | None = None,
    ) -> None:
        self.cuda_device = cuda_device or make_device(config.backend)
        self._runners: dict[tuple, CudaRunner] = {}
        super().__init__(plan, memory, config, log, device)

    def _resolve_kernels(self) -> list[Kernel]:
        return []

    def runner_for(self, feeds: dict[str, np.ndarray]) -> CudaRunner:
        """The runner (launch plan prepared on the device) for the feeds' shapes."""
        shapes = {name: tuple(array.shape) for name, array in feeds.items()}
        key = tuple(sorted(shapes.items()))
        runner = self._runners.get(key)
        if runner is None:
            _, planned = self._memory_for(feeds)
            memory = planned or plan_memory(self.plan, self.config, shapes)
            launch = lower_launch_plan(self.plan, memory, shapes)
            if len(self._runners) >= SHAPE_SETS_KEPT:
                self._runners.pop(next(iter(self._runners)))
            runner = self._runners[key] = CudaRunner(
                launch,
                self.cuda_device,
                streams=max(1, self.config.cuda_streams),
                use_graph=self.config.cuda_graphs,
            )
        return runner

    def launch_plan(self, feeds: dict[str, np.ndarray] | None = None) -> LaunchPlan:
        """The launch plan at the feeds' shapes (default: the example feeds)."""
        checked = self.check_feeds(feeds if feeds is not None else self.example_feeds())
        return self.runner_for(checked).plan

    def _run_ms(self, feeds: dict[str, np.ndarray]) -> float:
        """Device time of one run (a CUDA-graph replay when there is one; feeds uploaded and
        outputs read outside the clock), as trtexec's GPU compute time."""
        return self.runner_for(feeds).time_run_ms(feeds)

    def _execute(
        self,
        feeds: dict[str, np.ndarray],
        layer_ms: list[list[float]] | None,
        on_layer: Callable[[Layer, list[Any], list[Any]], None] | None = None,
    ) -> dict[str, np.ndarray]:
        runner = self.runner_for(feeds)
        if layer_ms is None and on_layer is None:
            return runner.run(feeds)
        observe = None
        if on_layer is not None:

            def observe(steps: LayerSteps) -> None:
                layer = self.plan.layers[steps.index]
                on_layer(
                    layer,
                    [self._value(runner, steps, name, feeds) for name in layer.inputs],
                    [self._value(runner, steps, name, feeds) for name in layer.outputs],
                )

        return runner.run_layers(feeds, layer_ms, observe)

    def _value(
        self, runner: CudaRunner, steps: LayerSteps, name: str, feeds: dict[str, np.ndarray]
    ) -> Any:
        if not name:
            return None
        if name in self.plan.constants:
            return self.plan.constants[name]
        if name in runner.plan.host_values:
            return runner.plan.host_values[name]
        if name in feeds:
            return feeds[name]
        buffer = steps.values.get(name)
        return None if buffer is None else runner.device.read(buffer)


__all__ = ["CUDA_BACKENDS", "CudaEngine", "make_device"]
