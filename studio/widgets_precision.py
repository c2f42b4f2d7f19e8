"""The precision table: one dropdown per compute layer, a filter, and apply-to-all-matching.

Changing a row's dropdown calls ``session.set_precision(layer, precision)`` (an incremental
rebuild); the summary of the returned ``RebuildDelta`` is shown under the table. After every
session change the dropdowns show the precision the builder actually chose (a request the
builder refused, e.g. int8 for an op without an int8 kernel, snaps back, with the reason as
the dropdown's tooltip). Moving the session to another step drops its engine: the table then
empties and offers a "Build engine" button.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets

from studio.widgets_base import (
    PRECISION_CHOICES,
    build_button,
    check_precision,
    compute_layer_names,
    engine_layers,
    escaped,
    show,
)


class PrecisionTable(ipywidgets.VBox):
    """Per-layer precision editor of a session (a VBox; display it directly).

    Parts (for notebooks and tests): ``widget`` (the VBox itself), ``rows`` (layer ->
    Dropdown), ``row_boxes`` (layer -> the row's HBox, hidden by the filter), ``filter`` (Text:
    case-insensitive substring of the layer name or op type), ``apply_choice`` (Dropdown) and
    ``apply_button`` (Button) applying that precision to every visible row, ``build_button``
    (Button, shown while the session has no engine) and ``status`` (HTML: the last rebuild
    summary).
    Constructing the table builds the session's engine when it has none.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.rows: dict[str, ipywidgets.Dropdown] = {}
        self.row_boxes: dict[str, ipywidgets.HBox] = {}
        self._ops: dict[str, str] = {}
        self._syncing = False
        self.filter = ipywidgets.Text(
            value="", placeholder="op type or layer name", description="Filter"
        )
        self.apply_choice = ipywidgets.Dropdown(
            options=PRECISION_CHOICES, value=PRECISION_CHOICES[0], description="All shown"
        )
        self.apply_button = ipywidgets.Button(description="Apply", tooltip="apply to all shown")
        self.build_button = build_button(session)
        self.status = ipywidgets.HTML(value="")
        self._table = ipywidgets.VBox()
        super().__init__(
            [
                ipywidgets.HBox([self.filter, self.apply_choice, self.apply_button]),
                self.build_button,
                self._table,
                self.status,
            ]
        )
        self.filter.observe(self._filter_changed, names="value")
        self.apply_button.on_click(lambda _button: self.apply_all(self.apply_choice.value))
        if session.engine is None:
            session.build()
        self._rebuild_rows()
        session.on_change(self._on_session_change)

    @property
    def widget(self) -> ipywidgets.VBox:
        """The displayable widget (the table itself)."""
        return self

    def visible_layers(self) -> list[str]:
        """The layers the filter currently shows, in execution order."""
        return [name for name in self.rows if self._matches(name)]

    def apply_all(self, precision: str) -> list[str]:
        """Ask ``precision`` for every visible layer (one incremental rebuild each).

        Returns the layers it was applied to; the status line shows the last summary.
        """
        precision = check_precision(precision)
        layers = self.visible_layers()
        summary = ""
        for layer in layers:
            summary = self.session.set_precision(layer, precision).summary()
        if layers:
            self.status.value = (
                f"<b>{escaped(precision)}</b> on {len(layers)} layer(s); last: {escaped(summary)}"
            )
        return layers

    # ------------------------------------------------------------------ internals

    def _matches(self, layer: str) -> bool:
        needle = self.filter.value.strip().lower()
        return not needle or needle in layer.lower() or needle in self._ops[layer].lower()

    def _filter_changed(self, _change: dict[str, Any] | None = None) -> None:
        for name, box in self.row_boxes.items():
            show(box, self._matches(name))

    def _rebuild_rows(self) -> None:
        layers = engine_layers(self.session)
        self.rows, self.row_boxes, self._ops = {}, {}, {}
        for name in compute_layer_names(self.session):
            layer = layers[name]
            dropdown = ipywidgets.Dropdown(
                options=PRECISION_CHOICES,
                value=layer.precision.value,
                tooltip=layer.precision_reason,
                layout=ipywidgets.Layout(width="8em"),
            )
            dropdown.observe(self._make_handler(name), names="value")
            self.rows[name] = dropdown
            self._ops[name] = layer.qualified_op
            self.row_boxes[name] = ipywidgets.HBox(
                [
                    ipywidgets.Label(value=name, layout=ipywidgets.Layout(width="32em")),
                    ipywidgets.Label(
                        value=layer.qualified_op, layout=ipywidgets.Layout(width="12em")
                    ),
                    dropdown,
                ]
            )
        self._table.children = tuple(self.row_boxes.values())
        show(self.build_button, not self.rows)
        self._filter_changed()

    def _make_handler(self, layer: str) -> Callable[[dict[str, Any]], None]:
        def handler(change: dict[str, Any]) -> None:
            if self._syncing:
                return
            try:
                delta = self.session.set_precision(layer, change["new"])
            except Exception as error:
                self.status.value = escaped(f"rebuild failed for {layer}: {error}")
                self._on_session_change(self.session)  # back to what the engine has
                raise
            self.status.value = escaped(delta.summary())

        return handler

    def _on_session_change(self, session: Any) -> None:
        """Show the builder's actual choices; rebuild the rows when the layer set changed."""
        if compute_layer_names(session) != list(self.rows):
            self._rebuild_rows()
            return
        layers = engine_layers(session)
        previous, self._syncing = self._syncing, True
        try:
            for name, dropdown in self.rows.items():
                dropdown.value = layers[name].precision.value
                dropdown.tooltip = layers[name].precision_reason
        finally:
            self._syncing = previous


def precision_table(session: Any) -> PrecisionTable:
    """A :class:`PrecisionTable` of ``session`` (a VBox: display it; its parts are attributes)."""
    return PrecisionTable(session)
