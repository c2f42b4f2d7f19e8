"""What GPU the CUDA backend runs on: name, compute capability, sizes and software versions.

:func:`probe` asks CuPy (imported here, lazily) for device ``index`` and returns a
:class:`DeviceInfo`, or None when there is no usable GPU (CuPy missing, no driver, no device):
it never raises for a missing GPU. :func:`probe_reason` says why there is none.
:func:`fake_device` makes a DeviceInfo for tests (an H100 SXM by default).

Versions are ``"major.minor"`` strings (CUDA encodes them as ``1000 * major + 10 * minor``).
A DeviceInfo keys timing caches (:mod:`engine.backends.cuda.timing`) and picks the NVRTC
architecture (:attr:`DeviceInfo.arch`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class DeviceInfo:
    """One GPU and the software stack in front of it.

    ``memory_bytes`` is the global memory, ``l2_bytes`` the L2 cache (an L2 flush writes more
    than this), ``sm_count`` the streaming multiprocessors. ``driver_version`` is the newest
    CUDA version the driver supports, ``runtime_version`` the CUDA runtime CuPy was built
    against, ``nvrtc_version`` the NVRTC that compiles our kernels.
    """

    name: str
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int
    l2_bytes: int
    driver_version: str
    runtime_version: str
    nvrtc_version: str
    cupy_version: str
    index: int = 0

    @property
    def arch(self) -> str:
        """The NVRTC architecture of the device, e.g. ``"sm_90"``."""
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"

    @property
    def cc(self) -> float:
        """Compute capability as a number (8.0, 8.6, 9.0) for messages."""
        major, minor = self.compute_capability
        return major + minor / 10

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        data["arch"] = self.arch
        return data


def cuda_version_string(encoded: int) -> str:
    """``12040`` -> ``"12.4"`` (CUDA's 1000 * major + 10 * minor encoding)."""
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


def fake_device(
    name: str = "NVIDIA H100 80GB HBM3",
    compute_capability: tuple[int, int] = (9, 0),
    sm_count: int = 132,
    memory_bytes: int = 80 * GIB,
    l2_bytes: int = 50 * MIB,
    driver_version: str = "12.8",
    runtime_version: str = "12.8",
    nvrtc_version: str = "12.9",
    cupy_version: str = "14.2.0",
) -> DeviceInfo:
    """A DeviceInfo for tests (defaults: an H100 SXM with CUDA 12.8 and CuPy 14.2)."""
    return DeviceInfo(
        name,
        compute_capability,
        sm_count,
        memory_bytes,
        l2_bytes,
        driver_version,
        runtime_version,
        nvrtc_version,
        cupy_version,
    )


def _nvrtc_version(cupy: Any) -> str:
    """Our NVRTC binding's version, else CuPy's, else ``"unknown"``."""
    from engine.backends.cuda.nvrtc import nvrtc_available, nvrtc_version

    if nvrtc_available() is None:
        major, minor = nvrtc_version()
        return f"{major}.{minor}"
    try:
        major, minor = cupy.cuda.nvrtc.getVersion()
        return f"{major}.{minor}"
    except Exception:  # noqa: BLE001 - NVRTC is optional for probing
        return "unknown"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _probe(index: int) -> DeviceInfo | str:
    """The device, or the reason there is none."""
    try:
        import cupy  # type: ignore[import-not-found]
    except Exception as error:  # noqa: BLE001 - ImportError or a broken CUDA install
        return f"CuPy is not importable ({type(error).__name__}: {error})"
    try:
        runtime = cupy.cuda.runtime
        count = runtime.getDeviceCount()
        if count <= index:
            return f"no CUDA device {index} ({count} devices)"
        props = runtime.getDeviceProperties(index)
        return DeviceInfo(
            name=_text(props["name"]),
            compute_capability=(int(props["major"]), int(props["minor"])),
            sm_count=int(props["multiProcessorCount"]),
            memory_bytes=int(props["totalGlobalMem"]),
            l2_bytes=int(props.get("l2CacheSize", 0)),
            driver_version=cuda_version_string(int(runtime.driverGetVersion())),
            runtime_version=cuda_version_string(int(runtime.runtimeGetVersion())),
            nvrtc_version=_nvrtc_version(cupy),
            cupy_version=str(cupy.__version__),
            index=index,
        )
    except Exception as error:  # noqa: BLE001 - no driver / no device: CUDA runtime errors
        return f"CUDA is not usable ({type(error).__name__}: {error})"


def probe(index: int = 0) -> DeviceInfo | None:
    """The GPU ``index`` as CuPy sees it, or None when there is none (never raises for that)."""
    found = _probe(index)
    return found if isinstance(found, DeviceInfo) else None


def probe_reason(index: int = 0) -> str | None:
    """Why :func:`probe` finds no GPU (None when it finds one)."""
    found = _probe(index)
    return None if isinstance(found, DeviceInfo) else found


__all__ = ["DeviceInfo", "cuda_version_string", "fake_device", "probe", "probe_reason"]
