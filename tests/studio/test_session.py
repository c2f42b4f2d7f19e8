"""studio.Session: timeline cursor invariants, builds, click-to-rebuild, payload and display."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import plotly.offline
import pytest

from engine import zoo
from engine.builder import build
from engine.config import BuilderConfig, Precision
from engine.onnx_io import load
from studio.display import mimebundle
from studio.schema import (
    JSON_SCHEMA,
    MIME_TYPE,
    SCHEMA_PATH,
    PayloadError,
    schema_json,
    validate_payload,
)
from studio.session import Session

TACTICS = frozenset({"reference", "im2col", "direct"})


@pytest.fixture(scope="module")
def resnet() -> onnx.ModelProto:
    return zoo.build("resnet")


@pytest.fixture
def session(resnet: onnx.ModelProto):
    with Session(load(resnet), BuilderConfig(tactic_sources=TACTICS, timing_iterations=2)) as s:
        yield s


def _visible(payload: dict, position: int) -> set[str]:
    return {
        n["id"]
        for n in payload["nodes"]
        if n["born"] < position and (n["died"] is None or n["died"] >= position)
    }


def test_step_undo_redo_goto_move_a_cursor_over_the_recorded_steps(session: Session) -> None:
    total = len(session.steps)
    assert total > 10 and session.position == 0
    first = session.step()
    assert first is session.steps[0] and session.position == 1
    session.step()
    assert session.undo() and session.position == 1
    assert session.redo() and session.position == 2
    assert not session.redo()  # nothing left to redo
    session.goto(total)
    assert session.step() is None and session.position == total
    assert session.undo() and session.position == 2
    session.goto(5)
    assert not session.redo()  # a new move clears the redo history
    with pytest.raises(IndexError, match="outside 0"):
        session.goto(total + 1)
    assert session.position == 5


def test_the_graph_at_a_position_is_the_replay_of_that_many_steps(session: Session) -> None:
    payload = session.payload()
    for position in (0, 7, len(session.steps)):
        session.goto(position)
        names = {node.name for node in session.model.graph}
        visible = _visible(payload, position)
        assert names == {v for v in visible if not v.startswith(("input:", "output:"))}


def test_building_at_the_last_step_equals_a_direct_build(
    session: Session, resnet: onnx.ModelProto
) -> None:
    session.run()
    ours = session.build()
    direct = build(load(resnet), session.config.with_changes(timing_cache_path=None))
    assert [layer.qualified_op for layer in ours.plan.layers] == [
        layer.qualified_op for layer in direct.plan.layers
    ]
    assert [layer.origins for layer in ours.plan.layers] == [
        layer.origins for layer in direct.plan.layers
    ]
    feeds = zoo.make_inputs(resnet, seed=3)
    np.testing.assert_allclose(ours.run(feeds)["output"], direct.run(feeds)["output"], rtol=1e-5)


def test_building_midway_builds_what_is_shown(session: Session) -> None:
    session.goto(0)
    engine = session.build()
    assert len(engine.plan.layers) == len(list(session.original.graph))


def test_set_precision_on_one_layer_retunes_only_that_layer(session: Session) -> None:
    session.run()
    session.build()
    conv = next(n for n in session.layer_names() if "layer1.0/relu/" in n)
    delta = session.set_precision(conv, "fp16")
    assert delta.layers_retuned == [conv]  # every other layer came from the timing cache
    hits = [
        e
        for e in session.engine.log.entries
        if e.stage == "tactics" and "timing cache" in e.message
    ]
    assert hits  # the unchanged convolutions were answered by the cache
    assert session.precision_of(conv) == "fp16"
    assert delta.cosine_before == pytest.approx(1.0)
    assert 0.999 < delta.cosine_after <= 1.0
    assert delta.latency_after_ms > 0
    assert conv in delta.summary() and "fp16" in delta.summary()


def test_set_precision_int8_by_glob_calibrates_once_and_reports_the_delta(
    session: Session,
) -> None:
    session.run()
    delta = session.set_precision("*", Precision.INT8)
    layers = session.engine.plan.layers
    assert any(layer.op_type == "QConv" for layer in layers)
    assert session.engine.calibration is not None
    assert 0.99 < delta.cosine_after < 1.0
    errors = session.layer_errors()
    assert {e.precision for e in errors} >= {"int8"}


def test_pin_tactic_and_unpin(session: Session) -> None:
    session.run()
    session.build()
    conv = next(n for n in session.layer_names() if n.endswith("ConvAct"))
    session.pin_tactic(conv, "direct")
    assert session.engine.plan.layer(conv).tactic == "direct"
    session.pin_tactic(conv, None)
    assert not any(pattern for pattern, _ in session.config.tactic_pins)
    with pytest.raises(KeyError, match="no layer named"):
        session.pin_tactic("nope", "direct")


def test_the_payload_follows_the_schema_and_the_file_on_disk(session: Session) -> None:
    assert json.loads(SCHEMA_PATH.read_text()) == JSON_SCHEMA
    assert SCHEMA_PATH.read_text() == schema_json()
    session.run()
    session.profile(iterations=2)
    session.layer_errors()
    payload = session.payload()
    validate_payload(payload)
    json.dumps(payload, allow_nan=False)  # plain JSON: no NaN or inf
    assert payload["current_step"] == len(payload["steps"])
    assert set(payload["layers"]) == {layer.name for layer in session.engine.plan.layers}
    assert all(v["latency_ms"] is not None for v in payload["layers"].values())
    broken = dict(payload, edges=[*payload["edges"], {**payload["edges"][0], "target": "ghost"}])
    with pytest.raises(PayloadError, match="no node 'ghost'"):
        validate_payload(broken)
    with pytest.raises(PayloadError, match="current_step"):
        validate_payload(dict(payload, current_step=-1))


def test_the_display_bundle_has_our_mime_type_and_escaped_fallbacks(resnet) -> None:
    model = load(resnet)
    hostile = "<img src=x onerror=alert(1)>"
    first = next(iter(model.graph))
    first.name = hostile
    with Session(model, BuilderConfig(tactic_sources=frozenset({"reference"}))) as session:
        bundle = session._repr_mimebundle_()
    assert set(bundle) == {MIME_TYPE, "text/html", "text/plain"}
    assert any(n["id"] == hostile for n in bundle[MIME_TYPE]["nodes"])
    assert hostile not in bundle["text/html"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in bundle["text/html"]
    assert "0 of" in bundle["text/plain"]
    assert mimebundle(bundle[MIME_TYPE])["text/plain"] == bundle["text/plain"]


def test_export_writes_engine_recipe_qdq_and_report(session: Session, tmp_path) -> None:
    import onnxruntime as ort

    session.run()
    session.set_precision("*", "int8")
    paths = session.export(tmp_path / "out")
    assert all(p.is_file() for p in paths.values())
    ort_session = ort.InferenceSession(str(paths["qdq"]), providers=["CPUExecutionProvider"])
    feeds = session.feeds
    ours = session.engine.run(feeds)["output"]
    theirs = ort_session.run(None, feeds)[0]
    cosine = float(np.dot(ours.ravel(), theirs.ravel()))
    cosine /= float(np.linalg.norm(ours) * np.linalg.norm(theirs))
    assert cosine > 0.999
    text = paths["report"].read_text()
    assert "<svg" in text
    bundle = plotly.offline.get_plotlyjs()
    assert text.count(bundle) == 1  # plotly.js embedded once; its own source links are inert
    text = text.replace(bundle, "")
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", text)  # nothing to fetch


def test_close_removes_the_working_folder(resnet) -> None:
    session = Session(resnet, BuilderConfig(tactic_sources=frozenset({"reference"})))  # a proto
    folder = session._workdir
    import os

    assert os.path.isdir(folder)
    session.close()
    session.close()  # idempotent
    assert not os.path.exists(folder)


def test_compare_profiles_engines_on_the_same_feeds(session: Session, resnet) -> None:
    from studio.plots import engine_comparison

    session.run()
    session.build()
    with Session(load(resnet), BuilderConfig(tactic_sources=frozenset({"reference"}))) as other:
        other.run()
        other.set_precision("*", "fp16")
        comparison = session.compare(other, iterations=2)
    assert set(comparison.reports) == {"this", "#1"}
    assert comparison.cosine["this"] == pytest.approx(1.0)
    assert 0.9999 < comparison.cosine["#1"] < 1.0
    figure = engine_comparison(comparison.reports, baseline="this")
    assert figure.data  # aligned by origin nodes: one speedup per group


def test_python_m_studio_writes_the_export_folder(resnet, tmp_path) -> None:
    import subprocess
    import sys

    path = tmp_path / "resnet.onnx"
    onnx.save(resnet, path)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "studio", str(path), "--out", str(out), "--fp16"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "optimizer steps at O3" in result.stdout
    names = {p.name for p in out.iterdir()}
    assert names == {"model.gie", "recipe.json", "model_qdq.onnx", "report.html"}
    missing = subprocess.run(
        [sys.executable, "-m", "studio", str(tmp_path / "nope.onnx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2 and "nope.onnx" in missing.stderr


def test_an_fp16_session_keeps_overflowing_layers_in_fp32() -> None:
    from onnx import TensorProto, helper, numpy_helper

    weight = np.full((4, 8), 3000.0, dtype=np.float32)  # logits ~ 1e5: beyond float16
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["logits"], name="fc"),
            helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
        ],
        "overflow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.full((2, 4), 9.0, dtype=np.float32)}
    config = BuilderConfig(
        precisions=frozenset({Precision.FP32, Precision.FP16}),
        tactic_sources=frozenset({"reference"}),
    )
    with Session(model, config, feeds=feeds) as session:
        session.run()
        engine = session.build()
        output = engine.run(feeds)["y"]
        precisions = {layer.name: layer.precision.value for layer in engine.plan.layers}
    assert np.isfinite(output).all()
    assert precisions["softmax"] == "fp32" and precisions["fc"] == "fp32"
    assert "overflows fp16" in engine.plan.layer("softmax").precision_reason
