"""The CPU shim as a device: a launch plan runs on the CPU through the same CUDA sources.

Memory regions are aligned NumPy byte arrays; a :class:`DeviceBuffer` argument becomes a typed
view at its offset, so the kernels index the same bytes they would on a GPU (a wrong offset,
stride or alias in the lowering gives wrong numbers here too). Kernels are compiled with g++
and the shim header (:mod:`engine.backends.cuda.shim_runner`), ``-D`` defines prepended as
``#define`` lines. cuBLAS GEMMs are emulated with NumPy at the requested compute type.

Streams: with ``interleave=True`` the device queues work per stream and, at
:meth:`synchronize`, runs the queues in a seeded random interleaving that respects only the
recorded events, so a missing dependency in the stream schedule shows up as wrong results. It
is slow (one CPU thread per CUDA thread): use tiny shapes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.cuda import shim_runner
from engine.backends.cuda.launch_plan import (
    ALIGNMENT,
    CopyStep,
    DeviceBuffer,
    KernelLaunch,
    KernelSource,
    LibraryGemm,
)
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.quantize.numerics import round_to_tf32

Work = Callable[[], None]


class ShimDevice:
    """Runs launch plans on the CPU (see the module docstring)."""

    name = "cpu-shim"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        interleave: bool = False,
        seed: int = 0,
        graphs: bool = False,
    ) -> None:
        self.cache_dir = cache_dir
        self.interleave = interleave
        #: With ``graphs``, :meth:`capture` records the issued work and :meth:`replay` runs
        #: the recording (what a CUDA graph is), so the executor's graph path runs here too.
        self.supports_graphs = graphs
        self._recording: list[tuple[int, tuple[str, Any]]] | None = None
        self._random = random.Random(seed)
        self._memory: dict[str, dict[str, np.ndarray]] = {}
        self._owner = "default"
        self._regions: dict[str, np.ndarray] = self._memory.setdefault("default", {})
        self._libraries: dict[tuple[str, str], shim_runner.ShimLibrary] = {}
        self._queues: dict[int, list[tuple[str, Any]]] = {}
        self._events: dict[int, bool] = {}
        self._next_event = 0

    # ---------------------------------------------------------------- memory

    def bind(self, owner: str) -> None:
        """Make ``owner``'s memory regions the ones buffers refer to."""
        self._owner = owner
        self._regions = self._memory.setdefault(owner, {})

    def release(self, owner: str) -> None:
        """Free ``owner``'s memory regions."""
        self._memory.pop(owner, None)
        if self._owner == owner:
            self.bind("default")

    def allocate(self, region_bytes: dict[str, int]) -> None:
        """One allocation per region (reused when big enough)."""
        for region, size in region_bytes.items():
            current = self._regions.get(region)
            if current is None or current.nbytes < size:
                raw = np.zeros(size + 2 * ALIGNMENT, dtype=np.uint8)
                start = -raw.ctypes.data % ALIGNMENT
                self._regions[region] = raw[start : start + size + ALIGNMENT]

    def view(self, buffer: DeviceBuffer) -> np.ndarray:
        """The buffer's bytes as a flat typed array (memory order)."""
        region = self._regions[buffer.region]
        raw = region[buffer.offset : buffer.offset + buffer.nbytes]
        return raw.view(np.dtype(buffer.dtype))

    def write(self, buffer: DeviceBuffer, array: np.ndarray) -> None:
        self.synchronize()
        data = np.asarray(array, dtype=np.dtype(buffer.dtype)).reshape(buffer.shape)
        if buffer.layout == "nhwc":
            data = data.transpose(0, 2, 3, 1)
        self.view(buffer)[...] = np.ascontiguousarray(data).reshape(-1)

    def read(self, buffer: DeviceBuffer) -> np.ndarray:
        """A copy in the logical (plain) shape."""
        self.synchronize()
        flat = self.view(buffer).copy()
        if buffer.layout == "nhwc":
            n, c, h, w = buffer.shape
            return np.ascontiguousarray(flat.reshape(n, h, w, c).transpose(0, 3, 1, 2))
        return flat.reshape(buffer.shape)

    # ---------------------------------------------------------------- kernels

    def _library(self, source: KernelSource) -> shim_runner.ShimLibrary:
        key = (source.file or source.text or "", repr(source.defines))
        if key not in self._libraries:
            text = (KERNEL_DIR / source.file).read_text() if source.file else source.text or ""
            header = "".join(f"#define {name} {value}\n" for name, value in source.defines)
            self._libraries[key] = shim_runner.build(header + text, source.label, self.cache_dir)
        return self._libraries[key]

    def load(self, launch: KernelLaunch) -> None:
        """Compile the launch's kernel ahead of the run."""
        self._library(launch.source)

    def _argument(self, value: Any) -> Any:
        return self.view(value) if isinstance(value, DeviceBuffer) else value

    def _run_launch(self, launch: KernelLaunch) -> None:
        library = self._library(launch.source)
        args = [self._argument(a) for a in launch.args]
        library.launch(
            launch.entry, launch.grid, launch.block, args, shared_bytes=launch.shared_bytes
        )

    def _run_copy(self, step: CopyStep) -> None:
        self.view(step.dst).view(np.uint8)[...] = self.view(step.src).view(np.uint8)

    def _run_gemm(self, step: LibraryGemm) -> None:
        a_all, b_all, c_all = self.view(step.a), self.view(step.b), self.view(step.c)
        for z in range(step.batch):

            def matrix(flat: np.ndarray, start: int, rows: int, cols: int, ld: int) -> np.ndarray:
                return np.lib.stride_tricks.as_strided(
                    flat[start:], (rows, cols), (ld * flat.itemsize, flat.itemsize)
                )

            a = matrix(a_all, z * step.stride_a, step.m, step.k, step.lda)
            b = matrix(b_all, z * step.stride_b, step.k, step.n, step.ldb)
            c = matrix(c_all, z * step.stride_c, step.m, step.n, step.ldc)
            if step.compute == "int8":  # exact int32 accumulation (K is bounded by the check)
                c[...] = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
                continue
            a, b = a.astype(np.float32), b.astype(np.float32)
            if step.compute == "tf32":
                a, b = round_to_tf32(a), round_to_tf32(b)
            product = np.float32(step.alpha) * (a @ b)
            if step.beta:
                product = product + np.float32(step.beta) * c.astype(np.float32)
            c[...] = product.astype(c.dtype)

    # ---------------------------------------------------------------- streams

    def ensure_streams(self, count: int) -> None:
        """Streams are queues made on first use here."""

    def submit(self, stream: int, step: Any) -> None:
        """Queue (or, without interleaving, run) one step on ``stream``."""
        if isinstance(step, KernelLaunch):
            work: Work = lambda: self._run_launch(step)  # noqa: E731
        elif isinstance(step, CopyStep):
            work = lambda: self._run_copy(step)  # noqa: E731
        elif isinstance(step, LibraryGemm):
            work = lambda: self._run_gemm(step)  # noqa: E731
        else:
            raise TypeError(f"the device cannot run {type(step).__name__}")
        self._enqueue(stream, ("work", work))

    def record(self, stream: int) -> int:
        event = self._next_event
        self._next_event += 1
        self._events[event] = False
        self._enqueue(stream, ("record", event))
        return event

    def wait(self, stream: int, event: int) -> None:
        self._enqueue(stream, ("wait", event))

    def _enqueue(self, stream: int, item: tuple[str, Any]) -> None:
        if self._recording is not None:
            self._recording.append((stream, item))
            return
        if not self.interleave:
            self._execute(item)
            return
        self._queues.setdefault(stream, []).append(item)

    def _execute(self, item: tuple[str, Any]) -> None:
        kind, payload = item
        if kind == "work":
            payload()
        elif kind == "record":
            self._events[payload] = True

    def synchronize(self) -> None:
        """Run everything queued (in a random order the events allow, when interleaving)."""
        if self._recording is not None:
            return
        while any(self._queues.values()):
            ready = [
                s
                for s, queue in self._queues.items()
                if queue and (queue[0][0] != "wait" or self._events.get(queue[0][1], False))
            ]
            if not ready:
                raise RuntimeError("stream deadlock: every queue waits for an unrecorded event")
            stream = self._random.choice(sorted(ready))
            self._execute(self._queues[stream].pop(0))

    def capture(self, issue: Callable[[], None]) -> list[tuple[int, tuple[str, Any]]]:
        """The work ``issue`` submits, recorded instead of run (a CUDA graph's stand-in)."""
        self._recording = []
        try:
            issue()
            return self._recording
        finally:
            self._recording = None

    def replay(self, graph: list[tuple[int, tuple[str, Any]]]) -> None:
        for stream, item in graph:
            self._enqueue(stream, item)

    def elapsed_ms(self, run: Callable[[], object]) -> float:
        """Wall time of ``run`` followed by a synchronize (the shim has no events)."""
        import time

        started = time.perf_counter()
        run()
        self.synchronize()
        return (time.perf_counter() - started) * 1e3


__all__ = ["ShimDevice"]
