"""Figures of how an engine was made: its activation memory over time and the optimizer's time.

:func:`memory_timeline` reads an engine's :class:`engine.build.memory.MemoryPlan` (liveness
intervals and value sizes); :func:`build_timeline` the optimizer's recorded
:class:`engine.passes.step.Step` list (and optionally the build log).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.build.log import BuildLog
from engine.passes.step import Step
from engine.runtime import Engine
from studio.colors import CATEGORICAL_COLORS, PRECISION_COLORS
from studio.plots_common import TEMPLATE, empty_figure, hover_text


def naive_allocated_bytes(engine: Engine) -> list[int]:
    """Bytes a planner without reuse would hold at each layer: every planned value gets its
    own buffer when it is defined and keeps it to the end (the last entry is the plan's
    ``naive_bytes``)."""
    memory = engine.memory
    allocated = [0] * len(engine.plan.layers)
    for name, size in memory.sizes.items():
        first = memory.intervals[name][0]
        if 0 <= first < len(allocated):
            allocated[first] += size
    total = 0
    for index, added in enumerate(allocated):
        total += added
        allocated[index] = total
    return allocated


def memory_timeline(engine: Engine) -> go.Figure:
    """Activation bytes over execution order (x: layer index, hover: the layer).

    Traces (by ``meta["kind"]``): ``live`` — bytes of the arena buffers live at each layer
    (the plan's ``live_bytes``); ``naive`` — bytes held without any reuse
    (:func:`naive_allocated_bytes`). Dotted lines mark the arena size and the naive sum.
    """
    memory = engine.memory
    layers = engine.plan.layers
    if not layers:
        return empty_figure("Activation memory", "the engine has no layers")
    x = [layer.index for layer in layers]
    hovers = [
        hover_text([("op", layer.qualified_op), ("precision", layer.precision.value)], layer.name)
        for layer in layers
    ]
    live = list(memory.live_bytes) or [0] * len(layers)
    naive = naive_allocated_bytes(engine)
    figure = go.Figure(
        layout={
            "template": TEMPLATE,
            "title": (
                f"Activation memory: arena {memory.arena_bytes:,} B vs naive "
                f"{memory.naive_bytes:,} B ({100 * memory.ratio:.1f}%), peak live "
                f"{memory.peak_live_bytes:,} B"
            ),
            "xaxis": {"title": "layer (execution order)"},
            "yaxis": {"title": "bytes"},
            "hovermode": "x unified",
        }
    )
    for kind, values, label, color, fill in (
        ("naive", naive, "allocated without reuse", CATEGORICAL_COLORS[5], None),
        ("live", live, "live in the arena plan", PRECISION_COLORS["fp32"], "tozeroy"),
    ):
        figure.add_trace(
            go.Scatter(
                x=x,
                y=values,
                mode="lines",
                line={"shape": "hv", "color": color, "width": 2},
                fill=fill,
                name=label,
                hovertext=hovers,
                hovertemplate="%{y:,} B<br>%{hovertext}<extra>" + label + "</extra>",
                meta={"kind": kind},
            )
        )
    for value, label in (
        (memory.arena_bytes, f"arena {memory.arena_bytes:,} B"),
        (memory.naive_bytes, f"naive sum {memory.naive_bytes:,} B"),
    ):
        figure.add_hline(
            y=value,
            line={"color": "#333333", "dash": "dot", "width": 1},
            annotation_text=label,
            annotation_position="top left",
        )
    return figure


@dataclass(frozen=True)
class PassTime:
    """Optimizer time of one pass: ``seconds`` summed over its ``steps`` recorded steps,
    ``rules`` the distinct rules that fired (in order)."""

    name: str
    seconds: float
    steps: int
    rules: tuple[str, ...]


def _step_fields(step: Step | Mapping[str, Any]) -> tuple[str, float, str | None]:
    if isinstance(step, Step):
        return step.pass_name, step.seconds, step.rule
    return str(step["pass"]), float(step.get("seconds", 0.0)), step.get("rule")


def pass_times(steps: Sequence[Step | Mapping[str, Any]]) -> list[PassTime]:
    """Steps grouped by pass in order of first appearance (steps may be Step records or
    their ``to_json()`` dicts, as in the session payload)."""
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    rules: dict[str, dict[str, None]] = {}
    for step in steps:
        name, spent, rule = _step_fields(step)
        seconds[name] = seconds.get(name, 0.0) + spent
        counts[name] = counts.get(name, 0) + 1
        rules.setdefault(name, {})
        if rule:
            rules[name][rule] = None
    return [PassTime(name, seconds[name], counts[name], tuple(rules[name])) for name in seconds]


def build_timeline(
    steps: Sequence[Step | Mapping[str, Any]], build_log: BuildLog | None = None
) -> go.Figure:
    """Seconds the optimizer spent per pass (sum of its steps' ``seconds``), one horizontal
    bar per pass, first pass on top (trace ``meta={"kind": "passes"}``).

    With a ``build_log``, a second panel counts the builder's decisions per stage (in order
    of first appearance, trace ``meta={"kind": "decisions"}``); the log records no times.
    """
    times = pass_times(steps)
    if not times and build_log is None:
        return empty_figure("Optimizer time per pass", "no steps were recorded")
    total = sum(t.seconds for t in times)
    title = f"Optimizer time per pass: {total:.4f} s over {len(steps)} steps"
    bars = go.Bar(
        y=[t.name for t in times],
        x=[t.seconds for t in times],
        orientation="h",
        marker={"color": PRECISION_COLORS["fp32"]},
        hovertext=[
            hover_text(
                [("seconds", t.seconds), ("steps", t.steps), ("rules", ", ".join(t.rules) or "-")],
                t.name,
            )
            for t in times
        ],
        hoverinfo="text",
        name="seconds per pass",
        showlegend=False,
        meta={"kind": "passes"},
    )
    if build_log is None:
        figure = go.Figure(bars)
        figure.update_yaxes(autorange="reversed", title="pass", automargin=True)
        figure.update_xaxes(title="seconds")
        figure.update_layout(template=TEMPLATE, title=title)
        return figure
    stages: dict[str, int] = {}
    for entry in build_log.entries:
        stages[entry.stage] = stages.get(entry.stage, 0) + 1
    figure = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.6, 0.4],
        horizontal_spacing=0.18,
        subplot_titles=("optimizer seconds per pass", "build decisions per stage"),
    )
    figure.add_trace(bars, row=1, col=1)
    figure.add_trace(
        go.Bar(
            y=list(stages),
            x=list(stages.values()),
            orientation="h",
            marker={"color": CATEGORICAL_COLORS[0]},
            hovertext=[
                f"{html.escape(stage)}: {count} log entries" for stage, count in stages.items()
            ],
            hoverinfo="text",
            name="decisions per stage",
            showlegend=False,
            meta={"kind": "decisions"},
        ),
        row=1,
        col=2,
    )
    figure.update_yaxes(autorange="reversed", automargin=True)
    figure.update_xaxes(title="seconds", row=1, col=1)
    figure.update_xaxes(title="log entries", row=1, col=2)
    figure.update_layout(template=TEMPLATE, title=title)
    return figure
