"""Helpers the plot modules share: hover text, a row's colour key, op families, legend keys.

Plotly renders trace data (category names, labels) as text, but hover text, titles and
annotations are plotly's pseudo-HTML: every model string that goes into them passes through
:func:`hover_text` / :func:`html.escape` first.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

import plotly.graph_objects as go

from engine.ops.registry import default_registry
from engine.report import LayerProfile
from studio.colors import PRECISION_COLORS, precision_color

#: Plotly template of every figure (white background, light grid).
TEMPLATE = "plotly_white"

#: Name prefix of the conversion layers the builder inserts (engine/build/reformat.py).
REFORMAT_PREFIX = "reformat:"


def hover_text(pairs: Sequence[tuple[str, object]], title: str | None = None) -> str:
    """Hover text: an optional bold title, then one ``key: value`` line per pair, every model
    string escaped (values are formatted with ``str``; floats with 4 significant digits)."""
    lines = [f"<b>{html.escape(title)}</b>"] if title is not None else []
    for key, value in pairs:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{html.escape(key)}: {html.escape(shown)}")
    return "<br>".join(lines)


#: Longest category tick label; longer layer names show their tail after an ellipsis (the
#: hover and the data keep the whole name).
TICK_LABEL_CHARS = 36


def short_label(name: str, limit: int = TICK_LABEL_CHARS) -> str:
    """``name``, or its last ``limit - 1`` characters after an ellipsis when longer (layer
    names share long scope prefixes; their tails tell them apart)."""
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def category_ticks(names: Sequence[str]) -> dict[str, object]:
    """Axis settings that label each category with :func:`short_label` of its name."""
    return {
        "tickmode": "array",
        "tickvals": list(names),
        "ticktext": [short_label(name) for name in names],
        "tickangle": -45,
        "automargin": True,
    }


def is_reformat(row: LayerProfile) -> bool:
    """Whether a report row is a conversion layer the builder inserted (no ONNX origins)."""
    return not row.origins and row.layer.startswith(REFORMAT_PREFIX)


def color_key(row: LayerProfile) -> str:
    """The palette key of a row: ``reformat`` for a conversion layer, else its precision."""
    return "reformat" if is_reformat(row) else row.precision


def ordered_keys(keys: Iterable[str]) -> list[str]:
    """Distinct keys in palette order (fp32, tf32, fp16, int8, reformat), unknown ones after
    in order of appearance."""
    seen = list(dict.fromkeys(keys))
    known = [k for k in PRECISION_COLORS if k in seen]
    return known + [k for k in seen if k not in PRECISION_COLORS]


def op_family(op: str) -> str:
    """The registry family of a report's op (``Conv`` or ``gie::QConv``); ``misc`` if the
    registry does not know it."""
    domain, _, op_type = op.rpartition("::")
    spec = default_registry().lookup(op_type, domain)
    return spec.family if spec is not None else "misc"


def legend_entry(name: str, color: str, symbol: str = "square") -> go.Scatter:
    """A trace that shows only a legend entry (for figures whose data trace colours each
    point separately)."""
    return go.Scatter(
        x=[None],
        y=[None],
        mode="markers",
        marker={"color": color, "symbol": symbol, "size": 10},
        name=name,
        showlegend=True,
        hoverinfo="skip",
        meta={"kind": "legend"},
    )


def precision_legend(keys: Iterable[str]) -> list[go.Scatter]:
    """Legend-only traces for the precision keys used, in palette order."""
    return [legend_entry(key, precision_color(key)) for key in ordered_keys(keys)]


def empty_figure(title: str, message: str) -> go.Figure:
    """A figure with no data and a centred note (a report with nothing to plot)."""
    figure = go.Figure(layout={"template": TEMPLATE, "title": html.escape(title)})
    figure.add_annotation(
        text=html.escape(message), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False
    )
    return figure
