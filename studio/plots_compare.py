"""Comparing N engines of one model layer by layer, aligned by their original ONNX nodes.

Two engines of the same model rarely have the same layers: one fuses Conv+BN+ReLU into a
ConvAct, another into a QConv, a third keeps the ReLU apart. Every layer names the original
nodes it came from (its *origins*), so layers are aligned through them: two layers (of any
engines) belong to the same :class:`AlignedGroup` when they share an origin, transitively
(connected components of the "shares an origin" relation). Within a group each engine's time
is the sum of its layers' median latencies; the group's speedup of an engine is the baseline
engine's time over that engine's time. Conversion layers (no origins) cannot be aligned and are
dropped; their cost shows in the end-to-end numbers only.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.report import ProfileReport
from studio.colors import CATEGORICAL_COLORS, PRECISION_COLORS, precision_color
from studio.plots_common import TEMPLATE, category_ticks, empty_figure, hover_text


@dataclass(frozen=True)
class AlignedGroup:
    """Layers of several engines that computed the same original nodes.

    ``origins``: the original ONNX node names, in first-seen order; ``layers``: engine name ->
    its layers in the group (absent engines have none); ``ms``: engine name -> the sum of those
    layers' median latencies (ms).
    """

    origins: tuple[str, ...]
    layers: dict[str, tuple[str, ...]]
    ms: dict[str, float]

    def speedup(self, baseline: str, engine: str) -> float | None:
        """Baseline time over ``engine``'s time; None when either has no layer here or
        ``engine`` took 0 ms."""
        if not self.layers.get(baseline) or not self.layers.get(engine):
            return None
        spent = self.ms[engine]
        return self.ms[baseline] / spent if spent > 0 else None


class _Components:
    """Union-find over origin names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        root = name
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[name] != root:
            self.parent[name], name = root, self.parent[name]
        return root

    def union(self, names: tuple[str, ...]) -> None:
        first = self.find(names[0])
        for name in names[1:]:
            other = self.find(name)
            if other != first:
                self.parent[other] = first


def align_layers(reports: Mapping[str, ProfileReport], order_by: str) -> list[AlignedGroup]:
    """The aligned groups of ``reports`` (see the module docstring), in the execution order of
    the ``order_by`` engine's first layer in each group; groups it has no layer in follow, in
    order of first appearance over the other reports."""
    components = _Components()
    for report in reports.values():
        for row in report.layers:
            if row.origins:
                components.union(row.origins)
    origins: dict[str, dict[str, None]] = {}
    layers: dict[str, dict[str, list[str]]] = {}
    ms: dict[str, dict[str, float]] = {}
    order = [order_by, *(name for name in reports if name != order_by)]
    for name in order:
        for row in reports[name].layers:
            if not row.origins:
                continue
            root = components.find(row.origins[0])
            origins.setdefault(root, {}).update(dict.fromkeys(row.origins))
            layers.setdefault(root, {}).setdefault(name, []).append(row.layer)
            ms.setdefault(root, {})
            ms[root][name] = ms[root].get(name, 0.0) + row.latency_ms_median
    return [
        AlignedGroup(
            origins=tuple(origins[root]),
            layers={name: tuple(found) for name, found in layers[root].items()},
            ms=dict(ms[root]),
        )
        for root in origins
    ]


def engine_color(name: str, position: int) -> str:
    """A precision's colour for an engine named after one (``fp32``, ``int8``...), else the
    ``position``-th categorical colour."""
    if name.lower() in PRECISION_COLORS:
        return precision_color(name)
    return CATEGORICAL_COLORS[position % len(CATEGORICAL_COLORS)]


def _labels(groups: list[AlignedGroup], baseline: str) -> list[str]:
    """Unique x labels: the baseline's layer names (else another engine's), joined by ' + '."""
    labels: list[str] = []
    seen: set[str] = set()
    for group in groups:
        names = group.layers.get(baseline) or next(iter(group.layers.values()))
        label = " + ".join(names)
        while label in seen:
            label += "'"
        seen.add(label)
        labels.append(label)
    return labels


def engine_comparison(reports: Mapping[str, ProfileReport], baseline: str) -> go.Figure:
    """Per aligned group: each engine's time (top, ms) and each other engine's speedup over
    ``baseline`` (bottom; above the dotted 1 is faster), with the end-to-end speedups in the title.

    Speedup traces have ``meta={"kind": "speedup", "engine": name}`` and, per bar, the group's
    origins as ``customdata``; time traces ``meta={"kind": "time", "engine": name}``. A group
    an engine has no layer in shows no bar for it.
    """
    if baseline not in reports:
        raise KeyError(f"baseline {baseline!r} is not among the engines {sorted(reports)}")
    groups = align_layers(reports, baseline)
    if not groups:
        return empty_figure("Engine comparison", "no layer has origins to align")
    labels = _labels(groups, baseline)
    others = [name for name in reports if name != baseline]
    base_e2e = reports[baseline].end_to_end.median_ms
    summary = ", ".join(
        f"{html.escape(name)} {base_e2e / reports[name].end_to_end.median_ms:.2f}x"
        for name in others
        if reports[name].end_to_end.median_ms > 0
    )
    figure = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=("time per aligned group (ms)", f"speedup vs {html.escape(baseline)}"),
    )
    for position, name in enumerate(reports):
        color = engine_color(name, position)
        figure.add_trace(
            go.Bar(
                x=labels,
                y=[group.ms.get(name) for group in groups],
                name=html.escape(name),
                legendgroup=name,
                marker={"color": color},
                hovertext=[_group_hover(group, name) for group in groups],
                hoverinfo="text",
                meta={"kind": "time", "engine": name},
            ),
            row=1,
            col=1,
        )
    for position, name in enumerate(reports):
        if name == baseline:
            continue
        figure.add_trace(
            go.Bar(
                x=labels,
                y=[group.speedup(baseline, name) for group in groups],
                name=f"{html.escape(name)} speedup",
                legendgroup=name,
                showlegend=False,
                marker={"color": engine_color(name, position)},
                customdata=[list(group.origins) for group in groups],
                hovertext=[
                    _group_hover(group, name)
                    + f"<br>speedup vs {html.escape(baseline)}: "
                    + _format_speedup(group.speedup(baseline, name))
                    for group in groups
                ],
                hoverinfo="text",
                meta={"kind": "speedup", "engine": name},
            ),
            row=2,
            col=1,
        )
    figure.add_hline(y=1.0, line={"color": "#333333", "dash": "dot", "width": 1}, row=2, col=1)
    figure.update_layout(
        template=TEMPLATE,
        barmode="group",
        height=650,
        title=f"{len(reports)} engines over {len(groups)} aligned groups; end to end vs "
        f"{html.escape(baseline)}: {summary or 'no other engine'}",
    )
    figure.update_xaxes(**category_ticks(labels), row=2, col=1)
    figure.update_yaxes(title="ms", row=1, col=1)
    figure.update_yaxes(title="speedup (x)", row=2, col=1)
    return figure


def _format_speedup(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}x"


def _group_hover(group: AlignedGroup, engine: str) -> str:
    layers = group.layers.get(engine, ())
    return hover_text(
        [
            ("layers", ", ".join(layers) or "(none)"),
            ("ms", group.ms.get(engine, 0.0)),
            ("origins", ", ".join(group.origins)),
        ],
        title=engine,
    )
