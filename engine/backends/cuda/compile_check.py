"""Compile every CUDA kernel with NVRTC for sm_80 and sm_90, with no GPU.

``python -m engine.backends.cuda.compile_check [--json FILE] [--arch sm_80 --arch sm_90]
[--cache-dir DIR] [--no-zoo]`` compiles

* every hand-written kernel file (``kernels/*.cu``), and
* the pointwise kernel generated for every ``gie::Pointwise`` node of every zoo model
  optimized at O2 and at O3, and every generated kernel the zoo's CUDA engines launch (fp32
  and fp16 at O3: single elementwise ops, casts; identical kernels are compiled once;
  ``pointwise_origins`` says which nodes or layers each one serves),

and reports, as JSON: ``kernels`` (the sources checked), ``compiled`` (successful
source x arch compiles), ``failed`` (source, arch, compiler log), ``spills`` (entry points
that use local memory for spilled registers), ``registers`` (source -> arch -> entry ->
registers) and ``resources`` (the full ptxas report). It exits 1 when anything failed or
spilled, 2 when NVRTC is unavailable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.backends.cuda import nvrtc
from engine.backends.cuda.pointwise_codegen import (
    PointwiseKernel,
    UnsupportedPointwiseError,
    kernel_for_node,
)

LEVELS = ("O2", "O3")


@dataclass
class SourceToCheck:
    """One source to compile: its display name and text (file or generated)."""

    name: str
    text: str
    origins: list[str] = field(default_factory=list)


@dataclass
class ZooPointwise:
    """The distinct generated kernels of the zoo, and the nodes refused (with reasons)."""

    kernels: dict[str, tuple[PointwiseKernel, list[str]]]
    unsupported: list[dict[str, str]]


def zoo_pointwise_kernels(levels: Sequence[str] = LEVELS) -> ZooPointwise:
    """The generated kernel of every gie::Pointwise node of the zoo at each level."""
    import onnx_ir as ir

    from engine import zoo
    from engine.onnx_io import load
    from engine.passes.pipelines import optimize

    kernels: dict[str, tuple[PointwiseKernel, list[str]]] = {}
    unsupported: list[dict[str, str]] = []
    for model_name in zoo.ZOO:
        source_model = load(zoo.build(model_name))
        for level in levels:
            optimized = optimize(source_model, level, estimate_costs=False).model
            for node in ir.traversal.RecursiveGraphIterator(optimized.graph):
                if node.op_type != "Pointwise" or node.domain not in ("gie", "com.gie"):
                    continue
                origin = f"{model_name}@{level}:{node.name}"
                try:
                    kernel = kernel_for_node(node)
                except UnsupportedPointwiseError as error:
                    unsupported.append({"node": origin, "reason": str(error)})
                    continue
                kernels.setdefault(kernel.name, (kernel, []))[1].append(origin)
    return ZooPointwise(kernels, unsupported)


def zoo_engine_sources() -> dict[str, tuple[str, list[str]]]:
    """The generated kernels the zoo's CUDA engines launch (fp32 and fp16 at O3): the
    lowering's own sources (single elementwise ops, casts, pointwise at their real ranks),
    by entry-derived name -> (source, origins)."""
    import onnx_ir as ir

    from engine import zoo
    from engine.backends.cuda.launch_plan import KernelLaunch
    from engine.backends.cuda.lowering import lower_launch_plan
    from engine.builder import build
    from engine.config import BuilderConfig, Precision

    found: dict[str, tuple[str, list[str]]] = {}
    for model_name in zoo.ZOO:
        proto = zoo.build(model_name)
        shapes = {k: v.shape for k, v in zoo.make_inputs(proto).items()}
        for label, precisions in (("fp32", {Precision.FP32}), ("fp16", {Precision.FP16})):
            config = BuilderConfig(
                backend="cuda-shim",
                optimization_level="O3",
                precisions=frozenset(precisions | {Precision.FP32}),
            )
            engine = build(ir.serde.deserialize_model(proto), config)
            plan = lower_launch_plan(engine.plan, engine.memory, shapes)
            for layer in plan.layers:
                for step in layer.steps:
                    if isinstance(step, KernelLaunch) and step.source.text is not None:
                        name = step.entry.rsplit("_", 1)[0]
                        origin = f"{model_name}@O3/{label}:{layer.name}"
                        found.setdefault(name, (step.source.text, []))[1].append(origin)
    return found


def sources_to_check(include_zoo: bool = True) -> tuple[list[SourceToCheck], list[dict[str, str]]]:
    """Kernel files, then the zoo's generated kernels (pointwise nodes at O2 and O3, and every
    generated kernel the zoo's CUDA engines launch), sorted by name, each once."""
    sources = [SourceToCheck(p.name, p.read_text()) for p in nvrtc.kernel_files()]
    unsupported: list[dict[str, str]] = []
    if include_zoo:
        zoo_kernels = zoo_pointwise_kernels()
        unsupported = zoo_kernels.unsupported
        generated: dict[str, SourceToCheck] = {}
        for name, (kernel, origins) in sorted(zoo_kernels.kernels.items()):
            generated[name] = SourceToCheck(f"{name}.cu", kernel.source, origins)
        for name, (text, origins) in sorted(zoo_engine_sources().items()):
            if name in generated:
                generated[name].origins.extend(origins)
            else:
                generated[name] = SourceToCheck(f"{name}.cu", text, origins)
        sources.extend(generated[name] for name in sorted(generated))
    return sources, unsupported


def check(
    sources: Iterable[SourceToCheck],
    archs: Sequence[str] = nvrtc.DEFAULT_ARCHS,
    cache: nvrtc.CompileCache | None = None,
) -> dict[str, Any]:
    """Compile every source for every arch; the JSON-ready report (see the module doc)."""
    started = time.perf_counter()
    names: list[str] = []
    compiled = 0
    failed: list[dict[str, str]] = []
    spills: list[dict[str, Any]] = []
    registers: dict[str, dict[str, dict[str, int]]] = {}
    resources: dict[str, dict[str, dict[str, Any]]] = {}
    origins: dict[str, list[str]] = {}
    for source in sources:
        names.append(source.name)
        if source.origins:
            origins[source.name] = source.origins
        for arch in archs:
            try:
                result = nvrtc.compile_source(source.text, source.name, arch, cache=cache)
            except nvrtc.CompileError as error:
                failed.append({"kernel": source.name, "arch": arch, "log": error.log})
                continue
            compiled += 1
            registers.setdefault(source.name, {})[arch] = {
                entry: r.registers for entry, r in sorted(result.resources.items())
            }
            resources.setdefault(source.name, {})[arch] = {
                entry: asdict(r) for entry, r in sorted(result.resources.items())
            }
            for entry, r in sorted(result.resources.items()):
                if r.spills:
                    spills.append(
                        {
                            "kernel": source.name,
                            "arch": arch,
                            "entry": entry,
                            "spill_stores": r.spill_stores,
                            "spill_loads": r.spill_loads,
                        }
                    )
    major, minor = nvrtc.nvrtc_version()
    return {
        "nvrtc_version": f"{major}.{minor}",
        "archs": list(archs),
        "kernels": names,
        "compiled": compiled,
        "failed": failed,
        "spills": spills,
        "registers": registers,
        "resources": resources,
        "pointwise_origins": origins,
        "cache": {"hits": cache.hits, "misses": cache.misses} if cache is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


def passed(report: dict[str, Any]) -> bool:
    """True when every compile succeeded and nothing spilled."""
    return not report["failed"] and not report["spills"]


def summary(report: dict[str, Any]) -> str:
    """A few lines for a terminal."""
    total = len(report["kernels"]) * len(report["archs"])
    lines = [
        f"NVRTC {report['nvrtc_version']}: {report['compiled']}/{total} compiles of "
        f"{len(report['kernels'])} sources for {', '.join(report['archs'])} "
        f"in {report['seconds']} s; {len(report['failed'])} failed, "
        f"{len(report['spills'])} spilling entry points"
    ]
    for failure in report["failed"]:
        lines.append(f"FAILED {failure['kernel']} ({failure['arch']}):\n{failure['log']}")
    for spill in report["spills"]:
        lines.append(
            f"SPILLS {spill['kernel']}:{spill['entry']} ({spill['arch']}): "
            f"{spill['spill_stores']} B stores, {spill['spill_loads']} B loads"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.backends.cuda.compile_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write the full report to this file")
    parser.add_argument("--arch", action="append", help="architecture (repeatable)")
    parser.add_argument("--cache-dir", type=Path, help="NVRTC cache folder")
    parser.add_argument("--no-zoo", action="store_true", help="kernel files only")
    args = parser.parse_args(argv)
    reason = nvrtc.nvrtc_available()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    sources, unsupported = sources_to_check(include_zoo=not args.no_zoo)
    report = check(sources, args.arch or nvrtc.DEFAULT_ARCHS, nvrtc.CompileCache(args.cache_dir))
    report["unsupported_pointwise"] = unsupported
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    return 0 if passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
