"""Identity of the device an engine is built for and runs on (keys timing caches, guards .gie)."""

from __future__ import annotations

import os
import platform
from functools import cache

import numpy as np
import onnx

ENGINE_VERSION = "0.1.0"


@cache
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else the platform's processor)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_identity(backend: str = "numpy") -> dict[str, str]:
    """What an engine's tactics and timings depend on: backend, device, library versions
    (on a CUDA backend the device is the GPU, or the CPU shim, with its compute capability)."""
    if backend in ("cuda", "cuda-shim"):
        from engine.backends.cuda.setup import cuda_identity

        return {**device_identity("numpy"), "backend": backend, **cuda_identity(backend)}
    return {
        "backend": backend,
        "device": cpu_model(),
        "machine": platform.machine(),
        "threads": str(usable_cpus()),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "engine": ENGINE_VERSION,
    }
