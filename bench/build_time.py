"""Build time with a cold and a warm timing cache (the issue's target: warm >= 5x faster).

For each model: one priming build (tactic timing off, so imports and first-call costs do not
land on the cold build), then a build with an empty timing cache in a temporary directory
(cold: every candidate is timed), then the same build again with that cache (warm: nothing is
timed). Prints the wall-clock build times, their ratio, and the part of each build after the
optimizer (tactic selection, memory planning, engine creation), where the cache acts.

Usage (from the repository root)::

    .venv/bin/python bench/build_time.py [--models resnet,light_resnet50] [--level O2]
        [--iterations 5] [--warmup 1] [--json out.json|-]

Model names: the zoo's (``engine.zoo.ZOO``) and ``light_<name>`` for the onnx wheel's light
models. Timings depend on machine load: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the engine importable
    sys.path.insert(0, str(ROOT))

import onnx_ir as ir  # noqa: E402

from engine import zoo  # noqa: E402
from engine.build.timing import WallClockTimer  # noqa: E402
from engine.builder import build  # noqa: E402
from engine.config import BuilderConfig  # noqa: E402
from engine.device import device_identity  # noqa: E402
from engine.examples import light_model_path  # noqa: E402
from engine.onnx_io import load  # noqa: E402

TARGET_RATIO = 5.0
DEFAULT_MODELS = "resnet,light_resnet50"


@dataclass
class BuildRun:
    """One build: total seconds, seconds after the optimizer, candidates timed, cache hits."""

    seconds: float
    after_optimize_seconds: float
    timed: int
    cache_hits: int


@dataclass
class Row:
    """One model's cold and warm builds and the ratio cold / warm (total build time)."""

    model: str
    layers: int
    cold: BuildRun
    warm: BuildRun
    ratio: float
    after_optimize_ratio: float
    meets_target: bool


def load_model(name: str) -> ir.Model:
    if name.startswith("light_"):
        return load(light_model_path(name.removeprefix("light_")))
    return load(zoo.build(name))


class CountingTimer(WallClockTimer):
    """The builder's wall-clock timer, remembering which layers it timed."""

    def __init__(self, warmup: int, iterations: int) -> None:
        super().__init__(warmup, iterations)
        self.calls: list[tuple[str, str]] = []

    def time(self, layer, tactic, run, abort_above_ms=None):  # type: ignore[no-untyped-def]
        self.calls.append((layer.name, tactic))
        return super().time(layer, tactic, run, abort_above_ms)


def timed_build(model: ir.Model, config: BuilderConfig) -> tuple[BuildRun, Any]:
    """Build once: the run's numbers and the engine. The optimizer's end comes from the
    builder's progress callback; cache hits are layers with candidates that were not timed."""
    marks: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "optimize" and done == total:
            marks["optimized"] = time.perf_counter()

    timer = CountingTimer(config.timing_warmup, config.timing_iterations)
    start = time.perf_counter()
    engine = build(model, config, timer=timer, progress=progress)
    end = time.perf_counter()
    timed_layers = {name for name, _ in timer.calls}
    hits = sum(1 for x in engine.plan.layers if x.candidates and x.name not in timed_layers)
    run = BuildRun(end - start, end - marks.get("optimized", start), len(timer.calls), hits)
    return run, engine


def bench_model(name: str, base: BuilderConfig, cache_dir: str) -> Row:
    model = load_model(name)
    build(model, base.with_changes(tactic_sources=frozenset({"reference"})))  # priming
    config = base.with_changes(timing_cache_path=os.path.join(cache_dir, f"{name}.json"))
    cold, _ = timed_build(model, config)
    warm, engine = timed_build(model, config)
    ratio = cold.seconds / max(warm.seconds, 1e-9)
    after = cold.after_optimize_seconds / max(warm.after_optimize_seconds, 1e-9)
    return Row(name, len(engine.plan.layers), cold, warm, ratio, after, ratio >= TARGET_RATIO)


def _write_json(target: str, document: dict[str, Any]) -> None:
    text = json.dumps(document, indent=2)
    if target == "-":
        sys.stdout.write(text + "\n")
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text + "\n")
    os.replace(temp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated model names")
    parser.add_argument("--level", default="O2", help="optimization level (default O2)")
    parser.add_argument("--iterations", type=int, default=5, help="timed runs per candidate")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per candidate")
    parser.add_argument("--json", help="also write the results as JSON to this file (- = stdout)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        if name not in zoo.ZOO and not name.startswith("light_"):
            sys.stderr.write(f"unknown model {name!r}; zoo: {', '.join(zoo.ZOO)}, or light_*\n")
            return 2
    base = BuilderConfig(
        optimization_level=args.level,
        timing_iterations=args.iterations,
        timing_warmup=args.warmup,
    )
    device = device_identity()
    out = sys.stderr if args.json == "-" else sys.stdout
    out.write(f"device: {device['device']} ({device['threads']} threads), level {args.level}\n")
    out.write(
        f"{'model':<18} {'layers':>6} {'cold s':>8} {'warm s':>8} {'ratio':>7} "
        f"{'cold post-opt s':>15} {'warm post-opt s':>15} {'timed':>6} {'hits':>5}\n"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="gie-timing-cache-") as cache_dir:
        for name in names:
            row = bench_model(name, base, cache_dir)
            rows.append(row)
            out.write(
                f"{row.model:<18} {row.layers:>6} {row.cold.seconds:>8.2f} "
                f"{row.warm.seconds:>8.2f} {row.ratio:>6.1f}x "
                f"{row.cold.after_optimize_seconds:>15.2f} "
                f"{row.warm.after_optimize_seconds:>15.2f} "
                f"{row.cold.timed:>6} {row.warm.cache_hits:>5}"
                f"{'' if row.meets_target else f'  (below the {TARGET_RATIO:.0f}x target)'}\n"
            )
    if args.json:
        _write_json(
            args.json,
            {
                "device": device,
                "settings": vars(args),
                "target_ratio": TARGET_RATIO,
                "rows": [asdict(row) for row in rows],
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
