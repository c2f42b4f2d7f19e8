"""``python -m studio MODEL --out DIR``: a session end to end, written to a folder.

Records the optimization, builds the engine (``--fp16`` / ``--int8`` with ``--calib DATA``),
profiles it, measures per-layer error vs fp32 and writes ``DIR/model.gie``, ``recipe.json``,
``model_qdq.onnx`` and ``report.html`` (offline); prints the timeline summary, the slowest
layers and where the files are. ``make demo`` runs it on the bundled example.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine.config import BuilderConfig, Precision


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio", description=__doc__)
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("--out", default="out", help="folder for the files (out)")
    parser.add_argument("--fp16", action="store_true", help="allow fp16 layers")
    parser.add_argument("--int8", action="store_true", help="allow int8 layers (needs --calib)")
    parser.add_argument("--calib", metavar="DATA", help="int8 calibration data (.npz, folder)")
    parser.add_argument("-O", dest="level", default="O3", help="optimization level (O3)")
    args = parser.parse_args(argv)
    from studio.session import Session

    precisions = {Precision.FP32}
    if args.fp16:
        precisions.add(Precision.FP16)
    if args.int8:
        precisions.add(Precision.INT8)
    config = BuilderConfig(precisions=frozenset(precisions), timing_iterations=3)
    try:
        session = Session(args.model, config, calibration_data=args.calib, level=args.level)
    except (OSError, ValueError) as error:
        sys.stderr.write(f"studio: error: {error}\n")
        return 2
    with session:
        session.run()
        print(f"{args.model}: {len(session.steps)} optimizer steps at {args.level}")
        session.build()
        report = session.profile(iterations=3)
        session.layer_errors()
        slowest = sorted(report.layers, key=lambda row: -row.latency_ms_median)[:5]
        for row in slowest:
            print(f"  {row.latency_ms_median:8.3f} ms  {row.precision:5s}  {row.layer}")
        paths = session.export(args.out)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    print("open the report in a browser (offline), or explore in JupyterLab: make lab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
