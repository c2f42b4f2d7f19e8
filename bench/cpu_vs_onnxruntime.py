"""Latency of the NumPy reference backend against onnxruntime (CPU), model by model.

Both run the same model on the same seeded inputs with the same thread count: onnxruntime gets
``intra_op_num_threads`` = the CPUs this process may use (or ``--threads``), and NumPy's OpenBLAS
is set to the same number when it can be reached. Runs are interleaved (ours, ort, ort, ours...)
after warm-up, and each backend's latency is the median of ``--repeats`` runs. The table ends
with the geometric mean of the ratios (ours / onnxruntime) over the models both backends ran.

Models: the zoo (``engine.zoo``; skipped with a note when it is absent) and the nine "light"
models of the onnx wheel. Usage (from the repository root)::

    .venv/bin/python bench/cpu_vs_onnxruntime.py [--models resnet,light_vgg*] [--repeats 10]
        [--warmup 2] [--threads N] [--seed 0] [--max-seconds 30] [--json out.json] [--list]
"""

from __future__ import annotations

import argparse
import ctypes
import fnmatch
import glob
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the engine importable
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter  # noqa: E402
from engine.cli import random_feeds  # noqa: E402
from engine.onnx_io import load, unsupported_ops  # noqa: E402

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

Feeds = dict[str, np.ndarray]


@dataclass
class BenchRow:
    """One model's result; times in milliseconds, ``status`` 'ok' or why it was not compared."""

    model: str
    status: str
    ours_ms: float | None = None
    ort_ms: float | None = None
    ratio: float | None = None
    max_abs_diff: float | None = None
    repeats: int = 0


# --------------------------------------------------------------------------- threads


def _openblas() -> ctypes.CDLL | None:
    """NumPy's bundled OpenBLAS (scipy-openblas wheels), or None when it cannot be found."""
    folder = Path(np.__file__).parent.parent / "numpy.libs"
    for path in sorted(glob.glob(str(folder / "libscipy_openblas*"))):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def blas_threads(set_to: int | None = None) -> str:
    """Describe (and optionally set) NumPy's BLAS thread count."""
    lib = _openblas()
    getter = setter = None
    for suffix in ("64_", ""):
        getter = getter or getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
        setter = setter or getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
    if set_to is not None and setter is not None:
        setter(ctypes.c_int(set_to))
    if getter is not None:
        return f"OpenBLAS, {getter()} thread(s)"
    env = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ}
    return f"unknown BLAS (not queried; env {env or 'unset'})"


def available_cpus() -> int:
    """CPUs this process may run on (affinity mask), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- models


def model_catalog(seed: int) -> tuple[dict[str, Callable[[], tuple[onnx.ModelProto, Feeds]]], str]:
    """Name -> loader of (model, feeds); the note says what was left out."""
    catalog: dict[str, Callable[[], tuple[onnx.ModelProto, Feeds]]] = {}
    note = ""
    try:
        from engine.zoo import ZOO, make_inputs
    except ImportError as error:
        note = f"engine.zoo unavailable ({error}); zoo models skipped"
    else:
        for name, builder in ZOO.items():

            def zoo_loader(builder: Any = builder) -> tuple[onnx.ModelProto, Feeds]:
                model = builder(seed)
                return model, make_inputs(model, seed)

            catalog[name] = zoo_loader
    for path in sorted(LIGHT_DIR.glob("light_*.onnx")):

        def light_loader(path: Path = path) -> tuple[onnx.ModelProto, Feeds]:
            model = onnx.load(path)
            return model, random_feeds(load(model).graph.inputs, seed)

        catalog[path.stem] = light_loader
    return catalog, note


def select(names: Sequence[str], patterns: str | None) -> list[str]:
    """Names matching any comma-separated pattern (exact name or glob: ``light_*``)."""
    if not patterns:
        return list(names)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in wanted)]


# --------------------------------------------------------------------------- timing


def _time(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _max_abs_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> float | None:
    diffs = []
    for name, expected in theirs.items():
        actual = ours.get(name)
        if isinstance(actual, np.ndarray) and isinstance(expected, np.ndarray):
            if actual.shape != expected.shape:
                return math.inf
            if actual.size and actual.dtype.kind in "fciub":
                delta = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
                diffs.append(float(np.nanmax(delta)))
    return max(diffs) if diffs else None


def bench_model(
    name: str,
    loader: Callable[[], tuple[onnx.ModelProto, Feeds]],
    threads: int,
    repeats: int,
    warmup: int,
    max_seconds: float,
) -> BenchRow:
    """Time one model on both backends; failures become a row with the reason."""
    try:
        proto, feeds = loader()
        model = load(proto)
    except Exception as error:  # noqa: BLE001 - reported in the table
        return BenchRow(name, f"load failed: {type(error).__name__}: {error}")
    missing = unsupported_ops(model)
    if missing:
        return BenchRow(name, "unsupported: " + ", ".join(op.op_type for op in missing))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: no "removing unused initializer" warnings
    # Idle onnxruntime workers spin by default, stealing the CPUs NumPy runs on next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        ort_names = [i.name for i in session.get_inputs()]
        ort_feeds = {k: v for k, v in feeds.items() if k in ort_names}
        output_names = [o.name for o in session.get_outputs()]
        interpreter = ReferenceInterpreter(model)
    except Exception as error:  # noqa: BLE001
        return BenchRow(name, f"setup failed: {type(error).__name__}: {error}")

    def ours() -> dict[str, Any]:
        return interpreter.run(feeds).outputs

    def theirs() -> dict[str, Any]:
        return dict(zip(output_names, session.run(output_names, ort_feeds)))

    try:
        diff = _max_abs_diff(ours(), theirs())
        first = _time(ours) + _time(theirs)
        for _ in range(max(0, warmup - 1)):
            ours()
            theirs()
        runs = max(3, min(repeats, int(max_seconds / max(first, 1e-9))))
        ours_times: list[float] = []
        ort_times: list[float] = []
        for index in range(runs):  # alternate who goes first: no order bias
            pair = ((ours, ours_times), (theirs, ort_times))
            for call, times in pair if index % 2 == 0 else reversed(pair):
                times.append(_time(call))
    except Exception as error:  # noqa: BLE001
        return BenchRow(name, f"run failed: {type(error).__name__}: {error}")
    ours_ms = 1e3 * statistics.median(ours_times)
    ort_ms = 1e3 * statistics.median(ort_times)
    return BenchRow(name, "ok", ours_ms, ort_ms, ours_ms / ort_ms, diff, runs)


# --------------------------------------------------------------------------- report


def geometric_mean(values: Sequence[float]) -> float | None:
    """Geometric mean of positive values (None for an empty list)."""
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def format_table(rows: Sequence[BenchRow]) -> list[str]:
    """Aligned text table of the rows, then the geometric mean of the ratios."""
    table = [["model", "ours ms", "onnxruntime ms", "ratio", "max |diff|", "runs"]]
    for row in rows:
        if row.status != "ok":
            table.append([row.model, "-", "-", "-", "-", row.status[:70]])
            continue
        diff = "-" if row.max_abs_diff is None else f"{row.max_abs_diff:.2e}"
        table.append(
            [
                row.model,
                f"{row.ours_ms:.3f}",
                f"{row.ort_ms:.3f}",
                f"{row.ratio:.2f}x",
                diff,
                str(row.repeats),
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in table
    ]
    ratios = [r.ratio for r in rows if r.ratio is not None]
    mean = geometric_mean(ratios)
    summary = "n/a" if mean is None else f"{mean:.2f}x over {len(ratios)} model(s)"
    return [*lines, "", f"geometric-mean ratio (ours / onnxruntime): {summary} (target <= 1.5x)"]


def environment(threads: int, blas: str) -> dict[str, Any]:
    """What the numbers depend on: machine, threads and library versions."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus_available": available_cpus(),
        "threads": threads,
        "blas": blas,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }


def _write_json(path: str, data: Any) -> None:
    target = Path(path)
    temporary = target.with_name(f".{target.name}.partial")
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0, or 2 when no model was selected)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated names or globs (default: all)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per backend (10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per backend (2)")
    parser.add_argument("--threads", type=int, help="threads for both (default: CPUs available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of models and inputs (0)")
    parser.add_argument(
        "--max-seconds", type=float, default=30.0, help="cap on timed runs per model (30 s)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    args = parser.parse_args(argv)

    catalog, note = model_catalog(args.seed)
    if args.list:
        print("\n".join(catalog))
        return 0
    names = select(list(catalog), args.models)
    if not names:
        print(f"no model matches {args.models!r}; try --list", file=sys.stderr)
        return 2
    threads = args.threads or available_cpus()
    blas = blas_threads(set_to=threads)
    env = environment(threads, blas)
    print(
        f"threads: {threads} (onnxruntime intra-op; NumPy {blas}); "
        f"onnxruntime {ort.__version__}, numpy {np.__version__}"
    )
    if note:
        print(note)
    rows = []
    for name in names:
        row = bench_model(name, catalog[name], threads, args.repeats, args.warmup, args.max_seconds)
        rows.append(row)
        state = f"{row.ours_ms:.2f} ms vs {row.ort_ms:.2f} ms" if row.status == "ok" else row.status
        print(f"  {name}: {state}", file=sys.stderr, flush=True)
    print("\n".join(format_table(rows)))
    if args.json:
        ratios = [r.ratio for r in rows if r.ratio is not None]
        _write_json(
            args.json,
            {
                "environment": env,
                "settings": {"repeats": args.repeats, "warmup": args.warmup, "seed": args.seed},
                "models": [asdict(r) for r in rows],
                "geomean_ratio": geometric_mean(ratios),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
