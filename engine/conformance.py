"""ONNX conformance harness: runs the backend test cases shipped in the onnx wheel.

Cases: the 1,884 node tests (built in memory by onnx's loader), plus the on-disk folders
simple, pytorch-converted, pytorch-operator and light (the nine classic networks, whose input
is ``arange(n) / n`` as onnx's own runner makes it) -- 2,033 in all.

Each case ends as ``passed``, ``failed`` (with the reason) or ``unsupported`` (an op has no
reference kernel, or the model is outside the opsets we load). Outputs are compared as onnx's
runner does: same shape, same dtype, ``assert_allclose`` with the case's rtol/atol.

Usage: ``python -m engine.conformance [--json out.json] [--filter REGEX] [--kinds node,light]``
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.examples import LIGHT_MODELS, light_model_inputs, light_model_path
from engine.onnx_io import ModelLoadError, load, unsupported_ops
from engine.ops.registry import RANDOM_OP_TYPES, OptionalNone

KINDS = ("node", "simple", "pytorch-converted", "pytorch-operator", "light")


@dataclass
class ConformanceCase:
    """One conformance case: a model and its (inputs, expected outputs) data sets."""

    name: str
    kind: str
    model: onnx.ModelProto
    data_sets: list[tuple[list[Any], list[Any]]]
    rtol: float
    atol: float


@dataclass
class CaseResult:
    """Outcome of one case; ``ops`` are the op types its model contains."""

    name: str
    kind: str
    status: str
    reason: str = ""
    ops: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _read_value(path: Path, type_proto: onnx.TypeProto) -> Any:
    data = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        sequence = onnx.SequenceProto()
        sequence.ParseFromString(data)
        return numpy_helper.to_list(sequence)
    if type_proto.HasField("optional_type"):
        optional = onnx.OptionalProto()
        optional.ParseFromString(data)
        return numpy_helper.to_optional(optional)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def _normalize(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, onnx.SequenceProto):
        return numpy_helper.to_list(value)
    if isinstance(value, onnx.OptionalProto):
        return numpy_helper.to_optional(value)
    return value


def _disk_data_sets(model: onnx.ModelProto, model_dir: Path) -> list[tuple[list[Any], list[Any]]]:
    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializer_names]
    data_sets = []
    for folder in sorted(model_dir.glob("test_data_set_*")):
        feeds = [
            _read_value(folder / f"input_{i}.pb", v.type)
            for i, v in enumerate(inputs)
            if (folder / f"input_{i}.pb").exists()
        ]
        expected = [
            _read_value(folder / f"output_{i}.pb", v.type)
            for i, v in enumerate(model.graph.output)
            if (folder / f"output_{i}.pb").exists()
        ]
        data_sets.append((feeds, expected))
    return data_sets


def _light_cases() -> Iterator[ConformanceCase]:
    for name in LIGHT_MODELS:
        model = onnx.load(light_model_path(name))
        feeds = list(light_model_inputs(model).values())
        expected = [
            _read_value(light_model_path(name).with_name(f"light_{name}_output_{i}.pb"), v.type)
            for i, v in enumerate(model.graph.output)
        ]
        yield ConformanceCase(f"test_{name}", "light", model, [(feeds, expected)], 1e-3, 1e-7)


def iter_cases(kinds: Sequence[str] = KINDS) -> Iterator[ConformanceCase]:
    """All conformance cases of the given kinds, in a stable order."""
    from onnx.backend.test.loader import load_model_tests

    for kind in kinds:
        if kind == "light":
            yield from _light_cases()
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tests = load_model_tests(kind=kind)
        for test in tests:
            if test.model is not None:
                model = test.model
                data_sets = [
                    ([_normalize(v) for v in inputs], [_normalize(v) for v in outputs])
                    for inputs, outputs in (test.data_sets or [])
                ]
            else:
                model_dir = Path(test.model_dir)
                model = onnx.load(model_dir / "model.onnx")
                data_sets = _disk_data_sets(model, model_dir)
            yield ConformanceCase(test.name, kind, model, data_sets, test.rtol, test.atol)


def compare_outputs(
    expected: Any, actual: Any, rtol: float, atol: float, where: str, values: bool = True
) -> None:
    """Raise AssertionError when ``actual`` differs from ``expected`` as onnx's runner judges.

    With ``values=False`` only structure, shapes and dtypes are compared (random ops).
    """
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            raise AssertionError(f"{where}: expected a sequence of {len(expected)}, got {actual!r}")
        for index, (want, got) in enumerate(zip(expected, actual)):
            compare_outputs(want, got, rtol, atol, f"{where}[{index}]", values)
        return
    if expected is None:
        if actual is not None and not isinstance(actual, OptionalNone):
            raise AssertionError(f"{where}: expected an empty optional, got {actual!r}")
        return
    if not isinstance(actual, np.ndarray):
        raise AssertionError(f"{where}: expected an array, got {type(actual).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{where}: shape {actual.shape} != expected {expected.shape}")
    if not values:
        if actual.dtype != expected.dtype:
            raise AssertionError(f"{where}: dtype {actual.dtype} != expected {expected.dtype}")
        return
    if expected.dtype == object:
        np.testing.assert_array_equal(actual, expected, err_msg=where)
        return
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{where}: dtype {actual.dtype} != expected {expected.dtype}")
    if actual.dtype.name == "bfloat16":
        rtol = max(rtol, 2**-6)
    if actual.dtype.kind not in "biufc":
        actual, expected = actual.astype(np.float32), expected.astype(np.float32)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=where)


def model_ops(model: onnx.ModelProto) -> list[str]:
    """Sorted op types of the model, nested graphs included (domain-qualified if not default)."""
    ops: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            ops.add(
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            )
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for subgraph in attribute.graphs:
                    visit(subgraph)

    visit(model.graph)
    for function in model.functions:
        for node in function.node:
            ops.add(node.op_type)
    return sorted(ops)


def run_case(case: ConformanceCase) -> CaseResult:
    """Load and run one case on the reference backend and judge its outputs."""
    started = time.perf_counter()
    result = CaseResult(case.name, case.kind, "passed", ops=model_ops(case.model))
    try:
        model = load(case.model)
    except ModelLoadError as error:
        result.status, result.reason = "unsupported", f"load: {error}"
        return result
    missing = unsupported_ops(model)
    if missing:
        result.status = "unsupported"
        result.reason = "no kernel for " + ", ".join(op.qualified_name for op in missing)
        return result
    try:
        interpreter = ReferenceInterpreter(model)
        input_names = [
            v.name for v in model.graph.inputs if v not in set(model.graph.initializers.values())
        ]
        output_names = [v.name for v in model.graph.outputs]
        random = bool(RANDOM_OP_TYPES & set(result.ops))
        if random:
            result.reason = "random op: shapes and dtypes compared, not values"
        for set_index, (inputs, expected) in enumerate(case.data_sets):
            feeds = dict(zip(input_names, inputs))
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                outputs = interpreter.run(feeds).outputs
            if len(expected) != len(output_names):
                raise AssertionError(
                    f"data set {set_index}: {len(expected)} expected outputs, "
                    f"model has {len(output_names)}"
                )
            for name, want in zip(output_names, expected):
                compare_outputs(
                    want, outputs[name], case.rtol, case.atol, f"output '{name}'", not random
                )
    except Exception as error:  # noqa: BLE001 - every failure is a recorded result
        result.status = "failed"
        result.reason = f"{type(error).__name__}: {str(error).strip()[:600]}"
    result.seconds = time.perf_counter() - started
    return result


def run_conformance(
    kinds: Sequence[str] = KINDS, name_filter: str | None = None
) -> list[CaseResult]:
    """Run every selected case; ``name_filter`` is a regular expression on the case name."""
    pattern = re.compile(name_filter) if name_filter else None
    return [
        run_case(case) for case in iter_cases(kinds) if pattern is None or pattern.search(case.name)
    ]


def summarize(results: Sequence[CaseResult]) -> dict[str, Any]:
    """The JSON document: totals, per-op counts and every case."""
    counts = Counter(r.status for r in results)
    per_op: dict[str, Counter[str]] = {}
    for result in results:
        for op in result.ops:
            per_op.setdefault(op, Counter())[result.status] += 1
    return {
        "total": len(results),
        "passed": counts["passed"],
        "failed": counts["failed"],
        "unsupported": counts["unsupported"],
        "per_op": {op: dict(c) for op, c in sorted(per_op.items())},
        "cases": [asdict(r) for r in results],
    }


def format_table(summary: dict[str, Any]) -> str:
    """Per-op passed/failed/unsupported table followed by the totals line."""
    lines = [f"{'op':<36}{'passed':>8}{'failed':>8}{'unsupported':>13}"]
    for op, counts in summary["per_op"].items():
        lines.append(
            f"{op:<36}{counts.get('passed', 0):>8}{counts.get('failed', 0):>8}"
            f"{counts.get('unsupported', 0):>13}"
        )
    lines.append(
        f"total {summary['total']}: passed {summary['passed']}, failed {summary['failed']}, "
        f"unsupported {summary['unsupported']}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.conformance", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write the full results as JSON here")
    parser.add_argument("--filter", help="only cases whose name matches this regular expression")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma list from {KINDS}")
    parser.add_argument(
        "--failures", action="store_true", help="also list failed and unsupported cases"
    )
    parser.add_argument(
        "--write-pass-list", type=Path, help="write the names of passing cases here (one a line)"
    )
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}")
    results = run_conformance(kinds, args.filter)
    summary = summarize(results)
    print(format_table(summary))
    if args.failures:
        for result in results:
            if result.status != "passed":
                print(f"{result.status:<12} {result.name}: {result.reason[:300]}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if args.write_pass_list:
        passing = sorted(r.name for r in results if r.status == "passed")
        args.write_pass_list.write_text("".join(f"{name}\n" for name in passing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
