"""``gie compare``: our outputs against onnxruntime's on the same inputs (Polygraphy's spirit).

    gie compare MODEL [ENGINE] [--inputs F.npz] [--seed N] [--dim NAME=VALUE ...]
                [--rtol R] [--atol A] [--min-cosine C] [--json F|-]

"Ours" is the engine when one is given, else the reference backend on MODEL; onnxruntime (CPU)
runs MODEL. Inputs not given in ``--inputs`` are generated per dtype, seeded: floats standard
normal, integers in [0, 100) (token ids), booleans true, except integer inputs named
``*mask*``, which are ones: an attention mask is 0/1, and the extended-mask formula exporters
emit, ``(1 - mask) * finfo.min``, overflows to NaN for larger values, so every output would be
NaN on both sides and the comparison vacuous. Their shapes are the engine's (or the model's
declared shapes, symbolic dims from ``--dim`` else 1). Outputs holding non-finite values are
flagged (NaN matches only NaN). Per output: max/mean/p99 absolute error,
max relative error (over elements whose onnxruntime value is non-zero), cosine similarity,
pass/fail at ``|ours - ort| <= atol + rtol * |ort|`` (numpy.isclose; NaN matches NaN), and the
smallest atol (at the given rtol) and rtol (at the given atol) that would have passed.
Exit status 0 when every output passes, 1 on a mismatch, 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from engine.cli import CliError, _load, load_npz, parse_dims
from engine.cli_engine import (
    InputSpec,
    check_engine_feeds,
    emit_json,
    engine_inputs,
    is_engine_file,
    load_engine_file,
    run_engine,
    synthetic_feeds,
    text_stream,
)
from engine.progress import ProgressBar
from engine.text_report import text_table

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
#: Generated integer inputs are drawn from [0, INTEGER_HIGH) (token ids of small vocabularies).
INTEGER_HIGH = 100


@dataclass(frozen=True)
class OutputComparison:
    """Errors of one output, ours vs onnxruntime (the reference), in the output's units.

    ``max_rel`` is over elements where the reference is non-zero; ``cosine`` is 1.0 for two
    all-zero outputs; ``required_atol``/``required_rtol`` are the least tolerances that pass
    with the other one as given (None: none passes, e.g. differing NaNs or shapes);
    ``nonfinite`` counts elements that are NaN or infinite on either side; ``problem`` says
    why the output cannot be compared element-wise ('' when it can).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    cosine: float
    mismatched: int
    nonfinite: int
    passed: bool
    required_atol: float | None
    required_rtol: float | None
    problem: str = ""

    def to_json(self) -> dict[str, Any]:
        def number(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else float(value)

        return {
            "max_abs": number(self.max_abs),
            "mean_abs": number(self.mean_abs),
            "p99_abs": number(self.p99_abs),
            "max_rel": number(self.max_rel),
            "cosine": number(self.cosine),
            "passed": self.passed,
            "mismatched": self.mismatched,
            "nonfinite": self.nonfinite,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "required_atol": number(self.required_atol),
            "required_rtol": number(self.required_rtol),
            "problem": self.problem,
        }


def _failed(
    name: str, problem: str, shape: tuple[int, ...] = (), dtype: str = ""
) -> OutputComparison:
    """An output that cannot be compared element-wise (missing, not a tensor, other shape)."""
    nan = float("nan")
    return OutputComparison(
        name=name,
        shape=shape,
        dtype=dtype,
        max_abs=nan,
        mean_abs=nan,
        p99_abs=nan,
        max_rel=nan,
        cosine=nan,
        mismatched=-1,
        nonfinite=0,
        passed=False,
        required_atol=None,
        required_rtol=None,
        problem=problem,
    )


def compare_output(
    name: str, ours: Any, reference: Any, rtol: float, atol: float
) -> OutputComparison:
    """Compare one output (see :class:`OutputComparison`)."""
    if not isinstance(ours, np.ndarray) or not isinstance(reference, np.ndarray):
        return _failed(name, "not a tensor")
    shape, dtype = tuple(reference.shape), str(reference.dtype)
    if ours.shape != reference.shape:
        return _failed(
            name, f"shape {list(ours.shape)} vs onnxruntime's {list(shape)}", shape, dtype
        )
    if reference.dtype.kind not in "biufc" or ours.dtype.kind not in "biufc":
        if np.array_equal(ours, reference):
            zero = compare_output(name, np.zeros(shape), np.zeros(shape), rtol, atol)
            return replace(zero, dtype=dtype)
        return replace(_failed(name, "non-numeric values differ", shape, dtype), mismatched=0)
    a = ours.astype(np.complex128 if ours.dtype.kind == "c" else np.float64)
    b = reference.astype(np.complex128 if reference.dtype.kind == "c" else np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    same_inf = np.isinf(a) & np.isinf(b) & (a == b)
    exact = both_nan | same_inf
    diff = np.where(exact, 0.0, np.abs(a - b))
    diff = np.nan_to_num(diff, nan=np.inf)
    magnitude = np.abs(b)
    close = np.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    mismatched = int(close.size - np.count_nonzero(close))
    finite = bool(np.isfinite(diff).all())
    nonzero = (magnitude > 0) & np.isfinite(magnitude)
    rel = diff[nonzero] / magnitude[nonzero]
    with np.errstate(invalid="ignore"):  # inf - inf interpolating among non-finite errors
        p99 = float(np.percentile(diff, 99)) if diff.size else 0.0
    required_atol = required_rtol = None
    if finite:
        slack = np.where(np.isfinite(magnitude), diff - rtol * magnitude, 0.0)
        required_atol = float(max(slack.max(initial=0.0), 0.0))
        zero_fail = bool(((diff > atol) & ~nonzero).any())
        if not zero_fail:
            over = (diff[nonzero] - atol) / magnitude[nonzero]
            required_rtol = float(max(over.max(initial=0.0), 0.0))
    return OutputComparison(
        name=name,
        shape=shape,
        dtype=dtype,
        max_abs=float(diff.max(initial=0.0)),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        p99_abs=p99,
        max_rel=float(rel.max(initial=0.0)),
        cosine=cosine_similarity(a, b),
        mismatched=mismatched,
        nonfinite=int(np.count_nonzero(~(np.isfinite(a) & np.isfinite(b)))),
        passed=mismatched == 0,
        required_atol=required_atol,
        required_rtol=required_rtol,
        problem="" if finite else "non-finite values differ",
    )


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """<a, b> / (|a| |b|) over the flattened values (non-finite entries ignored); 1.0 for two
    zero vectors, 0.0 when exactly one is zero."""
    keep = np.isfinite(a) & np.isfinite(b)
    x, y = a[keep].ravel(), b[keep].ravel()
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    if norm == 0.0:
        return 1.0 if not x.any() and not y.any() else 0.0
    return float(np.real(np.vdot(y, x)) / norm)


def round_up(value: float, digits: int = 2) -> float:
    """``value`` rounded up to ``digits`` significant digits (a tolerance that surely passes)."""
    if value <= 0 or not math.isfinite(value):
        return value
    scale = 10 ** (math.floor(math.log10(value)) - digits + 1)
    return math.ceil(value / scale * (1 - 1e-12)) * scale


def verdict(item: OutputComparison, rtol: float, atol: float) -> str:
    """'pass' or 'FAIL: ...' with the tolerance that would have passed."""
    if item.passed:
        return "pass"
    if item.problem and item.required_atol is None and item.required_rtol is None:
        return f"FAIL: {item.problem}"
    options = []
    if item.required_atol is not None:
        options.append(f"atol >= {round_up(item.required_atol):.2g} (rtol {rtol:g})")
    if item.required_rtol is not None:
        options.append(f"rtol >= {round_up(item.required_rtol):.2g} (atol {atol:g})")
    return f"FAIL ({item.mismatched} elements): would pass with " + " or ".join(options)


# --------------------------------------------------------------------------- running


def onnxruntime_outputs(path: str, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Run MODEL on onnxruntime's CPU provider; CliError when it cannot load or run it."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, dict(feeds))
    except Exception as error:
        raise CliError(f"{path}: onnxruntime cannot run the model: {error}") from error
    return dict(zip(names, values))


def model_input_specs(model: Any, dims: Mapping[str, int]) -> dict[str, InputSpec]:
    """Declared non-initializer inputs with symbolic dims bound by ``dims`` (else 1)."""
    specs: dict[str, InputSpec] = {}
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        if value.dtype is None or value.shape is None:
            raise CliError(f"input '{value.name}' has no known dtype and rank; use --inputs")
        shape = tuple(d if isinstance(d, int) else dims.get(str(d), 1) for d in value.shape)
        specs[value.name or ""] = (shape, np.dtype(value.dtype.numpy()))
    return specs


def check_model_feeds(model: Any, given: Mapping[str, np.ndarray], label: str) -> None:
    """CliError unless every given array names a model input with its dtype and shape."""
    from engine.backends.numpy_ref.interpreter import InputError, check_feed

    declared = {v.name: v for v in model.graph.inputs}
    for name, array in given.items():
        if name not in declared:
            raise CliError(f"{label}: no model input named {name!r}; inputs: {sorted(declared)}")
        try:
            check_feed(declared[name], array)
        except InputError as error:
            raise CliError(f"{label}: {error}") from error


def cmd_compare(args: argparse.Namespace) -> int:
    """``gie compare``: print and optionally write per-output errors; 1 on a mismatch."""
    if args.rtol < 0 or args.atol < 0:
        raise CliError("--rtol and --atol must be >= 0")
    model = _load(args.model)
    out = text_stream(args.json)
    engine = None
    if args.engine:
        if not is_engine_file(args.engine):
            raise CliError(f"{args.engine}: not a .gie engine (build one with gie build)")
        engine = load_engine_file(args.engine)
        specs = engine_inputs(engine)
        declared = set(model_input_specs(model, {}))
        if set(specs) != declared:
            raise CliError(
                f"{args.engine}: engine inputs {sorted(specs)} differ from the model's "
                f"{sorted(declared)}"
            )
    else:
        specs = model_input_specs(model, parse_dims(args.dim))
    given = load_npz(args.inputs) if args.inputs else {}
    label = args.inputs or "--inputs"
    if engine is None:
        check_model_feeds(model, given, label)
    missing = {name: spec for name, spec in specs.items() if name not in given}
    generated = synthetic_feeds(
        missing, args.seed, INTEGER_HIGH, booleans_true=True, masks_ones=True
    )
    feeds = {**given, **generated}
    if engine is not None:
        feeds = check_engine_feeds(engine, feeds, label)
    ours_label = args.engine or "reference backend"
    with ProgressBar("compare", 2) as bar:
        reference = onnxruntime_outputs(args.model, feeds)
        bar.advance()
        ours = run_ours(engine, model, feeds, ours_label)
        bar.advance()
    results = [
        compare_output(name, ours[name], value, args.rtol, args.atol)
        if name in ours
        else _failed(name, f"missing from {ours_label}")
        for name, value in reference.items()
    ]

    def accepted(item: OutputComparison) -> bool:
        by_cosine = args.min_cosine is not None and not item.nonfinite and not item.problem
        return item.passed or (by_cosine and item.cosine >= args.min_cosine)

    passed = all(accepted(item) for item in results)
    print(f"compare: {ours_label} vs onnxruntime on {args.model}", file=out)
    for name, array in feeds.items():
        origin = "from " + args.inputs if name in given else f"generated, seed {args.seed}"
        if name not in given and array.dtype.kind in "iu" and "mask" in name.lower():
            origin = "generated: ones, an attention mask"
        print(
            f"input  {name}: {array.dtype}[{','.join(map(str, array.shape))}] ({origin})", file=out
        )
    rows = [["output", "max_abs", "mean_abs", "p99_abs", "max_rel", "cosine", "result"]]
    for item in results:
        rows.append(
            [
                item.name,
                f"{item.max_abs:.3g}",
                f"{item.mean_abs:.3g}",
                f"{item.p99_abs:.3g}",
                f"{item.max_rel:.3g}",
                f"{item.cosine:.6f}",
                "pass (cosine)"
                if accepted(item) and not item.passed
                else verdict(item, args.rtol, args.atol),
            ]
        )
    print("\n".join(text_table(rows, right=(1, 2, 3, 4, 5))), file=out)
    for item in results:
        if item.nonfinite:
            print(
                f"note: {item.name}: {item.nonfinite} of {math.prod(item.shape)} values are "
                "NaN or infinite (compared only for equality there)",
                file=out,
            )
    criterion = f"rtol {args.rtol:g}, atol {args.atol:g}"
    if args.min_cosine is not None:
        criterion += f" or cosine >= {args.min_cosine:g}"
    print(f"{'PASSED' if passed else 'FAILED'} at {criterion}", file=out)
    if args.json:
        document = {
            "model": args.model,
            "engine": args.engine,
            "passed": passed,
            "rtol": args.rtol,
            "atol": args.atol,
            "inputs": {
                n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in feeds.items()
            },
            "outputs": {item.name: item.to_json() for item in results},
        }
        emit_json(args.json, document)
    return 0 if passed else 1


def run_ours(engine: Any, model: Any, feeds: Mapping[str, np.ndarray], label: str) -> dict:
    """The engine's outputs, or the reference backend's on the model."""
    if engine is not None:
        return run_engine(engine, feeds, label)
    from engine.backends.numpy_ref.interpreter import (
        InputError,
        NodeExecutionError,
        ReferenceInterpreter,
        UnsupportedModelError,
    )

    try:
        return ReferenceInterpreter(model).run(dict(feeds)).outputs
    except (InputError, NodeExecutionError, UnsupportedModelError) as error:
        raise CliError(f"{label}: {error}") from error


def add_compare_command(commands: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``gie compare`` on the CLI's subparsers."""
    parser = commands.add_parser(
        "compare", parents=[common], help="compare ours (engine or reference) with onnxruntime"
    )
    parser.add_argument("model", help="ONNX model file (onnxruntime runs it)")
    parser.add_argument("engine", nargs="?", help=".gie engine (default: the reference backend)")
    parser.add_argument("--inputs", metavar="FILE.npz", help="input arrays by input name")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (0)")
    parser.add_argument(
        "--dim", action="append", metavar="NAME=VALUE", help="bind a symbolic dim (repeatable)"
    )
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="relative tolerance")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="absolute tolerance")
    parser.add_argument(
        "--min-cosine",
        type=float,
        metavar="C",
        help="also pass an output whose cosine similarity is >= C (reduced-precision engines)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the comparison ('-': stdout)")
    parser.set_defaults(handler=cmd_compare)
    return parser
