"""CUDA backend benchmarks against peers measured in the same run on the same card.

Each case prints ``ours / peer`` ratios (see engine/backends/cuda/gpu_bench.py for the targets):

* ``gemm``: own fp16 GEMM vs cuBLAS at N^3, own int8 vs own fp16, 2:4 sparse vs dense;
* ``resnet50`` / ``bert``: our fp16 engine (one CUDA-graph replay) vs PyTorch eager and
  torch.compile (batch 1 and 32 for the CNN, seq 128 batch 1 for the encoder).

Needs a GPU (CuPy; PyTorch for the model cases); ``make gpu-check`` runs all of it within its
time budget. ``--rehearse`` runs the GEMM case on the CPU shim at toy sizes (numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import sys

from engine.backends.cuda.device_info import probe, probe_reason
from engine.backends.cuda.gpu_bench import bench_gemm, bench_torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=["gemm", "resnet50", "bert"])
    parser.add_argument("--size", type=int, default=4096, help="GEMM size N (N^3)")
    parser.add_argument("--rehearse", action="store_true", help="GEMM on the CPU shim, toy size")
    args = parser.parse_args(argv)
    if args.rehearse:
        print(json.dumps(bench_gemm("cuda-shim", 32, 64, 1)["ratios"], indent=1))
        return 0
    if probe() is None:
        print(f"no GPU: {probe_reason()}", file=sys.stderr)
        return 2
    results = {}
    if "gemm" in args.cases:
        results["gemm"] = bench_gemm("cuda", args.size, 4 * args.size)
    if "resnet50" in args.cases:
        results["resnet50_bs1"] = bench_torch("resnet50", 1)
        results["resnet50_bs32"] = bench_torch("resnet50", 32)
    if "bert" in args.cases:
        results["bert_seq128_bs1"] = bench_torch("bert_encoder", 1)
    print(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
