"""The one check to run on an H100/H200: ``python -m engine.backends.cuda.gpu_check --out DIR``
(``make gpu-check``; DIR defaults to ``$OUT`` or ``out/gpu-check``; well under 8 minutes).

1. Probe the GPU (:mod:`engine.backends.cuda.device_info`). Without one it writes
   ``{"gpu": null, "reason": ...}`` to ``DIR/gpu_check.json`` and exits 0.
2. Compile every ``kernels/*.cu`` and every tile variant of the tactic catalogue for the
   device's architecture (NVRTC; registers and spills recorded).
3. Run the kernels at several shapes (bounds-check sizes and tile multiples) on the GPU against
   the engine's NumPy reference kernels, with the argument layouts of ``tests/backends/cuda``
   (fp32 rtol 1e-4, fp16 rtol 1e-2, int8 exact): SIMT GEMM (every tile variant, fp32/fp16),
   mma fp16 GEMM, implicit-GEMM convolution (every tile variant, groups, stride 2, fp16),
   IMMA int8 GEMM, global average pool, softmax, LayerNorm, RMSNorm, bias + activation.
4. Benchmark the own fp16 tensor-core GEMM (``gie_gemm_mma_f16``) against cuBLAS
   (``cupy.matmul`` on fp16) at 4096^3 with CUDA events (median of 10, L2 flushed).

Results go to ``DIR/gpu_check.json`` (keys ``gpu``, ``compile``, ``kernels``, ``benchmarks``,
``summary``, ``not_covered``). Exit status 1 when a compile or a kernel check failed.

5. Engine sections (:mod:`engine.backends.cuda.gpu_bench`, :mod:`engine.backends.cuda.gpu_engines`):
   every CUDA candidate tactic of every layer of the zoo at fp32 / fp16 / int8 against the
   reference kernel; every zoo engine at fp32 / fp16 / int8 / sparse against onnxruntime;
   GEMM benchmarks (own vs cuBLAS, int8 vs fp16, 2:4 vs dense); ResNet-50 (batch 1, 32) and a
   BERT-base encoder (seq 128) vs PyTorch eager and torch.compile; CUDA-graph latency vs the
   sum of layer times. ``--budget`` seconds (450) bound the whole run; sections past it are
   marked skipped. ``--rehearse`` runs the engine sections on the CPU shim at toy sizes.

On a GPU machine without this repository's venv, ``make gpu-check`` (scripts/gpu-check.sh)
uses ``python3`` with the repository on PYTHONPATH and the wheels in ``.whl/``
(``make gpu-wheels``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.cuda import activations
from engine.backends.cuda.device_info import DeviceInfo, probe, probe_reason
from engine.backends.cuda.launcher import CudaModule
from engine.backends.cuda.nvrtc import KERNEL_DIR, CompileCache, compile_source, kernel_files
from engine.backends.cuda.tactics import CATALOGUE, CATALOGUE_VERSION, kernel_missing
from engine.device import ENGINE_VERSION
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, default_registry

RESULT_FILE = "gpu_check.json"
#: Seconds the whole check may take (the device session allows one 10-minute command).
BUDGET_S = 450.0
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2}
NOT_COVERED = [
    "RNN, attention, resize and data-movement tactics beyond the zoo layers that use them "
    "(their shim tests in tests/backends/cuda hold the layouts)",
    "kernel speed work is incomplete: most kernels are the first, simple versions",
]
GEMM_SHAPES = [(13, 17, 19), (64, 64, 64), (130, 257, 96)]


def _include_options() -> list[str]:
    """-I for a system CUDA toolkit's headers (cuda_fp16.h) when no pip wheel provides them."""
    found = []
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            found.append(f"-I{Path(root) / 'include'}")
    return found[:1]


def compile_all(device: DeviceInfo, cache: CompileCache) -> tuple[dict[str, Any], dict]:
    """Compile every kernel file and every catalogue tile variant for the device's arch."""
    sources = {(p.name, ()): p.read_text() for p in kernel_files()}
    for tactic in CATALOGUE:
        if tactic.kernel_file and tactic.defines and kernel_missing(tactic) is None:
            source = (KERNEL_DIR / tactic.kernel_file).read_text()
            sources[(tactic.kernel_file, tactic.defines)] = source
    report: dict[str, Any] = {"arch": device.arch, "compiled": [], "failed": {}, "resources": {}}
    modules: dict[tuple[str, tuple], CudaModule] = {}
    for (file_name, defines), source in sorted(sources.items()):
        label = file_name + "".join(f" -D{k}={v}" for k, v in defines)
        options = [f"-D{k}={v}" for k, v in defines] + _include_options()
        try:
            result = compile_source(source, file_name, device.arch, "cubin", options, cache)
            modules[(file_name, defines)] = CudaModule(result, source)
        except Exception as error:  # noqa: BLE001 - record and go on with the other kernels
            report["failed"][label] = str(error)[-2000:]
            continue
        report["compiled"].append(label)
        report["resources"][label] = {n: vars(r) for n, r in result.resources.items()}
        spilled = [n for n, r in result.resources.items() if r.spills]
        if spilled:
            report.setdefault("spills", {})[label] = spilled
    return report, modules


# --------------------------------------------------------------------------- kernel checks

REGISTRY = default_registry()
CONTEXT = KernelContext(opset=17)


def _reference(op: str, inputs: list, attributes: dict, domain: str = "", outputs: int = 1):
    spec = REGISTRY.lookup(op, domain)
    context = KernelContext(17, output_count=outputs) if outputs > 1 else CONTEXT
    return spec.kernel(inputs, Attrs(attributes), context)  # type: ignore[union-attr]


def _nhwc(array: np.ndarray) -> np.ndarray:
    """NCHW (or a KCRS weight) -> NHWC (KRSC), contiguous."""
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1))


def _compare(name: str, got: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    expected = np.asarray(expected)
    tolerance = TOLERANCE[np.dtype(got.dtype)]
    got64, want64 = got.astype(np.float64), expected.astype(np.float64)
    error = np.abs(got64 - want64)
    bound = tolerance * (1.0 + np.abs(want64))
    return {
        "check": name,
        "passed": bool(np.all(error <= bound)) and bool(np.all(np.isfinite(got64))),
        "max_abs_error": float(error.max(initial=0.0)),
        "tolerance": tolerance,
    }


class KernelChecks:
    """Runs the kernels of ``modules`` on the GPU (CuPy arrays) against the reference."""

    def __init__(self, modules: dict[tuple[str, tuple], CudaModule]) -> None:
        import cupy  # type: ignore[import-not-found]

        self.cp = cupy
        self.modules = modules
        self.rng = np.random.default_rng(0)
        self.results: list[dict[str, Any]] = []

    def random(self, *shape: int, dtype: Any = np.float32) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(dtype)

    def device(self, array: np.ndarray | None) -> Any:
        return None if array is None else self.cp.asarray(array)

    def run(self, name: str, check: Callable[[], dict[str, Any]]) -> None:
        try:
            self.results.append(check())
        except Exception as error:  # noqa: BLE001 - one failing kernel must not end the run
            self.results.append(
                {"check": name, "passed": False, "error": f"{type(error).__name__}: {error}"}
            )

    def gemm(self, key: tuple[str, tuple], entry: str, m: int, n: int, k: int, dtype: Any):
        defines = dict(key[1])
        bm, bn = defines.get("GIE_GEMM_BM", 64), defines.get("GIE_GEMM_BN", 64)
        a, b, bias, residual = (
            self.random(m, k, dtype=dtype),
            self.random(k, n, dtype=dtype),
            self.random(n, dtype=dtype),
            self.random(m, n, dtype=dtype),
        )
        attributes = {"kind": "MatMul", "activation": "Relu", "residual_before_activation": 1}
        code, alpha, beta = activations.activation_arguments(Attrs(attributes))
        out = self.cp.zeros((m, n), dtype)
        if entry == "gie_gemm_mma_f16":
            grid, block = ((n + 7) // 8, (m + 15) // 16), 32
        else:
            grid, block = ((n + bn - 1) // bn, (m + bm - 1) // bm), 256
        args = [*map(self.device, (a, b, bias, residual)), out, m, n, k, k, n, n]
        self.modules[key].launch(entry, grid, block, [*args, code, alpha, beta, 1])
        expected = _reference("GemmAct", [a, b, bias, residual], attributes, GIE_DOMAIN)[0]
        label = f"{entry}{''.join(f' {v}' for _, v in key[1])} {m}x{n}x{k}"
        return _compare(label, self.cp.asnumpy(out), expected)

    def rows(self, kind: str, rows: int, cols: int, dtype: Any) -> dict[str, Any]:
        suffix = "f32" if dtype == np.float32 else "f16"
        x, gamma, beta = self.random(rows, cols, dtype=dtype), self.random(cols, dtype=dtype), None
        out = self.cp.zeros((rows, cols), dtype)
        if kind == "softmax":
            module, args = "softmax.cu", [self.device(x), out, rows, cols]
            expected = _reference("Softmax", [x], {"axis": -1})[0]
        elif kind == "layernorm":
            beta, residual = self.random(cols, dtype=dtype), self.random(rows, cols, dtype=dtype)
            stream = self.cp.zeros((rows, cols), dtype)
            module = "layernorm.cu"
            args = [*map(self.device, (x, residual, gamma, beta)), out, stream, rows, cols, 1e-5]
            expected = _reference(
                "LayerNorm", [x, gamma, beta, residual], {"epsilon": 1e-5}, GIE_DOMAIN, 2
            )[0]
        else:
            module, args = "rmsnorm.cu", [self.device(x), self.device(gamma), out, rows, cols, 1e-6]
            expected = _reference("RMSNorm", [x, gamma], {"epsilon": 1e-6}, GIE_DOMAIN)[0]
        self.modules[(module, ())].launch(f"gie_{kind}_{suffix}", rows, 128, args)
        return _compare(f"gie_{kind}_{suffix} {rows}x{cols}", self.cp.asnumpy(out), expected)

    def bias_act(self, rows: int, cols: int, dtype: Any, activation: str) -> dict[str, Any]:
        suffix = "f32" if dtype == np.float32 else "f16"
        x, bias = self.random(rows, cols, dtype=dtype), self.random(cols, dtype=dtype)
        attributes = {"kind": "MatMul", "activation": activation, "activation_alpha": 0.1}
        code, alpha, beta = activations.activation_arguments(Attrs(attributes))
        out = self.cp.zeros((rows, cols), dtype)
        args = [self.device(x), self.device(bias), out, rows, cols, code, alpha, beta]
        blocks = max(1, min(1024, (rows * cols + 255) // 256))
        self.modules[("elementwise.cu", ())].launch(f"gie_bias_act_{suffix}", blocks, 256, args)
        identity = np.eye(cols, dtype=dtype)
        expected = _reference("GemmAct", [x, identity, bias], attributes, GIE_DOMAIN)[0]
        label = f"gie_bias_act_{suffix} {activation} {rows}x{cols}"
        return _compare(label, self.cp.asnumpy(out), expected)

    def conv(self, key: tuple[str, tuple], dtype: Any, group: int, stride: int) -> dict:
        """Implicit-GEMM (NHWC, KRSC weight) vs gie::ConvAct: 2 x 8 x 9 x 7, 3x3, pad 1."""
        n, c, h, w, m = 2, 8, 9, 7, 6
        defines = dict(key[1])
        bm, bn = defines.get("GIE_CONV_BM", 64), defines.get("GIE_CONV_BN", 64)
        x, bias = self.random(n, c, h, w, dtype=dtype), self.random(m, dtype=dtype)
        weight = (self.random(m, c // group, 3, 3) / 3).astype(dtype)
        oh, ow = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
        residual = self.random(n, m, oh, ow, dtype=dtype)
        attributes = {"group": group, "strides": [stride] * 2, "pads": [1] * 4}
        attributes |= {"dilations": [1, 1], "kernel_shape": [3, 3], "activation": "Relu"}
        expected = _reference("ConvAct", [x, weight, bias, residual], attributes, GIE_DOMAIN)[0]
        out = self.cp.zeros((n, oh, ow, m), dtype)
        args = [self.device(_nhwc(a)) for a in (x, weight)] + [self.device(bias)]
        args += [self.device(_nhwc(residual)), out, n, h, w, c, m, oh, ow, 3, 3, stride, stride]
        args += [1, 1, 1, 1, group, int(activations.Activation.RELU), 0.0, 0.0, 1]
        grid = (-(-n * oh * ow // bm), -(-(m // group) // bn), group)
        suffix = "f32" if dtype == np.float32 else "f16"
        self.modules[key].launch(f"gie_conv_implicit_gemm_{suffix}", grid, 256, args)
        got = self.cp.asnumpy(out).transpose(0, 3, 1, 2)
        return _compare(f"conv_implicit_gemm_{suffix} {key[1]} g{group} s{stride}", got, expected)

    def int8_gemm(self, m: int, n: int, k: int) -> dict[str, Any]:
        """gie_gemm_int8_f32 vs gie::QGemm (kind MatMul), per-channel scales, int32 bias."""
        a_q = self.rng.integers(-128, 128, (m, k)).astype(np.int8)
        b_q = self.rng.integers(-128, 128, (k, n)).astype(np.int8)
        w_scale = self.rng.uniform(0.001, 0.02, n).astype(np.float32)
        bias_q = self.rng.integers(-40000, 40000, n).astype(np.int32)
        attributes = {"kind": "MatMul", "activation": "Relu", "output_dtype": 1}
        inputs = [a_q, np.float32(0.0173), b_q, w_scale, bias_q]
        expected = _reference("QGemm", inputs, attributes, GIE_DOMAIN)[0]
        out = self.cp.zeros((m, n), np.float32)
        args = [*map(self.device, (a_q, b_q, bias_q, w_scale)), None, out, m, n, k, k, n, 1, n]
        args += [0, 0, 0, 0.0173, 1, 1.0, int(activations.Activation.RELU), 0.0, 0.0, 1]
        grid = ((n + 7) // 8, (m + 15) // 16, 1)
        self.modules[("gemm_int8.cu", ())].launch("gie_gemm_int8_f32", grid, 32, args)
        got = self.cp.asnumpy(out)
        check = _compare(f"gie_gemm_int8_f32 {m}x{n}x{k}", got, expected)
        check["passed"] = bool(np.array_equal(got, expected))  # int8 layers are exact
        return check

    def global_pool(self, dtype: Any) -> dict[str, Any]:
        n, c, h, w = 2, 37, 5, 7
        x = self.random(n, c, h, w, dtype=dtype)
        expected = _reference("GlobalAveragePool", [x], {})[0].reshape(n, c)
        out = self.cp.zeros((n, c), dtype)
        suffix = "f32" if dtype == np.float32 else "f16"
        args = [self.device(_nhwc(x)), out, h, w, c]
        self.modules[("pool.cu", ())].launch(
            f"gie_global_average_pool_{suffix}", (2, n), (32, 8), args
        )
        return _compare(f"gie_global_average_pool_{suffix}", self.cp.asnumpy(out), expected)

    def all(self) -> list[dict[str, Any]]:
        gemms = {"gemm_simt.cu": "gie_gemm_simt_f32", "gemm_mma_f16.cu": "gie_gemm_mma_f16"}
        for key in sorted(self.modules):
            entry = gemms.get(key[0])
            if entry is None:
                continue
            dtype = np.float16 if entry.endswith("f16") else np.float32
            for m, n, k in GEMM_SHAPES:
                self.run(entry, partial(self.gemm, key, entry, m, n, k, dtype))
                if entry == "gie_gemm_simt_f32" and not key[1]:
                    f16 = "gie_gemm_simt_f16"
                    self.run(f16, partial(self.gemm, key, f16, m, n, k, np.float16))
        for kind in ("softmax", "layernorm", "rmsnorm"):
            for rows, cols in ((3, 37), (64, 768), (7, 4099)):
                for dtype in (np.float32, np.float16):
                    self.run(kind, partial(self.rows, kind, rows, cols, dtype))
        for key in sorted(k for k in self.modules if k[0] == "conv_implicit_gemm.cu"):
            for dtype, group, stride in (
                (np.float32, 1, 1),
                (np.float32, 2, 2),
                (np.float16, 1, 1),
            ):
                self.run("conv", partial(self.conv, key, dtype, group, stride))
        if ("gemm_int8.cu", ()) in self.modules:
            for m, n, k in ((13, 17, 40), (64, 64, 256)):
                self.run("int8", partial(self.int8_gemm, m, n, k))
        if ("pool.cu", ()) in self.modules:
            for dtype in (np.float32, np.float16):
                self.run("pool", partial(self.global_pool, dtype))
        for activation in ("Relu", "GELU", "Sigmoid", "LeakyRelu"):
            for dtype in (np.float32, np.float16):
                self.run("bias_act", partial(self.bias_act, 33, 70, dtype, activation))
        return self.results


# --------------------------------------------------------------------------- benchmark


def benchmark_gemm(modules: dict[tuple[str, tuple], CudaModule], device: DeviceInfo, size: int):
    """Own fp16 mma GEMM vs cuBLAS (cupy.matmul fp16) at size^3: median ms and TFLOP/s."""
    import cupy  # type: ignore[import-not-found]

    from engine.backends.cuda.timing import CudaEventTimer, CupyEventClock

    a = cupy.random.standard_normal((size, size), dtype=cupy.float32).astype(cupy.float16)
    b = cupy.random.standard_normal((size, size), dtype=cupy.float32).astype(cupy.float16)
    out = cupy.empty((size, size), cupy.float16)
    timer = CudaEventTimer(2, 10, flush_l2=True, clock=CupyEventClock(device))
    module = modules[("gemm_mma_f16.cu", ())]
    args = [a, b, None, None, out, size, size, size, size, size, size, 0, 0.0, 0.0, 1]
    grid = ((size + 7) // 8, (size + 15) // 16)

    def own() -> None:
        module.launch("gie_gemm_mma_f16", grid, 32, args)

    def cublas() -> None:
        cupy.matmul(a, b, out=out)

    flops = 2.0 * size**3
    result: dict[str, Any] = {"shape": [size, size, size], "dtype": "float16"}
    for name, run in (("own_mma_f16", own), ("cublas", cublas)):
        samples = timer.time(None, name, run)  # type: ignore[arg-type]
        median = float(np.median(samples))
        result[name] = {"median_ms": median, "tflops": flops / median / 1e9, "samples": samples}
    result["own_over_cublas_speed"] = (
        result["cublas"]["median_ms"] / result["own_mma_f16"]["median_ms"]
    )
    result["target"] = ">= 0.9 x cuBLAS"
    return result


# --------------------------------------------------------------------------- main


def run_checks(device: DeviceInfo, out_dir: Path, budget_s: float = BUDGET_S) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {"gpu": device.to_json(), "catalogue": CATALOGUE_VERSION}
    results["engine"] = ENGINE_VERSION
    cache = CompileCache()  # ~/.cache/gie-studio/nvrtc: DIR keeps only the results
    results["compile"], modules = compile_all(device, cache)
    try:
        results["kernels"] = KernelChecks(modules).all()
    except Exception:  # noqa: BLE001 - keep the compile results
        results["kernels"] = [{"check": "setup", "passed": False, "error": traceback.format_exc()}]
    try:
        results["benchmarks"] = {"gemm_fp16_4096": benchmark_gemm(modules, device, 4096)}
    except Exception:  # noqa: BLE001
        results["benchmarks"] = {"error": traceback.format_exc()}
    from engine.backends.cuda.cupy_device import CupyDevice
    from engine.backends.cuda.gpu_bench import engine_sections, engine_summary

    left = budget_s - (time.perf_counter() - started)
    try:
        results["engines"] = engine_sections("cuda", CupyDevice(), device, left)
    except Exception:  # noqa: BLE001 - keep the kernel results
        results["engines"] = {"error": traceback.format_exc()}
    failed = [r["check"] for r in results["kernels"] if not r.get("passed")]
    results["summary"] = {
        "compiled": len(results["compile"]["compiled"]),
        "compile_failed": sorted(results["compile"]["failed"]),
        "kernel_checks": len(results["kernels"]),
        "kernel_failed": failed,
        "seconds": round(time.perf_counter() - started, 1),
        **engine_summary(results.get("engines", {})),
    }
    results["not_covered"] = NOT_COVERED
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("OUT") or "out/gpu-check"
    parser.add_argument("--out", default=default, help="folder for gpu_check.json")
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="run the engine sections on the CPU shim at toy sizes (no GPU needed)",
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds (default 450)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.rehearse:
        from engine.backends.cuda.gpu_bench import rehearse

        results = rehearse(args.budget)
        (out_dir / RESULT_FILE).write_text(json.dumps(results, indent=1, default=str))
        print(f"gpu-check rehearsal: {json.dumps(results['summary'])}", file=sys.stderr)
        failed = results["summary"]["tactic_failed"] or results["summary"]["zoo_failed"]
        return 1 if failed else 0
    device = probe()
    if device is None:
        results: dict[str, Any] = {"gpu": None, "reason": probe_reason(), "engine": ENGINE_VERSION}
        results["not_covered"] = ["everything: no GPU", *NOT_COVERED]
    else:
        results = run_checks(device, out_dir, args.budget)
    (out_dir / RESULT_FILE).write_text(json.dumps(results, indent=1, default=str))
    print(f"gpu-check: wrote {out_dir / RESULT_FILE}", file=sys.stderr)
    if device is None:
        print(f"gpu-check: no GPU ({results['reason']})", file=sys.stderr)
        return 0
    summary = results["summary"]
    print(f"gpu-check: {json.dumps(summary)}", file=sys.stderr)
    failed = summary["compile_failed"] or summary["kernel_failed"] or summary["tactic_failed"]
    return 1 if failed or summary["zoo_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
