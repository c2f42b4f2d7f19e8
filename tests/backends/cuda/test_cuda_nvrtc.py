"""NVRTC compile, ptxas resource parsing, the disk cache, and lazy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.backends.cuda import nvrtc

pytestmark = pytest.mark.xdist_group("cuda-nvrtc")

LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gie_softmax_f32' for 'sm_80'
ptxas info    : Function properties for gie_softmax_f32
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 23 registers, used 1 barriers, 128 bytes smem, 368 bytes cmem[0]
ptxas info    : Function properties for helper
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'gie_softmax_f16' for 'sm_80'
ptxas info    : Function properties for gie_softmax_f16
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 25 registers, used 1 barriers, 368 bytes cmem[0]
"""


def test_ptxas_log_is_parsed_per_entry_point() -> None:
    resources = nvrtc.parse_ptxas_log(LOG)
    assert set(resources) == {"gie_softmax_f32", "gie_softmax_f16"}
    f32 = resources["gie_softmax_f32"]
    assert (f32.registers, f32.spill_stores, f32.spill_loads) == (23, 8, 12)
    assert (f32.shared_bytes, f32.stack_bytes, f32.spills) == (128, 16, True)
    f16 = resources["gie_softmax_f16"]
    assert (f16.registers, f16.shared_bytes, f16.spills) == (25, 0, False)


def test_kernel_file_compiles_for_both_archs_with_resources(
    nvrtc_cache: nvrtc.CompileCache,
) -> None:
    for arch in nvrtc.DEFAULT_ARCHS:
        result = nvrtc.compile_file(nvrtc.KERNEL_DIR / "softmax.cu", arch, cache=nvrtc_cache)
        assert result.binary and result.arch == arch
        assert set(result.resources) == {"gie_softmax_f32", "gie_softmax_f16"}
        assert all(r.registers > 0 and not r.spills for r in result.resources.values())
    ptx = nvrtc.compile_file(nvrtc.KERNEL_DIR / "elementwise.cu", "sm_90", "ptx", cache=nvrtc_cache)
    assert b".target sm_90" in ptx.binary and b"gie_bias_act_f32" in ptx.binary


def test_second_compile_is_a_cache_hit(tmp_path, nvrtc_cache: nvrtc.CompileCache) -> None:
    cache = nvrtc.CompileCache(tmp_path / "cache")
    source = 'extern "C" __global__ void twice(float* x) { x[threadIdx.x] *= 2.0f; }\n'
    first = nvrtc.compile_source(source, "twice.cu", "sm_80", cache=cache)
    second = nvrtc.compile_source(source, "twice.cu", "sm_80", cache=cache)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert (cache.misses, cache.hits) == (1, 1)
    assert second.binary == first.binary and second.resources == first.resources
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1
    # Another arch, other options or another source is another entry.
    nvrtc.compile_source(source, "twice.cu", "sm_90", cache=cache)
    nvrtc.compile_source(source, "twice.cu", "sm_80", extra_options=["-DX=1"], cache=cache)
    nvrtc.compile_source(source + "\n", "twice.cu", "sm_80", cache=cache)
    assert (cache.misses, cache.hits) == (4, 1)


def test_compile_error_names_the_file_and_carries_the_log(
    nvrtc_cache: nvrtc.CompileCache,
) -> None:
    source = 'extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }\n'
    with pytest.raises(nvrtc.CompileError) as caught:
        nvrtc.compile_source(source, "broken_kernel.cu", "sm_80")
    message = str(caught.value)
    assert "broken_kernel.cu" in message and "sm_80" in message
    assert "undefined_name" in caught.value.log


def test_cuda_backend_imports_without_cupy_or_nvrtc() -> None:
    code = (
        "import sys; import engine.backends.cuda.compile_check, engine.backends.cuda.shim_runner;"
        "import engine.backends.cuda.pointwise_codegen;"
        "bad = [m for m in sys.modules if m.startswith(('cupy', 'cuda.bindings'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tensor_core_wrappers_emit_the_tensor_core_instructions(nvrtc_cache) -> None:
    for file_name, instructions in (
        ("gemm_mma_f16.cu", ("mma.sync.aligned.m16n8k16", "ldmatrix.sync", "cp.async.cg")),
        ("tensor_core_stubs.cu", ("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32", "mma.sp")),
    ):
        for arch in nvrtc.DEFAULT_ARCHS:
            ptx = nvrtc.compile_file(nvrtc.KERNEL_DIR / file_name, arch, "ptx", cache=nvrtc_cache)
            text = ptx.binary.decode()
            assert all(i in text for i in instructions), (file_name, arch)
