"""``gie optimize``: run the optimizer, print the rewrite timeline, export steps and results.

    gie optimize MODEL [-O0|-O1|-O2|-O3] [--disable NAME ...] [--steps-dir DIR] [-o OUT.onnx]
                 [--json F|-] [--check] [--list-rules]

The timeline has one line per step (index, pass/rule, nodes removed/added, node count,
estimated latency). ``--steps-dir`` writes the original and every step's graph as ONNX (with
our ``gie`` ops; Netron opens them) plus canonical text for diffs. ``--check`` reruns the
reference backend after every step on seeded inputs and records the largest difference.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import onnx_ir as ir

from engine.cli import CliError, _load, random_feeds, write_json
from engine.model_stats import op_key
from engine.onnx_io import save
from engine.passes import LEVELS, Instrument, PassFailedError, RewriteEvent, optimize
from engine.passes.graph_text import canonical_text
from engine.passes.pipelines import all_pass_and_rule_names


class StepExporter(Instrument):
    """Writes the graph before the first pass (step_0000_original) and after every step
    (step_NNNN_<pass>_<rule>, NNNN = step index + 1) into ``directory``, as .onnx and .txt."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.index = 0

    def _write(self, model: ir.Model, stem: str) -> None:
        save(model, self.directory / f"{stem}.onnx")
        (self.directory / f"{stem}.txt").write_text(canonical_text(model), encoding="utf-8")

    def before_pipeline(self, model: ir.Model, pass_names: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write(model, "step_0000_original")

    def after_rewrite(self, event: RewriteEvent, model: ir.Model) -> None:
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{event.pass_name}_{event.rule or 'pass'}")
        self.index += 1
        self._write(model, f"step_{self.index:04d}_{label}")


def op_counts(model: ir.Model) -> dict[str, int]:
    """Op histogram of the main graph: 'Conv', 'gie::ConvAct' (domain-qualified if not default)."""
    return dict(sorted(Counter(op_key(node) for node in model.graph).items()))


def cmd_optimize(args: argparse.Namespace) -> int:
    if args.list_rules:
        for pass_name, rules in all_pass_and_rule_names().items():
            print(f"{pass_name}: {', '.join(rules) if rules else '(whole-graph pass)'}")
        return 0
    if not args.model:
        raise CliError("optimize: a MODEL is required (or --list-rules)")
    model = _load(args.model)
    feeds = random_feeds(list(model.graph.inputs), seed=0) if args.check else None
    instruments = [StepExporter(Path(args.steps_dir))] if args.steps_dir else []
    try:
        result = optimize(
            model,
            args.level,
            disabled=args.disable or (),
            instruments=instruments,
            check_feeds=feeds,
        )
    except PassFailedError as error:
        raise CliError(f"{args.model}: {error}") from error
    except OSError as error:
        raise CliError(f"cannot write steps: {error}") from error
    steps = result.steps
    print(f"model: {args.model}   level: {args.level}   steps: {len(steps)}")
    if "opset_upgrade" in result.model.meta:
        print(f"opset upgraded {result.model.meta['opset_upgrade']} before optimizing")
    for step in steps:
        line = step.summary()
        if step.numeric_check is not None:
            line += f"  max|diff| {step.numeric_check.max_abs:.2e}"
        print(line)
    before = steps[0].before if steps else None
    after = steps[-1].after if steps else None
    if before is not None and after is not None:
        print(
            f"nodes {before.node_count} -> {after.node_count}; estimated latency "
            f"{before.latency_ms:.3f} -> {after.latency_ms:.3f} ms (GPU fp32 roofline)"
        )
    counts = op_counts(result.model)
    print("final ops: " + ", ".join(f"{op} {n}" for op, n in counts.items()))
    if result.why_not:
        print(f"why not ({len(result.why_not)} near matches):")
        for why in result.why_not[: args.why_not_limit]:
            print(f"  {why.node}: {why.rule}: {why.reason}")
    if args.output:
        save(result.model, args.output)
        print(f"wrote {args.output}")
    if args.json:
        document = {
            "model": str(args.model),
            "level": args.level,
            "steps": [step.to_json() for step in steps],
            "op_counts": counts,
            "why_not": [why.to_json() for why in result.why_not],
        }
        if args.json == "-":
            json.dump(document, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            write_json(args.json, document)
    return 0


def add_optimize_command(commands: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``gie optimize`` on the CLI's subparsers."""
    parser = commands.add_parser(
        "optimize", parents=[common], help="optimize a model, printing every recorded rewrite"
    )
    parser.add_argument("model", nargs="?", help="ONNX model file")
    level = parser.add_mutually_exclusive_group()
    for name in LEVELS:
        level.add_argument(
            f"-{name}", dest="level", action="store_const", const=name, help=f"level {name}"
        )
    parser.set_defaults(level="O2")
    parser.add_argument(
        "--disable", action="append", metavar="NAME", help="skip a pass or rule (repeatable)"
    )
    parser.add_argument("--steps-dir", metavar="DIR", help="write every step's graph here")
    parser.add_argument("-o", "--output", metavar="OUT.onnx", help="write the optimized model")
    parser.add_argument("--json", metavar="FILE", help="write steps and op counts ('-': stdout)")
    parser.add_argument(
        "--check", action="store_true", help="numeric check of every step on seeded inputs"
    )
    parser.add_argument("--why-not-limit", type=int, default=20, help="near matches to print (20)")
    parser.add_argument("--list-rules", action="store_true", help="list passes and rules")
    parser.set_defaults(handler=cmd_optimize)
    return parser
