"""Plotly figures of GIE Studio: pure functions from reports and records to figures.

Every function returns a new ``plotly.graph_objects.Figure`` and never shows it (display it
in a notebook by leaving it as a cell's value, or ``fig.show()``). Colours come from
:mod:`studio.colors`. The figures live in four modules, re-exported here:

- :mod:`studio.plots_profile` (one ProfileReport): :func:`layer_latency`,
  :func:`latency_sunburst`, :func:`precision_mix`, :func:`roofline`;
- :mod:`studio.plots_compare` (N reports): :func:`engine_comparison`, :func:`align_layers`;
- :mod:`studio.plots_accuracy`: :func:`layer_error`, :func:`calibration_histogram`;
- :mod:`studio.plots_build`: :func:`memory_timeline`, :func:`build_timeline`.

Each data trace carries ``meta={"kind": ...}`` so code (and tests) can find it without
relying on trace order.
"""

from studio.plots_accuracy import calibration_histogram, layer_error
from studio.plots_build import PassTime, build_timeline, memory_timeline, pass_times
from studio.plots_compare import AlignedGroup, align_layers, engine_comparison
from studio.plots_profile import latency_sunburst, layer_latency, precision_mix, roofline

__all__ = [
    "AlignedGroup",
    "PassTime",
    "align_layers",
    "build_timeline",
    "calibration_histogram",
    "engine_comparison",
    "latency_sunburst",
    "layer_error",
    "layer_latency",
    "memory_timeline",
    "pass_times",
    "precision_mix",
    "roofline",
]
