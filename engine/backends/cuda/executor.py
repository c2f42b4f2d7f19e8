"""Run a :class:`LaunchPlan` on a device: weights uploaded once, one allocation per memory
region, streams with events, whole-run CUDA-graph capture, per-layer timing.

* :meth:`CudaRunner.run` copies the feeds into the ``io`` region, issues every step on the
  stream the :mod:`~engine.backends.cuda.streams` schedule gives it (events for the
  cross-stream dependencies), waits, and reads the outputs back. On a device that supports
  graphs and a plan without host steps, the first run captures the issue sequence as one CUDA
  graph and later runs replay it (one launch for the whole engine).
* :meth:`CudaRunner.run_layers` runs layer by layer on one stream, timing each layer with the
  device's clock (CUDA events on a GPU) and/or handing each layer's inputs and outputs to a
  callback: the separate profiling / observation run.
* Host steps (layers without a CUDA kernel) synchronize, download their inputs, run the NumPy
  kernel and upload the results; they make the plan non-capturable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from engine.backends.cuda.launch_plan import (
    DeviceBuffer,
    HostStep,
    KernelLaunch,
    LaunchPlan,
    LayerSteps,
    Step,
)
from engine.backends.cuda.streams import Schedule, schedule


class Device(Protocol):
    """What the executor needs of a device (ShimDevice, CupyDevice)."""

    name: str
    supports_graphs: bool

    def bind(self, owner: str) -> None: ...
    def release(self, owner: str) -> None: ...
    def allocate(self, region_bytes: dict[str, int]) -> None: ...
    def write(self, buffer: DeviceBuffer, array: np.ndarray) -> None: ...
    def read(self, buffer: DeviceBuffer) -> np.ndarray: ...
    def load(self, launch: KernelLaunch) -> None: ...
    def ensure_streams(self, count: int) -> None: ...
    def submit(self, stream: int, step: Step) -> None: ...
    def record(self, stream: int) -> Any: ...
    def wait(self, stream: int, event: Any) -> None: ...
    def synchronize(self) -> None: ...
    def elapsed_ms(self, run: Callable[[], object]) -> float: ...


class HostStepError(RuntimeError):
    """A host-fallback layer produced something other than what its buffers hold."""


class CudaRunner:
    """Executes one launch plan on one device (see the module docstring)."""

    def __init__(
        self,
        plan: LaunchPlan,
        device: Device,
        streams: int = 1,
        use_graph: bool = True,
        owner: str | None = None,
    ) -> None:
        self.plan = plan
        self.device = device
        #: The name of this runner's memory on the device (one set of regions per runner).
        self.owner = owner or f"runner-{id(self)}"
        device.bind(self.owner)
        device.allocate(dict(plan.region_bytes))
        for buffer, array in plan.weights:
            device.write(buffer, array)
        for step in plan.steps:
            if isinstance(step, KernelLaunch):
                device.load(step)
        self.schedule: Schedule = schedule(plan.steps, streams)
        device.ensure_streams(self.schedule.streams)
        self.use_graph = use_graph and device.supports_graphs and plan.graph_capturable
        self._graph: Any = None
        self.graph_replays = 0

    # ---------------------------------------------------------------- whole runs

    def close(self) -> None:
        """Free this runner's device memory."""
        self.device.release(self.owner)

    def _write_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        self.device.bind(self.owner)
        for name, buffer in self.plan.inputs.items():
            self.device.write(buffer, np.asarray(feeds[name]))

    def _read_outputs(self) -> dict[str, np.ndarray]:
        return {name: self.device.read(buffer) for name, buffer in self.plan.outputs.items()}

    def _run_host(self, step: HostStep) -> None:
        self.device.synchronize()
        inputs = [None if b is None else self.device.read(b) for b in step.inputs]
        results = list(step.kernel(inputs, step.attrs, step.context))
        for buffer, result in zip(step.outputs, results):
            if buffer is None:
                continue
            array = np.asarray(result)
            if tuple(array.shape) != buffer.shape or array.dtype != np.dtype(buffer.dtype):
                raise HostStepError(
                    f"host fallback produced {array.dtype}{list(array.shape)}, its buffer is "
                    f"{buffer.describe()}"
                )
            self.device.write(buffer, array)

    def issue(self) -> None:
        """Issue every step on its stream (no synchronization at the end)."""
        self.device.bind(self.owner)
        events: dict[int, Any] = {}
        for j, step in enumerate(self.plan.steps):
            if isinstance(step, HostStep):
                self._run_host(step)
                continue
            stream = self.schedule.stream[j]
            for i in self.schedule.waits[j]:
                self.device.wait(stream, events[i])
            self.device.submit(stream, step)
            if j in self.schedule.recorded:
                events[j] = self.device.record(stream)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs (plain layout, host arrays) for ``feeds``."""
        self._write_feeds(feeds)
        if self.use_graph:
            self._replay()
        else:
            self.issue()
        self.device.synchronize()
        return self._read_outputs()

    def _capture(self) -> Any:
        """The CUDA graph of one issue, captured after one eager issue (which loads every
        function and lets cuBLAS allocate its workspace outside the capture)."""
        if self._graph is None:
            self.issue()
            self.device.synchronize()
            self._graph = self.device.capture(self.issue)  # type: ignore[attr-defined]
        return self._graph

    def _replay(self) -> None:
        self.device.replay(self._capture())  # type: ignore[attr-defined]
        self.graph_replays += 1

    def time_run_ms(self, feeds: Mapping[str, np.ndarray]) -> float:
        """Device time of one whole run (feeds uploaded before the clock starts)."""
        self._write_feeds(feeds)
        if self.use_graph:
            graph = self._capture()
            return self.device.elapsed_ms(lambda: self.device.replay(graph))  # type: ignore[attr-defined]
        return self.device.elapsed_ms(self.issue)

    # ---------------------------------------------------------------- layer by layer

    def run_layers(
        self,
        feeds: Mapping[str, np.ndarray],
        layer_ms: list[list[float]] | None = None,
        after_layer: Callable[[LayerSteps], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """One stream, layer by layer: ``layer_ms[i]`` gets layer i's device time;
        ``after_layer(layer)`` runs once the layer finished (read its values then)."""
        self._write_feeds(feeds)
        for layer in self.plan.layers:

            def run(layer: LayerSteps = layer) -> None:
                for step in layer.steps:
                    if isinstance(step, HostStep):
                        self._run_host(step)
                    else:
                        self.device.submit(0, step)

            if layer_ms is not None:
                layer_ms[layer.index].append(self.device.elapsed_ms(run))
            else:
                run()
            if after_layer is not None:
                self.device.synchronize()
                after_layer(layer)
        self.device.synchronize()
        return self._read_outputs()


__all__ = ["CudaRunner", "Device", "HostStepError"]
