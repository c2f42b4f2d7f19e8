"""Figures of quantization accuracy: per-layer error against fp32, and calibration histograms.

:func:`layer_error` reads the :class:`engine.quantize.accuracy.LayerError` rows of
``compare_engines`` (one per layer both engines share); :func:`calibration_histogram` one
:class:`engine.quantize.calibrate.TensorCalibration` (``engine.calibration.tensors[name]``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.quantize.accuracy import LayerError, first_divergent
from engine.quantize.calibrate import TensorCalibration
from studio.colors import NEUTRAL_COLOR, calibrator_color, precision_color
from studio.plots_common import (
    TEMPLATE,
    category_ticks,
    empty_figure,
    hover_text,
    precision_legend,
)

#: Bins shown past the largest threshold / |x| of a calibration histogram (context).
HISTOGRAM_MARGIN_BINS = 16


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _error_hover(error: LayerError) -> str:
    sqnr = f"{error.sqnr_db:.4g}" if math.isfinite(error.sqnr_db) else "exact (no error)"
    return hover_text(
        [
            ("index", error.index),
            ("op", error.op),
            ("precision", error.precision),
            ("tensor", error.tensor),
            ("SQNR dB", sqnr),
            ("cosine", f"{error.cosine:.6f}"),
            ("max |error|", error.max_abs),
        ],
        title=error.layer,
    )


def layer_error(errors: Sequence[LayerError], min_cosine: float = 0.999) -> go.Figure:
    """SQNR (dB, top) and cosine similarity (bottom) of every layer in execution order,
    markers coloured by the layer's precision, the ``min_cosine`` tolerance dotted, and the
    first divergent layer (:func:`engine.quantize.accuracy.first_divergent`) marked by a
    vertical line and an annotation named ``first_divergent``; when every layer is within,
    an annotation named ``no_divergence`` says so. Infinite SQNR (an exact layer) is left
    out of the top plot.
    """
    if not errors:
        return empty_figure("Per-layer error", "no layer errors to show")
    rows = sorted(errors, key=lambda e: e.index)
    names = [error.layer for error in rows]
    colors = [precision_color(error.precision) for error in rows]
    hovers = [_error_hover(error) for error in rows]
    figure = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=("SQNR (dB)", "cosine similarity"),
    )
    for row, (metric, values) in enumerate(
        (
            ("sqnr_db", [_finite(e.sqnr_db) for e in rows]),
            ("cosine", [e.cosine for e in rows]),
        ),
        start=1,
    ):
        figure.add_trace(
            go.Scatter(
                x=names,
                y=values,
                mode="lines+markers",
                line={"color": NEUTRAL_COLOR, "width": 1},
                marker={"color": colors, "size": 8},
                hovertext=hovers,
                hoverinfo="text",
                name=metric,
                showlegend=False,
                meta={"kind": metric},
            ),
            row=row,
            col=1,
        )
    for entry in precision_legend(error.precision for error in rows):
        figure.add_trace(entry)
    figure.add_hline(
        y=min_cosine,
        line={"color": "#B2182B", "dash": "dot", "width": 1},
        annotation_text=f"min cosine {min_cosine:g}",
        annotation_position="bottom left",
        row=2,
        col=1,
    )
    first = first_divergent(rows, min_cosine)
    if first is not None:
        figure.add_shape(
            type="line",
            x0=first.layer,
            x1=first.layer,
            xref="x",
            y0=0,
            y1=1,
            yref="paper",
            line={"color": "#B2182B", "width": 2},
            name="first_divergent",
        )
        figure.add_annotation(
            x=first.layer,
            xref="x",
            y=1.0,
            yref="paper",
            yanchor="bottom",
            text=(
                f"first divergent: {html.escape(first.layer)} "
                f"(cosine {first.cosine:.5f} < {min_cosine:g})"
            ),
            showarrow=True,
            arrowcolor="#B2182B",
            name="first_divergent",
        )
    else:
        figure.add_annotation(
            x=0.5,
            xref="paper",
            y=1.0,
            yref="paper",
            yanchor="bottom",
            text=f"every layer has cosine ≥ {min_cosine:g}",
            showarrow=False,
            name="no_divergence",
        )
    figure.update_layout(
        template=TEMPLATE,
        title=f"Per-layer error vs the reference over {len(rows)} layers",
        margin={"t": 110},
        height=600,
    )
    figure.update_xaxes(**category_ticks(names), row=2, col=1)
    return figure


def _chosen_method(calibration: TensorCalibration, chosen: str | None) -> str | None:
    if chosen is not None:
        return chosen
    for method, value in calibration.thresholds.items():
        if value == calibration.threshold:
            return method
    return None


def calibration_histogram(
    tensor_calibration: TensorCalibration, chosen: str | None = None
) -> go.Figure:
    """The tensor's |x| histogram (bar per bin, log y) with one vertical line per calibrator
    threshold (shapes named after the method, in the legend), the chosen one solid and thick.

    ``chosen`` names the chosen method (e.g. ``engine.calibration.calibrator``); by default it
    is the method whose threshold equals ``tensor_calibration.threshold``. Bins past the
    largest threshold or |x| (plus :data:`HISTOGRAM_MARGIN_BINS`) are not drawn.
    """
    calibration = tensor_calibration
    histogram = calibration.histogram
    method = _chosen_method(calibration, chosen)
    counts = np.asarray(histogram.counts)
    width = histogram.bin_width
    top = max([histogram.amax, *calibration.thresholds.values()])
    nonzero = np.flatnonzero(counts)
    last = int(nonzero[-1]) + 1 if nonzero.size else 1
    if width > 0:
        last = max(last, math.ceil(top / width))
    shown = min(histogram.num_bins, last + HISTOGRAM_MARGIN_BINS)
    centres = histogram.centres[:shown] if width > 0 else np.zeros(1)
    figure = go.Figure(
        layout={
            "template": TEMPLATE,
            "title": (
                f"|x| of {html.escape(calibration.name)}: {histogram.count} values, "
                f"max {histogram.amax:.4g}; threshold {calibration.threshold:.4g}"
                f" ({html.escape(method or 'given')}), scale {calibration.scale:.4g}"
            ),
            "xaxis": {"title": "|x|"},
            "yaxis": {"title": "count", "type": "log"},
            "bargap": 0,
        }
    )
    figure.add_trace(
        go.Bar(
            x=centres.tolist(),
            y=counts[: len(centres)].tolist(),
            width=width if width > 0 else None,
            marker={"color": NEUTRAL_COLOR, "line": {"width": 0}},
            name="|x| histogram",
            hovertemplate="|x| ≈ %{x:.4g}: %{y} values<extra></extra>",
            meta={"kind": "histogram"},
        )
    )
    ordered = sorted(calibration.thresholds.items(), key=lambda item: item[0] != method)
    for name, value in ordered:  # the chosen line first: the dashed ones stay visible on it
        emphasised = name == method
        figure.add_shape(
            type="line",
            x0=value,
            x1=value,
            y0=0,
            y1=1,
            yref="paper",
            line={
                "color": calibrator_color(name),
                "width": 4 if emphasised else 1.5,
                "dash": "solid" if emphasised else "dash",
            },
            name=html.escape(f"{name} {value:.4g}" + (" (chosen)" if emphasised else "")),
            showlegend=True,
            legendgroup=name,
        )
    return figure
