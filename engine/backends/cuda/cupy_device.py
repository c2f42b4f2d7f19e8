"""The GPU device: launch plans on CUDA through CuPy (imported here only, on construction).

* Memory: one ``cupy.empty`` allocation per region; a :class:`DeviceBuffer` is the region's base
  pointer plus its offset (:class:`~engine.backends.cuda.launcher.DevicePointer`).
* Kernels: NVRTC to CUBIN for the device's architecture through the on-disk compile cache
  (:mod:`engine.backends.cuda.nvrtc`), loaded and launched through
  :class:`~engine.backends.cuda.launcher.CudaModule` (arguments checked against the source's
  signature before the driver sees them). Kernels that need over 48 KB of dynamic shared
  memory get the attribute raised when loaded.
* Streams: ``streams[0]`` is the engine's main stream; others are created on demand; events
  are ``cupy.cuda.Event(disable_timing=True)``.
* CUDA graphs: :meth:`capture` records one issue of the plan on the main stream (other streams
  fork from it with an event and join back), :meth:`replay` launches the graph.
* cuBLAS: ``gemmEx`` / ``gemmStridedBatchedEx`` on row-major operands by computing C^T = B^T A^T
  in cuBLAS's column-major convention.

Nothing here ran on a GPU in the session that wrote it: ``make gpu-check`` is its test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from engine.backends.cuda import nvrtc
from engine.backends.cuda.device_info import DeviceInfo, probe, probe_reason
from engine.backends.cuda.launch_plan import (
    CopyStep,
    DeviceBuffer,
    KernelLaunch,
    KernelSource,
    LibraryGemm,
)
from engine.backends.cuda.launcher import CudaModule, DevicePointer

#: cudaDataType / cublasComputeType values (cuda_runtime_api.h, cublas_api.h).
CUDA_R_32F, CUDA_R_16F, CUDA_R_8I, CUDA_R_32I = 0, 2, 3, 10
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_COMPUTE_32I = 68, 77, 72
CUBLAS_OP_N = 0
CUBLAS_GEMM_DEFAULT = -1


class CudaUnavailableError(RuntimeError):
    """No usable GPU (the message says why: no CuPy, no driver, no device)."""


class CupyDevice:
    """Runs launch plans on GPU ``index`` (see the module docstring)."""

    supports_graphs = True

    def __init__(self, index: int = 0, cache: nvrtc.CompileCache | None = None) -> None:
        info = probe(index)
        if info is None:
            raise CudaUnavailableError(probe_reason(index) or "no CUDA device")
        import cupy  # type: ignore[import-not-found]

        self._cupy = cupy
        self.info: DeviceInfo = info
        self.name = info.name
        cupy.cuda.Device(index).use()
        self.cache = cache or nvrtc.CompileCache()
        self._memory: dict[str, dict[str, Any]] = {}
        self._owner = "default"
        self._regions: dict[str, Any] = self._memory.setdefault("default", {})
        self._modules: dict[tuple[str, tuple], CudaModule] = {}
        self._streams: list[Any] = [cupy.cuda.Stream(non_blocking=True)]
        self._capturing = False

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
        for region, size in region_bytes.items():
            current = self._regions.get(region)
            if current is None or current.nbytes < size:
                self._regions[region] = self._cupy.empty(max(size, 1), dtype=self._cupy.uint8)

    def pointer(self, buffer: DeviceBuffer) -> DevicePointer:
        return DevicePointer(int(self._regions[buffer.region].data.ptr) + buffer.offset)

    def _array(self, buffer: DeviceBuffer) -> Any:
        region = self._regions[buffer.region]
        memory = region.data + buffer.offset
        return self._cupy.ndarray((buffer.size,), dtype=np.dtype(buffer.dtype), memptr=memory)

    def write(self, buffer: DeviceBuffer, array: np.ndarray) -> None:
        data = np.asarray(array, dtype=np.dtype(buffer.dtype)).reshape(buffer.shape)
        if buffer.layout == "nhwc":
            data = data.transpose(0, 2, 3, 1)
        self.synchronize()
        self._array(buffer).set(np.ascontiguousarray(data).reshape(-1))
        # A pageable host copy may still be in flight when set() returns, and the engine's
        # streams do not wait for the legacy default stream: finish it before any launch.
        self._cupy.cuda.runtime.deviceSynchronize()

    def read(self, buffer: DeviceBuffer) -> np.ndarray:
        self.synchronize()
        flat = self._array(buffer).get()
        if buffer.layout == "nhwc":
            n, c, h, w = buffer.shape
            return np.ascontiguousarray(flat.reshape(n, h, w, c).transpose(0, 3, 1, 2))
        return flat.reshape(buffer.shape)

    # ---------------------------------------------------------------- kernels

    def _module(self, source: KernelSource) -> CudaModule:
        key = (source.file or source.text or "", source.defines)
        if key not in self._modules:
            text = (nvrtc.KERNEL_DIR / source.file).read_text() if source.file else source.text
            assert text is not None
            result = nvrtc.compile_source(
                text, source.label, self.info.arch, "cubin", source.options(), self.cache
            )
            self._modules[key] = CudaModule(result, text)
        return self._modules[key]

    def load(self, launch: KernelLaunch) -> None:
        """Compile (or take from the cache) and load the launch's function now: nothing is
        compiled or loaded while a CUDA graph is being captured."""
        self._module(launch.source).prepare(launch.entry)

    def ensure_streams(self, count: int) -> None:
        """Create streams up to ``count`` now (a graph capture cannot create them later)."""
        self.stream(count - 1)

    def stream(self, index: int) -> Any:
        while len(self._streams) <= index:
            self._streams.append(self._cupy.cuda.Stream(non_blocking=True))
        return self._streams[index]

    def submit(self, stream: int, step: Any) -> None:
        target = self.stream(stream)
        if isinstance(step, KernelLaunch):
            args = [self.pointer(a) if isinstance(a, DeviceBuffer) else a for a in step.args]
            self._module(step.source).launch(
                step.entry, step.grid, step.block, args, step.shared_bytes, target
            )
        elif isinstance(step, CopyStep):
            runtime = self._cupy.cuda.runtime
            runtime.memcpyAsync(
                self.pointer(step.dst).address,
                self.pointer(step.src).address,
                step.src.nbytes,
                runtime.memcpyDeviceToDevice,
                target.ptr,
            )
        elif isinstance(step, LibraryGemm):
            self._gemm(step, target)
        else:
            raise TypeError(f"the device cannot run {type(step).__name__}")

    def _gemm(self, step: LibraryGemm, stream: Any) -> None:
        from cupy_backends.cuda.libs import cublas  # type: ignore[import-not-found]

        handle = self._cupy.cuda.device.get_cublas_handle()
        cublas.setStream(handle, stream.ptr)
        data = out = CUDA_R_16F if step.compute == "fp16" else CUDA_R_32F
        compute = CUBLAS_COMPUTE_32F_FAST_TF32 if step.compute == "tf32" else CUBLAS_COMPUTE_32F
        scalar = np.float32
        if step.compute == "int8":  # int8 inputs, int32 accumulator and output
            data, out, compute, scalar = CUDA_R_8I, CUDA_R_32I, CUBLAS_COMPUTE_32I, np.int32
        alpha = np.array(step.alpha, dtype=scalar)
        beta = np.array(step.beta, dtype=scalar)
        a, b, c = (self.pointer(x).address for x in (step.a, step.b, step.c))
        # Row-major C = A @ B is column-major C^T = B^T @ A^T: swap the operands and m/n.
        if step.batch == 1:
            cublas.gemmEx(
                handle, CUBLAS_OP_N, CUBLAS_OP_N, step.n, step.m, step.k, alpha.ctypes.data,
                b, data, step.ldb, a, data, step.lda, beta.ctypes.data, c, out, step.ldc,
                compute, CUBLAS_GEMM_DEFAULT,
            )  # fmt: skip
        else:
            cublas.gemmStridedBatchedEx(
                handle, CUBLAS_OP_N, CUBLAS_OP_N, step.n, step.m, step.k, alpha.ctypes.data,
                b, data, step.ldb, step.stride_b, a, data, step.lda, step.stride_a,
                beta.ctypes.data, c, out, step.ldc, step.stride_c, step.batch, compute,
                CUBLAS_GEMM_DEFAULT,
            )  # fmt: skip

    # ---------------------------------------------------------------- streams and graphs

    def record(self, stream: int) -> Any:
        event = self._cupy.cuda.Event(disable_timing=True)
        event.record(self.stream(stream))
        return event

    def wait(self, stream: int, event: Any) -> None:
        self.stream(stream).wait_event(event)

    def synchronize(self) -> None:
        if self._capturing:
            return
        for stream in self._streams:
            stream.synchronize()

    def capture(self, issue: Callable[[], None]) -> Any:
        """One issue of the plan captured as a CUDA graph on the main stream."""
        main = self.stream(0)
        main.begin_capture()
        self._capturing = True
        try:
            fork = self.record(0)
            for index in range(1, len(self._streams)):
                self.wait(index, fork)
            issue()
            for index in range(1, len(self._streams)):
                self.wait(0, self.record(index))
        finally:
            self._capturing = False
            graph = main.end_capture()
        return graph

    def replay(self, graph: Any) -> None:
        graph.launch(self.stream(0))

    def flush_l2(self) -> None:
        """Write twice the L2 size (at least 64 MiB) on the main stream, a new byte value
        each time, so the next timed run starts with a cold L2."""
        if getattr(self, "_flush", None) is None:
            size = max(2 * self.info.l2_bytes, 64 << 20)
            self._flush = self._cupy.empty(size, dtype=self._cupy.uint8)
            self._flush_value = 0
        self._flush_value = (self._flush_value + 1) % 256
        with self.stream(0):
            self._flush.fill(self._flush_value)

    def elapsed_ms(self, run: Callable[[], object]) -> float:
        """Device time of ``run`` (events on the main stream, others joined)."""
        cuda = self._cupy.cuda
        start, end = cuda.Event(), cuda.Event()
        main = self.stream(0)
        start.record(main)
        for index in range(1, len(self._streams)):
            self.wait(index, start)
        run()
        for index in range(1, len(self._streams)):
            self.wait(0, self.record(index))
        end.record(main)
        end.synchronize()
        return float(cuda.get_elapsed_time(start, end))


__all__ = ["CudaUnavailableError", "CupyDevice"]
