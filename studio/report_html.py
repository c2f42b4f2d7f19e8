"""The standalone HTML report of a session: one offline file, nothing loaded from elsewhere.

:func:`write_report_html` writes a session payload (studio.schema) and a set of plotly figures
as one HTML document: a summary (inputs, outputs, engine totals), the optimized graph as SVG
(studio.graph_svg, the final step), the rewrite timeline (step, pass, rule, nodes removed ->
added, estimated latency before/after), the per-layer table of the engine (layer, op,
precision, tactic, measured latency, why that precision) and the figures. plotly.js is
embedded once, with the first figure; the others reuse it. A Content-Security-Policy meta tag
keeps the page from loading or sending anything (no network sources at all). Every text that
comes from the model or the caller is HTML-escaped; plotly escapes its own JSON. The file is
written to a temporary file beside ``path`` and moved over it, so a reader never sees half a
report.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from studio.graph_svg import graph_svg

#: The report's own policy: inline scripts/styles only, images from data:/blob:, no network.
REPORT_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src data: blob:; font-src data:; connect-src 'none'; "
    "base-uri 'none'; form-action 'none'"
)

#: plotly config of every figure: no logo link and no "share chart" button (it uploads the
#: chart to Plotly Cloud); downloading a PNG stays, it is local.
PLOTLY_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "displaylogo": False,
        "showSendToCloud": False,
        "modeBarButtonsToRemove": ("sendDataToCloud",),
        "responsive": True,
    }
)

#: Node names listed per timeline row before "+ n more".
NAMES_PER_STEP = 4

_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.graph { max-height: 900px; overflow: auto; border: 1px solid #ddd; }
.names { font-family: monospace; font-size: 0.9em; }
.muted { color: #777; }
"""


def _text(value: Any) -> str:
    """``value`` as escaped HTML text (None -> empty)."""
    return "" if value is None else html.escape(str(value))


def _ms(value: Any) -> str:
    """A latency in milliseconds with 4 significant digits, or an empty cell."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return ""
    return f"{value:.4g}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    """An HTML table; cells are already escaped HTML, columns in ``numeric`` right-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{cell}</td>' if index in numeric else f"<td>{cell}</td>"
            for index, cell in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(html.escape(str(name)) for name in names[:NAMES_PER_STEP])
    more = len(names) - NAMES_PER_STEP
    return shown + (f' <span class="muted">+ {more} more</span>' if more > 0 else "")


def timeline_table(steps: Sequence[Mapping[str, Any]]) -> str:
    """The rewrite timeline: one row per recorded step (Step.to_json form)."""
    rows = []
    for position, step in enumerate(steps):
        removed, added = list(step.get("removed", [])), list(step.get("added", []))
        change = (
            f"{len(removed)} → {len(added)}"
            f'<div class="names">{_names(removed)} → {_names(added)}</div>'
        )
        before, after = step.get("before") or {}, step.get("after") or {}
        rows.append(
            [
                _text(step.get("index", position)),
                _text(step.get("pass")),
                _text(step.get("rule") or ""),
                change,
                _ms(before.get("latency_ms")),
                _ms(after.get("latency_ms")),
            ]
        )
    headers = ["step", "pass", "rule", "removed → added", "est. before (ms)", "est. after (ms)"]
    return _table(headers, rows, numeric={0, 4, 5})


def layer_table(layers: Mapping[str, Mapping[str, Any]]) -> str:
    """The engine's layers (payload ``layers``, plan order): op, precision, tactic, latency."""
    rows = []
    for name, facts in layers.items():
        op = _text(facts.get("op"))
        if facts.get("role") not in (None, "compute"):
            op += f' <span class="muted">({_text(facts.get("role"))})</span>'
        rows.append(
            [
                _text(name),
                op,
                _text(facts.get("precision")),
                _text(facts.get("tactic")),
                _ms(facts.get("latency_ms")),
                _text(facts.get("precision_reason")),
            ]
        )
    headers = ["layer", "op", "precision", "tactic", "latency (ms)", "reason"]
    return _table(headers, rows, numeric={4})


def _summary(payload: Mapping[str, Any]) -> str:
    """Inputs, outputs and the engine totals as a definition table."""

    def tensors(items: Sequence[Mapping[str, Any]]) -> str:
        return "<br>".join(
            f"{_text(t.get('name'))}: {_text(t.get('dtype'))} {_text(t.get('shape'))}"
            for t in items
        )

    steps = payload.get("steps", [])
    rows = [
        ["inputs", tensors(payload.get("inputs", []))],
        ["outputs", tensors(payload.get("outputs", []))],
        ["rewrites", _text(f"{payload.get('current_step', 0)} of {len(steps)} steps applied")],
    ]
    engine = payload.get("engine")
    if engine:
        precisions = ", ".join(f"{k}: {v}" for k, v in sorted(engine["precisions"].items()))
        rows += [
            ["end-to-end latency (ms)", _ms(engine.get("latency_ms")) or "not profiled"],
            ["activation arena", _text(f"{engine.get('arena_bytes', 0):,} bytes")],
            ["without reuse", _text(f"{engine.get('naive_bytes', 0):,} bytes")],
            ["layer precisions", _text(precisions)],
            ["first divergent layer", _text(engine.get("first_divergent") or "none")],
        ]
    return _table(["", ""], rows, numeric=set())


def _figures(figures: Mapping[str, Any]) -> str:
    """Each figure under its (escaped) title; plotly.js is embedded with the first only."""
    import plotly.io as pio

    parts = []
    for index, (title, figure) in enumerate(figures.items()):
        div = pio.to_html(
            figure,
            include_plotlyjs=index == 0,
            full_html=False,
            div_id=f"gie-figure-{index}",
            default_height="480px",
            config=dict(PLOTLY_CONFIG),
        )
        parts.append(f"<h3>{_text(title)}</h3>{div}")
    return "".join(parts)


def report_html(
    payload: Mapping[str, Any], figures: Mapping[str, Any], title: str = "GIE Studio report"
) -> str:
    """The report document as a string (see the module docstring)."""
    steps = payload.get("steps", [])
    layers = payload.get("layers") or {}
    overlay = payload.get("overlay", "family") if layers else "family"
    sections = [
        f"<h1>{_text(title)}</h1>",
        f'<p class="muted">{_text(payload.get("title", ""))}</p>',
        _summary(payload),
        f"<h2>Optimized graph (after step {len(steps)}, coloured by {_text(overlay)})</h2>",
        f'<div class="graph">{graph_svg(payload, step=len(steps), overlay=overlay)}</div>',
        f"<h2>Rewrite timeline ({len(steps)} steps)</h2>",
        timeline_table(steps) if steps else '<p class="muted">no rewrites</p>',
        f"<h2>Engine layers ({len(layers)})</h2>",
        layer_table(layers) if layers else '<p class="muted">no engine built</p>',
    ]
    if figures:
        sections += ["<h2>Figures</h2>", _figures(figures)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{REPORT_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_text(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )


def write_report_html(
    path: str | os.PathLike[str],
    payload: Mapping[str, Any],
    figures: Mapping[str, Any],
    title: str = "GIE Studio report",
) -> Path:
    """Write the report of ``payload`` with ``figures`` (title -> plotly Figure) to ``path``
    atomically (a temporary file in the same folder, then ``os.replace``); returns the path."""
    target = Path(path)
    text = report_html(payload, figures, title)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


__all__ = ["REPORT_CSP", "layer_table", "report_html", "timeline_table", "write_report_html"]
