"""The tactic explorer: every timed candidate of a layer, the margin of victory, pin/unpin.

Margins compare medians with the layer's chosen tactic (the "winner", pinned or fastest):
a losing candidate's margin is its median minus the winner's (ms; positive = slower), the
winner's margin is the runner-up's median minus its own, the runner-up being the fastest other
candidate that produced a sample (aborted ones included, as in
``engine.build.selector.winner_of``). Ratios divide a margin by the winner's median. A
candidate that failed (no sample) has no margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ipywidgets

from engine.build.plan import Layer
from studio.widgets_base import (
    build_button,
    compute_layer_names,
    engine_layers,
    escaped,
    html_table,
    show,
)

HEADERS = ("tactic", "median ms", "samples", "aborted", "margin ms", "margin %", "note")


@dataclass(frozen=True)
class TacticRow:
    """One candidate of a layer as the explorer shows it.

    ``median_ms`` over ``samples`` timed runs; ``aborted`` when timing stopped early;
    ``chosen`` for the layer's tactic; ``margin_ms`` / ``margin_ratio`` as in the module
    docstring (None when the layer's tactic was not timed or it has no rival).
    """

    tactic: str
    median_ms: float
    samples: int
    aborted: bool
    note: str
    chosen: bool
    margin_ms: float | None
    margin_ratio: float | None


def tactic_rows(layer: Layer) -> list[TacticRow]:
    """The candidates of ``layer`` with their margins, fastest first (failed ones last)."""
    timed = [c for c in layer.candidates if c.samples > 0]
    winner = next((c for c in timed if c.tactic == layer.tactic), None)
    runner_up = min(
        (c for c in timed if c.tactic != layer.tactic), key=lambda c: c.median_ms, default=None
    )
    rows = []
    for candidate in sorted(layer.candidates, key=lambda c: (c.samples == 0, c.median_ms)):
        chosen = candidate.tactic == layer.tactic
        margin = None
        if winner is not None and not chosen and candidate.samples > 0:
            margin = candidate.median_ms - winner.median_ms
        elif chosen and winner is not None and runner_up is not None:
            margin = runner_up.median_ms - candidate.median_ms
        ratio = None
        if margin is not None and winner is not None and winner.median_ms > 0:
            ratio = margin / winner.median_ms
        rows.append(
            TacticRow(
                candidate.tactic,
                candidate.median_ms,
                candidate.samples,
                candidate.aborted,
                candidate.note,
                chosen,
                margin,
                ratio,
            )
        )
    return rows


def _number(value: float | None, scale: float = 1.0, digits: int = 4) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def tactic_table_html(layer: Layer, pinned: str | None) -> str:
    """The explorer's table for ``layer`` (escaped HTML)."""
    head = f"<b>{escaped(layer.name)}</b> ({escaped(layer.qualified_op)}): tactic "
    head += f"<b>{escaped(layer.tactic)}</b>"
    head += f", pinned to {escaped(pinned)}" if pinned else ""
    if not layer.candidates:
        return head + "<br>not timed (a single candidate, or no choice to make)"
    body = [
        (
            ("* " if row.chosen else "") + row.tactic,
            _number(row.median_ms),
            row.samples,
            "yes" if row.aborted else "",
            _number(row.margin_ms),
            _number(row.margin_ratio, 100.0, 1),
            row.note,
        )
        for row in tactic_rows(layer)
    ]
    return head + html_table(HEADERS, body)


class TacticExplorer(ipywidgets.VBox):
    """Candidates of one layer at a time, with pin and unpin.

    Parts: ``layer`` (Dropdown of compute layers), ``table`` (HTML), ``pin_choice`` (Dropdown
    of the layer's candidates), ``pin_button`` / ``unpin_button`` (Buttons calling
    ``session.pin_tactic(layer, tactic or None)``), ``status`` (HTML: last rebuild summary),
    ``build_button`` (shown while the session has no engine). Builds the engine if needed.
    ``layer`` picks the first layer shown; with ``graph`` (a :class:`studio.widgets.GraphView`)
    selecting a node that is a compute layer in the graph shows that layer here.
    """

    def __init__(self, session: Any, layer: str | None = None, graph: Any = None) -> None:
        self.session = session
        self._syncing = False
        self.layer = ipywidgets.Dropdown(options=[], description="Layer")
        self.table = ipywidgets.HTML(value="")
        self.pin_choice = ipywidgets.Dropdown(options=[], description="Tactic")
        self.pin_button = ipywidgets.Button(description="Pin")
        self.unpin_button = ipywidgets.Button(description="Unpin")
        self.status = ipywidgets.HTML(value="")
        self.build_button = build_button(session)
        super().__init__(
            [
                self.layer,
                self.build_button,
                self.table,
                ipywidgets.HBox([self.pin_choice, self.pin_button, self.unpin_button]),
                self.status,
            ]
        )
        if session.engine is None:
            session.build()
        self._refresh(preferred=layer)
        self.layer.observe(lambda _change: self._show_layer(), names="value")
        self.pin_button.on_click(lambda _button: self.pin(self.pin_choice.value))
        self.unpin_button.on_click(lambda _button: self.pin(None))
        session.on_change(lambda _session: self._refresh())
        if graph is not None:
            graph.observe(self._graph_selected, names="selected")

    def _graph_selected(self, change: dict[str, Any]) -> None:
        if change["new"] in self.layer.options:
            self.layer.value = change["new"]

    def rows(self) -> list[TacticRow]:
        """The rows of the selected layer ([] when none is selected)."""
        layer = engine_layers(self.session).get(self.layer.value or "")
        return tactic_rows(layer) if layer is not None else []

    def pin(self, tactic: str | None) -> str:
        """Pin the selected layer to ``tactic`` (None: unpin); returns the rebuild summary."""
        if not self.layer.value:
            raise ValueError("no layer selected")
        summary = self.session.pin_tactic(self.layer.value, tactic).summary()
        self.status.value = escaped(summary)
        return summary

    def _refresh(self, preferred: str | None = None) -> None:
        layers = engine_layers(self.session)
        names = compute_layer_names(self.session)
        keep = preferred or self.layer.value
        if keep not in names:
            timed = [n for n in names if len(layers[n].candidates) > 1]
            keep = (timed or names or [None])[0]
        previous, self._syncing = self._syncing, True
        try:
            self.layer.options = names
            self.layer.value = keep
        finally:
            self._syncing = previous
        show(self.build_button, not names)
        self._show_layer()

    def _show_layer(self) -> None:
        if self._syncing:
            return
        layer = engine_layers(self.session).get(self.layer.value or "")
        if layer is None:
            self.table.value = "no engine at this step: build it to see its tactics"
            self.pin_choice.options = []
            return
        self.table.value = tactic_table_html(layer, self.session.config.tactic_pin(layer.name))
        self.pin_choice.options = [c.tactic for c in layer.candidates] or [layer.tactic]
