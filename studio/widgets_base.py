"""Shared pieces of the studio widgets: choices, escaped HTML tables, engine layer lookup.

Every widget wraps one :class:`studio.Session`, reads the session's current engine and
refreshes itself from ``session.on_change``. Text that comes from a model (layer, tensor,
node and tactic names) only reaches HTML through :func:`html_table` / :func:`escaped`, which
``html.escape`` it.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

import ipywidgets

from engine.build.plan import Layer
from engine.config import Precision
from studio.schema import OVERLAYS

#: Precisions a layer can be asked for, in the order the dropdowns list them.
PRECISION_CHOICES: tuple[str, ...] = tuple(p.value for p in Precision)

__all__ = [
    "OVERLAYS",
    "PRECISION_CHOICES",
    "build_button",
    "check_precision",
    "compute_layer_names",
    "engine_layers",
    "escaped",
    "html_table",
    "show",
]


def escaped(value: Any) -> str:
    """``str(value)`` made safe for HTML (``html.escape``, quotes included)."""
    return html.escape(str(value), quote=True)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML ``<table>`` whose every header and cell is escaped text."""
    head = "".join(f"<th>{escaped(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escaped(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return (
        '<table class="gie-table" style="border-collapse:collapse">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def engine_layers(session: Any) -> dict[str, Layer]:
    """The current engine's plan layers by name ({} when the session has no engine yet)."""
    engine = session.engine
    if engine is None:
        return {}
    return {layer.name: layer for layer in engine.plan.layers}


def compute_layer_names(session: Any) -> list[str]:
    """The compute layers of the session's engine, in execution order ([] without an engine).

    Never builds: widgets refresh from ``session.on_change`` callbacks, and a move of the
    cursor drops the engine; building there would rebuild on every scrub of the timeline.
    """
    layers = engine_layers(session)
    return [name for name, layer in layers.items() if layer.role == "compute"]


def build_button(session: Any) -> ipywidgets.Button:
    """A "Build engine" button calling ``session.build()`` (widgets show it while the session
    has no engine, e.g. after moving to another step)."""
    button = ipywidgets.Button(
        description="Build engine", tooltip="build the graph at the current step"
    )
    button.on_click(lambda _button: session.build())
    return button


def show(widget: ipywidgets.DOMWidget, visible: bool) -> None:
    """Show or hide ``widget`` (CSS display)."""
    widget.layout.display = None if visible else "none"


def check_precision(value: Any) -> str:
    """``value`` as a precision name, or ValueError naming it and the choices."""
    text = str(getattr(value, "value", value))
    if text not in PRECISION_CHOICES:
        raise ValueError(
            f"unknown precision {value!r}; expected one of {', '.join(PRECISION_CHOICES)}"
        )
    return text
