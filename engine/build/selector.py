"""Tactic selection: pick each layer's fastest applicable tactic, with pins and a timing cache.

For every layer of a plan, in order of precedence:

1. a tactic pinned by the config (``BuilderConfig.tactic_pins``, name or glob) is used as is;
   a pin that cannot run the layer (unknown tactic, refused shape) is logged and ignored;
2. a layer with a single candidate keeps it untimed;
3. a timing-cache hit reuses the stored timings (nothing is run);
4. otherwise every candidate runs on seeded random inputs at the plan's specs (weights from
   ``plan.constants``): warm-up, then the median of N runs; a candidate whose first runs are
   all above twice the best median so far is abandoned (``aborted``). The fastest median wins.

Every candidate's timing is kept in ``layer.candidates`` (the studio's tactic explorer shows
them) and each decision is logged, e.g. "tactic im2col_gemm chosen, 4 candidates, margin 8%"
(the margin is how much slower the runner-up was).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from engine.build.log import BuildLog
from engine.build.plan import Layer, Plan, TacticTiming, lower
from engine.build.tactics import candidate_tactics, check_tactic_sources, make_kernel, why_not
from engine.build.timing import Timer, TimingCache, WallClockTimer, summarize, timing_key
from engine.config import BuilderConfig
from engine.device import device_identity
from engine.onnx_io import load
from engine.passes import optimize

STAGE = "tactics"
#: ``progress(stage, done, total)``, as the builder's progress callback.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SelectionStats:
    """Counts of one selection: ``timed`` candidates actually run through the timer,
    ``cache_hits`` layers answered by the timing cache, ``pinned`` layers, ``single`` layers
    with one candidate, ``aborted`` candidates abandoned early, ``seconds`` spent in total."""

    layers: int
    timed: int
    cache_hits: int
    pinned: int
    single: int
    aborted: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _random_input(layer: Layer, plan: Plan, name: str, rng: np.random.Generator) -> Any:
    """A timing input: the constant, or a seeded random array at the value's spec (None when
    its shape or dtype is unknown)."""
    if name in plan.constants:
        return plan.constants[name]
    spec = plan.specs.get(name)
    if spec is None or not spec.is_static or spec.dtype is None:
        return None
    if spec.value is not None:
        return spec.value
    dtype = spec.dtype.numpy()
    shape = tuple(int(d) for d in spec.shape)  # type: ignore[union-attr, arg-type]
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    return rng.integers(0, 10, size=shape).astype(dtype)


def timing_inputs(layer: Layer, plan: Plan, seed: int = 0) -> list[Any] | None:
    """The inputs candidates are timed on (None entries for omitted inputs), or None when a
    shape is unknown."""
    rng = np.random.default_rng(seed)
    values = []
    for name in layer.inputs:
        value = _random_input(layer, plan, name, rng) if name else None
        if name and value is None:
            return None
        values.append(value)
    return values


def _valid(timing: TacticTiming) -> bool:
    return timing.samples > 0 and not timing.aborted


def winner_of(candidates: list[TacticTiming]) -> tuple[str, float]:
    """The fastest valid candidate (ties: the earlier one) and its margin in percent over the
    runner-up (0 when there is none)."""
    valid = [t for t in candidates if _valid(t)]
    if not valid:
        return "reference", 0.0
    best = min(valid, key=lambda t: t.median_ms)  # min keeps the first of equal medians
    others = [t.median_ms for t in candidates if t is not best and t.samples > 0]
    if not others or best.median_ms <= 0:
        return best.tactic, 0.0
    return best.tactic, (min(others) - best.median_ms) / best.median_ms * 100.0


class TacticSource(Protocol):
    """Where a backend's tactics come from: the candidates of a layer, why one cannot run it,
    a ready-to-time run of one, and the timing-cache key of a layer."""

    def candidates(self, layer: Layer, plan: Plan, config: BuilderConfig) -> list[str]: ...

    def why_not(self, layer: Layer, plan: Plan, name: str) -> str | None: ...

    def runner(
        self, layer: Layer, plan: Plan, name: str, inputs: list[Any]
    ) -> Callable[[], object]: ...

    def key(self, layer: Layer, plan: Plan) -> dict[str, Any]: ...


class NumpyTacticSource:
    """The NumPy backend's tactics (engine.build.tactics), timed on the host."""

    def __init__(self, config: BuilderConfig) -> None:
        self.device = device_identity(config.backend)

    def candidates(self, layer: Layer, plan: Plan, config: BuilderConfig) -> list[str]:
        return candidate_tactics(layer, plan, config)

    def why_not(self, layer: Layer, plan: Plan, name: str) -> str | None:
        try:
            return why_not(layer, plan, name)
        except ValueError as error:
            return str(error)

    def runner(
        self, layer: Layer, plan: Plan, name: str, inputs: list[Any]
    ) -> Callable[[], object]:
        kernel = make_kernel(layer, name)
        return lambda: kernel(inputs, layer.attrs, layer.context)

    def key(self, layer: Layer, plan: Plan) -> dict[str, Any]:
        return timing_key(layer, plan, self.device)


def time_candidates(
    layer: Layer,
    plan: Plan,
    candidates: list[str],
    timer: Timer,
    source: TacticSource | None = None,
) -> list[TacticTiming] | None:
    """Time every candidate of ``layer`` (None when its input shapes are unknown)."""
    inputs = timing_inputs(layer, plan, seed=layer.index)
    if inputs is None:
        return None
    source = source or NumpyTacticSource(BuilderConfig())
    timings: list[TacticTiming] = []
    best = math.inf
    for name in candidates:
        limit = 2.0 * best if math.isfinite(best) else None
        try:
            run = source.runner(layer, plan, name, inputs)
            samples = timer.time(layer, name, run, abort_above_ms=limit)
        except Exception as error:  # noqa: BLE001 - a failing candidate is recorded, not fatal
            timings.append(TacticTiming(name, -1.0, 0, False, f"failed: {error}"))
            continue
        timing = summarize(name, samples, timer.iterations)
        timings.append(timing)
        if _valid(timing):
            best = min(best, timing.median_ms)
    return timings


def select_tactics(
    plan: Plan,
    config: BuilderConfig,
    log: BuildLog,
    timer: Timer | None = None,
    cache: TimingCache | None = None,
    progress: Progress | None = None,
    source: TacticSource | None = None,
) -> SelectionStats:
    """Set ``layer.tactic`` and ``layer.candidates`` for every layer (see the module docstring).

    ``timer`` defaults to a :class:`WallClockTimer` with the config's warm-up and iterations;
    ``cache`` to the config's ``timing_cache_path`` (if any). New timings are saved to the
    cache at the end. ``source`` gives the tactics (default: the NumPy backend's).
    """
    source = source or NumpyTacticSource(config)
    if isinstance(source, NumpyTacticSource):
        check_tactic_sources(config.tactic_sources)
    started = time.perf_counter()
    timer = timer or WallClockTimer(config.timing_warmup, config.timing_iterations)
    if cache is None and config.timing_cache_path:
        cache = TimingCache(config.timing_cache_path)
    for warning in cache.warnings if cache is not None else []:
        log.add(STAGE, warning)
    timed = hits = pinned = single = aborted = 0
    for done, layer in enumerate(plan.layers):
        if progress:
            progress(STAGE, done, len(plan.layers))
        layer.candidates = []
        pin = config.tactic_pin(layer.name)
        if pin is not None:
            refusal = source.why_not(layer, plan, pin)
            if refusal is None:
                layer.tactic = pin
                pinned += 1
                log.add(STAGE, f"tactic {pin} pinned", layer.name)
                continue
            log.add(STAGE, f"pin {pin} ignored: {refusal}", layer.name)
        candidates = source.candidates(layer, plan, config)
        if len(candidates) == 1:
            layer.tactic = candidates[0]
            single += 1
            continue
        key = source.key(layer, plan)
        stored = cache.lookup(key) if cache is not None else None
        if stored is not None:
            by_name = {t.tactic: t for t in stored[0]}
            if all(name in by_name for name in candidates):
                layer.candidates = [by_name[name] for name in candidates]
                layer.tactic, margin = winner_of(layer.candidates)
                hits += 1
                log.add(
                    STAGE,
                    f"tactic {layer.tactic} from timing cache, {len(candidates)} candidates, "
                    f"margin {margin:.0f}%",
                    layer.name,
                )
                continue
        timings = time_candidates(layer, plan, candidates, timer, source)
        if timings is None:
            layer.tactic = "reference"
            log.add(STAGE, "tactic reference kept: input shapes unknown, not timed", layer.name)
            continue
        timed += sum(1 for t in timings if t.samples > 0)
        aborted += sum(1 for t in timings if t.aborted)
        layer.candidates = timings
        layer.tactic, margin = winner_of(timings)
        failed = [t.tactic for t in timings if t.samples == 0]
        note = f" ({', '.join(failed)} failed)" if failed else ""
        log.add(
            STAGE,
            f"tactic {layer.tactic} chosen, {len(candidates)} candidates, margin {margin:.0f}%"
            + note,
            layer.name,
        )
        if cache is not None and not failed:
            cache.store(key, timings, layer.tactic)
    if single:
        log.add(STAGE, f"{single} layers with a single candidate kept it untimed")
    if cache is not None and cache.dirty:
        cache.save()
    if progress:
        progress(STAGE, len(plan.layers), len(plan.layers))
    return SelectionStats(
        len(plan.layers), timed, hits, pinned, single, aborted, time.perf_counter() - started
    )


# --------------------------------------------------------------------------- determinism


@dataclass(frozen=True)
class TacticFlip:
    """A layer whose choice differed between two builds. ``first_margin_pct``: how much
    faster ``first`` was than ``second`` in build 1; ``second_margin_pct``: how much faster
    ``second`` was than ``first`` in build 2 (None where one was not measured)."""

    layer: str
    first: str
    second: str
    first_margin_pct: float | None
    second_margin_pct: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _margin(candidates: list[TacticTiming], winner: str, other: str) -> float | None:
    times = {t.tactic: t.median_ms for t in candidates if t.samples > 0}
    if winner not in times or other not in times or times[winner] <= 0:
        return None
    return (times[other] - times[winner]) / times[winner] * 100.0


def determinism_check(
    model: ir.Model | str | os.PathLike[str],
    config: BuilderConfig | None = None,
    timer_factory: Callable[[], Timer] | None = None,
) -> list[TacticFlip]:
    """Select tactics twice (no timing cache, a fresh timer each time) and report the layers
    whose choice flipped, with the margins each build measured.

    The model is optimized once and lowered twice at the config's optimization shapes;
    precisions are left at their lowering defaults.
    """
    config = (config or BuilderConfig()).with_changes(timing_cache_path=None)
    if timer_factory is None:

        def timer_factory() -> Timer:
            return WallClockTimer(config.timing_warmup, config.timing_iterations)

    if not isinstance(model, ir.Model):
        model = load(model)
    optimized = optimize(model, config.optimization_level, disabled=config.disabled_passes).model
    shapes = {p.input_name: p.opt for p in config.profiles}
    plans = []
    for _ in range(2):
        plan = lower(optimized, shapes)
        select_tactics(plan, config, BuildLog(), timer=timer_factory())
        plans.append(plan)
    flips = []
    for one, two in zip(plans[0].layers, plans[1].layers):
        if one.tactic != two.tactic:
            flips.append(
                TacticFlip(
                    one.name,
                    one.tactic,
                    two.tactic,
                    _margin(one.candidates, one.tactic, two.tactic),
                    _margin(two.candidates, two.tactic, one.tactic),
                )
            )
    return flips


__all__ = [
    "NumpyTacticSource",
    "SelectionStats",
    "TacticFlip",
    "TacticSource",
    "determinism_check",
    "select_tactics",
    "time_candidates",
    "timing_inputs",
    "winner_of",
]
