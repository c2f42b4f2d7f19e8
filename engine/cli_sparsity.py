"""``gie sparsity``: 2:4 structured sparsity from the command line.

    gie sparsity check MODEL [-O0..-O3] [--min-channels N] [--json F]
    gie sparsity prune MODEL -o PRUNED.onnx [--permute] [--min-channels N]
    gie sparsity advise MODEL [--inputs F.npz] [-O0..-O3] [--min-channels N] [--json F]

``check`` lists every Conv/Gemm/MatMul layer of the optimized model: eligible, the reason when
not, whether the weight already is 2:4 and the fraction of groups of 4 that comply. ``prune``
prunes the eligible layers of the model AS GIVEN (standard ONNX in, standard ONNX out) by
magnitude, optionally searching an input-channel permutation that keeps more magnitude, and
reports the magnitude kept per layer. ``advise`` adds, per layer, the output error when that
layer alone is pruned and the expected speed-up from the cost model.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict
from typing import Any

from engine.cli import CliError, _load, load_npz
from engine.cli_engine import emit_json, text_stream
from engine.passes import LEVELS
from engine.progress import progress
from engine.text_report import text_table


def _rows_text(rows: list[list[str]]) -> str:
    return "\n".join(text_table(rows))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def cmd_check(args: argparse.Namespace) -> int:
    from engine.passes import optimize
    from engine.sparsity.check import check_model

    model = optimize(_load(args.model), args.level, estimate_costs=False).model
    layers = check_model(model, min_channels=args.min_channels)
    out = text_stream(args.json)
    rows = [["layer", "op", "eligible", "2:4", "compliant", "reason"]]
    for layer in layers:
        rows.append(
            [
                layer.name,
                layer.op,
                "yes" if layer.eligible else "no",
                "yes" if layer.is_2_4 else "no",
                _percent(layer.compliant_fraction),
                layer.reason,
            ]
        )
    eligible = sum(1 for layer in layers if layer.eligible)
    summary = f"{len(layers)} weight layers, {eligible} eligible"
    print(f"{args.model} at {args.level}: {summary}", file=out)
    print(_rows_text(rows), file=out)
    if args.json:
        emit_json(args.json, {"model": args.model, "layers": [asdict(layer) for layer in layers]})
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from engine.onnx_io import save
    from engine.sparsity.prune import prune_model

    model = _load(args.model)
    pruned, records = prune_model(model, permute=args.permute, min_channels=args.min_channels)
    try:
        save(pruned, args.output)
    except OSError as error:
        raise CliError(f"{args.output}: cannot write: {error.strerror or error}") from error
    rows = [["layer", "kept (identity)", "kept", "permuted", "note"]]
    for record in records:
        rows.append(
            [
                record.name,
                _percent(record.retained_before_permutation),
                _percent(record.retained_after),
                "yes" if record.permuted else "no",
                record.note,
            ]
        )
    print(f"{args.model} -> {args.output}: {len(records)} layers pruned to 2:4")
    print(_rows_text(rows))
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    from engine.builder import build
    from engine.config import BuilderConfig
    from engine.sparsity.advisor import advise

    model = _load(args.model)
    if args.inputs:
        feeds = load_npz(args.inputs)
    else:
        config = BuilderConfig(optimization_level="O0", tactic_sources=frozenset({"reference"}))
        feeds = build(model, config).example_feeds(seed=0)
    bars = progress()
    try:
        report = advise(
            model, feeds, min_channels=args.min_channels, level=args.level, progress=bars
        )
    finally:
        bars.close()
    out = text_stream(args.json)
    rows = [["layer", "op", "eligible", "kept", "output cosine", "expected speedup", "reason"]]
    for item in report:
        cosine = "-" if item.output_cosine is None else f"{item.output_cosine:.6f}"
        speed = "-" if item.expected_speedup is None else f"{item.expected_speedup:.2f}x"
        rows.append(
            [
                item.name,
                item.op,
                "yes" if item.eligible else "no",
                _percent(item.retained_magnitude),
                cosine,
                speed,
                item.reason,
            ]
        )
    print(f"{args.model}: 2:4 advice for {len(report)} weight layers (each pruned alone)", file=out)
    print(_rows_text(rows), file=out)
    if args.json:
        emit_json(args.json, {"model": args.model, "layers": [a.to_json() for a in report]})
    return 0


def sparsity_error_line(engine: Any, model: Any) -> str:
    """``gie build --sparsity``: the sparse engine's output error vs the dense model."""
    from engine.builder import build
    from engine.config import SparsityMode
    from engine.quantize.accuracy import output_errors

    dense = build(
        model,
        engine.config.with_changes(
            sparsity=SparsityMode.OFF, tactic_sources=frozenset({"reference"}), tactic_pins=()
        ),
    )
    feeds = engine.example_feeds(seed=0)
    errors = output_errors(dense.run(feeds), engine.run(feeds))
    cosine = min((e.cosine for e in errors.values()), default=1.0)
    worst = max((e.max_abs for e in errors.values()), default=0.0)
    cos_text = "nan" if math.isnan(cosine) else f"{cosine:.6f}"
    return f"output vs the dense model (seeded inputs): cosine {cos_text}, max |diff| {worst:.3g}"


def add_sparsity_command(commands: Any, common: argparse.ArgumentParser) -> None:
    """Register ``gie sparsity check|prune|advise``."""
    sparsity = commands.add_parser(
        "sparsity", parents=[common], help="2:4 structured sparsity: check, prune, advise"
    )
    actions = sparsity.add_subparsers(dest="action", metavar="ACTION", required=True)

    def levels(parser: argparse.ArgumentParser) -> None:
        group = parser.add_mutually_exclusive_group()
        for name in LEVELS:
            group.add_argument(
                f"-{name}", dest="level", action="store_const", const=name, help=f"level {name}"
            )
        parser.set_defaults(level="O2")

    def minimum(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--min-channels",
            type=int,
            default=256,
            help="fewer input channels than this: too small to benefit (256, NVIDIA's guidance)",
        )

    check = actions.add_parser("check", parents=[common], help="per layer: eligible, 2:4, why")
    check.add_argument("model", help="ONNX model file")
    levels(check)
    minimum(check)
    check.add_argument("--json", metavar="FILE", help="write the table as JSON ('-')")
    check.set_defaults(handler=cmd_check)

    prune = actions.add_parser("prune", parents=[common], help="magnitude-prune eligible layers")
    prune.add_argument("model", help="ONNX model file")
    prune.add_argument("-o", "--output", required=True, metavar="PRUNED.onnx")
    prune.add_argument("--permute", action="store_true", help="search input-channel permutations")
    minimum(prune)
    prune.set_defaults(handler=cmd_prune)

    advise_parser = actions.add_parser(
        "advise", parents=[common], help="per layer: kept magnitude, error alone, speedup"
    )
    advise_parser.add_argument("model", help="ONNX model file")
    advise_parser.add_argument("--inputs", metavar="FILE.npz", help="inputs to measure error on")
    levels(advise_parser)
    minimum(advise_parser)
    advise_parser.add_argument("--json", metavar="FILE", help="write the report as JSON ('-')")
    advise_parser.set_defaults(handler=cmd_advise)


__all__ = ["add_sparsity_command", "sparsity_error_line"]
