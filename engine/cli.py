"""The ``gie`` command line: inspect a model, run it on the reference backend (``gie build``,
``profile``, ``compare`` and ``run``/``inspect`` on a .gie engine: engine/cli_engine.py).

``gie inspect MODEL [--json F]``
    Inputs/outputs, op histogram, parameters, estimated FLOPs and memory traffic, unsupported ops.
``gie run MODEL [--inputs F.npz] [--seed N] [--iterations N]``
    Runs the model on the NumPy reference backend (random seeded inputs, or those of an ``.npz``),
    prints a summary of every output and a per-node time table (like trtexec's layer profile).

Bad input (a missing or corrupt file, an invalid graph, mismatched inputs, an unsupported op, a
failing kernel) exits with status 2 and one line on stderr starting ``gie: error:``; ``--debug``
adds the traceback. This module is the only one of the engine that prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.backends.numpy_ref.interpreter import (
    InputError,
    NodeExecutionError,
    ReferenceInterpreter,
    UnsupportedModelError,
    check_feed,
)
from engine.model_stats import compute_stats, node_label
from engine.onnx_io import ModelLoadError, load, unsupported_ops
from engine.text_report import format_stats, short_list, text_table

PROG = "gie"
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2


class CliError(Exception):
    """Bad input the user can fix; printed as one ``gie: error:`` line, exit status 2."""


# --------------------------------------------------------------------------- formatting


def summarize_value(name: str, value: Any, first: int = 5) -> str:
    """One line for an output: name, dtype, shape, min/max/mean and the first values."""
    if isinstance(value, list):
        return f"{name}: sequence of {len(value)}"
    if not isinstance(value, np.ndarray):
        return f"{name}: {type(value).__name__}"
    head = f"{name}: {value.dtype}[{','.join(str(d) for d in value.shape)}]"
    if value.dtype == object or value.dtype.kind in "USV":
        return f"{head} first={value.ravel()[:first].tolist()}"
    numeric = value.astype(np.float64) if value.dtype.kind not in "c" else np.abs(value)
    flat = numeric.ravel()
    values = np.array2string(value.ravel()[:first], precision=5, separator=", ")
    if flat.size == 0:
        return f"{head} (empty)"
    finite = flat[np.isfinite(flat)]
    stats = ""
    if finite.size:
        stats = f" min={finite.min():.6g} max={finite.max():.6g} mean={finite.mean():.6g}"
    bad = flat.size - finite.size
    return head + stats + (f" non-finite={bad}" if bad else "") + f" first={values}"


def format_profile(
    labels: Sequence[tuple[str, str]], seconds: np.ndarray, top: int = 20
) -> list[str]:
    """Per-node time table: ``labels`` are (node, op); ``seconds`` is [iterations, nodes]."""
    mean = seconds.mean(axis=0) if seconds.size else np.zeros(len(labels))
    total = float(mean.sum())
    order = np.argsort(-mean, kind="stable")[:top]
    rows = [["node", "op", "ms", "%"]]
    for index in order:
        share = 100 * mean[index] / total if total else 0.0
        node, op = labels[index]
        rows.append([node, op, f"{1e3 * mean[index]:.3f}", f"{share:.1f}"])
    if len(labels) > len(order):
        rest = float(mean.sum() - mean[order].sum())
        share = 100 * rest / total if total else 0.0
        rows.append([f"({len(labels) - len(order)} more)", "", f"{1e3 * rest:.3f}", f"{share:.1f}"])
    rows.append(["total", f"{len(labels)} nodes", f"{1e3 * total:.3f}", "100.0"])
    return text_table(rows, right=(2, 3))


# --------------------------------------------------------------------------- inputs


def random_feeds(inputs: Sequence[ir.Value], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random arrays matching the declared inputs: symbolic dims are 1, floats standard
    normal, integers in [0, 4), booleans fair coins. Raises CliError for what cannot be made."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in inputs:
        name = value.name or ""
        if not isinstance(value.type, ir.TensorType) or value.dtype is None:
            raise CliError(f"input '{name}' is not a tensor of known dtype; pass it with --inputs")
        if value.shape is None:
            raise CliError(f"input '{name}' has an unknown rank; pass it with --inputs")
        shape = tuple(d if isinstance(d, int) else 1 for d in value.shape)
        dtype = value.dtype
        if dtype == ir.DataType.STRING:
            raise CliError(f"input '{name}' is a string tensor; pass it with --inputs")
        target = np.dtype(dtype.numpy())
        if dtype == ir.DataType.BOOL:
            array = rng.random(shape) < 0.5
        elif dtype.is_integer():
            array = rng.integers(0, 4, size=shape)
        elif dtype.is_floating_point():
            array = rng.standard_normal(shape)
        else:  # complex
            array = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        feeds[name] = np.asarray(array).astype(target)
    return feeds


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file (no pickles); CliError naming the file when it cannot be read."""
    label = str(path)
    if not Path(path).is_file():
        raise CliError(f"{label}: no such file")
    if not zipfile.is_zipfile(path):
        raise CliError(f"{label}: not an .npz archive (expected a zip of .npy arrays, np.savez)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise CliError(f"{label}: cannot read the .npz archive: {error}") from error


def prepare_feeds(
    model: ir.Model, given: Mapping[str, np.ndarray], seed: int, label: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Check ``given`` against the model's inputs (names, dtypes, shapes) and make the rest
    randomly; returns the feeds and the names that were generated."""
    declared = {v.name: v for v in model.graph.inputs}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise CliError(
            f"{label}: no model input named {', '.join(repr(n) for n in unknown)}; "
            f"the model's inputs are {sorted(declared)}"
        )
    feeds: dict[str, np.ndarray] = {}
    for name, array in given.items():
        try:
            feeds[name] = check_feed(declared[name], array)
        except InputError as error:
            raise CliError(f"{label}: {error}") from error
    # Inputs backed by an initializer (IR >= 4 overridable weights) keep their stored value.
    missing = [v for name, v in declared.items() if name not in feeds and v.const_value is None]
    feeds.update(random_feeds(missing, seed))
    return feeds, [v.name or "" for v in missing]


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, Any]) -> None:
    """Write arrays to an ``.npz`` atomically (temporary file, then rename)."""
    plain = {name: value for name, value in arrays.items() if isinstance(value, np.ndarray)}
    target = Path(path)
    temporary = target.with_name(f".{target.name}.partial.npz")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, **plain)
        os.replace(temporary, target)
    except OSError as error:
        raise CliError(f"{target}: cannot write: {error.strerror or error}") from error
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically (``-``: standard output); nothing is left half-written on failure."""
    if str(path) == "-":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    target = Path(path)
    temporary = target.with_name(f".{target.name}.partial")
    try:
        text = json.dumps(data, indent=2, sort_keys=False) + "\n"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
    except OSError as error:
        raise CliError(f"{target}: cannot write: {error.strerror or error}") from error
    finally:
        temporary.unlink(missing_ok=True)


# --------------------------------------------------------------------------- commands


def _load(path: str) -> ir.Model:
    try:
        return load(path)
    except ModelLoadError as error:
        raise CliError(str(error)) from error


def parse_dims(items: Sequence[str] | None) -> dict[str, int]:
    """``["N=1", "seq=128"]`` -> ``{"N": 1, "seq": 128}``; CliError on a malformed item."""
    dims: dict[str, int] = {}
    for item in items or []:
        name, _, number = item.partition("=")
        if not name or not number.strip().isdigit():
            raise CliError(f"--dim {item!r}: expected NAME=VALUE with a non-negative integer")
        dims[name.strip()] = int(number)
    return dims


def on_engine(args: argparse.Namespace) -> int | None:
    """``gie run``/``gie inspect`` when args.model is a .gie engine (a zip: starts with PK)."""
    from engine import cli_engine  # imports this module: load it late

    return cli_engine.engine_handler(args) if cli_engine.is_engine_file(args.model) else None


def cmd_inspect(args: argparse.Namespace) -> int:
    """``gie inspect``: print the model's statistics; optionally write them as JSON."""
    if (status := on_engine(args)) is not None:
        return status
    dims = parse_dims(args.dim)
    model = _load(args.model)
    stats = compute_stats(model, dim_values=dims)
    to_stdout = args.json == "-"
    print("\n".join(format_stats(stats)), file=sys.stderr if to_stdout else sys.stdout)
    if args.json:
        write_json(args.json, stats.to_json())
        if not to_stdout:
            print(f"\nwrote {args.json}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """``gie run``: run the model on the reference backend and print outputs and a profile."""
    if args.iterations < 1 or args.warmup < 0:
        raise CliError("--iterations must be >= 1 and --warmup >= 0")
    if (status := on_engine(args)) is not None:
        return status
    model = _load(args.model)
    missing_ops = unsupported_ops(model)
    if missing_ops:
        listed = "; ".join(
            f"{op.qualified_name} (node {short_list(list(op.node_names), 3)})" for op in missing_ops
        )
        raise CliError(f"{args.model}: unsupported op(s), no reference kernel: {listed}")
    given = load_npz(args.inputs) if args.inputs else {}
    feeds, generated = prepare_feeds(model, given, args.seed, args.inputs or "--inputs")
    try:
        interpreter = ReferenceInterpreter(model)
    except UnsupportedModelError as error:
        raise CliError(f"{args.model}: {error}") from error
    print(f"model: {args.model}")
    for name, array in feeds.items():
        origin = f"random, seed {args.seed}" if name in generated else f"from {args.inputs}"
        print(f"input  {name}: {array.dtype}[{','.join(map(str, array.shape))}] ({origin})")
    if args.save_inputs:
        save_npz(args.save_inputs, feeds)
    runs, walls = [], []
    for iteration in range(args.warmup + args.iterations):
        started = time.perf_counter()
        try:
            result = interpreter.run(feeds, profile=True)
        except NodeExecutionError as error:
            raise CliError(f"{args.model}: {error}") from error
        except InputError as error:
            raise CliError(f"{args.model}: {error}") from error
        if iteration >= args.warmup:
            walls.append(time.perf_counter() - started)
            runs.append([t.seconds for t in result.timings])
    print()
    for name, value in result.outputs.items():
        print("output " + summarize_value(name, value))
    if args.save_outputs:
        save_npz(args.save_outputs, result.outputs)
    labels = [(node_label(node, i), node.op_type) for i, node in enumerate(model.graph)]
    if len(labels) != len(runs[0]):  # defensive: one timing per step of the main graph
        labels = [(t.node_name or f"#{i}", t.op_type) for i, t in enumerate(result.timings)]
    walls_ms = 1e3 * np.array(walls)
    print(
        f"\nlatency over {len(walls)} iteration(s) after {args.warmup} warm-up: "
        f"median {np.median(walls_ms):.3f} ms, min {walls_ms.min():.3f} ms, "
        f"mean {walls_ms.mean():.3f} ms"
    )
    if args.warmup == 0:
        print("(no warm-up: the first run pays one-time costs; try --warmup 1 --iterations 10)")
    print(f"per-node time (mean over iterations, top {args.top}):")
    print("\n".join(format_profile(labels, np.array(runs), args.top)))
    return EXIT_OK


def version_text() -> str:
    """'gie 0.1.0 (onnx 1.23.2, onnx-ir 1.1.0, numpy 2.4.6; opsets up to 23)'."""
    import importlib.metadata
    import tomllib

    import onnx

    try:
        version = importlib.metadata.version("gie-studio")
    except importlib.metadata.PackageNotFoundError:  # a source checkout: read pyproject.toml
        try:
            pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
            version = tomllib.loads(pyproject.read_text())["project"]["version"] + "+source"
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            version = "unknown"
    return (
        f"{PROG} {version} (onnx {onnx.__version__}, onnx-ir {ir.__version__}, "
        f"numpy {np.__version__}; opsets up to {onnx.defs.onnx_opset_version()})"
    )


class _VersionAction(argparse.Action):
    """``--version`` whose text is computed only when asked (metadata lookups are slow)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with the ``inspect``, ``run`` and ``optimize`` subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="GIE Studio: inspect, optimize and run ONNX models; build engines.",
        parents=[common],
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect", parents=[common], help="inputs, outputs, op histogram, parameters, FLOPs"
    )
    inspect.add_argument("model", help="ONNX model or .gie engine file")
    inspect.add_argument("--json", metavar="FILE", help="also write the statistics as JSON")
    inspect.add_argument(
        "--dim",
        action="append",
        metavar="NAME=VALUE",
        help="bind a symbolic dim for the cost estimate (repeatable)",
    )
    inspect.set_defaults(handler=cmd_inspect)

    run = commands.add_parser(
        "run", parents=[common], help="run on the reference backend, with a per-node profile"
    )
    run.add_argument("model", help="ONNX model or .gie engine file")
    run.add_argument("--inputs", metavar="FILE.npz", help="input arrays by input name")
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs (0)")
    run.add_argument("--iterations", type=int, default=1, help="timed runs (1)")
    run.add_argument("--warmup", type=int, default=0, help="untimed runs first (0)")
    run.add_argument("--top", type=int, default=20, help="rows of the per-node table (20)")
    run.add_argument("--save-inputs", metavar="FILE.npz", help="write the inputs used")
    run.add_argument("--save-outputs", metavar="FILE.npz", help="write the outputs")
    run.set_defaults(handler=cmd_run)

    from engine.cli_optimize import add_optimize_command  # imports this module: load it late

    add_optimize_command(commands, common)
    from engine.cli_engine import add_engine_commands  # build, profile, compare

    add_engine_commands(commands, common)
    from engine.cli_quant import add_quant_commands  # export-qdq, sensitivity

    add_quant_commands(commands, common)
    from engine.cli_sparsity import add_sparsity_command  # check, prune, advise

    add_sparsity_command(commands, common)
    return parser


def _one_line(message: str) -> str:
    return re.sub(r"\s+", " ", message).strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gie`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return int(args.handler(args))
    except CliError as error:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(str(error))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # e.g. `gie run ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a bug: one line unless --debug
        if debug:
            traceback.print_exc()
        print(
            f"{PROG}: error: internal error ({type(error).__name__}: {_one_line(str(error))}); "
            "rerun with --debug for the traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    # Run the canonical engine.cli module, not this __main__ copy, so that the exception classes
    # subcommand modules import from engine.cli are the ones main() catches.
    from engine.cli import main as canonical_main

    sys.exit(canonical_main())
