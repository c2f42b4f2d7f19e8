"""The Engine: a built Plan that runs, with every activation in one memory arena.

``run(feeds)`` checks the feeds against the model inputs and their optimization profiles,
then executes the layers in order, each with the kernel of its chosen tactic. Every layer's
outputs are copied into their slots of one ``np.uint8`` arena (views at the offsets of the
:class:`~engine.build.memory.MemoryPlan`), and later layers read those views: the arena is the
only storage activations have, so a wrong memory plan gives wrong results rather than hiding.
A value bigger than its slot is refused (:class:`ArenaOverflowError`), never written past it.
Values the plan left out of the arena (data-dependent shapes, sequences) stay separate arrays.
Outputs are returned as copies (the arena is reused by the next run). One engine runs one
request at a time (one arena per planned shape set).

Shapes: an input with a profile accepts any shape inside [min, max] per dim; an input without
one must match its declared static dims, its symbolic dims are free, and inputs bigger than
the memory plan was sized for get a memory plan of their own (made once per shape set).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.backends.numpy_ref.interpreter import (
    ReferenceInterpreter,
    describe_value,
    node_subgraphs,
)
from engine.build.log import BuildLog
from engine.build.memory import MemoryPlan, liveness, plan_memory, planning_shapes
from engine.build.plan import Layer, Plan
from engine.config import BuilderConfig
from engine.ops.registry import Kernel, KernelContext, TensorSpec, default_registry
from engine.ops.shape_inference import declared_spec
from engine.report import COLUMN_NAMES, LatencyStats, LayerProfile, ProfileReport, achieved

#: Memory plans kept for input shapes beyond the built plan (inputs without profiles).
EXTRA_PLANS_KEPT = 4


class EngineInputError(ValueError):
    """The feeds do not fit the engine: unknown or missing name, dtype, rank, or a dim outside
    the profile range (or different from the declared static dim)."""


class ArenaOverflowError(RuntimeError):
    """A layer produced a value larger than its arena slot (its shape exceeds the planned one)."""


class LayerExecutionError(RuntimeError):
    """A layer's kernel failed; the message names the layer, its op and its input shapes."""


def resolve_kernel(layer: Layer) -> Kernel:
    """The kernel of ``layer.tactic``: engine.build.tactics when present, else the registry's
    reference kernel (the only tactic there is without it)."""
    try:
        from engine.build.tactics import tactic_kernel
    except ModuleNotFoundError as error:
        if error.name != "engine.build.tactics":
            raise
    else:
        return tactic_kernel(layer)
    if layer.tactic != "reference":
        raise ValueError(f"layer '{layer.name}': tactic '{layer.tactic}' is not available")
    spec = default_registry().lookup(layer.op_type, layer.domain)
    if spec is None:
        raise ValueError(f"layer '{layer.name}': no kernel for {layer.qualified_op}")
    return spec.kernel


class _Arena:
    """One arena buffer and the slot (offset, capacity) of every planned value."""

    def __init__(self, memory: MemoryPlan) -> None:
        self.memory = memory
        raw = np.zeros(memory.arena_bytes + memory.alignment, dtype=np.uint8)
        start = -raw.ctypes.data % memory.alignment
        self.buffer = raw[start : start + memory.arena_bytes]
        self.slots: dict[str, tuple[int, int]] = {}
        for name in memory.offsets:
            slot = memory.slot(name)
            assert slot is not None
            offset, capacity = slot
            if offset < 0 or offset + capacity > memory.arena_bytes or offset % memory.alignment:
                raise ValueError(
                    f"memory plan: slot of '{name}' [{offset}, {offset + capacity}) is misaligned "
                    f"or outside the {memory.arena_bytes}-byte arena"
                )
            self.slots[name] = (offset, capacity)

    def store(self, layer: Layer, name: str, result: Any) -> Any:
        """``result`` copied into the slot of ``name`` (a view of the arena), or ``result``
        itself for a value outside the arena."""
        slot = self.slots.get(name)
        if slot is None:
            return result
        if not isinstance(result, np.ndarray) or result.dtype == object:
            raise ArenaOverflowError(
                f"layer '{layer.name}': output '{name}' is {describe_value(result)}, "
                "not a fixed-width tensor, but the memory plan gave it an arena slot"
            )
        offset, capacity = slot
        if result.nbytes > capacity:
            shapes = ", ".join(f"{k}{list(v)}" for k, v in self.memory.input_shapes.items())
            raise ArenaOverflowError(
                f"layer '{layer.name}': output '{name}' ({describe_value(result)}) needs "
                f"{result.nbytes} bytes but its arena slot holds {capacity} bytes "
                f"(memory planned for inputs {shapes})"
            )
        view = self.buffer[offset : offset + result.nbytes].view(result.dtype).reshape(result.shape)
        np.copyto(view, result, casting="no")
        return view


class Engine:
    """An executable plan (see the module docstring); built by ``engine.builder.build``."""

    def __init__(
        self,
        plan: Plan,
        memory: MemoryPlan,
        config: BuilderConfig,
        log: BuildLog,
        device: dict[str, Any],
    ) -> None:
        self.plan = plan
        self.memory = memory
        self.config = config
        self.log = log
        self.device = dict(device)
        self._declared = {
            v.name or "": declared_spec(v, constant_limit=0)
            for v in plan.model.graph.inputs
            if (v.name or "") in plan.inputs
        }
        self._kernels = self._resolve_kernels()
        self._release = self._release_lists()
        self._arenas: dict[tuple, _Arena] = {}
        self._values: dict[str, ir.Value] | None = None
        self._interpreter: Any = None
        #: Set by the builder: the CalibrationResult (histograms, thresholds) the int8 scales
        #: came from, every layer's PrecisionDecision, and the QuantScales used. A loaded
        #: engine has none of them (its scales live in the graph).
        self.calibration: Any = None
        self.precision_decisions: dict[str, Any] = {}
        self.quant_scales: Any = None

    def _resolve_kernels(self) -> list[Kernel]:
        """The kernel of every layer (a CUDA engine launches its own instead)."""
        return [resolve_kernel(layer) for layer in self.plan.layers]

    # ------------------------------------------------------------------ description

    @property
    def input_names(self) -> list[str]:
        return list(self.plan.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.plan.outputs)

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per layer: name, op, inputs, outputs, origins, precision, tactic, candidate
        timings, output shapes at the optimization shapes, and the arena offsets of outputs."""
        rows = []
        for layer in self.plan.layers:
            row = layer.to_json()
            row["output_shapes"] = [
                None if s is None or s.shape is None else list(s.shape)
                for s in self.plan.output_specs(layer)
            ]
            row["output_offsets"] = [self.memory.offsets.get(name) for name in layer.outputs]
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ feeds

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The feeds as arrays, or EngineInputError saying exactly what does not fit."""
        unknown = sorted(set(feeds) - set(self.plan.inputs))
        if unknown:
            raise EngineInputError(
                f"unknown input name(s) {unknown}; the engine's inputs are {self.plan.inputs}"
            )
        checked: dict[str, np.ndarray] = {}
        for name in self.plan.inputs:
            if name not in feeds:
                raise EngineInputError(f"missing input '{name}' ({self._describe_input(name)})")
            array = np.asarray(feeds[name])
            spec = self._declared[name]
            expected = None
            if spec.dtype is not None and spec.dtype != ir.DataType.STRING:
                expected = np.dtype(spec.dtype.numpy())
            if expected is not None and array.dtype != expected:
                raise EngineInputError(
                    f"input '{name}' has dtype {array.dtype}, the engine expects "
                    f"{self._describe_input(name)}"
                )
            self._check_shape(name, tuple(array.shape), spec)
            checked[name] = array
        return checked

    def _check_shape(self, name: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
        profile = self.config.profile_for(name)
        rank = len(profile.min) if profile is not None else spec.rank
        if rank is not None and len(shape) != rank:
            raise EngineInputError(
                f"input '{name}' has rank {len(shape)} (shape {list(shape)}), the engine "
                f"expects rank {rank} ({self._describe_input(name)})"
            )
        for axis, size in enumerate(shape):
            if profile is not None:
                low, high = profile.min[axis], profile.max[axis]
                if not low <= size <= high:
                    raise EngineInputError(
                        f"input '{name}' dim {axis} is {size}, outside its profile range "
                        f"[{low}, {high}] (profile min {list(profile.min)}, "
                        f"max {list(profile.max)}; got shape {list(shape)})"
                    )
            want = spec.shape[axis] if spec.shape is not None else None
            if isinstance(want, int) and want != size:
                raise EngineInputError(
                    f"input '{name}' dim {axis} is {size}, the model declares {want} "
                    f"({self._describe_input(name)}; got shape {list(shape)})"
                )

    def _describe_input(self, name: str) -> str:
        spec = self._declared[name]
        dtype = spec.dtype.name.lower() if spec.dtype is not None else "?"
        dims = "?" if spec.shape is None else ",".join(str(d) for d in spec.shape)
        profile = self.config.profile_for(name)
        text = f"{dtype}[{dims}]"
        if profile is not None:
            text += f", profile min {list(profile.min)} max {list(profile.max)}"
        return text

    def example_feeds(self, seed: int = 0, which: str = "opt") -> dict[str, np.ndarray]:
        """Seeded feeds at the ``which`` end of the profiles (unprofiled symbolic dims 1):
        floats standard normal, integers in [0, 4), booleans fair coins."""
        rng = np.random.default_rng(seed)
        shapes = planning_shapes(self.plan.model, self.config, which)
        feeds = {}
        for name in self.plan.inputs:
            spec = self._declared[name]
            if spec.dtype is None or name not in shapes:
                raise EngineInputError(f"input '{name}' has no known dtype or rank; pass feeds")
            dtype = np.dtype(spec.dtype.numpy())
            shape = shapes[name]
            if dtype == np.bool_:
                array = rng.random(shape) < 0.5
            elif np.issubdtype(dtype, np.integer):
                array = rng.integers(0, 4, size=shape)
            else:
                array = rng.standard_normal(shape)
            feeds[name] = np.asarray(array).astype(dtype)
        return feeds

    # ------------------------------------------------------------------ execution

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Outputs by name for ``feeds`` (input name -> array); see the module docstring."""
        return self._execute(self.check_feeds(feeds), None)

    def run_observed(
        self,
        feeds: Mapping[str, Any],
        on_layer: Callable[[Layer, list[Any], list[Any]], None],
    ) -> dict[str, np.ndarray]:
        """:meth:`run`, calling ``on_layer(layer, inputs, outputs)`` after every layer. The
        arrays are views of the arena, valid only during the call (copy what you keep)."""
        return self._execute(self.check_feeds(feeds), None, on_layer)

    def _memory_for(self, feeds: Mapping[str, np.ndarray]) -> tuple[tuple, MemoryPlan | None]:
        """(key, memory plan) for the feeds' shapes: key () and the built plan when they fit
        it, else a key of the shapes and None (the caller plans memory for them)."""
        shapes = {name: tuple(array.shape) for name, array in feeds.items()}
        planned = self.memory.input_shapes
        fits = all(
            self.config.profile_for(name) is not None
            or (
                name in planned
                and len(planned[name]) == len(shape)
                and all(a <= b for a, b in zip(shape, planned[name]))
            )
            for name, shape in shapes.items()
        )
        if fits:
            return (), self.memory
        return tuple(sorted(shapes.items())), None

    def _arena_for(self, feeds: Mapping[str, np.ndarray]) -> _Arena:
        key, planned = self._memory_for(feeds)
        arena = self._arenas.get(key)
        if arena is None:
            shapes = {name: tuple(array.shape) for name, array in feeds.items()}
            memory = planned or plan_memory(self.plan, self.config, shapes)
            if key and len(self._arenas) > EXTRA_PLANS_KEPT:
                self._arenas.pop(next(k for k in self._arenas if k))
            arena = self._arenas[key] = _Arena(memory)
        return arena

    def _release_lists(self) -> list[list[str]]:
        """Values to drop from the environment after each layer (last use, not an output)."""
        release: list[list[str]] = [[] for _ in self.plan.layers]
        keep = set(self.plan.outputs)
        last = {name: interval[1] for name, interval in liveness(self.plan).items()}
        for name in self.plan.inputs:
            uses = [layer.index for layer in self.plan.layers if name in layer.inputs]
            if uses:
                last[name] = max(uses)
        for name, index in last.items():
            if name not in keep and index < len(release):
                release[index].append(name)
        return release

    def _context(self, layer: Layer, env: dict[str, Any]) -> KernelContext:
        """The layer's kernel context; for If/Loop/Scan, with a runner for their bodies."""
        if not node_subgraphs(layer.node):
            return layer.context

        if self._values is None:
            graph = self.plan.model.graph
            self._values = {v.name or "": v for v in graph.inputs}
            self._values.update(graph.initializers)
            for node in graph:
                self._values.update({v.name or "": v for v in node.outputs})
            self._interpreter = ReferenceInterpreter(self.plan.model)
        outer = {self._values[n]: v for n, v in env.items() if n in self._values}
        # The interpreter's subgraph runner resolves captured outer values from ``outer``.
        runner = self._interpreter.subgraph_runner(outer)
        return replace(layer.context, run_subgraph=runner)

    def _execute(
        self,
        feeds: dict[str, np.ndarray],
        layer_ms: list[list[float]] | None,
        on_layer: Callable[[Layer, list[Any], list[Any]], None] | None = None,
    ) -> dict[str, np.ndarray]:
        arena = self._arena_for(feeds)
        env: dict[str, Any] = dict(self.plan.constants)
        env.update(feeds)
        clock = time.perf_counter
        for layer, kernel, release in zip(self.plan.layers, self._kernels, self._release):
            inputs = [env[name] if name else None for name in layer.inputs]
            started = clock()
            try:
                results = list(kernel(inputs, layer.attrs, self._context(layer, env)))
            except Exception as error:
                raise LayerExecutionError(
                    f"layer '{layer.name}' ({layer.qualified_op}, tactic {layer.tactic}) failed "
                    f"on inputs [{', '.join(describe_value(v) for v in inputs)}]: "
                    f"{type(error).__name__}: {error}"
                ) from error
            for name, result in zip(layer.outputs, results):
                if name:
                    env[name] = arena.store(layer, name, result)
            if layer_ms is not None:
                layer_ms[layer.index].append((clock() - started) * 1e3)
            if on_layer is not None:
                on_layer(layer, inputs, [env.get(n) for n in layer.outputs])
            for name in release:
                env.pop(name, None)
        missing = [name for name in self.plan.outputs if name not in env]
        if missing:
            raise RuntimeError(f"outputs {missing} were not produced")
        return {
            name: np.array(env[name], copy=True) if isinstance(env[name], np.ndarray) else env[name]
            for name in self.plan.outputs
        }

    # ------------------------------------------------------------------ profiling

    def _run_ms(self, feeds: dict[str, np.ndarray]) -> float:
        """One whole run's latency (ms): wall time here; a CUDA engine reports device time."""
        started = time.perf_counter()
        self._execute(feeds, None)
        return (time.perf_counter() - started) * 1e3

    def profile(
        self,
        iterations: int = 10,
        warmup: int = 2,
        feeds: Mapping[str, Any] | None = None,
    ) -> ProfileReport:
        """Time ``iterations`` plain runs (after ``warmup``) for the end-to-end statistics, then
        a separate profiling pass of ``iterations`` runs timing every layer (kernel plus the
        copy into the arena). Feeds default to :meth:`example_feeds` at the opt shapes."""
        if iterations < 1 or warmup < 0:
            raise ValueError("profile needs iterations >= 1 and warmup >= 0")
        checked = self.check_feeds(feeds if feeds is not None else self.example_feeds())
        for _ in range(warmup):
            self._execute(checked, None)
        samples = [self._run_ms(checked) for _ in range(iterations)]
        layer_ms: list[list[float]] = [[] for _ in self.plan.layers]
        seen: dict[int, tuple[list[TensorSpec | None], list[TensorSpec]]] = {}

        def record(layer: Layer, inputs: list[Any], outputs: list[Any]) -> None:
            if layer.index not in seen:
                ins = [None if v is None else TensorSpec.of_array(v) for v in inputs]
                seen[layer.index] = (ins, [TensorSpec.of_array(v) for v in outputs])

        for _ in range(iterations):
            self._execute(checked, layer_ms, record)
        rows = tuple(
            self._profile_row(layer, layer_ms[layer.index], *seen[layer.index])
            for layer in self.plan.layers
        )
        return ProfileReport(
            layers=rows,
            end_to_end=LatencyStats.of(samples),
            warmup=warmup,
            input_shapes={name: tuple(a.shape) for name, a in checked.items()},
            device=dict(self.device),
        )

    def _profile_row(
        self,
        layer: Layer,
        times: list[float],
        ins: list[TensorSpec | None],
        outs: list[TensorSpec],
    ) -> LayerProfile:
        flops = moved = None
        spec = default_registry().lookup(layer.op_type, layer.domain)
        if spec is not None and all(s.is_static for s in outs):
            try:
                cost = spec.cost(ins, outs, layer.attrs)  # type: ignore[arg-type]
                flops, moved = int(cost.flops), int(cost.bytes_total)
            except Exception:  # noqa: BLE001 - a rule that cannot price a layer leaves it unknown
                pass
        median = float(np.median(times))
        values = {
            "layer": layer.name,
            "op": layer.qualified_op,
            "origins": tuple(layer.origins),
            "precision": layer.precision.value,
            "tactic": layer.tactic,
            "latency_ms_mean": float(np.mean(times)),
            "latency_ms_median": median,
            "flops": flops,
            "bytes": moved,
            "gflops": achieved(flops, median),
            "gbs": achieved(moved, median),
            "output_shape": tuple(tuple(int(d) for d in s.shape or ()) for s in outs),
        }
        assert tuple(values) == COLUMN_NAMES
        return LayerProfile(**values)
