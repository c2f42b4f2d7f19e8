"""Notebook widgets over a :class:`studio.Session` (ipywidgets models; Python owns state).

:class:`GraphView` is the model of the interactive graph; its view is rendered by the
``gie-studio`` JupyterLab extension. The front end only sends intent (a step, a selected node,
an overlay, a precision override); the traits are validated here, and valid changes
round-trip to the session, which rebuilds and calls back to refresh the payload.

The other widgets are plain ipywidgets compositions that work in any front end:
:class:`~studio.widgets_precision.PrecisionTable` (``precision_table(session)``),
:class:`~studio.widgets_steps.StepScrubber`, :class:`~studio.widgets_tactics.TacticExplorer`
and :class:`~studio.widgets_calibration.CalibrationViewer`.
"""

from __future__ import annotations

from typing import Any

import ipywidgets
import traitlets

from studio.widgets_base import OVERLAYS, PRECISION_CHOICES
from studio.widgets_calibration import NO_CALIBRATION, CalibrationViewer
from studio.widgets_precision import PrecisionTable, precision_table
from studio.widgets_steps import StepScrubber, step_diff_text
from studio.widgets_tactics import TacticExplorer, TacticRow, tactic_rows

__all__ = [
    "NO_CALIBRATION",
    "OVERLAYS",
    "PRECISION_CHOICES",
    "CalibrationViewer",
    "GraphView",
    "PrecisionTable",
    "StepScrubber",
    "TacticExplorer",
    "TacticRow",
    "precision_table",
    "step_diff_text",
    "tactic_rows",
]

#: npm package of the extension that renders the view, and the semver range it must satisfy.
MODULE_NAME = "gie-studio"
MODULE_VERSION = "^0.1.0"


class GraphView(ipywidgets.DOMWidget):
    """The interactive graph of a session (view: the ``gie-studio`` JupyterLab extension).

    Synced traits:

    - ``payload``: the session payload (``studio.schema``, MIME application/vnd.gie.session+json).
    - ``step``: how many recorded steps are applied, in ``[0, len(payload["steps"])]``;
      setting it calls ``session.goto(step)``.
    - ``selected``: a node id of the payload (any step of the timeline) or ``""``.
    - ``overlay``: graph colouring, one of ``family``, ``precision``, ``latency``, ``error``
      (also stored as ``session.overlay``, so the session's own display uses it).
    - ``precision_overrides``: compute layer -> precision (``fp32``/``tf32``/``fp16``/``int8``);
      each layer whose value changed is passed to ``session.set_precision`` (an incremental
      rebuild; the layer names are the session's ``layer_names()``, which builds the engine
      when the session has none). Removing a key does not revert the layer.
    - ``last_delta``: the ``RebuildDelta.summary()`` of the last rebuild this widget triggered
      (one line per layer when several changed at once).

    Invalid values raise ``traitlets.TraitError`` naming the value. The widget registers with
    ``session.on_change`` so any change of the session (step, undo, rebuild) refreshes
    ``payload`` and ``step``.
    """

    _model_name = traitlets.Unicode("GraphModel").tag(sync=True)
    _view_name = traitlets.Unicode("GraphView").tag(sync=True)
    _model_module = traitlets.Unicode(MODULE_NAME).tag(sync=True)
    _view_module = traitlets.Unicode(MODULE_NAME).tag(sync=True)
    _model_module_version = traitlets.Unicode(MODULE_VERSION).tag(sync=True)
    _view_module_version = traitlets.Unicode(MODULE_VERSION).tag(sync=True)

    payload = traitlets.Dict().tag(sync=True)
    step = traitlets.Int(0).tag(sync=True)
    selected = traitlets.Unicode("").tag(sync=True)
    overlay = traitlets.Unicode("family").tag(sync=True)
    precision_overrides = traitlets.Dict().tag(sync=True)
    last_delta = traitlets.Unicode("").tag(sync=True)

    def __init__(self, session: Any, **kwargs: Any) -> None:
        self._session = session
        self._syncing = True
        payload = session.payload()
        kwargs.setdefault("overlay", payload.get("overlay", "family"))
        try:
            super().__init__(payload=payload, step=session.position, **kwargs)
        finally:
            self._syncing = False
        session.on_change(self._on_session_change)

    @property
    def session(self) -> Any:
        """The session this view edits."""
        return self._session

    # ------------------------------------------------------------------ validation

    @traitlets.validate("step")
    def _validate_step(self, proposal: dict[str, Any]) -> int:
        value = proposal["value"]
        count = len(self.payload.get("steps", []))
        if not 0 <= value <= count:
            raise traitlets.TraitError(f"step {value} is outside [0, {count}] (recorded steps)")
        return value

    @traitlets.validate("selected")
    def _validate_selected(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"]
        if value and value not in {node["id"] for node in self.payload.get("nodes", [])}:
            raise traitlets.TraitError(f"unknown node id {value!r}: no such node in the graph")
        return value

    @traitlets.validate("overlay")
    def _validate_overlay(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"]
        if value not in OVERLAYS:
            raise traitlets.TraitError(
                f"unknown overlay {value!r}; expected one of {', '.join(OVERLAYS)}"
            )
        return value

    @traitlets.validate("precision_overrides")
    def _validate_overrides(self, proposal: dict[str, Any]) -> dict[str, str]:
        value = proposal["value"]
        layers = set(self._session.layer_names()) if value else set()
        checked = {}
        for layer, precision in value.items():
            if layer not in layers:
                raise traitlets.TraitError(
                    f"unknown layer {layer!r}: not a compute layer of the current engine"
                )
            text = str(getattr(precision, "value", precision))
            if text not in PRECISION_CHOICES:
                raise traitlets.TraitError(
                    f"unknown precision {precision!r} for layer {layer!r}; "
                    f"expected one of {', '.join(PRECISION_CHOICES)}"
                )
            checked[layer] = text
        return checked

    # ------------------------------------------------------------------ round trip

    @traitlets.observe("step")
    def _step_changed(self, change: dict[str, Any]) -> None:
        if not self._syncing:
            self._session.goto(change["new"])

    @traitlets.observe("precision_overrides")
    def _overrides_changed(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        old = change["old"] or {}
        changed = [(layer, p) for layer, p in change["new"].items() if old.get(layer) != p]
        summaries = []
        for layer, precision in changed:
            try:
                delta = self._session.set_precision(layer, precision)
            except Exception as error:
                self.last_delta = f"rebuild failed for {layer} -> {precision}: {error}"
                raise
            summaries.append(delta.summary())
        if summaries:
            self.last_delta = "\n".join(summaries)

    @traitlets.observe("overlay")
    def _overlay_changed(self, change: dict[str, Any]) -> None:
        self._session.overlay = change["new"]

    def _on_session_change(self, session: Any) -> None:
        """Refresh ``payload`` then ``step`` from the session without calling it back."""
        previous, self._syncing = self._syncing, True
        try:
            self.payload = session.payload()
            self.step = session.position
            if self.selected and self.selected not in {n["id"] for n in self.payload["nodes"]}:
                self.selected = ""
        finally:
            self._syncing = previous
