"""The calibration viewer: per activation tensor, its |x| histogram and every method's threshold.

Reads ``session.engine.calibration`` (engine.quantize.calibrate.CalibrationResult): one
:class:`~engine.quantize.calibrate.TensorCalibration` per calibrated tensor. The thresholds
table is always shown (threshold in the tensor's units, the int8 scale it implies =
threshold / 127, the chosen method marked); the histogram figure comes from
``studio.plots.calibration_histogram`` when that module is installed, as a plotly MIME output.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import ipywidgets
import plotly.io

from engine.quantize.calibrate import TensorCalibration, scale_from_threshold
from studio.widgets_base import build_button, escaped, html_table, show

#: What the viewer says when the engine has no calibration.
NO_CALIBRATION = "no calibration (build with int8 and calibration data)"

HEADERS = ("method", "threshold", "int8 scale", "chosen")


def thresholds_html(tensor: TensorCalibration, chosen_method: str) -> str:
    """Header line (|x| max, values seen) and the table of thresholds per method (escaped)."""
    histogram = tensor.histogram
    head = (
        f"<b>{escaped(tensor.name)}</b>: max |x| {histogram.amax:.6g} over "
        f"{histogram.count} values; chosen threshold {tensor.threshold:.6g} "
        f"(scale {tensor.scale:.6g})"
    )
    rows = [
        (
            method,
            f"{value:.6g}",
            f"{scale_from_threshold(value):.6g}",
            "yes" if method == chosen_method else "",
        )
        for method, value in sorted(tensor.thresholds.items())
    ]
    return head + html_table(HEADERS, rows)


def _histogram_figure(tensor: TensorCalibration, chosen_method: str) -> Any:
    """``studio.plots.calibration_histogram`` of ``tensor``, or None without studio.plots."""
    if importlib.util.find_spec("studio.plots") is None:
        return None
    from studio import plots

    return plots.calibration_histogram(tensor, chosen=chosen_method)


def figure_output(figure: Any) -> dict[str, Any]:
    """A display_data output (plotly MIME bundle, JSON-safe) for an ``Output`` widget."""
    spec = json.loads(plotly.io.to_json(figure, validate=False))
    return {
        "output_type": "display_data",
        "data": {
            "application/vnd.plotly.v1+json": {**spec, "config": {"displaylogo": False}},
            "text/plain": f"<plotly figure: {len(spec.get('data', []))} trace(s)>",
        },
        "metadata": {},
    }


class CalibrationViewer(ipywidgets.VBox):
    """Calibrated tensors of the session's engine, one at a time.

    Parts: ``tensor`` (Dropdown of calibrated tensor names), ``thresholds`` (HTML table),
    ``plot`` (Output holding the histogram figure when studio.plots exists; ``figure`` is the
    last plotly figure or None), ``message`` (HTML: :data:`NO_CALIBRATION` when the engine has
    none), ``build_button`` (shown while the session has no engine). Builds the engine if needed.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self._syncing = False
        self.figure: Any = None
        self.tensor = ipywidgets.Dropdown(options=[], description="Tensor")
        self.thresholds = ipywidgets.HTML(value="")
        self.plot = ipywidgets.Output()
        self.message = ipywidgets.HTML(value="")
        self.build_button = build_button(session)
        super().__init__([self.message, self.build_button, self.tensor, self.thresholds, self.plot])
        if session.engine is None:
            session.build()
        self._refresh()
        self.tensor.observe(lambda _change: self._show_tensor(), names="value")
        session.on_change(lambda _session: self._refresh())

    def tensor_names(self) -> list[str]:
        """The calibrated tensors ([] without calibration)."""
        return list(self.tensor.options)

    def _calibration(self) -> Any:
        engine = self.session.engine
        return None if engine is None else engine.calibration

    def _refresh(self) -> None:
        engine = self.session.engine
        calibration = self._calibration()
        names = list(calibration.tensors) if calibration is not None else []
        keep = self.tensor.value if self.tensor.value in names else (names or [None])[0]
        previous, self._syncing = self._syncing, True
        try:
            self.tensor.options = names
            self.tensor.value = keep
        finally:
            self._syncing = previous
        show(self.build_button, engine is None)
        if engine is None:
            self.message.value = "no engine at this step: build it to see its calibration"
        elif not names:
            self.message.value = escaped(NO_CALIBRATION)
        else:
            self.message.value = (
                f"{len(names)} tensors calibrated with <b>{escaped(calibration.calibrator)}</b>"
            )
        self._show_tensor()

    def _show_tensor(self) -> None:
        if self._syncing:
            return
        calibration = self._calibration()
        name = self.tensor.value
        if calibration is None or name not in calibration.tensors:
            self.thresholds.value = ""
            self.plot.outputs = ()
            self.figure = None
            return
        tensor = calibration.tensors[name]
        self.thresholds.value = thresholds_html(tensor, calibration.calibrator)
        self.figure = _histogram_figure(tensor, calibration.calibrator)
        self.plot.outputs = () if self.figure is None else (figure_output(self.figure),)
