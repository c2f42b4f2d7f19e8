"""``gie profile``, and ``gie run``/``gie inspect`` on a ``.gie`` engine; helpers shared with
``gie build`` (engine/cli_build.py) and ``gie compare`` (engine/cli_compare.py).

    gie profile ENGINE [--iterations N] [--warmup N] [--export-profile F] [--export-layer-info F]
    gie run ENGINE [--inputs F.npz]          gie inspect ENGINE [--json F]

``gie run`` and ``gie inspect`` come here when their file is an engine (a zip: it starts with
``PK``; an ONNX protobuf never does). Every ``--json``/``--export-*`` file may be ``-``
(stdout; the text report then goes to stderr so that stdout stays valid JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from engine.cli import (
    CliError,
    load_npz,
    save_npz,
    summarize_value,
    write_json,
)
from engine.progress import ProgressBar
from engine.text_report import human_bytes, short_list, text_table

#: An input as the engine expects it: shape (at the optimization shapes) and numpy dtype.
InputSpec = tuple[tuple[int, ...], np.dtype]


# --------------------------------------------------------------------------- helpers


def is_engine_file(path: str) -> bool:
    """Whether ``path`` holds a .gie engine (a zip archive: its first bytes are ``PK``)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == b"PK"
    except OSError:
        return False


def load_engine_file(path: str) -> Any:
    """The Engine stored in ``path``; CliError with the loader's message when it is refused."""
    from engine.serialize import EngineFileError, load_engine

    if not Path(path).is_file():
        raise CliError(f"{path}: no such file")
    try:
        engine = load_engine(path)
    except EngineFileError as error:
        message = str(error)
        raise CliError(message if path in message else f"{path}: {message}") from error
    except OSError as error:
        raise CliError(f"{path}: cannot read: {error.strerror or error}") from error
    loads = [i for i, e in enumerate(engine.log.entries) if e.stage == "load"]
    for entry in engine.log.entries[loads[0] + 1 :] if loads else []:  # after "loaded from"
        if entry.stage == "load":
            print(f"gie: warning: {entry.message}", file=sys.stderr)
    return engine


def emit_json(target: str, data: Any) -> None:
    """Write JSON to the file ``target`` (atomically) or to stdout when it is ``-``."""
    if target == "-":
        json.dump(data, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        sys.stdout.flush()
    else:
        write_json(target, json.loads(json.dumps(data, default=str)))


def text_stream(*json_targets: str | None) -> TextIO:
    """Where the human-readable report goes: stderr when some JSON goes to stdout."""
    return sys.stderr if "-" in json_targets else sys.stdout


def engine_inputs(engine: Any) -> dict[str, InputSpec]:
    """Input name -> (shape at the profiles' ``opt``, unprofiled symbolic dims as the runtime
    binds them, numpy dtype)."""
    from engine.build.memory import planning_shapes

    shapes = planning_shapes(engine.plan.model, engine.config, "opt")
    specs: dict[str, InputSpec] = {}
    for name in engine.input_names:
        spec = engine.plan.specs.get(name)
        if spec is None or spec.dtype is None or name not in shapes:
            raise CliError(f"engine input '{name}' has no known dtype or rank; use --inputs")
        specs[name] = (shapes[name], np.dtype(spec.dtype.numpy()))
    return specs


def synthetic_feeds(
    specs: Mapping[str, InputSpec],
    seed: int,
    integer_high: int = 4,
    booleans_true: bool = False,
    masks_ones: bool = False,
) -> dict[str, np.ndarray]:
    """Seeded arrays: floats standard normal, integers in [0, integer_high), booleans fair
    coins (or all true); with ``masks_ones``, integer inputs named ``*mask*`` are all ones
    (attend everywhere). With the defaults this draws what ``gie run MODEL`` draws."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in specs.items():
        if dtype == np.bool_:
            array = np.ones(shape, bool) if booleans_true else rng.random(shape) < 0.5
        elif dtype.kind in "iu" and masks_ones and "mask" in name.lower():
            array = np.ones(shape, dtype)
        elif dtype.kind in "iu":
            array = rng.integers(0, integer_high, size=shape)
        elif dtype.kind == "f":
            array = rng.standard_normal(shape)
        elif dtype.kind == "c":
            array = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        else:
            raise CliError(f"input '{name}' is of dtype {dtype}; pass it with --inputs")
        feeds[name] = np.asarray(array).astype(dtype)
    return feeds


def engine_feeds(
    engine: Any, inputs: str | None, seed: int, **generate: Any
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Feeds from ``inputs`` (.npz), the rest generated (:func:`synthetic_feeds` with
    ``generate``), all checked by the engine; returns the feeds and the generated names."""
    given = load_npz(inputs) if inputs else {}
    unknown = sorted(set(given) - set(engine.input_names))
    if unknown:
        raise CliError(
            f"{inputs}: no engine input named {unknown}; its inputs are {engine.input_names}"
        )
    missing = {name: s for name, s in engine_inputs(engine).items() if name not in given}
    feeds = {**given, **synthetic_feeds(missing, seed, **generate)}
    return check_engine_feeds(engine, feeds, inputs or "inputs"), list(missing)


def check_engine_feeds(
    engine: Any, feeds: Mapping[str, np.ndarray], label: str
) -> dict[str, np.ndarray]:
    """The engine's own check of names, dtypes, and shapes against its profiles; CliError."""
    from engine.runtime import EngineInputError

    try:
        return engine.check_feeds(feeds)
    except EngineInputError as error:
        raise CliError(f"{label}: {error}") from error


def run_engine(engine: Any, feeds: Mapping[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    """``engine.run(feeds)``; refused inputs and a failing layer become a CliError."""
    from engine.runtime import EngineInputError, LayerExecutionError

    try:
        return engine.run(dict(feeds))
    except (EngineInputError, LayerExecutionError) as error:
        raise CliError(f"{label}: {error}") from error


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def memory_summary(memory: Any) -> dict[str, Any]:
    """The memory plan as JSON with ``arena_bytes`` and ``naive_bytes`` first."""
    data = memory.to_json() if hasattr(memory, "to_json") else {}
    return {"arena_bytes": int(memory.arena_bytes), "naive_bytes": int(memory.naive_bytes), **data}


def config_text(key: str, value: Any) -> str:
    """``key=value`` for the config line ('' for empty values and the profiles, which the
    input lines show)."""
    if value in (None, [], ()) or key == "profiles":
        return ""
    if isinstance(value, list):
        value = ",".join("=".join(map(str, v)) if isinstance(v, list) else str(v) for v in value)
    return f"{key}={value}"


def cmd_inspect_engine(args: argparse.Namespace) -> int:
    """``gie inspect ENGINE``: config, device, inputs/outputs, the layer table, the memory plan."""
    engine = load_engine_file(args.model)
    out = text_stream(args.json)
    table = engine.layer_table()
    memory = engine.memory
    specs = engine_inputs(engine)
    from engine.serialize import read_manifest

    manifest = read_manifest(args.model)
    about = {k: manifest.get(k) for k in ("format_version", "engine_version", "created", "source")}
    print(f"engine: {args.model}   " + "   ".join(f"{k}: {v}" for k, v in about.items()), file=out)
    print("device: " + ", ".join(f"{k}={v}" for k, v in engine.device.items()), file=out)
    config = engine.config.to_json()
    print(
        "config: " + ", ".join(config_text(k, v) for k, v in config.items() if config_text(k, v)),
        file=out,
    )
    for name, (shape, dtype) in specs.items():
        profile = engine.config.profile_for(name)
        bounds = f" (opt) profile {list(profile.min)}..{list(profile.max)}" if profile else ""
        print(f"input  {name}: {dtype}[{shape_text(shape)}]{bounds}", file=out)
    for name in engine.output_names:
        print(f"output {name}", file=out)
    rows = [["#", "layer", "op", "precision", "tactic", "origins"]]
    for index, row in enumerate(table):
        origins = short_list(list(row.get("origins", [])), 2)
        rows.append(
            [
                str(row.get("index", index)),
                str(row["name"]),
                str(row["op"]),
                str(row["precision"]),
                str(row["tactic"]),
                origins,
            ]
        )
    print(f"\nlayers ({len(table)}):", file=out)
    print("\n".join(text_table(rows, right=(0,))), file=out)
    arena, naive = int(memory.arena_bytes), int(memory.naive_bytes)
    print(
        f"\nmemory plan: arena {human_bytes(arena)} ({arena:,} bytes) vs naive "
        f"{human_bytes(naive)} ({naive:,} bytes): {100 * arena / max(naive, 1):.0f}%",
        file=out,
    )
    if args.json:
        document = {
            "engine": args.model,
            **about,
            "device": dict(engine.device),
            "config": config,
            "inputs": {n: {"shape": list(s), "dtype": str(d)} for n, (s, d) in specs.items()},
            "outputs": list(engine.output_names),
            "layers": table,
            "memory": memory_summary(memory),
        }
        emit_json(args.json, document)
    return 0


def cmd_run_engine(args: argparse.Namespace) -> int:
    """``gie run ENGINE``: run the engine on given or seeded inputs; print output summaries."""
    if args.iterations < 1 or args.warmup < 0:
        raise CliError("--iterations must be >= 1 and --warmup >= 0")
    engine = load_engine_file(args.model)
    feeds, generated = engine_feeds(engine, args.inputs, args.seed)
    print(f"engine: {args.model}")
    for name, array in feeds.items():
        origin = f"random, seed {args.seed}" if name in generated else f"from {args.inputs}"
        print(f"input  {name}: {array.dtype}[{','.join(map(str, array.shape))}] ({origin})")
    if args.save_inputs:
        save_npz(args.save_inputs, feeds)
    walls = []
    with ProgressBar("run", args.warmup + args.iterations) as bar:
        for iteration in range(args.warmup + args.iterations):
            started = time.perf_counter()
            outputs = run_engine(engine, feeds, args.model)
            if iteration >= args.warmup:
                walls.append(time.perf_counter() - started)
            bar.advance()
    print()
    for name, value in outputs.items():
        print("output " + summarize_value(name, value))
    if args.save_outputs:
        save_npz(args.save_outputs, outputs)
    walls_ms = 1e3 * np.array(walls)
    print(
        f"\nlatency over {len(walls)} iteration(s) after {args.warmup} warm-up: "
        f"median {np.median(walls_ms):.3f} ms, min {walls_ms.min():.3f} ms, "
        f"mean {walls_ms.mean():.3f} ms   (per-layer times: gie profile ENGINE)"
    )
    return 0


def profile_lines(report: Any, top: int = 20) -> list[str]:
    """The profile as text: layers sorted by median time (top ``top``, the rest summed, the
    total), then the end-to-end latency stats of the separate plain runs."""
    layers = sorted(report.layers, key=lambda row: -row.latency_ms_median)
    total = sum(row.latency_ms_median for row in layers)

    def share(ms: float) -> str:
        return f"{100 * ms / total:.1f}" if total else "0.0"

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = [["layer", "op", "precision", "tactic", "median ms", "mean ms", "%", "GFLOP/s", "GB/s"]]
    for row in layers[:top]:
        rows.append(
            [
                row.layer,
                row.op,
                row.precision,
                row.tactic,
                f"{row.latency_ms_median:.4f}",
                f"{row.latency_ms_mean:.4f}",
                share(row.latency_ms_median),
                rate(row.gflops),
                rate(row.gbs),
            ]
        )
    if len(layers) > top:
        rest = sum(row.latency_ms_median for row in layers[top:])
        rows.append(
            [f"({len(layers) - top} more)", "", "", "", f"{rest:.4f}", "", share(rest), "", ""]
        )
    rows.append(["total", f"{len(layers)} layers", "", "", f"{total:.4f}", "", "100.0", "", ""])
    e2e = report.end_to_end
    return [
        *text_table(rows, right=(4, 5, 6, 7, 8)),
        "",
        f"end to end over {e2e.iterations} run(s) after {report.warmup} warm-up: "
        f"mean {e2e.mean_ms:.3f} ms, median {e2e.median_ms:.3f} ms, p90 {e2e.p90_ms:.3f} ms, "
        f"p99 {e2e.p99_ms:.3f} ms, throughput {e2e.throughput:.2f} inferences/s",
    ]


def cmd_profile(args: argparse.Namespace) -> int:
    """``gie profile ENGINE``: per-layer times (a profiling pass) and end-to-end latency."""
    if args.iterations < 1 or args.warmup < 0 or args.top < 1:
        raise CliError("--iterations and --top must be >= 1, --warmup >= 0")
    from engine.runtime import LayerExecutionError

    engine = load_engine_file(args.engine)
    out = text_stream(args.export_profile, args.export_layer_info)
    feeds = engine_feeds(engine, args.inputs, args.seed)[0] if args.inputs else None
    try:
        report = engine.profile(iterations=args.iterations, warmup=args.warmup, feeds=feeds)
    except LayerExecutionError as error:
        raise CliError(f"{args.engine}: {error}") from error
    shapes = ", ".join(f"{k}[{shape_text(v)}]" for k, v in report.input_shapes.items())
    print(f"engine: {args.engine}   inputs: {shapes or '-'}", file=out)
    print("\n".join(profile_lines(report, args.top)), file=out)
    if args.export_profile:
        emit_json(args.export_profile, report.to_json())
    if args.export_layer_info:
        info = {
            "engine": args.engine,
            "layers": engine.layer_table(),
            "memory": memory_summary(engine.memory),
        }
        emit_json(args.export_layer_info, info)
    return 0


def add_engine_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Register ``gie build``, ``gie profile`` and ``gie compare`` on the CLI's subparsers."""
    from engine.cli_build import add_build_command  # imports this module: load it late
    from engine.cli_compare import add_compare_command

    add_build_command(commands, common)
    add_compare_command(commands, common)
    profile = commands.add_parser(
        "profile", parents=[common], help="per-layer times and end-to-end latency of an engine"
    )
    profile.add_argument("engine", help=".gie engine file")
    profile.add_argument("--iterations", type=int, default=10, help="timed runs (10)")
    profile.add_argument("--warmup", type=int, default=2, help="untimed runs first (2)")
    profile.add_argument("--inputs", metavar="FILE.npz", help="inputs (default: seeded, opt)")
    profile.add_argument("--seed", type=int, default=0, help="seed of generated inputs (0)")
    profile.add_argument("--top", type=int, default=20, help="rows of the layer table (20)")
    profile.add_argument("--export-profile", metavar="F.json", help="write the report ('-')")
    profile.add_argument(
        "--export-layer-info", metavar="F.json", help="write the layer table and memory plan ('-')"
    )
    profile.set_defaults(handler=cmd_profile)


def engine_handler(args: argparse.Namespace) -> int:
    """``gie run``/``gie inspect`` of an engine file (engine.cli dispatches here)."""
    return cmd_run_engine(args) if args.command == "run" else cmd_inspect_engine(args)
