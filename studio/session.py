"""Session: one model, its recorded optimization, the builder config, and the engines built.

The optimization is recorded once (studio.timeline); the session then moves a cursor over the
steps: ``step()`` applies the next one, ``goto(i)`` jumps, ``undo()``/``redo()`` walk the
history of cursor moves, ``run(level)`` applies a whole pipeline (re-recording at another
level). ``model`` is the graph after the applied steps (a replay, cached per position), and
``build()`` builds exactly that graph (optimization level O0: what you see is what is built), so
at the last step it equals a direct ``engine.build`` of the original model.

Click-to-rebuild: ``set_precision(layer_or_glob, precision)`` and ``pin_tactic(layer, tactic)``
change the config and rebuild through the session's timing cache, so only the layers whose
timing key changed (their precision, or their neighbours' conversion layers) are timed again;
they return a :class:`RebuildDelta` (layers re-tuned, estimated latency and output cosine vs
fp32 before and after). int8 scales come from one calibration (``calibration_data``, else the
session's ``feeds``) kept for every rebuild.

Display: the session renders as ``application/vnd.gie.session+json`` (studio.display) with
HTML and text fallbacks. ``netron(step)`` serves a step's ONNX on 127.0.0.1; ``close()`` (or
the garbage collector, or the end of a ``with`` block) stops every server and removes the
session's working folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from engine.build.estimate import estimate_latency
from engine.build.quantization import needs_calibration
from engine.builder import build
from engine.config import BuilderConfig, Precision
from engine.onnx_io import load
from engine.passes import replay
from engine.passes.step import Step
from engine.quantize.accuracy import LayerError, compare_engines, worst_output_cosine
from engine.recipe import exact_pattern
from engine.report import ProfileReport
from engine.runtime import Engine
from studio.schema import session_payload
from studio.timeline import Timeline, record_timeline

#: Positions whose replayed model the session keeps.
MODEL_CACHE_SIZE = 4


@dataclass(frozen=True)
class RebuildDelta:
    """What a click-to-rebuild changed: the layers whose tactics were timed again, estimated
    latency (ms, engine.build.estimate) and worst output cosine vs fp32, before and after."""

    change: str
    layers_retuned: list[str]
    latency_before_ms: float | None
    latency_after_ms: float
    cosine_before: float | None
    cosine_after: float

    def summary(self) -> str:
        before = "-" if self.latency_before_ms is None else f"{self.latency_before_ms:.3f}"
        cos_before = "-" if self.cosine_before is None else f"{self.cosine_before:.6f}"
        return (
            f"{self.change}: {len(self.layers_retuned)} layer(s) re-tuned; estimated latency "
            f"{before} -> {self.latency_after_ms:.3f} ms; output cosine vs fp32 "
            f"{cos_before} -> {self.cosine_after:.6f}"
        )


@dataclass
class Comparison:
    """Profiles of several engines by name and their worst output cosine vs the first."""

    reports: dict[str, ProfileReport]
    cosine: dict[str, float] = field(default_factory=dict)


def _tensor_io(values: list[ir.Value]) -> list[dict[str, Any]]:
    rows = []
    for value in values:
        shape = (
            None
            if value.shape is None
            else [d if isinstance(d, int) else str(d) for d in value.shape]
        )
        dtype = value.dtype.name.lower() if value.dtype is not None else "?"
        rows.append({"name": value.name or "", "dtype": dtype, "shape": shape})
    return rows


def _cleanup(folder: str, servers: list[Any]) -> None:
    for server in servers:
        server.stop()
    servers.clear()
    shutil.rmtree(folder, ignore_errors=True)


class Session:
    """See the module docstring."""

    def __init__(
        self,
        model_or_path: ir.Model | onnx.ModelProto | str | os.PathLike[str],
        config: BuilderConfig | None = None,
        backend: str = "auto",
        feeds: Mapping[str, np.ndarray] | None = None,
        calibration_data: Any = None,
        level: str | None = None,
    ) -> None:
        if isinstance(model_or_path, ir.Model):
            self.original = model_or_path
            self.title = model_or_path.graph.name or "model"
        elif isinstance(model_or_path, onnx.ModelProto):
            self.original = load(model_or_path)
            self.title = model_or_path.graph.name or "model"
        else:
            self.original = load(model_or_path)
            self.title = Path(model_or_path).name
        if backend not in ("auto", "numpy", "cuda", "cuda-shim"):
            raise ValueError(
                f"backend {backend!r}: choose 'auto' (a GPU when there is one), 'numpy', "
                "'cuda' or 'cuda-shim'"
            )
        if backend == "auto":
            from engine.backends.cuda.setup import auto_backend

            backend = auto_backend()
        self._workdir = tempfile.mkdtemp(prefix="gie-session-")
        base = config or BuilderConfig()
        if level is not None:
            base = base.with_changes(optimization_level=level)
        if base.timing_cache_path is None:
            base = base.with_changes(timing_cache_path=os.path.join(self._workdir, "timing.json"))
        #: The backend engines are built for: "auto" resolves to "cuda" on a machine with a GPU.
        self.backend = backend
        self.config = base.with_changes(backend=backend)
        self.calibration_data = calibration_data
        self._feeds = dict(feeds) if feeds is not None else None
        self._timeline: Timeline = record_timeline(
            self.original, self.config.optimization_level, self.config.disabled_passes
        )
        self.position = 0
        self._undo: list[int] = []
        self._redo: list[int] = []
        self._models: dict[int, ir.Model] = {}
        self._listeners: list[Callable[[Session], None]] = []
        self._servers: list[Any] = []
        self.engine: Engine | None = None
        self._reference: Engine | None = None
        self._reference_key: tuple[int, str] | None = None
        self._calibration: Any = None
        self._profile: ProfileReport | None = None
        self._errors: list[LayerError] = []
        self.overlay = "family"
        self._finalizer = weakref.finalize(self, _cleanup, self._workdir, self._servers)

    # ------------------------------------------------------------------ timeline

    @property
    def steps(self) -> list[Step]:
        return list(self._timeline.steps)

    @property
    def timeline(self) -> Timeline:
        return self._timeline

    @property
    def model(self) -> ir.Model:
        """The graph after the applied steps (a replay of the recorded steps)."""
        if self.position not in self._models:
            if len(self._models) >= MODEL_CACHE_SIZE:
                self._models.pop(next(iter(self._models)))
            self._models[self.position] = replay(
                self.original, self.steps[: self.position], self.config.optimization_level
            )
        return self._models[self.position]

    def _move(self, position: int) -> None:
        if not 0 <= position <= len(self._timeline.steps):
            raise IndexError(f"step {position} is outside 0..{len(self._timeline.steps)}")
        if position == self.position:
            return
        self._undo.append(self.position)
        self._redo.clear()
        self._set_position(position)

    def _set_position(self, position: int) -> None:
        """Move the cursor; the engine and its measurements belong to the old graph."""
        self.position = position
        self.engine = None
        self._profile = None
        self._errors = []
        self._changed()

    def step(self) -> Step | None:
        """Apply the next recorded step and return it (None at the end)."""
        if self.position >= len(self._timeline.steps):
            return None
        self._move(self.position + 1)
        return self._timeline.steps[self.position - 1]

    def goto(self, position: int) -> None:
        """Jump to the graph after ``position`` steps (0 = the original)."""
        self._move(position)

    def undo(self) -> bool:
        """Go back to the previous position; False when there is none."""
        if not self._undo:
            return False
        self._redo.append(self.position)
        self._set_position(self._undo.pop())
        return True

    def redo(self) -> bool:
        """Re-apply the last undone move; False when there is none."""
        if not self._redo:
            return False
        self._undo.append(self.position)
        self._set_position(self._redo.pop())
        return True

    def run(self, level: str | None = None) -> None:
        """Apply every step of ``level``'s pipeline (re-recording when the level changes)."""
        if level is not None and level != self.config.optimization_level:
            self.config = self.config.with_changes(optimization_level=level)
            self._timeline = record_timeline(self.original, level, self.config.disabled_passes)
            self._models.clear()
            self._undo.clear()
            self._redo.clear()
            self.position = 0
        self._move(len(self._timeline.steps))

    # ------------------------------------------------------------------ building

    @property
    def feeds(self) -> dict[str, np.ndarray]:
        """The inputs accuracy and deltas are measured on (seeded example feeds by default)."""
        if self._feeds is None:
            self._feeds = self.reference().example_feeds(seed=0)
        return self._feeds

    def _build(self, config: BuilderConfig) -> Engine:
        build_config = config.with_changes(optimization_level="O0")
        if needs_calibration(config) and self._calibration is None:
            data = self.calibration_data
            if data is None:
                data = [self.feeds]
            engine = build(self.model, build_config, calibration_data=data)
            self._calibration = engine.calibration
            return engine
        return build(self.model, build_config, calibration=self._calibration)

    def build(self) -> Engine:
        """Build the current graph with the current config (see the module docstring)."""
        self.engine = self._build(self.config)
        self._profile = None
        self._errors = []
        self._changed()
        return self.engine

    def reference(self) -> Engine:
        """The fp32 engine of the current graph (same fused plan): the accuracy baseline."""
        fp32 = self.config.with_changes(
            precisions=frozenset({Precision.FP32}), layer_precisions=(), tactic_pins=()
        )
        key = (self.position, self.config.optimization_level)
        if self._reference is None or self._reference_key != key:
            self._reference = self._build(fp32)
            self._reference_key = key
        return self._reference

    def profile(self, iterations: int = 5, warmup: int = 1) -> ProfileReport:
        """Per-layer profile of the engine (built first when needed) on the session's feeds."""
        engine = self.engine or self.build()
        self._profile = engine.profile(iterations=iterations, warmup=warmup, feeds=self.feeds)
        self._changed()
        return self._profile

    def layer_errors(self) -> list[LayerError]:
        """Per-layer error of the engine vs the fp32 engine of the same plan (on ``feeds``)."""
        engine = self.engine or self.build()
        self._errors, _ = compare_engines(self.reference(), engine, [self.feeds])
        self._changed()
        return self._errors

    def _cosine(self, engine: Engine) -> float:
        return worst_output_cosine(self.reference().run(self.feeds), engine.run(self.feeds))

    def _rebuild(self, config: BuilderConfig, change: str) -> RebuildDelta:
        before = self.engine
        latency_before = estimate_latency(before.plan).total_ms if before else None
        cosine_before = self._cosine(before) if before else None
        previous, self.config = self.config, config
        try:
            engine = self.build()
        except Exception:
            self.config = previous  # a refused request leaves the session as it was
            raise
        retuned = sorted(
            {
                e.layer
                for e in engine.log.entries
                if e.stage == "tactics" and " chosen," in e.message
            }
        )
        return RebuildDelta(
            change,
            retuned,
            latency_before,
            estimate_latency(engine.plan).total_ms,
            cosine_before,
            self._cosine(engine),
        )

    def layer_names(self) -> list[str]:
        """The compute layers of the engine (built first when needed)."""
        engine = self.engine or self.build()
        return [layer.name for layer in engine.plan.layers if layer.role == "compute"]

    def precision_of(self, layer: str) -> str:
        engine = self.engine or self.build()
        return engine.plan.layer(layer).precision.value

    def set_precision(self, layer_or_glob: str, precision: Precision | str) -> RebuildDelta:
        """Request ``precision`` for the matching layers and rebuild (see the module docstring)."""
        chosen = Precision(precision)
        names = self.layer_names()
        pattern = exact_pattern(layer_or_glob) if layer_or_glob in names else layer_or_glob
        config = self.config.with_changes(
            layer_precisions=(*self.config.layer_precisions, (pattern, chosen))
        )
        return self._rebuild(config, f"{layer_or_glob} -> {chosen.value}")

    def pin_tactic(self, layer: str, tactic: str | None) -> RebuildDelta:
        """Pin ``layer`` to ``tactic`` (None: unpin) and rebuild."""
        if layer not in self.layer_names():
            raise KeyError(f"no layer named {layer!r}")
        pattern = exact_pattern(layer)
        pins = tuple(p for p in self.config.tactic_pins if p[0] != pattern)
        if tactic is not None:
            pins = (*pins, (pattern, tactic))
        change = f"{layer} pinned to {tactic}" if tactic else f"{layer} unpinned"
        return self._rebuild(self.config.with_changes(tactic_pins=pins), change)

    def compare(self, *others: Session | Engine, iterations: int = 5) -> Comparison:
        """Profiles of this session's engine and ``others`` on the same feeds."""
        engines: dict[str, Engine] = {"this": self.engine or self.build()}
        for index, other in enumerate(others, start=1):
            engine = other if isinstance(other, Engine) else (other.engine or other.build())
            engines[f"#{index}"] = engine
        reports = {
            name: engine.profile(iterations=iterations, warmup=1, feeds=self.feeds)
            for name, engine in engines.items()
        }
        base = engines["this"].run(self.feeds)
        cosine = {
            name: worst_output_cosine(base, engine.run(self.feeds))
            for name, engine in engines.items()
        }
        return Comparison(reports, cosine)

    # ------------------------------------------------------------------ display and export

    def on_change(self, callback: Callable[[Session], None]) -> None:
        """Call ``callback(session)`` after every move, build or profile."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in list(self._listeners):
            callback(self)

    def payload(self) -> dict[str, Any]:
        """The session payload (studio.schema) at the current position."""
        graph = self.original.graph
        io = {
            "inputs": _tensor_io([v for v in graph.inputs if not v.is_initializer()]),
            "outputs": _tensor_io(list(graph.outputs)),
        }
        return session_payload(
            self._timeline,
            self.position,
            self.title,
            io,
            self.engine,
            self._profile,
            self._errors,
            self.overlay,
        )

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        from studio.display import mimebundle

        return mimebundle(self.payload())

    def model_bytes(self, step: int | None = None) -> bytes:
        """The ONNX bytes of the graph after ``step`` steps (default: the current position)."""
        saved = self.position
        if step is not None:
            if not 0 <= step <= len(self._timeline.steps):
                raise IndexError(f"step {step} is outside 0..{len(self._timeline.steps)}")
            self.position = step
        try:
            return ir.to_proto(self.model).SerializeToString()
        finally:
            self.position = saved

    def netron(self, step: int | None = None, height: int = 600) -> Any:
        """Serve the graph after ``step`` steps to Netron on 127.0.0.1; returns an IFrame."""
        from studio.netron import start_netron

        name = f"{Path(self.title).stem}_step{self.position if step is None else step}.onnx"
        server = start_netron(self.model_bytes(step), name)
        self._servers.append(server)
        return server.iframe(height=height)

    def report_html(self, path: str | os.PathLike[str]) -> Path:
        """A standalone, offline HTML report (graph as SVG, timeline, layers, plots)."""
        from studio.export import write_session_report

        return write_session_report(self, path)

    def export(self, folder: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the engine (.gie), its recipe, its QDQ ONNX and the HTML report to ``folder``."""
        from studio.export import export_session

        return export_session(self, folder)

    def close(self) -> None:
        """Stop every Netron server and remove the working folder (idempotent)."""
        self._finalizer()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["Comparison", "RebuildDelta", "Session"]
