"""``gie build``: optimize, lower, select tactics, plan memory, and save a ``.gie`` engine.

    gie build MODEL [--fp16] [--tf32] [--int8] [--layer-precision NAME=PREC ...]
              [--calib DATA] [--calibrator entropy|minmax|percentile|mse] [--percentile P]
              [--calib-cache F] [--accuracy-budget cosine=0.999] [--strict-precision]
              [--sparsity off|on|force] [--sparsity-min-channels N]
              [--timing-cache F] [--shapes IN:MIN,OPT,MAX ...] [-O0..-O3] [--pin LAYER=TACTIC ...]
              [-o MODEL.gie]

A shape is dims joined by ``x``: ``--shapes input_ids:1x32,4x32,8x32`` is the profile min 1x32,
opt 4x32, max 8x32 (``input_ids:4x32`` fixes the shape). ``--layer-precision`` and ``--pin``
take a layer name or glob. The summary lists the layers, the tactics chosen, the timing-cache
hits and the memory plan (arena vs the naive sum); ``--json F`` (``-``: stdout) writes it with
the whole build log.

INT8: ``--calib`` is an .npz (arrays by input name, first axis = samples), a folder of images,
or an .npy (single-input models); the scales are written to ``--calib-cache`` when given, and a
later build with the cache alone needs no data. A model with QuantizeLinear/DequantizeLinear
nodes is built from its own scales (explicit quantization). ``--accuracy-budget`` runs the
automatic mixed precision search on the calibration data (engine.quantize.mixed_precision).
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from engine.cli import CliError, _load
from engine.cli_engine import emit_json, text_stream
from engine.config import BuilderConfig, Precision, PrecisionMode, ShapeProfile, SparsityMode
from engine.onnx_io import unsupported_ops
from engine.passes import LEVELS
from engine.progress import progress
from engine.text_report import human_bytes, short_list

#: The builder's summary of tactic selection: "120 candidates timed, 4 timing-cache hits".
TIMING_LINE = re.compile(r"(?P<timed>\d+) candidates timed, (?P<hits>\d+) timing-cache hits")

# --------------------------------------------------------------------------- option parsing


def parse_shape(text: str, option: str) -> tuple[int, ...]:
    """``"4x32"`` -> ``(4, 32)``."""
    parts = text.strip().lower().split("x")
    if not text.strip() or not all(p.strip().isdigit() for p in parts):
        raise CliError(f"{option}: bad shape {text!r}: dims are integers joined by x, e.g. 4x32")
    return tuple(int(p) for p in parts)


def parse_shapes(items: Sequence[str] | None, model: ir.Model) -> tuple[ShapeProfile, ...]:
    """``--shapes NAME:MIN,OPT,MAX`` (or ``NAME:SHAPE`` for min = opt = max) -> profiles,
    checked against the model's inputs (name, rank, fixed dims)."""
    declared = {v.name: v for v in model.graph.inputs}
    profiles: dict[str, ShapeProfile] = {}
    for item in items or []:
        option = f"--shapes {item!r}"
        name, colon, shapes = item.rpartition(":")
        parts = shapes.split(",")
        if not colon or not name or len(parts) not in (1, 3):
            raise CliError(
                f"{option}: expected INPUT:MIN,OPT,MAX with dims joined by x, "
                "e.g. input_ids:1x32,4x32,8x32"
            )
        low, mid, high = [parse_shape(p, option) for p in parts] * (3 // len(parts))
        if name not in declared:
            raise CliError(f"{option}: the model has no input {name!r}; inputs: {sorted(declared)}")
        try:
            profile = ShapeProfile(name, low, mid, high)
        except ValueError as error:
            raise CliError(f"{option}: {error}") from error
        want = declared[name].shape
        if want is not None:
            if len(want) != len(low):
                raise CliError(f"{option}: input {name!r} has rank {len(want)}, not {len(low)}")
            for axis, dim in enumerate(want):
                if isinstance(dim, int) and not profile.min[axis] == dim == profile.max[axis]:
                    raise CliError(f"{option}: dim {axis} of input {name!r} is fixed at {dim}")
        profiles[name] = profile
    return tuple(profiles.values())


def parse_assignments(items: Sequence[str] | None, option: str) -> list[tuple[str, str]]:
    """``["a=b", "/x/*=c"]`` -> ``[("a", "b"), ("/x/*", "c")]`` (split at the last ``=``)."""
    pairs = []
    for item in items or []:
        name, equals, value = item.rpartition("=")
        if not equals or not name.strip() or not value.strip():
            raise CliError(f"{option} {item!r}: expected NAME=VALUE (NAME may be a glob)")
        pairs.append((name.strip(), value.strip()))
    return pairs


def parse_precision(text: str, option: str) -> Precision:
    try:
        return Precision(text.lower())
    except ValueError:
        known = ", ".join(p.value for p in Precision)
        raise CliError(f"{option}: unknown precision {text!r} (choose from {known})") from None


def config_from_args(args: argparse.Namespace, model: ir.Model) -> BuilderConfig:
    """The BuilderConfig the ``gie build`` options describe."""
    precisions = {Precision.FP32}
    for flag, precision in (("tf32", Precision.TF32), ("fp16", Precision.FP16)):
        if getattr(args, flag):
            precisions.add(precision)
    if args.int8:
        precisions.add(Precision.INT8)
    overrides = tuple(
        (name, parse_precision(value, f"--layer-precision {name}={value}"))
        for name, value in parse_assignments(args.layer_precision, "--layer-precision")
    )
    if args.timing_iterations < 1 or args.timing_warmup < 0:
        raise CliError("--timing-iterations must be >= 1 and --timing-warmup >= 0")
    if not 0.0 < args.percentile <= 100.0:
        raise CliError(f"--percentile must be in (0, 100], got {args.percentile}")
    if args.accuracy_budget and not args.calib:
        raise CliError("--accuracy-budget needs --calib DATA (the data the budget is measured on)")
    check_backend(args.backend)
    if args.cuda_streams < 1:
        raise CliError(f"--cuda-streams must be >= 1, got {args.cuda_streams}")
    return BuilderConfig(
        backend=args.backend,
        cuda_streams=args.cuda_streams,
        cuda_graphs=not args.no_cuda_graphs,
        timing_flush_l2=args.flush_l2,
        optimization_level=args.level,
        precisions=frozenset(precisions),
        precision_mode=PrecisionMode.OBEY if args.strict_precision else PrecisionMode.PREFER,
        layer_precisions=overrides,
        tactic_pins=tuple(parse_assignments(args.pin, "--pin")),
        timing_cache_path=args.timing_cache,
        timing_iterations=args.timing_iterations,
        timing_warmup=args.timing_warmup,
        profiles=parse_shapes(args.shapes, model),
        disabled_passes=tuple(args.disable or ()),
        calibrator=args.calibrator,
        percentile=args.percentile,
        calibration_cache_path=args.calib_cache,
        fp16_overflow_fallback=not args.no_fp16_fallback,
        sparsity=SparsityMode(args.sparsity),
        sparsity_min_channels=args.sparsity_min_channels,
    )


def check_backend(backend: str) -> None:
    """A clear error when the backend cannot run here (no GPU / no g++)."""
    if backend == "cuda":
        from engine.backends.cuda.device_info import probe, probe_reason

        if probe() is None:
            raise CliError(f"--backend cuda needs a GPU: {probe_reason()}")
    elif backend == "cuda-shim":
        from engine.backends.cuda.shim_runner import compiler_available

        reason = compiler_available()
        if reason is not None:
            raise CliError(f"--backend cuda-shim needs g++: {reason}")


# --------------------------------------------------------------------------- commands


def build_summary(engine: Any) -> dict[str, Any]:
    """Layers, ops and tactics chosen, memory plan totals and the whole-build log lines."""
    layers = engine.plan.layers
    memory = engine.memory
    return {
        "layers": len(layers),
        "ops": dict(Counter(layer.qualified_op for layer in layers).most_common()),
        "tactics": dict(Counter(layer.tactic for layer in layers).most_common()),
        "precisions": dict(
            Counter(layer.precision.value for layer in layers if layer.role == "compute")
        ),
        "conversions": sum(1 for layer in layers if layer.role != "compute"),
        "arena_bytes": int(memory.arena_bytes),
        "naive_bytes": int(memory.naive_bytes),
        "decisions": [f"[{e.stage}] {e.message}" for e in engine.log.entries if not e.layer],
        "layer_decisions": sum(1 for e in engine.log.entries if e.layer),
        **timing_counts(engine.log.entries),
    }


def timing_counts(entries: Sequence[Any]) -> dict[str, int | None]:
    """``timed`` (candidates timed) and ``cache_hits`` (timing-cache hits) as the builder's
    tactics summary line states them (None when the log has no such line)."""
    for entry in entries:
        found = TIMING_LINE.search(entry.message) if entry.stage == "tactics" else None
        if found and not entry.layer:
            return {"timed": int(found["timed"]), "cache_hits": int(found["hits"])}
    return {"timed": None, "cache_hits": None}


def cmd_build(args: argparse.Namespace) -> int:
    """``gie build``: optimize, lower, select tactics, plan memory; save the engine."""
    from engine.builder import BuildError, build
    from engine.quantize.calibration_cache import CalibrationCacheError
    from engine.quantize.calibration_data import CalibrationDataError
    from engine.quantize.mixed_precision import BudgetError
    from engine.serialize import save_engine

    model = _load(args.model)
    missing = unsupported_ops(model)
    if missing:
        listed = "; ".join(
            f"{op.qualified_name} ({short_list(list(op.node_names), 3)})" for op in missing
        )
        raise CliError(f"{args.model}: unsupported op(s), no reference kernel: {listed}")
    config = config_from_args(args, model)
    output = args.output or str(Path(args.model).with_suffix(".gie"))
    out = text_stream(args.json)
    bars = progress()
    started = time.perf_counter()
    mixed = None
    try:
        if args.accuracy_budget:
            mixed = _mixed_precision(model, config, args, bars)
            engine = mixed.engine
        else:
            engine = build(model, config, progress=bars, calibration_data=args.calib)
    except BuildError as error:
        raise CliError(f"{args.model}: {error}") from error
    except (CalibrationDataError, CalibrationCacheError, BudgetError) as error:
        raise CliError(str(error)) from error
    except OSError as error:  # the timing cache's folder or lock cannot be written
        where = error.filename or args.timing_cache or args.model
        raise CliError(f"{where}: {error.strerror or error}") from error
    finally:
        bars.close()
    seconds = time.perf_counter() - started
    try:
        save_engine(engine, output)
    except OSError as error:
        raise CliError(f"{output}: cannot write: {error.strerror or error}") from error
    summary = build_summary(engine)
    print(f"model: {args.model}   level: {config.optimization_level}   -> {output}", file=out)
    lines = summary["decisions"] if not args.verbose else engine.log.lines()
    print("\n".join(lines), file=out)
    ops = ", ".join(f"{op} {n}" for op, n in summary["ops"].items())
    tactics = ", ".join(f"{tactic} {n}" for tactic, n in summary["tactics"].items())
    arena, naive = summary["arena_bytes"], summary["naive_bytes"]
    print(f"layers: {summary['layers']} ({ops})", file=out)
    print(f"tactics chosen: {tactics}", file=out)
    precisions = ", ".join(f"{p} {n}" for p, n in summary["precisions"].items())
    print(f"precisions: {precisions}; {summary['conversions']} conversion layers", file=out)
    if mixed is not None:
        print(f"mixed precision: {mixed.summary()}", file=out)
    if config.sparsity != SparsityMode.OFF:
        from engine.cli_sparsity import sparsity_error_line

        sparse = [e.message for e in engine.log.entries if e.stage == "sparsity" and not e.layer]
        print(f"sparsity {config.sparsity.value}: {'; '.join(sparse)}", file=out)
        print(f"sparsity {config.sparsity.value}: {sparsity_error_line(engine, model)}", file=out)
    print(
        f"memory: arena {human_bytes(arena)} vs naive {human_bytes(naive)} "
        f"({100 * arena / max(naive, 1):.0f}%)",
        file=out,
    )
    if not args.verbose and summary["layer_decisions"]:
        print(f"({summary['layer_decisions']} per-layer decisions: --verbose lists them)", file=out)
    size = Path(output).stat().st_size
    print(f"built in {seconds:.2f} s; wrote {output} ({human_bytes(size)})", file=out)
    if args.json:
        document = {"model": args.model, "engine": output, "seconds": seconds, **summary}
        if mixed is not None:
            document["mixed_precision"] = mixed.to_json()
        emit_json(args.json, {**document, "config": config.to_json(), "log": engine.log.to_json()})
    return 0


def _mixed_precision(
    model: ir.Model, config: BuilderConfig, args: argparse.Namespace, bars: Any
) -> Any:
    """Automatic mixed precision on the calibration data under ``--accuracy-budget``."""
    from engine.quantize.calibration_data import load_calibration_data
    from engine.quantize.mixed_precision import AccuracyBudget, auto_mixed_precision

    budget = AccuracyBudget.parse(args.accuracy_budget)
    batches = list(load_calibration_data(args.calib, model))
    return auto_mixed_precision(
        model, batches, budget, config, calibration_data=batches, progress=bars
    )


def add_build_command(commands: Any, common: argparse.ArgumentParser) -> None:
    """Register ``gie build`` on the CLI's subparsers."""
    build = commands.add_parser(
        "build", parents=[common], help="build a .gie engine: optimize, pick tactics, plan memory"
    )
    build.add_argument("model", help="ONNX model file")
    build.add_argument("-o", "--output", metavar="MODEL.gie", help="engine file (MODEL.gie)")
    level = build.add_mutually_exclusive_group()
    for name in LEVELS:
        level.add_argument(
            f"-{name}", dest="level", action="store_const", const=name, help=f"level {name}"
        )
    build.set_defaults(level="O2")
    for flag in ("tf32", "fp16", "int8"):
        build.add_argument(f"--{flag}", action="store_true", help=f"allow {flag} layers")
    build.add_argument(
        "--layer-precision",
        action="append",
        metavar="NAME=PREC",
        help="precision of the layers NAME (a glob) names (repeatable)",
    )
    build.add_argument(
        "--strict-precision",
        action="store_true",
        help="fail when a precision request cannot be honoured (default: log and fall back)",
    )
    build.add_argument(
        "--shapes",
        action="append",
        metavar="IN:MIN,OPT,MAX",
        help="optimization profile of an input, dims joined by x: ids:1x32,4x32,8x32 (repeatable)",
    )
    build.add_argument(
        "--pin", action="append", metavar="LAYER=TACTIC", help="force a layer's tactic (repeatable)"
    )
    build.add_argument(
        "--calib", metavar="DATA", help="int8 calibration data: .npz, .npy or a folder of images"
    )
    build.add_argument(
        "--calibrator",
        choices=("entropy", "minmax", "percentile", "mse"),
        default="entropy",
        help="how activation thresholds are chosen (entropy)",
    )
    build.add_argument(
        "--percentile", type=float, default=99.99, help="the percentile calibrator's p (99.99)"
    )
    build.add_argument(
        "--calib-cache", metavar="FILE", help="calibration cache (JSON): written, or read alone"
    )
    build.add_argument(
        "--accuracy-budget",
        metavar="METRIC=V",
        help="automatic mixed precision: cosine=0.999, top1=0.99 or sqnr=30 on the calib data",
    )
    build.add_argument(
        "--no-fp16-fallback",
        action="store_true",
        help="keep fp16 on layers whose activations overflow it on the calibration data",
    )
    build.add_argument(
        "--sparsity",
        choices=("off", "on", "force"),
        default="off",
        help="2:4 sparsity: on = sparse tactics for 2:4 weights; force = prune eligible first",
    )
    build.add_argument(
        "--sparsity-min-channels",
        type=int,
        default=256,
        help="layers with fewer input channels are too small for 2:4 (256)",
    )
    build.add_argument(
        "--backend",
        choices=("numpy", "cuda", "cuda-shim"),
        default="numpy",
        help="numpy (reference tactics), cuda (CUDA kernels on a GPU) or cuda-shim (the CUDA "
        "kernels on the CPU through the shim: checks without a GPU, tiny models only)",
    )
    build.add_argument(
        "--cuda-streams", type=int, default=1, help="CUDA streams for independent branches (1)"
    )
    build.add_argument(
        "--no-cuda-graphs", action="store_true", help="launch kernel by kernel, no CUDA graph"
    )
    build.add_argument(
        "--flush-l2", action="store_true", help="flush the GPU's L2 before each timed sample"
    )
    build.add_argument("--timing-cache", metavar="FILE", help="timing cache (JSON), reused")
    build.add_argument("--timing-iterations", type=int, default=5, help="runs per tactic (5)")
    build.add_argument("--timing-warmup", type=int, default=1, help="untimed runs per tactic (1)")
    build.add_argument("--disable", action="append", metavar="NAME", help="skip an optimizer pass")
    build.add_argument("-v", "--verbose", action="store_true", help="print every build decision")
    build.add_argument("--json", metavar="FILE", help="write the build summary and log ('-')")
    build.set_defaults(handler=cmd_build)
