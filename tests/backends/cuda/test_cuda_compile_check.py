"""Every kernel file and every zoo pointwise kernel compiles for sm_80 and sm_90, no spills."""

from __future__ import annotations

import json

import pytest

from engine.backends.cuda import compile_check, nvrtc

pytestmark = pytest.mark.xdist_group("cuda-nvrtc")


def test_every_kernel_and_zoo_pointwise_kernel_compiles_without_spills(
    nvrtc_cache: nvrtc.CompileCache,
) -> None:
    sources, unsupported = compile_check.sources_to_check(include_zoo=True)
    report = compile_check.check(sources, nvrtc.DEFAULT_ARCHS, nvrtc_cache)
    assert compile_check.passed(report), compile_check.summary(report)
    assert unsupported == []
    files = {p.name for p in nvrtc.kernel_files()}
    assert files <= set(report["kernels"])
    generated = [k for k in report["kernels"] if k.startswith("gie_pointwise_")]
    assert generated, "the zoo at O2/O3 has gie::Pointwise nodes"
    assert set(report["pointwise_origins"]) == set(generated)
    assert report["compiled"] == len(report["kernels"]) * 2
    for name in report["kernels"]:
        for arch in ("sm_80", "sm_90"):
            entries = report["registers"][name][arch]
            assert entries and all(0 < count <= 255 for count in entries.values()), name


def test_command_line_writes_the_json_report(tmp_path, nvrtc_cache) -> None:
    out = tmp_path / "check.json"
    arguments = ["--json", str(out), "--no-zoo", "--cache-dir", str(nvrtc_cache.directory)]
    assert compile_check.main(arguments) == 0
    assert compile_check.main(arguments) == 0  # the second run compiles nothing
    report = json.loads(out.read_text())
    assert {"kernels", "compiled", "failed", "spills", "registers"} <= set(report)
    assert report["compiled"] == 2 * len(nvrtc.kernel_files())
    assert report["registers"]["gemm_simt.cu"]["sm_90"]["gie_gemm_simt_f32"] > 0
    assert report["cache"] == {"hits": report["compiled"], "misses": 0}


def test_a_failure_and_a_spill_fail_the_check(nvrtc_cache) -> None:
    broken = compile_check.SourceToCheck("broken.cu", 'extern "C" __global__ void b() { x; }')
    report = compile_check.check([broken], ("sm_80",), nvrtc_cache)
    assert not compile_check.passed(report)
    assert report["failed"][0]["kernel"] == "broken.cu" and "x" in report["failed"][0]["log"]
    # A big per-thread array indexed at run time lives in local memory; capped registers spill.
    spilling = compile_check.SourceToCheck(
        "spilling.cu",
        'extern "C" __global__ void __launch_bounds__(1024, 2) s(float* x, int n) {\n'
        "  float v[96];\n"
        "  for (int i = 0; i < 96; ++i) v[i] = x[i * n + threadIdx.x];\n"
        "  float acc = 0.f;\n"
        "  for (int j = 0; j < 96; ++j)\n"
        "    for (int i = 0; i < 96; ++i) acc += v[i] * v[(i + j) % 96];\n"
        "  x[threadIdx.x] = acc; }\n",
    )
    report = compile_check.check([spilling], ("sm_80",), nvrtc_cache)
    assert report["spills"] and not compile_check.passed(report), report["resources"]
