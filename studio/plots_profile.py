"""Figures of one engine's profile report: per-layer latency, where time goes, the roofline.

Every function takes an :class:`engine.report.ProfileReport` and returns a new
``plotly.graph_objects.Figure`` (never shown). Latencies are the per-layer medians of the
profiling pass, in milliseconds. Colours come from :mod:`studio.colors` (conversion layers
are coloured ``reformat``).
"""

from __future__ import annotations

import html

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.report import LayerProfile, ProfileReport
from studio.colors import family_color, precision_color
from studio.plots_common import (
    TEMPLATE,
    category_ticks,
    color_key,
    empty_figure,
    hover_text,
    op_family,
    ordered_keys,
    precision_legend,
)


def _layer_hover(row: LayerProfile) -> str:
    return hover_text(
        [
            ("op", row.op),
            ("precision", color_key(row)),
            ("tactic", row.tactic),
            ("median ms", row.latency_ms_median),
            ("mean ms", row.latency_ms_mean),
            ("origins", ", ".join(row.origins) or "(none)"),
        ],
        title=row.layer,
    )


def layer_latency(report: ProfileReport) -> go.Figure:
    """One bar per layer (its median latency, ms), slowest first, coloured by precision.

    The data trace (``meta={"kind": "layers"}``) has the layers in bar order; the legend
    traces name the precisions present. Hover: op, precision, tactic, latencies, origins.
    """
    if not report.layers:
        return empty_figure("Per-layer latency", "the report has no layers")
    rows = sorted(report.layers, key=lambda r: r.latency_ms_median, reverse=True)
    keys = [color_key(row) for row in rows]
    figure = go.Figure(
        layout={
            "template": TEMPLATE,
            "title": (
                f"Per-layer latency: {len(rows)} layers, sum of medians "
                f"{report.layer_ms_total:.3f} ms, end to end {report.end_to_end.median_ms:.3f} ms"
            ),
            "xaxis": {"title": "layer (slowest first)", **category_ticks([r.layer for r in rows])},
            "yaxis": {"title": "median latency (ms)"},
            "bargap": 0.15,
        }
    )
    figure.add_trace(
        go.Bar(
            x=[row.layer for row in rows],
            y=[row.latency_ms_median for row in rows],
            marker={"color": [precision_color(key) for key in keys]},
            hovertext=[_layer_hover(row) for row in rows],
            hoverinfo="text",
            name="layers",
            showlegend=False,
            meta={"kind": "layers"},
        )
    )
    for entry in precision_legend(keys):
        figure.add_trace(entry)
    return figure


def latency_sunburst(report: ProfileReport) -> go.Figure:
    """Where time goes: op types (inner ring, coloured by op family) split into their layers
    (outer ring, coloured by precision), every sector sized by median latency (ms).

    Sector ids are ``op:<op>`` and ``layer:<layer>``; op sectors carry no value of their own
    (``branchvalues="remainder"``), so each is exactly the sum of its layers.
    """
    if not report.layers:
        return empty_figure("Latency by op type", "the report has no layers")
    ops: dict[str, list[LayerProfile]] = {}
    for row in report.layers:
        ops.setdefault(row.op, []).append(row)
    ids: list[str] = []
    labels: list[str] = []
    parents: list[str] = []
    values: list[float] = []
    colors: list[str] = []
    hovers: list[str] = []
    for op, rows in sorted(
        ops.items(), key=lambda item: -sum(r.latency_ms_median for r in item[1])
    ):
        family = op_family(op)
        total = sum(r.latency_ms_median for r in rows)
        ids.append(f"op:{op}")
        labels.append(op)
        parents.append("")
        values.append(0.0)
        colors.append(family_color(family))
        hovers.append(
            hover_text([("family", family), ("layers", len(rows)), ("total ms", total)], op)
        )
        for row in rows:
            ids.append(f"layer:{row.layer}")
            labels.append(row.layer)
            parents.append(f"op:{op}")
            values.append(row.latency_ms_median)
            colors.append(precision_color(color_key(row)))
            hovers.append(_layer_hover(row))
    return go.Figure(
        go.Sunburst(
            ids=ids,
            labels=labels,
            parents=parents,
            values=values,
            branchvalues="remainder",
            marker={"colors": colors},
            hovertext=hovers,
            hoverinfo="text",
            meta={"kind": "sunburst"},
        ),
        layout={
            "template": TEMPLATE,
            "title": f"Latency by op type ({report.layer_ms_total:.3f} ms over "
            f"{len(report.layers)} layers)",
        },
    )


def precision_mix(report: ProfileReport) -> go.Figure:
    """Two pies: how many layers, and how much median time (ms), each precision has
    (conversion layers as ``reformat``)."""
    if not report.layers:
        return empty_figure("Precision mix", "the report has no layers")
    keys = ordered_keys(color_key(row) for row in report.layers)
    counts = {key: 0 for key in keys}
    times = {key: 0.0 for key in keys}
    for row in report.layers:
        counts[color_key(row)] += 1
        times[color_key(row)] += row.latency_ms_median
    figure = make_subplots(
        rows=1,
        cols=2,
        specs=[[{"type": "domain"}, {"type": "domain"}]],
        subplot_titles=("layers", "time (ms, sum of medians)"),
    )
    colors = [precision_color(key) for key in keys]
    for column, (kind, data) in enumerate((("count", counts), ("time", times)), start=1):
        figure.add_trace(
            go.Pie(
                labels=keys,
                values=[data[key] for key in keys],
                marker={"colors": colors},
                sort=False,
                hole=0.35,
                name=kind,
                textinfo="label+percent",
                textposition="inside",
                meta={"kind": kind},
            ),
            row=1,
            col=column,
        )
    figure.update_layout(template=TEMPLATE, title="Precision mix: layers and time")
    return figure


def roofline(report: ProfileReport, peak_gflops: float, bandwidth_gbs: float) -> go.Figure:
    """Achieved GFLOP/s against arithmetic intensity (FLOP per byte), log-log, under the
    roofline ``min(peak_gflops, bandwidth_gbs * intensity)``.

    One marker trace per precision (``meta={"kind": "layers"}``); layers without FLOPs or
    bytes (or with zero of either) are skipped. The roofline trace has ``meta={"kind":
    "roofline"}`` and bends at the ridge point ``peak_gflops / bandwidth_gbs``.
    """
    if peak_gflops <= 0 or bandwidth_gbs <= 0:
        raise ValueError(
            f"roofline needs a positive peak and bandwidth, got {peak_gflops} GFLOP/s and "
            f"{bandwidth_gbs} GB/s"
        )
    rows = [r for r in report.layers if r.flops and r.bytes and r.gflops is not None]
    if not rows:
        return empty_figure("Roofline", "no layer has both FLOPs and bytes")
    ridge = peak_gflops / bandwidth_gbs
    intensities = [row.flops / row.bytes for row in rows]  # type: ignore[operator]
    low = min([*intensities, ridge]) / 2
    high = max([*intensities, ridge]) * 2
    figure = go.Figure(
        layout={
            "template": TEMPLATE,
            "title": f"Roofline: peak {peak_gflops:g} GFLOP/s, {bandwidth_gbs:g} GB/s "
            f"(ridge at {ridge:.3g} FLOP/B)",
            "xaxis": {"title": "arithmetic intensity (FLOP/byte)", "type": "log"},
            "yaxis": {"title": "achieved GFLOP/s", "type": "log"},
        }
    )
    figure.add_trace(
        go.Scatter(
            x=[low, ridge, high],
            y=[bandwidth_gbs * low, peak_gflops, peak_gflops],
            mode="lines",
            line={"color": "#333333", "width": 2},
            name="roofline",
            hoverinfo="skip",
            meta={"kind": "roofline"},
        )
    )
    by_key: dict[str, list[tuple[LayerProfile, float]]] = {}
    for row, intensity in zip(rows, intensities):
        by_key.setdefault(color_key(row), []).append((row, intensity))
    for key in ordered_keys(by_key):
        points = by_key[key]
        figure.add_trace(
            go.Scatter(
                x=[intensity for _, intensity in points],
                y=[row.gflops for row, _ in points],
                mode="markers",
                marker={"color": precision_color(key), "size": 9, "line": {"width": 0.5}},
                name=html.escape(key),
                hovertext=[
                    _layer_hover(row) + f"<br>FLOP/byte: {intensity:.4g}<br>GFLOP/s: "
                    f"{row.gflops:.4g}"
                    for row, intensity in points
                ],
                hoverinfo="text",
                customdata=[row.layer for row, _ in points],
                meta={"kind": "layers"},
            )
        )
    return figure
