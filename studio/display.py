"""How a session shows itself in a notebook: our MIME type plus fallbacks that read anywhere.

``mimebundle(payload)`` returns:

* ``application/vnd.gie.session+json``: the payload (studio.schema); the JupyterLab extension
  renders the interactive graph and timeline from it, also from a saved notebook with no kernel;
* ``text/html``: a static view for nbconvert, GitHub and VS Code: the graph at the session's
  step as SVG (studio.graph_svg), the engine summary and the rewrite timeline as a table;
* ``text/plain``: one paragraph (model, steps applied, engine totals).

Every string that comes from the model is escaped before it reaches the HTML.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from studio.schema import MIME_TYPE

#: Timeline rows shown in the HTML fallback (the rest are summarised in one line).
HTML_STEP_ROWS = 40


def text_summary(payload: Mapping[str, Any]) -> str:
    """The text/plain form."""
    steps = len(payload["steps"])
    engine = payload.get("engine")
    text = (
        f"GIE Studio session: {payload['title']} — {payload['current_step']} of {steps} "
        "optimizer steps applied"
    )
    if engine:
        mix = ", ".join(f"{n} {p}" for p, n in sorted(engine["precisions"].items()))
        latency = engine.get("latency_ms")
        timing = f", {latency:.3f} ms median" if latency is not None else ""
        text += f"; engine: {mix}{timing}, arena {engine['arena_bytes']} bytes"
    return text


def _timeline_rows(payload: Mapping[str, Any]) -> str:
    rows = []
    for step in payload["steps"][:HTML_STEP_ROWS]:
        marker = "&#9654;" if step["index"] == payload["current_step"] - 1 else ""
        removed = html.escape(", ".join(step["removed"][:4]))
        added = html.escape(", ".join(step["added"][:4]))
        rows.append(
            f"<tr><td>{marker}{step['index']}</td><td>{html.escape(step['pass'])}</td>"
            f"<td>{html.escape(step['rule'] or '')}</td><td>{removed}</td><td>{added}</td></tr>"
        )
    more = len(payload["steps"]) - HTML_STEP_ROWS
    if more > 0:
        rows.append(f"<tr><td colspan='5'>... {more} more steps</td></tr>")
    return "".join(rows)


def html_view(payload: Mapping[str, Any]) -> str:
    """The text/html fallback (see the module docstring)."""
    from studio.graph_svg import graph_svg

    svg = graph_svg(
        dict(payload), step=payload["current_step"], overlay=payload.get("overlay", "family")
    )
    return (
        "<div class='gie-session'>"
        f"<p><b>{html.escape(text_summary(payload))}</b></p>"
        f"<div style='max-height:480px;overflow:auto'>{svg}</div>"
        "<table><thead><tr><th>step</th><th>pass</th><th>rule</th><th>removed</th>"
        f"<th>added</th></tr></thead><tbody>{_timeline_rows(payload)}</tbody></table>"
        "</div>"
    )


def mimebundle(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The display bundle of a session payload (see the module docstring)."""
    return {
        MIME_TYPE: dict(payload),
        "text/html": html_view(payload),
        "text/plain": text_summary(payload),
    }


__all__ = ["html_view", "mimebundle", "text_summary"]
