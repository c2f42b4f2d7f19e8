"""studio.widgets: trait validation, and every widget's round trip through a real Session.

Widgets run headless (ipywidgets falls back to a dummy comm without a kernel), so a change of
a trait or a dropdown here is what a click in the front end does once it reaches the kernel.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator

import ipywidgets
import onnx
import pytest
import traitlets

from engine import zoo
from engine.builder import BuildError
from engine.config import BuilderConfig, Precision, PrecisionMode
from engine.onnx_io import load
from studio.session import Session
from studio.widgets import (
    NO_CALIBRATION,
    CalibrationViewer,
    GraphView,
    PrecisionTable,
    StepScrubber,
    TacticExplorer,
    precision_table,
    step_diff_text,
    tactic_rows,
)
from studio.widgets_base import html_table

#: Three conv tactic families, each timed once after one warm-up run: real candidates, fast.
CONFIG = BuilderConfig(
    tactic_sources=frozenset({"reference", "im2col", "direct"}),
    timing_iterations=1,
    timing_warmup=1,
)


@pytest.fixture(scope="session")
def resnet() -> onnx.ModelProto:
    return zoo.build("resnet")


@pytest.fixture(scope="session")
def int8_session(resnet: onnx.ModelProto) -> Iterator[Session]:
    """Fully optimized, fp32 + int8, calibrated on two seeded batches; read-only in tests."""
    batches = [zoo.make_inputs(resnet, seed=seed) for seed in range(2)]
    config = CONFIG.with_changes(precisions=frozenset({Precision.FP32, Precision.INT8}))
    with Session(load(resnet), config, calibration_data=batches) as session:
        session.run()
        session.build()
        yield session


@pytest.fixture
def session(resnet: onnx.ModelProto) -> Iterator[Session]:
    """A fresh fp32 session at the last step with an engine (tests move and rebuild it)."""
    with Session(load(resnet), CONFIG) as fresh:
        fresh.run()
        fresh.build()
        yield fresh


def _first_conv(session: Session) -> str:
    return next(name for name in session.layer_names() if name.endswith("ConvAct"))


# ---------------------------------------------------------------------- GraphView


def test_graph_view_is_the_extension_model_with_the_session_payload(session: Session) -> None:
    view = GraphView(session)
    assert (view._model_name, view._view_name) == ("GraphModel", "GraphView")
    assert view._model_module == view._view_module == "gie-studio"
    assert view._model_module_version == view._view_module_version == "^0.1.0"
    assert view.payload["schema"] == "gie.session"
    assert view.step == session.position == len(session.steps)
    assert view.overlay == "family" and view.selected == "" and view.last_delta == ""
    synced = {name for name in view.traits(sync=True) if not name.startswith("_")}
    expected = {"payload", "step", "selected", "overlay", "precision_overrides", "last_delta"}
    assert expected <= synced
    json.dumps(view.get_state(), allow_nan=False)  # what the comm sends is strict JSON


@pytest.mark.parametrize(
    ("trait", "value", "shown"),
    [
        ("selected", "no/such<node>", "no/such<node>"),
        ("step", -1, "-1"),
        ("step", 10_000, "10000"),
        ("overlay", "rainbow", "rainbow"),
    ],
)
def test_graph_view_rejects_bad_values_naming_them(
    session: Session, trait: str, value: object, shown: str
) -> None:
    view = GraphView(session)
    before = getattr(view, trait)
    with pytest.raises(traitlets.TraitError, match=re.escape(shown)):
        setattr(view, trait, value)
    assert getattr(view, trait) == before
    assert session.position == len(session.steps)


def test_graph_view_rejects_unknown_precision_and_unknown_layer(session: Session) -> None:
    view = GraphView(session)
    layer = _first_conv(session)
    with pytest.raises(traitlets.TraitError, match="'int4'"):
        view.precision_overrides = {layer: "int4"}
    with pytest.raises(traitlets.TraitError, match=re.escape("'/no/such/layer'")):
        view.precision_overrides = {"/no/such/layer": "fp16"}
    assert view.precision_overrides == {} and view.last_delta == ""
    view.selected = view.payload["nodes"][0]["id"]  # a real node id is accepted
    view.overlay = "latency"
    assert session.overlay == "latency"


def test_setting_step_moves_the_session_and_session_moves_refresh_the_view(
    session: Session,
) -> None:
    view = GraphView(session)
    view.step = 3
    assert session.position == 3
    assert view.payload["current_step"] == 3
    session.step()
    assert view.step == 4 and view.payload["current_step"] == 4
    session.undo()
    assert view.step == 3
    view.step = 0
    assert session.position == 0 and view.payload["current_step"] == 0


def test_precision_override_on_one_layer_rebuilds_it(session: Session) -> None:
    view = GraphView(session)
    layer = _first_conv(session)
    assert session.engine is not None
    assert session.engine.plan.layer(layer).precision == Precision.FP32
    view.precision_overrides = {layer: "fp16"}
    assert session.engine.plan.layer(layer).precision == Precision.FP16
    assert layer in view.last_delta and "fp16" in view.last_delta
    assert view.payload["layers"][layer]["precision"] == "fp16"
    # An unchanged entry does not rebuild again; a second layer does.
    engine = session.engine
    view.precision_overrides = {layer: "fp16"}
    assert session.engine is engine


# ---------------------------------------------------------------------- precision table


def test_precision_table_dropdown_rebuilds_and_filter_hides_rows(session: Session) -> None:
    table = precision_table(session)
    assert isinstance(table, PrecisionTable) and isinstance(table.widget, ipywidgets.VBox)
    assert list(table.rows) == session.layer_names()
    layer = _first_conv(session)
    table.rows[layer].value = "fp16"
    assert session.engine.plan.layer(layer).precision == Precision.FP16
    assert html.escape(layer) in table.status.value

    table.filter.value = "maxpool"
    assert table.visible_layers() == ["/maxpool/MaxPool"]
    hidden = [name for name, box in table.row_boxes.items() if box.layout.display == "none"]
    assert sorted(hidden) == sorted(set(table.rows) - {"/maxpool/MaxPool"})

    table.filter.value = "gemm"  # an op type: /fc/Gemm is a Gemm layer
    assert table.visible_layers() == ["/fc/Gemm"]
    assert table.apply_all("fp16") == ["/fc/Gemm"]
    assert session.engine.plan.layer("/fc/Gemm").precision == Precision.FP16
    assert table.rows["/fc/Gemm"].value == "fp16" and "/fc/Gemm" in table.status.value
    with pytest.raises(ValueError, match="'bf16'"):
        table.apply_all("bf16")

    table.filter.value = ""
    assert table.visible_layers() == list(table.rows)


def test_precision_table_reports_a_refused_request_and_reverts(resnet: onnx.ModelProto) -> None:
    obey = CONFIG.with_changes(precision_mode=PrecisionMode.OBEY)
    with Session(load(resnet), obey) as strict:
        strict.run()
        table = precision_table(strict)
        layer = "/maxpool/MaxPool"  # no int8 kernel: an "obey" request fails the build
        with pytest.raises(BuildError):
            table.rows[layer].value = "int8"
        assert "rebuild failed" in table.status.value and html.escape(layer) in table.status.value
        assert table.rows[layer].value == strict.precision_of(layer) == "fp32"


def test_precision_table_empties_after_a_move_and_refills_on_build(session: Session) -> None:
    table = precision_table(session)
    session.goto(2)
    assert table.rows == {} and table.build_button.layout.display is None
    table.build_button.click()
    assert session.engine is not None
    assert list(table.rows) == session.layer_names()
    assert table.build_button.layout.display == "none"


# ---------------------------------------------------------------------- step scrubber


def test_step_scrubber_moves_the_session_and_shows_the_step_diff(session: Session) -> None:
    scrubber = StepScrubber(session)
    assert scrubber.slider.max == len(session.steps)
    assert scrubber.slider.value == session.position
    scrubber.slider.value = 2
    assert session.position == 2
    step = session.steps[1]
    assert html.escape(step_diff_text(step)) in scrubber.text.value
    diff = step_diff_text(step)
    assert step.pass_name in diff and "->" in diff
    assert all(name in diff for name in step.removed + step.added)
    session.goto(0)
    assert scrubber.slider.value == 0 and "original graph" in scrubber.text.value


# ---------------------------------------------------------------------- tactic explorer


def test_tactic_explorer_lists_every_candidate_with_recomputed_margins(session: Session) -> None:
    explorer = TacticExplorer(session)
    layer = session.engine.plan.layer(explorer.layer.value)
    assert len(layer.candidates) > 1  # it opens on a layer that had a choice
    rows = explorer.rows()
    assert sorted(row.tactic for row in rows) == sorted(c.tactic for c in layer.candidates)
    medians = {c.tactic: c.median_ms for c in layer.candidates if c.samples > 0}
    winner = medians[layer.tactic]
    runner_up = min(ms for tactic, ms in medians.items() if tactic != layer.tactic)
    for row in rows:
        if row.tactic == layer.tactic:
            assert row.chosen and row.margin_ms == pytest.approx(runner_up - winner)
        elif row.tactic in medians:
            assert row.margin_ms == pytest.approx(medians[row.tactic] - winner)
            assert row.margin_ratio == pytest.approx((medians[row.tactic] - winner) / winner)
        assert html.escape(row.tactic) in explorer.table.value
    assert rows == tactic_rows(layer)


def test_tactic_explorer_follows_the_graph_selection(session: Session) -> None:
    view = GraphView(session)
    explorer = TacticExplorer(session, graph=view)
    target = session.layer_names()[-1]
    view.selected = target
    assert explorer.layer.value == target
    assert html.escape(target) in explorer.table.value


def test_tactic_explorer_pins_and_unpins(session: Session) -> None:
    explorer = TacticExplorer(session)
    name = explorer.layer.value
    chosen = session.engine.plan.layer(name).tactic
    other = next(t for t in explorer.pin_choice.options if t != chosen)
    explorer.pin_choice.value = other
    explorer.pin_button.click()
    assert session.config.tactic_pin(name) == other
    assert session.engine.plan.layer(name).tactic == other
    assert "pinned" in explorer.status.value and f"pinned to {other}" in explorer.table.value
    explorer.unpin_button.click()
    assert session.config.tactic_pin(name) is None
    assert "unpinned" in explorer.status.value


# ---------------------------------------------------------------------- calibration viewer


def test_calibration_viewer_lists_the_calibrated_tensors(int8_session: Session) -> None:
    viewer = CalibrationViewer(int8_session)
    calibration = int8_session.engine.calibration
    assert viewer.tensor_names() == list(calibration.tensors) and len(calibration.tensors) > 5
    name = viewer.tensor_names()[1]
    viewer.tensor.value = name
    tensor = calibration.tensors[name]
    assert html.escape(name) in viewer.thresholds.value
    assert all(method in viewer.thresholds.value for method in tensor.thresholds)
    assert calibration.calibrator in viewer.message.value
    # studio.plots is installed: the histogram is a plotly output of the selected tensor.
    assert viewer.figure is not None
    (output,) = viewer.plot.outputs
    assert "application/vnd.plotly.v1+json" in output["data"]


def test_calibration_viewer_says_when_there_is_no_calibration(session: Session) -> None:
    viewer = CalibrationViewer(session)
    assert viewer.tensor_names() == []
    assert viewer.message.value == html.escape(NO_CALIBRATION)


def test_html_from_model_text_is_escaped() -> None:
    table = html_table(["<h>"], [["<script>alert('x')</script>"]])
    assert "<script>" not in table and "&lt;script&gt;" in table and "&lt;h&gt;" in table
