"""studio.colors and studio.plots: every figure built from real ResNet engines and reports.

Expected values are recomputed here from the reports, the memory plan, the calibration and the
recorded steps (not read back from the figure code's helpers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import plotly.graph_objects as go
import plotly.io
import pytest

from engine.config import Precision
from engine.onnx_io import load
from engine.ops.registry import default_registry
from engine.passes import optimize
from engine.quantize.accuracy import first_divergent
from engine.report import ProfileReport
from studio import plots
from studio.colors import (
    CALIBRATOR_COLORS,
    ERROR_SCALE,
    FAMILY_COLORS,
    LATENCY_SCALE,
    NEUTRAL_COLOR,
    PRECISION_COLORS,
    family_color,
    palette_json,
    precision_color,
    scale_color,
)

if TYPE_CHECKING:
    from tests.studio.conftest import ResnetEngines

HEX = re.compile(r"^#[0-9A-F]{6}$")
CDN_REFERENCE = re.compile(r"<(script|link)\b[^>]*\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", re.I)
EVIL = '<img src=x onerror="alert(1)">'


def expected_key(row) -> str:
    return "reformat" if row.layer.startswith("reformat:") and not row.origins else row.precision


def traces(figure: go.Figure, kind: str) -> list:
    return [t for t in figure.data if isinstance(t.meta, dict) and t.meta.get("kind") == kind]


def only(figure: go.Figure, kind: str):
    (found,) = traces(figure, kind)
    return found


# ---------------------------------------------------------------------------------- palette


def test_palette_covers_every_registry_family_and_precision() -> None:
    families = {spec.family for spec in default_registry().specs()}
    assert families | {"io", "fused"} <= set(FAMILY_COLORS)
    assert {p.value for p in Precision} | {"reformat"} == set(PRECISION_COLORS)
    assert len(set(PRECISION_COLORS.values())) == len(PRECISION_COLORS)  # all distinct
    for color in [*PRECISION_COLORS.values(), *FAMILY_COLORS.values(), NEUTRAL_COLOR]:
        assert HEX.match(color), color
    assert precision_color("INT8") == PRECISION_COLORS["int8"]
    assert precision_color("bf16") == NEUTRAL_COLOR
    assert family_color("transformer") == FAMILY_COLORS["gie_transformer"]
    assert family_color("quantize") == FAMILY_COLORS["quantization"]
    assert family_color("no_such_family") == NEUTRAL_COLOR


def test_palette_json_mirrors_the_constants_and_scales_interpolate() -> None:
    data = json.loads(json.dumps(palette_json()))
    assert data["precision"] == dict(PRECISION_COLORS)
    assert data["family"] == dict(FAMILY_COLORS)
    assert data["calibrator"] == dict(CALIBRATOR_COLORS)
    assert data["neutral"] == NEUTRAL_COLOR
    assert data["latency_scale"] == [list(stop) for stop in LATENCY_SCALE]
    assert data["error_scale"][0] == [0.0, ERROR_SCALE[0][1]]
    assert scale_color(LATENCY_SCALE, 0.0) == LATENCY_SCALE[0][1]
    assert scale_color(LATENCY_SCALE, 7.0) == LATENCY_SCALE[-1][1]
    assert scale_color(ERROR_SCALE, 0.5) == ERROR_SCALE[2][1]
    # halfway between #2166AC and #67A9CF, channel by channel: (33+103)/2, (102+169)/2,
    # (172+207)/2 rounded
    assert scale_color(ERROR_SCALE, 0.125) == "#4488BE"


# ---------------------------------------------------------------------------------- profile


@pytest.mark.parametrize("which", ["fp32_report", "int8_report"])
def test_layer_latency_has_one_sorted_bar_per_layer_coloured_by_precision(
    resnet_engines: ResnetEngines, which: str
) -> None:
    report: ProfileReport = getattr(resnet_engines, which)
    bars = only(plots.layer_latency(report), "layers")
    assert len(bars.x) == len(report.layers)
    assert list(bars.y) == sorted(bars.y, reverse=True)
    rows = {row.layer: row for row in report.layers}
    assert set(bars.x) == set(rows)
    for name, latency, color, hover in zip(bars.x, bars.y, bars.marker.color, bars.hovertext):
        row = rows[name]
        assert latency == row.latency_ms_median
        assert color == PRECISION_COLORS[expected_key(row)]
        assert row.op in hover and row.tactic in hover
        assert all(origin in hover for origin in row.origins)


def test_int8_engine_shows_int8_fp32_and_reformat_colours(resnet_engines: ResnetEngines) -> None:
    figure = plots.layer_latency(resnet_engines.int8_report)
    colors = set(only(figure, "layers").marker.color)
    assert colors == {PRECISION_COLORS[k] for k in ("int8", "fp32", "reformat")}
    legend = {t.name: t.marker.color for t in traces(figure, "legend")}
    assert legend == {k: PRECISION_COLORS[k] for k in ("fp32", "int8", "reformat")}


def test_latency_sunburst_splits_op_types_into_layers(resnet_engines: ResnetEngines) -> None:
    report = resnet_engines.int8_report
    sunburst = only(plots.latency_sunburst(report), "sunburst")
    leaves = {
        label: value
        for label, parent, value in zip(sunburst.labels, sunburst.parents, sunburst.values)
        if parent
    }
    assert leaves == {row.layer: row.latency_ms_median for row in report.layers}
    ops = {label for label, parent in zip(sunburst.labels, sunburst.parents) if not parent}
    assert ops == {row.op for row in report.layers}
    by_id = dict(zip(sunburst.ids, sunburst.parents))
    for row in report.layers:
        assert by_id[f"layer:{row.layer}"] == f"op:{row.op}"
    conv_color = sunburst.marker.colors[list(sunburst.ids).index("op:gie::QConv")]
    assert conv_color == FAMILY_COLORS["conv"]


def test_precision_mix_counts_layers_and_time(resnet_engines: ResnetEngines) -> None:
    report = resnet_engines.int8_report
    figure = plots.precision_mix(report)
    count, time = only(figure, "count"), only(figure, "time")
    expected_count: dict[str, int] = {}
    expected_time: dict[str, float] = {}
    for row in report.layers:
        key = expected_key(row)
        expected_count[key] = expected_count.get(key, 0) + 1
        expected_time[key] = expected_time.get(key, 0.0) + row.latency_ms_median
    assert dict(zip(count.labels, count.values)) == expected_count
    for label, value in zip(time.labels, time.values):
        assert value == pytest.approx(expected_time[label])
    assert list(count.marker.colors) == [PRECISION_COLORS[k] for k in count.labels]


def test_roofline_points_are_intensity_and_achieved_gflops(resnet_engines: ResnetEngines) -> None:
    report = resnet_engines.fp32_report
    figure = plots.roofline(report, peak_gflops=100.0, bandwidth_gbs=10.0)
    points = {}
    for trace in traces(figure, "layers"):
        for layer, x, y in zip(trace.customdata, trace.x, trace.y):
            points[layer] = (x, y)
    expected = {row.layer: row for row in report.layers if row.flops and row.bytes}
    assert expected and len(expected) < len(report.layers)  # Flatten has 0 FLOPs: skipped
    assert set(points) == set(expected)
    for layer, (x, y) in points.items():
        row = expected[layer]
        assert x == pytest.approx(row.flops / row.bytes)
        assert y == pytest.approx(row.gflops)
    line = only(figure, "roofline")
    assert max(line.y) == 100.0 and 10.0 in line.x  # ridge at 100 / 10 FLOP/byte
    assert line.y[0] == pytest.approx(10.0 * line.x[0])
    assert figure.layout.xaxis.type == "log" and figure.layout.yaxis.type == "log"
    with pytest.raises(ValueError, match="positive"):
        plots.roofline(report, 0.0, 10.0)


# ---------------------------------------------------------------------------------- comparison


def _ms_of(report: ProfileReport, origins: set[str]) -> float:
    return sum(row.latency_ms_median for row in report.layers if set(row.origins) & origins)


def test_engine_comparison_speedups_are_baseline_over_engine_per_group(
    resnet_engines: ResnetEngines,
) -> None:
    reports = {"fp32": resnet_engines.fp32_report, "int8": resnet_engines.int8_report}
    figure = plots.engine_comparison(reports, baseline="fp32")
    speedup = only(figure, "speedup")
    assert speedup.meta["engine"] == "int8"
    seen: set[str] = set()
    for origins, value in zip(speedup.customdata, speedup.y):
        group = set(origins)
        assert not group & seen  # groups are disjoint
        seen |= group
        expected = _ms_of(reports["fp32"], group) / _ms_of(reports["int8"], group)
        assert value == pytest.approx(expected)
    every_origin = {o for r in reports.values() for row in r.layers for o in row.origins}
    assert seen == every_origin
    time_traces = {t.meta["engine"]: t for t in traces(figure, "time")}
    reformat_ms = sum(row.latency_ms_median for row in reports["int8"].layers if not row.origins)
    assert reformat_ms > 0  # the int8 engine has conversion layers; they are not aligned
    total = sum(time_traces["int8"].y)
    assert total == pytest.approx(reports["int8"].layer_ms_total - reformat_ms)


def test_engine_comparison_of_an_engine_with_itself_is_one(resnet_engines: ResnetEngines) -> None:
    reports = {
        "a": resnet_engines.fp32_report,
        "b": resnet_engines.int8_report,
        "c": resnet_engines.fp32_report,
    }
    figure = plots.engine_comparison(reports, baseline="a")
    by_engine = {t.meta["engine"]: t for t in traces(figure, "speedup")}
    assert set(by_engine) == {"b", "c"}
    assert all(value == pytest.approx(1.0) for value in by_engine["c"].y)
    with pytest.raises(KeyError, match="baseline"):
        plots.engine_comparison(reports, baseline="missing")


# ---------------------------------------------------------------------------------- accuracy


def test_layer_error_marks_the_first_divergent_layer(resnet_engines: ResnetEngines) -> None:
    errors = resnet_engines.errors
    cosines = sorted(e.cosine for e in errors)
    threshold = cosines[len(cosines) // 2]  # half the layers fall below it
    first = first_divergent(errors, threshold)
    assert first is not None
    figure = plots.layer_error(errors, min_cosine=threshold)
    (note,) = [a for a in figure.layout.annotations if a.name == "first_divergent"]
    assert first.layer in note.text and note.x == first.layer
    (line,) = [s for s in figure.layout.shapes if s.name == "first_divergent"]
    assert line.x0 == first.layer
    ordered = sorted(errors, key=lambda e: e.index)
    cosine = only(figure, "cosine")
    assert list(cosine.x) == [e.layer for e in ordered]
    assert list(cosine.y) == [e.cosine for e in ordered]
    assert list(cosine.marker.color) == [PRECISION_COLORS[e.precision] for e in ordered]


def test_layer_error_at_the_default_tolerance_agrees_with_first_divergent(
    resnet_engines: ResnetEngines,
) -> None:
    errors = resnet_engines.errors
    figure = plots.layer_error(errors)
    names = {a.name for a in figure.layout.annotations}
    first = first_divergent(errors, 0.999)
    assert ("first_divergent" in names) == (first is not None)
    assert ("no_divergence" in names) == (first is None)
    sqnr = only(figure, "sqnr_db")
    for error, value in zip(sorted(errors, key=lambda e: e.index), sqnr.y):
        assert value == (error.sqnr_db if math.isfinite(error.sqnr_db) else None)


def test_calibration_histogram_draws_every_threshold(resnet_engines: ResnetEngines) -> None:
    calibration = resnet_engines.int8.calibration
    assert calibration is not None
    tensor = next(iter(calibration.tensors.values()))
    figure = plots.calibration_histogram(tensor, chosen=calibration.calibrator)
    lines = {shape.name.split()[0]: shape for shape in figure.layout.shapes}
    assert set(lines) == set(tensor.thresholds) == {"minmax", "percentile", "entropy", "mse"}
    for method, shape in lines.items():
        assert shape.x0 == shape.x1 == tensor.thresholds[method]
        assert shape.line.color == CALIBRATOR_COLORS[method]
        chosen = method == calibration.calibrator
        assert (shape.line.dash == "solid") == chosen and (shape.line.width == 4) == chosen
    assert lines[calibration.calibrator].x0 == tensor.threshold
    bars = only(figure, "histogram")
    assert sum(bars.y) == int(tensor.histogram.counts.sum()) == tensor.histogram.count
    assert figure.layout.yaxis.type == "log"
    default = plots.calibration_histogram(tensor)  # chosen found from tensor.threshold
    assert [s.line.width for s in default.layout.shapes] == [
        s.line.width for s in figure.layout.shapes
    ]


# ---------------------------------------------------------------------------------- build


def test_memory_timeline_follows_the_memory_plan(resnet_engines: ResnetEngines) -> None:
    engine = resnet_engines.int8
    memory = engine.memory
    figure = plots.memory_timeline(engine)
    live, naive = only(figure, "live"), only(figure, "naive")
    assert list(live.y) == list(memory.live_bytes)
    assert list(live.x) == list(range(len(engine.plan.layers)))
    expected = [
        sum(size for name, size in memory.sizes.items() if memory.intervals[name][0] <= index)
        for index in range(len(engine.plan.layers))
    ]
    assert list(naive.y) == expected and naive.y[-1] == memory.naive_bytes
    assert max(live.y) <= memory.arena_bytes < memory.naive_bytes
    assert {shape.y0 for shape in figure.layout.shapes} == {
        memory.arena_bytes,
        memory.naive_bytes,
    }


def test_build_timeline_totals_are_the_step_seconds(resnet_engines: ResnetEngines) -> None:
    steps = optimize(load(resnet_engines.proto), "O3").steps
    assert steps
    figure = plots.build_timeline(steps)
    bars = only(figure, "passes")
    assert list(bars.y) == list(dict.fromkeys(step.pass_name for step in steps))
    for name, seconds in zip(bars.y, bars.x):
        assert seconds == pytest.approx(sum(s.seconds for s in steps if s.pass_name == name))
    assert sum(bars.x) == pytest.approx(sum(step.seconds for step in steps))
    from_json = only(plots.build_timeline([step.to_json() for step in steps]), "passes")
    assert list(from_json.x) == list(bars.x)
    log = resnet_engines.int8.log
    with_log = plots.build_timeline(steps, build_log=log)
    decisions = only(with_log, "decisions")
    assert sum(decisions.x) == len(log.entries)
    assert list(decisions.y) == list(dict.fromkeys(entry.stage for entry in log.entries))


# ---------------------------------------------------------------------------------- output


def _all_figures(engines: ResnetEngines) -> dict[str, Callable[[], go.Figure]]:
    calibration = engines.int8.calibration
    assert calibration is not None
    tensor = next(iter(calibration.tensors.values()))
    reports = {"fp32": engines.fp32_report, "int8": engines.int8_report}
    return {
        "layer_latency": lambda: plots.layer_latency(engines.int8_report),
        "latency_sunburst": lambda: plots.latency_sunburst(engines.int8_report),
        "precision_mix": lambda: plots.precision_mix(engines.int8_report),
        "memory_timeline": lambda: plots.memory_timeline(engines.int8),
        "layer_error": lambda: plots.layer_error(engines.errors),
        "calibration_histogram": lambda: plots.calibration_histogram(tensor),
        "engine_comparison": lambda: plots.engine_comparison(reports, "fp32"),
        "roofline": lambda: plots.roofline(engines.fp32_report, 50.0, 20.0),
        "build_timeline": lambda: plots.build_timeline([], build_log=engines.int8.log),
    }


def test_every_figure_serializes_and_embeds_plotly_without_a_cdn(
    resnet_engines: ResnetEngines,
) -> None:
    for name, make in _all_figures(resnet_engines).items():
        figure = make()
        assert isinstance(figure, go.Figure), name
        json.loads(figure.to_json())
        page = plotly.io.to_html(figure, include_plotlyjs=True, full_html=True)
        assert CDN_REFERENCE.search(page) is None, name
        assert "Plotly.newPlot" in page, name


def test_model_strings_are_escaped_in_hover_and_annotations(
    resnet_engines: ResnetEngines,
) -> None:
    report = resnet_engines.fp32_report
    first = dataclasses.replace(report.layers[0], layer=EVIL, tactic=EVIL)
    evil_report = dataclasses.replace(report, layers=(first, *report.layers[1:]))
    bars = only(plots.layer_latency(evil_report), "layers")
    hover = bars.hovertext[list(bars.x).index(EVIL)]  # the data itself stays the raw name
    assert "<img" not in hover and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in hover
    error = dataclasses.replace(resnet_engines.errors[0], layer=EVIL, cosine=0.5)
    figure = plots.layer_error([error, *resnet_engines.errors[1:]])
    (note,) = [a for a in figure.layout.annotations if a.name == "first_divergent"]
    assert "<img" not in note.text and "&lt;img" in note.text
