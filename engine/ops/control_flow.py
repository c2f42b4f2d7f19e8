"""Control flow: If, Loop and Scan, whose bodies run through ``KernelContext.run_subgraph``.

Bodies see outer-scope values automatically (the interpreter resolves them); kernels pass only a
body's positional inputs. Output shapes depend on data (branch taken, trip count), so the shape
rules return the declared output types. The cost of these nodes excludes their bodies' work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import declared_rule, movement_cost
from engine.ops.registry import (
    Attrs,
    KernelContext,
    KernelError,
    OpSpec,
    TensorSpec,
)

FAMILY = "control_flow"


def _runner(ctx: KernelContext) -> Any:
    if ctx.run_subgraph is None:
        raise KernelError("this backend cannot run subgraphs (no run_subgraph in the context)")
    return ctx.run_subgraph


def _truth(value: Any) -> bool:
    """Boolean value of a condition tensor (a scalar or a one-element tensor)."""
    array = np.asarray(value)
    if array.size != 1:
        raise KernelError(f"condition must hold one element, got shape {array.shape}")
    return bool(array.reshape(-1)[0])


def _empty_scan_output(declared: TensorSpec | None, body_output: ir.Value | None) -> np.ndarray:
    """A scan output of a loop that ran zero times: leading dim 0, inner dims when known."""
    dtype = None
    if body_output is not None and isinstance(body_output.type, ir.TensorType):
        dtype = body_output.type.dtype
    if dtype is None and declared is not None:
        dtype = declared.dtype
    np_dtype = dtype.numpy() if dtype is not None else np.float32
    inner: tuple[int, ...] = ()
    if declared is not None and declared.shape is not None and len(declared.shape) >= 1:
        rest = declared.shape[1:]
        if all(isinstance(d, int) for d in rest):
            inner = tuple(int(d) for d in rest)  # type: ignore[arg-type]
    return np.zeros((0, *inner), dtype=np_dtype)


def _declared(ctx: KernelContext, index: int) -> TensorSpec | None:
    return ctx.declared_outputs[index] if index < len(ctx.declared_outputs) else None


# --------------------------------------------------------------------------- If


def _if(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Run ``then_branch`` or ``else_branch`` (no inputs) by the scalar condition."""
    branch = attrs.graph("then_branch" if _truth(inputs[0]) else "else_branch")
    outputs = _runner(ctx)(branch, [])
    if len(outputs) < ctx.output_count:
        raise KernelError(f"branch produced {len(outputs)} outputs, node has {ctx.output_count}")
    return list(outputs)


# --------------------------------------------------------------------------- Loop


def _loop(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Run the body while ``i < M`` and ``cond`` hold; returns the final loop-carried values
    followed by each scan output stacked along a new leading axis (length = trip count)."""
    body = attrs.graph("body")
    run = _runner(ctx)
    trip_limit, condition = inputs[0], inputs[1] if len(inputs) > 1 else None
    carried = list(inputs[2:])
    max_trips = None if trip_limit is None else int(np.asarray(trip_limit).reshape(-1)[0])
    keep_going = True if condition is None else _truth(condition)
    scan_count = len(body.outputs) - 1 - len(carried)
    scans: list[list[Any]] = [[] for _ in range(scan_count)]
    iteration = 0
    while keep_going and (max_trips is None or iteration < max_trips):
        outputs = run(body, [np.array(iteration, np.int64), np.array(keep_going), *carried])
        keep_going = _truth(outputs[0])
        carried = list(outputs[1 : 1 + len(carried)])
        for index, value in enumerate(outputs[1 + len(carried) :]):
            scans[index].append(value)
        iteration += 1
    results: list[Any] = list(carried)
    for index, values in enumerate(scans):
        out_index = len(carried) + index
        if values:
            results.append(np.stack([np.asarray(v) for v in values]))
        else:
            body_output = body.outputs[1 + out_index]
            results.append(_empty_scan_output(_declared(ctx, out_index), body_output))
    return results


# --------------------------------------------------------------------------- Scan


def _scan_core(
    ctx: KernelContext,
    body: ir.Graph,
    states: list[Any],
    scan_inputs: list[np.ndarray],
    attrs: Attrs,
    length: int | None = None,
) -> tuple[list[Any], list[list[Any]]]:
    """Run the body over the scan axis; returns final states and per-step scan output values."""
    count = len(scan_inputs)
    in_axes = attrs.ints("scan_input_axes") or [0] * count
    in_dirs = attrs.ints("scan_input_directions") or attrs.ints("directions") or [0] * count
    in_axes = [axis % x.ndim for axis, x in zip(in_axes, scan_inputs, strict=True)]
    lengths = {x.shape[axis] for axis, x in zip(in_axes, scan_inputs, strict=True)}
    if len(lengths) > 1:
        raise KernelError(f"scan inputs disagree on the sequence length: {sorted(lengths)}")
    steps = length if length is not None else (lengths.pop() if lengths else 0)
    run = _runner(ctx)
    scan_values: list[list[Any]] = [[] for _ in range(len(body.outputs) - len(states))]
    for t in range(steps):
        slices = [
            np.take(x, steps - 1 - t if direction else t, axis=axis)
            for x, axis, direction in zip(scan_inputs, in_axes, in_dirs, strict=True)
        ]
        outputs = run(body, [*states, *slices])
        states = list(outputs[: len(states)])
        for index, value in enumerate(outputs[len(states) :]):
            scan_values[index].append(np.asarray(value))
    return states, scan_values


def _stack_scan(values: list[np.ndarray], axis: int, reverse: bool) -> np.ndarray:
    if reverse:
        values = values[::-1]
    return np.stack(values, axis=axis % (values[0].ndim + 1))


def _scan(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Scan-9+: states thread through the body once per slice of the scan inputs along their
    scan axes; per-step outputs are stacked on ``scan_output_axes`` (reversed if asked)."""
    if ctx.opset < 9:
        return _scan8(inputs, attrs, ctx)
    body = attrs.graph("body")
    num_scan = attrs.int("num_scan_inputs")
    state_count = len(inputs) - num_scan
    states, scan_values = _scan_core(
        ctx, body, list(inputs[:state_count]), inputs[state_count:], attrs
    )
    out_axes = attrs.ints("scan_output_axes") or [0] * len(scan_values)
    out_dirs = attrs.ints("scan_output_directions") or [0] * len(scan_values)
    results = list(states)
    for index, values in enumerate(scan_values):
        if values:
            results.append(_stack_scan(values, out_axes[index], bool(out_dirs[index])))
        else:
            body_output = body.outputs[state_count + index]
            results.append(_empty_scan_output(_declared(ctx, state_count + index), body_output))
    return results


def _scan8(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Scan-8: a leading batch axis on every input, scan axis 1, optional per-batch lengths."""
    body = attrs.graph("body")
    num_scan = attrs.int("num_scan_inputs")
    lengths = inputs[0]
    rest = inputs[1:]
    state_count = len(rest) - num_scan
    initial, scan_inputs = rest[:state_count], rest[state_count:]
    batch = (scan_inputs[0] if scan_inputs else initial[0]).shape[0]
    max_len = scan_inputs[0].shape[1] if scan_inputs else 0
    per_batch = []
    for b in range(batch):
        length = max_len if lengths is None else int(lengths[b])
        slices = [x[b, :length] for x in scan_inputs]
        per_batch.append(
            _scan_core(ctx, body, [s[b] for s in initial], slices, attrs, length=length)
        )
    results: list[Any] = [
        np.stack([np.asarray(states[i]) for states, _ in per_batch]) for i in range(state_count)
    ]
    for index in range(len(body.outputs) - state_count):
        stacked = []
        for _, scans in per_batch:
            values = np.stack(scans[index]) if scans[index] else None
            if values is None or values.shape[0] < max_len:
                template = scans[index][0] if scans[index] else np.zeros(0, np.float32)
                padding = np.zeros((max_len - len(scans[index]), *template.shape), template.dtype)
                values = padding if values is None else np.concatenate([values, padding])
            stacked.append(values)
        results.append(np.stack(stacked))
    return results


OPS: list[OpSpec] = [
    OpSpec("If", _if, declared_rule, movement_cost, family=FAMILY),
    OpSpec("Loop", _loop, declared_rule, movement_cost, family=FAMILY),
    OpSpec("Scan", _scan, declared_rule, movement_cost, family=FAMILY),
]
