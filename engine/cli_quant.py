"""``gie export-qdq`` and ``gie sensitivity``: the precision tools of the command line.

    gie export-qdq ENGINE -o MODEL_QDQ.onnx
    gie sensitivity MODEL --calib DATA [--calibrator C] [-O0..-O3] [--top N] [--json F]

``export-qdq`` writes the engine's int8 decisions as a standard QDQ ONNX model (weights int8
with their per-channel scales, activations quantized at the engine's scales, fp16 layers back
in fp32, fused ops expanded into standard ops) that onnxruntime runs. ``sensitivity`` quantizes
every int8-capable layer alone and ranks the layers by the output error it causes (most
sensitive first): the layers to keep in higher precision first.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from engine.cli import CliError, _load
from engine.cli_engine import emit_json, load_engine_file, text_stream
from engine.config import BuilderConfig
from engine.passes import LEVELS
from engine.progress import progress


def cmd_export_qdq(args: argparse.Namespace) -> int:
    """``gie export-qdq``: the engine's precision decisions as a QDQ ONNX model."""
    from engine.onnx_io import save
    from engine.quantize.qdq_export import ExportError, export_qdq

    engine = load_engine_file(args.engine)
    try:
        model, report = export_qdq(engine.plan.model)
    except ExportError as error:
        raise CliError(f"{args.engine}: {error}") from error
    output = args.output or str(Path(args.engine).with_suffix("")) + "_qdq.onnx"
    try:
        save(model, output)
    except OSError as error:
        raise CliError(f"{output}: cannot write: {error.strerror or error}") from error
    out = text_stream(args.json)
    print(f"{args.engine} -> {output}: {report.summary()}", file=out)
    if args.json:
        emit_json(args.json, {"engine": args.engine, "output": output, **report.to_json()})
    return 0


def _format(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.6f}"


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """``gie sensitivity``: rank layers by the output error int8 alone causes."""
    from engine.quantize.calibration_data import CalibrationDataError, load_calibration_data
    from engine.quantize.mixed_precision import sensitivity

    model = _load(args.model)
    try:
        batches = list(load_calibration_data(args.calib, model))
    except CalibrationDataError as error:
        raise CliError(str(error)) from error
    config = BuilderConfig(optimization_level=args.level, calibrator=args.calibrator)
    bars = progress()
    try:
        ranked = sensitivity(model, batches, config, progress=bars)
    finally:
        bars.close()
    out = text_stream(args.json)
    print(
        f"{args.model}: {len(ranked)} int8-capable layers, each quantized alone "
        f"({args.calibrator} calibration, {len(batches)} batches); most sensitive first",
        file=out,
    )
    rows = [["#", "layer", "op", "output cosine", "SQNR dB", "top-1"]]
    for rank, item in enumerate(ranked[: args.top], start=1):
        rows.append(
            [
                str(rank),
                item.layer,
                item.op,
                _format(item.cosine),
                f"{item.sqnr_db:.1f}",
                f"{100 * item.top1:.1f}%",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)
    if args.json:
        emit_json(args.json, {"model": args.model, "layers": [s.to_json() for s in ranked]})
    return 0


def add_quant_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Register ``gie export-qdq`` and ``gie sensitivity``."""
    export = commands.add_parser(
        "export-qdq", parents=[common], help="write an engine's int8 decisions as a QDQ ONNX model"
    )
    export.add_argument("engine", help=".gie engine file")
    export.add_argument("-o", "--output", metavar="MODEL.onnx", help="(ENGINE_qdq.onnx)")
    export.add_argument("--json", metavar="FILE", help="write the export report as JSON ('-')")
    export.set_defaults(handler=cmd_export_qdq)

    sens = commands.add_parser(
        "sensitivity", parents=[common], help="rank layers by the error int8 alone causes"
    )
    sens.add_argument("model", help="ONNX model file")
    sens.add_argument("--calib", required=True, metavar="DATA", help=".npz, .npy or image folder")
    sens.add_argument(
        "--calibrator", choices=("entropy", "minmax", "percentile", "mse"), default="entropy"
    )
    level = sens.add_mutually_exclusive_group()
    for name in LEVELS:
        level.add_argument(
            f"-{name}", dest="level", action="store_const", const=name, help=f"level {name}"
        )
    sens.set_defaults(level="O2")
    sens.add_argument("--top", type=int, default=30, help="rows to print (30)")
    sens.add_argument("--json", metavar="FILE", help="write the ranking as JSON ('-')")
    sens.set_defaults(handler=cmd_sensitivity)


__all__ = ["add_quant_commands"]
