"""What a build on a CUDA backend needs before tactic selection: the device, its identity, the
tactic source and the timer (see :mod:`engine.backends.cuda.selection`)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.backends.cuda.device_info import DeviceInfo, fake_device
from engine.backends.cuda.engine import make_device
from engine.backends.cuda.executor import Device
from engine.backends.cuda.selection import CudaTacticSource, DeviceClock
from engine.backends.cuda.timing import CudaEventTimer
from engine.build.log import BuildLog
from engine.build.timing import Timer
from engine.config import BuilderConfig

#: What the CPU shim reports as its device: the compute capability its kernels are checked
#: against (sm_90: every catalogue tactic is allowed); cuBLAS calls are emulated with NumPy.
SHIM_DEVICE = fake_device(name="CPU shim (CUDA kernels on the host)", cupy_version="emulated")


@dataclass
class CudaSetup:
    device: Device
    info: DeviceInfo
    source: CudaTacticSource
    timer: Timer | None
    identity: dict[str, str]


def cuda_setup(config: BuilderConfig, log: BuildLog, timer: Timer | None) -> CudaSetup:
    """The device of ``config.backend`` and how its tactics are chosen (logged)."""
    device = make_device(config.backend)
    if config.backend == "cuda":
        info = device.info  # type: ignore[attr-defined]
        source = CudaTacticSource(info, device, config, log, timed=True)
        timer = timer or CudaEventTimer(
            config.timing_warmup,
            config.timing_iterations,
            flush_l2=config.timing_flush_l2,
            clock=DeviceClock(device),
            device=info,
        )
        log.add("tactics", f"CUDA tactics timed with events on {info.name} ({info.arch})")
    else:
        info = SHIM_DEVICE
        source = CudaTacticSource(info, device, config, log, timed=False)
        log.add(
            "tactics",
            "CUDA kernels on the CPU shim: not timed, the first fitting tactic of the catalogue",
        )
    return CudaSetup(device, info, source, timer, cuda_identity(config.backend, info))


def auto_backend() -> str:
    """The backend to use here: "cuda" when CuPy sees a GPU, else "numpy"."""
    from engine.backends.cuda.device_info import probe

    return "cuda" if probe() is not None else "numpy"


def cuda_identity(backend: str, info: DeviceInfo | None = None) -> dict[str, str]:
    """The device part of an engine's identity: GPU (or shim) name and compute capability."""
    if info is None:
        if backend == "cuda-shim":
            info = SHIM_DEVICE
        else:
            from engine.backends.cuda.device_info import probe

            info = probe()
            if info is None:
                return {"device": "no CUDA device", "compute_capability": "none"}
    return {"device": info.name, "compute_capability": info.arch}


__all__ = ["SHIM_DEVICE", "CudaSetup", "auto_backend", "cuda_identity", "cuda_setup"]
