"""Writing a session out: the standalone HTML report and the export folder.

``write_session_report(session, path)`` profiles the engine when that has not happened yet,
draws the figures (studio.plots: per-layer latency, sunburst, precision mix, memory, build
timeline, and when there are errors / calibration, the per-layer error and the first
calibrated tensor's histogram) and writes one offline HTML file (studio.report_html).

``export_session(session, folder)`` writes what a user ships and shares: ``model.gie`` (the
engine), ``recipe.json`` (config, per-layer precisions and tactics, int8 scales),
``model_qdq.onnx`` (the engine's decisions as standard ONNX with Q/DQ, which onnxruntime runs)
and ``report.html``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.onnx_io import save
from engine.quantize.qdq_export import export_qdq
from engine.recipe import export_recipe, save_recipe
from engine.serialize import save_engine
from studio import plots
from studio.report_html import write_report_html

if TYPE_CHECKING:
    from studio.session import Session


def session_figures(session: Session) -> dict[str, Any]:
    """The report's figures, titled, for the session's current engine."""
    engine = session.engine or session.build()
    report = session._profile or session.profile(iterations=3)
    figures: dict[str, Any] = {
        "Per-layer latency": plots.layer_latency(report),
        "Latency by op type and layer": plots.latency_sunburst(report),
        "Precision mix": plots.precision_mix(report),
        "Memory over execution order": plots.memory_timeline(engine),
        "Build timeline (time per optimizer pass)": plots.build_timeline(session.steps),
    }
    errors = session._errors
    if errors:
        figures["Per-layer error vs fp32"] = plots.layer_error(errors)
    calibration = engine.calibration
    if calibration is not None and calibration.tensors:
        name = next(iter(calibration.tensors))
        figures[f"Calibration histogram: {name}"] = plots.calibration_histogram(
            calibration.tensors[name]
        )
    return figures


def write_session_report(session: Session, path: str | os.PathLike[str]) -> Path:
    """The standalone HTML report of ``session`` (see the module docstring)."""
    figures = session_figures(session)
    write_report_html(path, session.payload(), figures, title=f"GIE Studio — {session.title}")
    return Path(path)


def export_session(session: Session, folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Engine, recipe, QDQ ONNX and report in ``folder`` (created); returns their paths."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    engine = session.engine or session.build()
    paths = {
        "engine": target / "model.gie",
        "recipe": target / "recipe.json",
        "qdq": target / "model_qdq.onnx",
        "report": target / "report.html",
    }
    save_engine(engine, paths["engine"])
    save_recipe(export_recipe(engine), paths["recipe"])
    qdq_model, _ = export_qdq(engine.plan.model)
    save(qdq_model, paths["qdq"])
    write_session_report(session, paths["report"])
    return paths


__all__ = ["export_session", "session_figures", "write_session_report"]
