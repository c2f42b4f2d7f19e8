"""Lowering: a built Plan (layers with CUDA tactics) -> a :class:`LaunchPlan` at fixed shapes.

For every layer, in order:

1. **Folded**: a layer whose outputs shape inference knows as constants at these input shapes
   (``Shape``, and the index arithmetic that follows it) runs nowhere; its outputs become
   host constants (uploaded only if a kernel reads them). TensorRT does the same with its
   shape tensors.
2. **Kernel**: the lowering function of the layer's tactic (``LOWERINGS``, filled by the
   ``lower_*`` modules) issues launches through a :class:`LowerContext`: it asks for each input
   in the layout its kernel reads (a conversion kernel is added when the value is stored in
   another layout, once per value and layout), for each output in the layout it writes, for
   weights in the form it wants (uploaded once), and for per-layer temporaries.
3. **Host**: tactic ``"host"`` (no CUDA kernel runs the layer, the reason is in the build log)
   becomes a :class:`HostStep` on plain-layout buffers.

Layouts are chosen greedily: a kernel that reads NHWC leaves its output NHWC, and elementwise
kernels follow the layout of their input, so a chain conv -> pool -> conv converts only at its
ends; graph outputs are always plain. Every launch is checked not to write a buffer it also
reads through a different view (an in-place pair must be the same view).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from engine.backends.cuda.folding import fold_layer, refresh_specs
from engine.backends.cuda.launch_plan import (
    Argument,
    CopyStep,
    DeviceBuffer,
    HostStep,
    KernelLaunch,
    KernelSource,
    LaunchPlan,
    LayerSteps,
    ScratchAllocator,
    Step,
    align_up,
)
from engine.backends.cuda.layouts import layout_launch, same_bytes_in_both_layouts
from engine.build.memory import MemoryPlan, liveness
from engine.build.plan import Layer, Plan, optimization_specs
from engine.ops.registry import TensorSpec, default_registry
from engine.ops.shape_inference import infer_specs

#: Tactic name of a layer that runs on the host (NumPy reference kernel).
HOST_TACTIC = "host"
#: A lowering function: issues the steps of one layer through the context.
LowerFunction = Callable[["LowerContext"], None]


class LoweringError(ValueError):
    """A layer cannot be lowered as its tactic says (names the layer and why)."""


class _Lowering:
    """The state of one lowering run (see :func:`lower_launch_plan`)."""

    def __init__(
        self,
        plan: Plan,
        memory: MemoryPlan,
        shapes: Mapping[str, tuple[int, ...]],
        lowerings: Mapping[str, LowerFunction],
        specs: Mapping[str, TensorSpec] | None,
    ) -> None:
        self.plan = plan
        self.memory = memory
        self.lowerings = lowerings
        if specs is None:
            inferred = infer_specs(plan.model, optimization_specs(plan.model, shapes)).specs
            specs = {v.name or "": s for v, s in inferred.items()}
        self.specs: dict[str, TensorSpec] = dict(specs)
        self.host_constants: dict[str, np.ndarray] = dict(plan.constants)
        self.graph_outputs = list(plan.outputs)
        self.stored: dict[str, DeviceBuffer] = {}
        self.copies: dict[tuple[str, str], DeviceBuffer] = {}
        self.weights: list[tuple[DeviceBuffer, np.ndarray]] = []
        self.weight_keys: dict[str, DeviceBuffer] = {}
        self.weights_bytes = 0
        self.io_bytes = 0
        self.scratch = ScratchAllocator()
        self.last_use = {name: interval[1] for name, interval in liveness(plan).items()}
        self.end = len(plan.layers)
        for name in plan.outputs:
            self.last_use[name] = self.end
        self.inputs: dict[str, DeviceBuffer] = {}
        for name in plan.inputs:
            spec = self.specs[name]
            buffer = DeviceBuffer("io", self.io_bytes, _dtype_name(spec), _shape(spec, name))
            self.io_bytes = align_up(self.io_bytes + buffer.nbytes)
            self.inputs[name] = self.stored[name] = buffer
            uses = [layer.index for layer in plan.layers if name in layer.inputs]
            self.last_use[name] = max(uses, default=0)
        self.notes: list[str] = []

    # ---------------------------------------------------------------- memory

    def weight(self, key: str, array: np.ndarray) -> DeviceBuffer:
        if key in self.weight_keys:
            return self.weight_keys[key]
        array = np.ascontiguousarray(array)
        buffer = DeviceBuffer("weights", self.weights_bytes, array.dtype.name, array.shape)
        self.weights_bytes = align_up(self.weights_bytes + max(array.nbytes, 1))
        self.weights.append((buffer, array))
        self.weight_keys[key] = buffer
        return buffer

    def slot(self, name: str, layer: Layer, layout: str) -> DeviceBuffer:
        """The storage of value ``name`` (output of ``layer``) in ``layout``."""
        spec = self.specs.get(name)
        if spec is None or not spec.is_static or spec.dtype is None:
            raise LoweringError(f"layer '{layer.name}': output '{name}' has no static shape")
        shape, dtype = _shape(spec, name), _dtype_name(spec)
        slot = self.memory.slot(name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if slot is not None and nbytes <= slot[1]:
            return DeviceBuffer("arena", slot[0], dtype, shape, layout)
        last = self.last_use.get(name, layer.index)
        offset = self.scratch.allocate(nbytes, layer.index, last)
        return DeviceBuffer("scratch", offset, dtype, shape, layout)

    # ---------------------------------------------------------------- layouts

    def convert(
        self, steps: list[Step], buffer: DeviceBuffer, layout: str, first: int, last: int
    ) -> DeviceBuffer:
        """A copy of ``buffer`` in ``layout`` (a transpose kernel into scratch)."""
        target = DeviceBuffer(
            "scratch",
            self.scratch.allocate(buffer.nbytes, first, last),
            buffer.dtype,
            buffer.shape,
            layout,
        )
        steps.append(layout_launch(buffer, target))
        return target


def _shape(spec: TensorSpec, name: str) -> tuple[int, ...]:
    if not spec.is_static:
        raise LoweringError(f"value '{name}' has no static shape ({spec.shape})")
    return tuple(int(d) for d in spec.shape)  # type: ignore[union-attr, arg-type]


def _dtype_name(spec: TensorSpec) -> str:
    if spec.dtype is None:
        raise LoweringError("a value has an unknown dtype")
    return np.dtype(spec.dtype.numpy()).name


class LowerContext:
    """What a lowering function sees of one layer (see the module docstring)."""

    def __init__(self, state: _Lowering, layer: Layer, steps: list[Step]) -> None:
        self._state = state
        self.layer = layer
        self.steps = steps
        self._after: list[Step] = []
        self._outputs: dict[int, DeviceBuffer] = {}

    # ---------------------------------------------------------------- facts

    @property
    def attrs(self) -> Any:
        return self.layer.attrs

    def has_input(self, index: int) -> bool:
        return index < len(self.layer.inputs) and bool(self.layer.inputs[index])

    def spec(self, name: str) -> TensorSpec:
        spec = self._state.specs.get(name)
        if spec is None:
            raise LoweringError(f"layer '{self.layer.name}': no spec for '{name}'")
        return spec

    def input_shape(self, index: int) -> tuple[int, ...]:
        name = self.layer.inputs[index]
        return _shape(self.spec(name), name)

    def input_dtype(self, index: int) -> np.dtype:
        return np.dtype(_dtype_name(self.spec(self.layer.inputs[index])))

    def output_shape(self, index: int = 0) -> tuple[int, ...]:
        name = self.layer.outputs[index]
        return _shape(self.spec(name), name)

    def output_dtype(self, index: int = 0) -> np.dtype:
        return np.dtype(_dtype_name(self.spec(self.layer.outputs[index])))

    def constant(self, index: int) -> np.ndarray | None:
        """The host value of input ``index`` when it is a constant (weights, folded shapes)."""
        if not self.has_input(index):
            return None
        name = self.layer.inputs[index]
        if name in self._state.host_constants:
            return self._state.host_constants[name]
        spec = self._state.specs.get(name)
        return None if spec is None or spec.value is None else np.asarray(spec.value)

    def stored_layout(self, index: int) -> str:
        """The layout input ``index`` is stored in now (``"plain"`` for constants)."""
        buffer = self._state.stored.get(self.layer.inputs[index])
        return "plain" if buffer is None else buffer.layout

    # ---------------------------------------------------------------- buffers

    def weight(self, key: str, array: np.ndarray) -> DeviceBuffer:
        """``array`` uploaded once; ``key`` names the prepared form (e.g. ``"w:conv1:krsc"``)."""
        return self._state.weight(key, array)

    def input(self, index: int, layout: str = "plain") -> DeviceBuffer | None:
        """Input ``index`` in ``layout`` (None when omitted). Constants come from the weights."""
        if not self.has_input(index):
            return None
        name = self.layer.inputs[index]
        state = self._state
        value = self.constant(index)
        if name not in state.stored and value is not None:
            array = np.asarray(value)
            if layout == "nhwc":
                array = array.transpose(0, 2, 3, 1)
            buffer = state.weight(f"const:{name}:{layout}", array)
            return DeviceBuffer("weights", buffer.offset, buffer.dtype, tuple(value.shape), layout)
        if name not in state.stored:
            raise LoweringError(f"layer '{self.layer.name}': input '{name}' was never produced")
        buffer = state.stored[name]
        if buffer.layout == layout:
            return buffer
        if same_bytes_in_both_layouts(buffer.shape):
            return replace(buffer, layout=layout)
        key = (name, layout)
        if key not in state.copies:
            last = state.last_use.get(name, self.layer.index)
            state.copies[key] = state.convert(self.steps, buffer, layout, self.layer.index, last)
        return state.copies[key]

    def output(self, index: int = 0, layout: str = "plain") -> DeviceBuffer:
        """Where output ``index`` is written, in ``layout``. A graph output asked for in NHWC
        is written to scratch and converted into its plain slot after the layer."""
        if index in self._outputs:
            return self._outputs[index]
        name = self.layer.outputs[index]
        state = self._state
        if layout != "plain" and name in state.plan.outputs:
            final = state.slot(name, self.layer, "plain")
            staged = DeviceBuffer(
                "scratch",
                state.scratch.allocate(final.nbytes, self.layer.index, self.layer.index),
                final.dtype,
                final.shape,
                layout,
            )
            self._after.append(layout_launch(staged, final))
            state.stored[name] = final
            self._outputs[index] = staged
            return staged
        buffer = state.slot(name, self.layer, layout)
        state.stored[name] = buffer
        self._outputs[index] = buffer
        return buffer

    def scratch(self, shape: Sequence[int], dtype: Any, layout: str = "plain") -> DeviceBuffer:
        """A temporary for this layer only."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(tuple(shape), dtype=np.int64)) * dtype.itemsize
        offset = self._state.scratch.allocate(nbytes, self.layer.index, self.layer.index)
        return DeviceBuffer("scratch", offset, dtype.name, tuple(int(d) for d in shape), layout)

    # ---------------------------------------------------------------- steps

    def launch(
        self,
        file: str | None,
        entry: str,
        grid: Sequence[int],
        block: Sequence[int],
        args: Sequence[Argument],
        defines: Sequence[tuple[str, int]] = (),
        shared_bytes: int = 0,
        text: str | None = None,
    ) -> KernelLaunch:
        """Add a launch of ``entry`` (from kernels/``file`` or generated ``text``)."""
        source = KernelSource(file=file, text=text, defines=tuple(defines))
        try:
            const = source.const_pointers(entry)
        except KeyError as error:
            raise LoweringError(f"layer '{self.layer.name}': {error.args[0]}") from None
        if len(const) != len(args):
            raise LoweringError(
                f"layer '{self.layer.name}': {entry} takes {len(const)} arguments, got {len(args)}"
            )
        reads = tuple(a for a, c in zip(args, const) if isinstance(a, DeviceBuffer))
        writes = tuple(a for a, c in zip(args, const) if isinstance(a, DeviceBuffer) and not c)
        launch = KernelLaunch(
            source,
            entry,
            _dims(grid),
            _dims(block),
            tuple(args),
            reads,
            writes,
            shared_bytes,
        )
        _check_aliasing(self.layer, launch)
        self.steps.append(launch)
        return launch

    def copy(self, src: DeviceBuffer, dst: DeviceBuffer) -> None:
        """A device copy (skipped when ``src`` and ``dst`` are the same bytes)."""
        if src.nbytes != dst.nbytes:
            raise LoweringError(
                f"layer '{self.layer.name}': copy of {src.nbytes} bytes into {dst.nbytes}"
            )
        if (src.region, src.offset) != (dst.region, dst.offset):
            self.steps.append(CopyStep(src, dst))

    def finish(self) -> None:
        self.steps.extend(self._after)


def _dims(values: Sequence[int]) -> tuple[int, int, int]:
    dims = [int(v) for v in values] + [1, 1, 1]
    return (dims[0], dims[1], dims[2])


def _check_aliasing(layer: Layer, launch: KernelLaunch) -> None:
    conflict = launch.aliasing()
    if conflict is not None:
        written, read = conflict
        raise LoweringError(
            f"layer '{layer.name}': {launch.entry} would write {written.describe()} "
            f"while reading the overlapping {read.describe()}"
        )


def _host_step(state: _Lowering, layer: Layer, steps: list[Step], reason: str) -> None:
    context = LowerContext(state, layer, steps)
    spec = default_registry().lookup(layer.op_type, layer.domain)
    if spec is None:
        raise LoweringError(f"layer '{layer.name}': no kernel at all for {layer.qualified_op}")
    inputs = tuple(context.input(i) for i in range(len(layer.inputs)))
    outputs = tuple(context.output(i) if name else None for i, name in enumerate(layer.outputs))
    steps.append(HostStep(spec.kernel, layer.attrs, layer.context, inputs, outputs, reason))


def _record_values(state: _Lowering, layer: Layer, record: LayerSteps) -> None:
    for name in (*layer.inputs, *layer.outputs):
        if name and name in state.stored:
            record.values[name] = state.stored[name]


def lower_launch_plan(
    plan: Plan,
    memory: MemoryPlan,
    shapes: Mapping[str, tuple[int, ...]],
    lowerings: Mapping[str, LowerFunction] | None = None,
    specs: Mapping[str, TensorSpec] | None = None,
) -> LaunchPlan:
    """The launch plan of ``plan`` (layers' tactics chosen) at input ``shapes``; ``specs``
    (value name -> spec at those shapes) skips shape inference when the caller has them."""
    if lowerings is None:
        from engine.backends.cuda.lowerings import all_lowerings

        lowerings = all_lowerings()
    state = _Lowering(plan, memory, shapes, lowerings, specs)
    layers: list[LayerSteps] = []
    for layer in plan.layers:
        record = LayerSteps(layer.index, layer.name, layer.qualified_op, layer.tactic)
        layers.append(record)
        refresh_specs(state, layer)
        if fold_layer(state, layer):
            record.tactic = "folded"
            continue
        if layer.tactic == HOST_TACTIC or layer.tactic not in lowerings:
            why = (
                "tactic host" if layer.tactic == HOST_TACTIC else f"no lowering for {layer.tactic}"
            )
            state.notes.append(
                f"layer '{layer.name}' ({layer.qualified_op}) runs on the host: {why}"
            )
            _host_step(state, layer, record.steps, why)
            _record_values(state, layer, record)
            continue
        context = LowerContext(state, layer, record.steps)
        try:
            lowerings[layer.tactic](context)
        except LoweringError:
            raise
        except (ValueError, KeyError, IndexError) as error:
            raise LoweringError(
                f"layer '{layer.name}' ({layer.qualified_op}, tactic {layer.tactic}): {error}"
            ) from error
        context.finish()
        missing = [n for n in layer.outputs if n and n not in state.stored]
        if missing:
            raise LoweringError(f"layer '{layer.name}': lowering never wrote {missing}")
        _record_values(state, layer, record)
    outputs = {}
    for name in plan.outputs:
        if name in state.stored:
            outputs[name] = state.stored[name]
        elif name in state.host_constants:
            outputs[name] = state.weight(f"const:{name}:plain", state.host_constants[name])
        else:
            raise LoweringError(f"graph output '{name}' is never produced")
    return LaunchPlan(
        input_shapes={k: tuple(v) for k, v in shapes.items()},
        layers=layers,
        region_bytes={
            "weights": state.weights_bytes,
            "arena": memory.arena_bytes,
            "io": state.io_bytes,
            "scratch": state.scratch.size,
        },
        weights=state.weights,
        inputs=state.inputs,
        outputs=outputs,
        notes=state.notes,
        host_values={k: v for k, v in state.host_constants.items() if k not in plan.constants},
    )


__all__ = [
    "HOST_TACTIC",
    "LowerContext",
    "LowerFunction",
    "LoweringError",
    "layout_launch",
    "lower_launch_plan",
]
