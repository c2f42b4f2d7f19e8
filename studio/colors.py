"""The one colour palette of GIE Studio, shared by the plots, the widgets and the extension.

Everything here is constant data; :func:`palette_json` writes it as JSON for the JupyterLab
extension, which mirrors it in ``extension/src/colors.ts``. Colours are ``#RRGGBB`` strings
chosen to stay distinguishable with the common colour-vision deficiencies:

- precisions and calibrators use the Okabe-Ito palette (Okabe & Ito, "Color Universal
  Design", 2002), with ``reformat`` (conversion layers, pure overhead) in its reddish purple;
- op families use Paul Tol's colour-blind-safe "muted" scheme for the families that make up
  most of a model's time (conv, linalg, elementwise, activation, normalization, pool, reduce,
  quantization, fused, attention), and greys for bookkeeping and rare families, so that the
  eye goes to the compute;
- the latency heat scale is viridis (perceptually uniform, readable in grey) and the error
  scale Color Brewer's RdBu (blue = accurate, red = divergent), both safe for deuteranopia.

A scale is a list of ``(position, colour)`` stops with positions from 0 to 1, the form plotly's
``colorscale`` takes; :func:`scale_color` samples one.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

#: Version of the :func:`palette_json` layout (bump when keys change).
PALETTE_VERSION = 1

#: Colour of anything the palette does not know (an unknown precision, family or method).
NEUTRAL_COLOR = "#BBBBBB"

#: Layer precision (engine.config.Precision values) -> colour; ``reformat`` colours the
#: conversion layers the builder inserts between precisions/formats.
PRECISION_COLORS: Mapping[str, str] = MappingProxyType(
    {
        "fp32": "#0072B2",  # Okabe-Ito blue
        "tf32": "#56B4E9",  # sky blue
        "fp16": "#009E73",  # bluish green
        "int8": "#E69F00",  # orange
        "reformat": "#CC79A7",  # reddish purple
    }
)

#: Op family (engine.ops.registry OpSpec.family values, plus ``io`` for graph inputs/outputs)
#: -> colour. ``fused`` is the family of gie::Pointwise; the fused conv/linalg ops keep their
#: base family. attention and gie_transformer share a colour (both are transformer blocks).
FAMILY_COLORS: Mapping[str, str] = MappingProxyType(
    {
        # compute families: Paul Tol muted
        "conv": "#332288",  # indigo
        "linalg": "#88CCEE",  # cyan
        "elementwise": "#DDCC77",  # sand
        "activation": "#117733",  # green
        "normalization": "#44AA99",  # teal
        "pool": "#999933",  # olive
        "reduce": "#AA4499",  # purple
        "quantization": "#CC6677",  # rose
        "fused": "#882255",  # wine
        "attention": "#EE7733",  # Tol vibrant orange
        "gie_transformer": "#EE7733",
        "resize": "#0077BB",  # Tol vibrant blue
        "rnn": "#009988",  # Tol vibrant teal
        # bookkeeping and rare families: greys
        "io": "#555555",
        "shape": "#A5A5A5",
        "indexing": "#A5A5A5",
        "control_flow": "#8C8C8C",
        "sequence": "#D0D0D0",
        "generator": "#D0D0D0",
        "signal": "#D0D0D0",
        "string": "#D0D0D0",
        "classic_ml": "#D0D0D0",
        "training": "#D0D0D0",
        "loss": "#D0D0D0",
        "detection": "#D0D0D0",
        "misc": "#D0D0D0",
    }
)

#: Other spellings of family names (the session payload's prose uses the short ones).
FAMILY_ALIASES: Mapping[str, str] = MappingProxyType(
    {"quantize": "quantization", "transformer": "gie_transformer"}
)

#: Activation calibrator (engine.quantize.calibrators.Calibrator values) -> colour.
CALIBRATOR_COLORS: Mapping[str, str] = MappingProxyType(
    {
        "minmax": "#D55E00",  # Okabe-Ito vermillion
        "percentile": "#0072B2",  # blue
        "entropy": "#009E73",  # bluish green
        "mse": "#CC79A7",  # reddish purple
    }
)

#: Colours for things without a palette key of their own (engines named by the user...), in
#: order of use: the Okabe-Ito palette.
CATEGORICAL_COLORS: tuple[str, ...] = (
    "#E69F00",
    "#56B4E9",
    "#009E73",
    "#F0E442",
    "#0072B2",
    "#D55E00",
    "#CC79A7",
    "#000000",
)

#: Sequential scale for latency heat: 0 = fastest layer, 1 = slowest (viridis).
LATENCY_SCALE: tuple[tuple[float, str], ...] = (
    (0.0, "#440154"),
    (0.25, "#3B528B"),
    (0.5, "#21918C"),
    (0.75, "#5EC962"),
    (1.0, "#FDE725"),
)

#: Diverging scale for numeric error: 0 = accurate (blue), 0.5 = at the tolerance (white),
#: 1 = far outside it (red) (Color Brewer RdBu, reversed).
ERROR_SCALE: tuple[tuple[float, str], ...] = (
    (0.0, "#2166AC"),
    (0.25, "#67A9CF"),
    (0.5, "#F7F7F7"),
    (0.75, "#EF8A62"),
    (1.0, "#B2182B"),
)


def precision_color(name: str) -> str:
    """The colour of a precision (``fp32``, ``tf32``, ``fp16``, ``int8`` or ``reformat``,
    case-insensitive); :data:`NEUTRAL_COLOR` for anything else."""
    return PRECISION_COLORS.get(str(name).lower(), NEUTRAL_COLOR)


def family_color(name: str) -> str:
    """The colour of an op family (see :data:`FAMILY_COLORS`, aliases accepted);
    :data:`NEUTRAL_COLOR` for an unknown family."""
    key = str(name).lower()
    return FAMILY_COLORS.get(FAMILY_ALIASES.get(key, key), NEUTRAL_COLOR)


def calibrator_color(name: str) -> str:
    """The colour of a calibration method; :data:`NEUTRAL_COLOR` for an unknown one."""
    return CALIBRATOR_COLORS.get(str(name).lower(), NEUTRAL_COLOR)


def _rgb(color: str) -> tuple[int, int, int]:
    text = color.lstrip("#")
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)


def scale_color(scale: Sequence[tuple[float, str]], position: float) -> str:
    """The colour at ``position`` (clamped to [0, 1]) of a scale, interpolated linearly in RGB
    between its two nearest stops."""
    t = min(max(float(position), 0.0), 1.0)
    for (low, low_color), (high, high_color) in itertools.pairwise(scale):
        if t <= high:
            span = high - low
            weight = 0.0 if span <= 0 else (t - low) / span
            a, b = _rgb(low_color), _rgb(high_color)
            mixed = (round(x + (y - x) * weight) for x, y in zip(a, b))
            return "#" + "".join(f"{channel:02X}" for channel in mixed)
    return scale[-1][1]


def plotly_scale(scale: Sequence[tuple[float, str]]) -> list[list[Any]]:
    """A scale in the form plotly's ``colorscale`` accepts (a list of [position, colour])."""
    return [[position, color] for position, color in scale]


def palette_json() -> dict[str, Any]:
    """The whole palette as JSON-able data (what extension/src/colors.ts mirrors)::

    {"version": 1, "neutral": "#BBBBBB", "precision": {...}, "family": {...},
     "family_aliases": {...}, "calibrator": {...}, "categorical": ["#E69F00", ...],
     "latency_scale": [[0.0, "#440154"], ...], "error_scale": [[0.0, "#2166AC"], ...]}
    """
    return {
        "version": PALETTE_VERSION,
        "neutral": NEUTRAL_COLOR,
        "precision": dict(PRECISION_COLORS),
        "family": dict(FAMILY_COLORS),
        "family_aliases": dict(FAMILY_ALIASES),
        "calibrator": dict(CALIBRATOR_COLORS),
        "categorical": list(CATEGORICAL_COLORS),
        "latency_scale": plotly_scale(LATENCY_SCALE),
        "error_scale": plotly_scale(ERROR_SCALE),
    }
