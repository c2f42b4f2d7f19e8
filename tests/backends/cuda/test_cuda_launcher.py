"""The launcher's argument packing and validation, the device probe and ``gpu_check`` without a
GPU (the CuPy calls sit behind the loader the tests replace)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.backends.cuda import device_info
from engine.backends.cuda.launcher import (
    CudaModule,
    DevicePointer,
    LaunchError,
    check_launch,
    pack_arguments,
)
from engine.backends.cuda.nvrtc import KERNEL_DIR, CompileResult
from engine.backends.cuda.shim_runner import entry_points

GEMM_SOURCE = (KERNEL_DIR / "gemm_simt.cu").read_text()
GEMM = {e.name: e for e in entry_points(GEMM_SOURCE)}["gie_gemm_simt_f32"]
SOFTMAX_SOURCE = (KERNEL_DIR / "softmax.cu").read_text()


class FakeFlags:
    def __init__(self, contiguous: bool) -> None:
        self.c_contiguous = contiguous


class FakePointer:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class FakeDeviceArray:
    """What the launcher reads from a cupy.ndarray: dtype, flags, data.ptr."""

    def __init__(self, dtype: type, ptr: int, contiguous: bool = True) -> None:
        self.dtype = np.dtype(dtype)
        self.flags = FakeFlags(contiguous)
        self.data = FakePointer(ptr)


def _gemm_args(**changes: object) -> list[object]:
    args: dict[str, object] = dict(
        A=FakeDeviceArray(np.float32, 0x1000),
        B=FakeDeviceArray(np.float32, 0x2000),
        bias=None,
        residual=DevicePointer(0x3000),
        C=FakeDeviceArray(np.float32, 0x4000),
        M=13, N=17, K=19, lda=19, ldb=17, ldc=17,
        activation=1, alpha=0.5, beta=0, residual_first=1,
    )  # fmt: skip
    args.update(changes)
    return list(args.values())


def test_packing_gives_exact_parameter_widths() -> None:
    packed = pack_arguments(GEMM, _gemm_args())
    assert packed[:5] == (0x1000, 0x2000, 0, 0x3000, 0x4000)
    assert all(type(v) is np.uint64 for v in packed[:5])
    assert all(type(v) is np.int32 for v in packed[5:12])
    assert type(packed[12]) is np.float32 and packed[12] == np.float32(0.5)
    assert type(packed[13]) is np.float32  # an int 0 passed for a float parameter
    assert type(packed[14]) is np.int32


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"A": FakeDeviceArray(np.float16, 8)}, "A needs a C-contiguous float32 array"),
        ({"B": FakeDeviceArray(np.float32, 8, contiguous=False)}, "contiguous=False"),
        ({"A": np.zeros(4, np.float32)}, "host NumPy array"),
        ({"A": [1.0, 2.0]}, "A needs a device array"),
        ({"M": 2**31}, "M = 2147483648 overflows int"),
        ({"K": 19.0}, "K \\(int\\) got 19.0"),
        ({"activation": True}, "activation needs a number"),
        ({"alpha": "0.5"}, "alpha \\(float\\) got '0.5'"),
        ({"residual": DevicePointer(-1)}, "negative address"),
    ],
)
def test_packing_refuses_mismatches(changes, message) -> None:
    with pytest.raises(LaunchError, match=message):
        pack_arguments(GEMM, _gemm_args(**changes))


def test_packing_checks_the_argument_count() -> None:
    with pytest.raises(LaunchError, match="takes 15 arguments, got 2"):
        pack_arguments(GEMM, _gemm_args()[:2])


def test_launch_dimensions() -> None:
    assert check_launch(3, 256) == ((3, 1, 1), (256, 1, 1))
    assert check_launch((2, 4), (16, 16)) == ((2, 4, 1), (16, 16, 1))
    with pytest.raises(LaunchError, match="more than 1024 threads"):
        check_launch(1, (64, 32))
    with pytest.raises(LaunchError, match="positive"):
        check_launch((0, 1), 32)
    with pytest.raises(LaunchError, match="exceeds"):
        check_launch((1, 70000), 32)


def test_module_validates_then_calls_the_loaded_function_once() -> None:
    loaded: list[tuple[bytes, str]] = []
    launches: list[tuple] = []

    def loader(binary: bytes, entry: str):
        loaded.append((binary, entry))
        return lambda *call: launches.append(call)

    result = CompileResult("softmax.cu", "sm_90", "cubin", b"CUBIN", "")
    module = CudaModule(result, SOFTMAX_SOURCE, loader)
    x, y = FakeDeviceArray(np.float32, 64), FakeDeviceArray(np.float32, 128)
    module.launch("gie_softmax_f32", 3, 64, [x, y, 3, 37])
    module.launch("gie_softmax_f32", (3,), (64,), [x, y, 3, 37], shared_bytes=0)
    assert loaded == [(b"CUBIN", "gie_softmax_f32")]
    assert launches[0] == ((3, 1, 1), (64, 1, 1), (64, 128, 3, 37), 0, None)
    with pytest.raises(LaunchError, match="has no kernel 'missing'"):
        module.launch("missing", 1, 32, [])
    with pytest.raises(LaunchError, match="x needs a C-contiguous float16"):
        module.launch("gie_softmax_f16", 1, 32, [x, y, 1, 4])
    assert len(launches) == 2  # refused launches never reach the driver


# --------------------------------------------------------------------------- device, gpu_check


def test_fake_device_and_version_strings() -> None:
    device = device_info.fake_device(compute_capability=(8, 6))
    assert device.arch == "sm_86" and device.cc == 8.6
    assert device.to_json()["compute_capability"] == [8, 6]
    assert device_info.cuda_version_string(12040) == "12.4"


def test_probe_without_a_gpu_returns_none_and_a_reason() -> None:
    if device_info.probe() is not None:
        pytest.skip("a GPU is present")
    reason = device_info.probe_reason()
    assert reason and ("CuPy" in reason or "CUDA" in reason or "device" in reason)


def test_gpu_check_without_a_gpu_writes_the_no_gpu_json(tmp_path: Path) -> None:
    if device_info.probe() is not None:
        pytest.skip("a GPU is present: gpu_check would run the real checks")
    out = tmp_path / "gpu"
    command = [sys.executable, "-m", "engine.backends.cuda.gpu_check", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode == 0, finished.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["gpu"] is None and result["reason"]
    assert result["not_covered"][0] == "everything: no GPU"
