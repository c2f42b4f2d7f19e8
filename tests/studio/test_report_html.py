"""studio.report_html: one offline HTML file with the graph, timeline, layers and figures."""

from __future__ import annotations

import copy
import os
import re
import stat
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import onnx_ir as ir
import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from engine import zoo
from engine.builder import build
from engine.config import BuilderConfig
from studio.graph_svg import visible
from studio.report_html import REPORT_CSP, write_report_html
from studio.schema import session_payload, validate_payload
from studio.timeline import record_timeline

HOSTILE = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"

#: Ways an HTML document makes the browser load something from an http(s) URL.
_LOADS = [
    r"""\bsrc\s*=\s*["'`]?\s*https?://""",
    r"""\bhref\s*=\s*["'`]?\s*https?://""",
    r"""url\(\s*["']?\s*https?://""",
    r"""@import\s+["']?\s*(?:url\()?\s*["']?https?://""",
    r"""\bimport\s*\(?\s*["'`]https?://""",
    r"""\bfrom\s+["'`]https?://""",
]


class _Tables(HTMLParser):
    """Every <table> of a document as a list of rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def payload() -> dict[str, Any]:
    """A real session payload: zoo resnet optimized at O3, with its built engine's layers."""
    proto = zoo.build("resnet")
    timeline = record_timeline(ir.from_proto(proto), "O3")
    engine = build(ir.from_proto(proto), BuilderConfig(tactic_sources=frozenset({"reference"})))
    io = {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 3, 32, 32]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": [1, 10]}],
    }
    result = session_payload(timeline, len(timeline.steps), "resnet", io, engine=engine)
    validate_payload(result)
    assert result["steps"] and result["layers"]
    return result


def _figures(payload: dict[str, Any]) -> dict[str, go.Figure]:
    steps = payload["steps"]
    return {
        "Estimated latency per step": go.Figure(
            go.Scatter(y=[s["after"]["latency_ms"] for s in steps], mode="lines+markers")
        ),
        "Nodes per step": go.Figure(go.Bar(y=[s["after"]["node_count"] for s in steps])),
        "Layers": go.Figure(go.Bar(x=list(payload["layers"]), y=[1] * len(payload["layers"]))),
    }


@pytest.fixture(scope="module")
def report(payload: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("report") / "report.html"
    written = write_report_html(path, payload, _figures(payload), title="resnet report")
    assert written == path
    return path.read_text(encoding="utf-8")


def _tables(text: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(text.replace(get_plotlyjs(), ""))
    return parser.tables


def test_plotly_is_embedded_once(report: str) -> None:
    assert report.count(get_plotlyjs()) == 1
    assert report.count("Plotly.newPlot(") == 3
    assert "cdn.plot.ly/plotly" not in report.replace(get_plotlyjs(), "")


def test_nothing_is_loaded_from_the_network(report: str) -> None:
    # plotly.js itself mentions map tile servers (map traces, unused); everything else is ours
    ours = report.replace(get_plotlyjs(), "")
    found = [m.group(0) for pattern in _LOADS for m in re.finditer(pattern, ours)]
    assert found == []
    assert f'<meta http-equiv="Content-Security-Policy" content="{REPORT_CSP}">' in report
    assert "default-src 'none'" in REPORT_CSP and "connect-src 'none'" in REPORT_CSP
    assert "http" not in REPORT_CSP
    assert '"showSendToCloud": false' in ours


def test_timeline_lists_every_step(report: str, payload: dict[str, Any]) -> None:
    timeline = next(t for t in _tables(report) if t[0][0] == "step")
    assert timeline[0][3] == "removed → added"
    rows = timeline[1:]
    assert len(rows) == len(payload["steps"])
    for row, step in zip(rows, payload["steps"]):
        assert row[0] == str(step["index"])
        assert row[1] == step["pass"]
        assert row[2] == (step["rule"] or "")
        assert row[3].startswith(f"{len(step['removed'])} → {len(step['added'])}")
        assert float(row[4]) == pytest.approx(step["before"]["latency_ms"], rel=1e-3)
        assert float(row[5]) == pytest.approx(step["after"]["latency_ms"], rel=1e-3)


def test_layer_table_lists_every_engine_layer(report: str, payload: dict[str, Any]) -> None:
    layers = next(t for t in _tables(report) if t[0][0] == "layer")
    assert layers[0] == ["layer", "op", "precision", "tactic", "latency (ms)", "reason"]
    assert [row[0] for row in layers[1:]] == list(payload["layers"])
    for row, facts in zip(layers[1:], payload["layers"].values()):
        assert row[1].startswith(facts["op"])
        assert row[2] == facts["precision"]
        assert row[3] == facts["tactic"]


def test_graph_of_the_final_step(report: str, payload: dict[str, Any]) -> None:
    final = len(payload["steps"])
    expected = sum(visible(node, final) for node in payload["nodes"])
    assert report.count('<g class="node"') == expected
    assert expected < sum(visible(node, 0) for node in payload["nodes"])  # fused resnet
    assert "ConvAct" in report


def test_hostile_text_is_escaped(payload: dict[str, Any], tmp_path: Path) -> None:
    hostile = copy.deepcopy(payload)
    hostile["title"] = HOSTILE
    hostile["nodes"].append(
        {**hostile["nodes"][0], "id": HOSTILE, "op": HOSTILE, "born": -1, "died": None}
    )
    hostile["steps"][0]["rule"] = HOSTILE
    hostile["steps"][0]["removed"] = [HOSTILE]
    hostile["layers"][HOSTILE] = {
        "op": HOSTILE,
        "precision": HOSTILE,
        "precision_reason": HOSTILE,
        "role": HOSTILE,
        "tactic": HOSTILE,
        "latency_ms": None,
    }
    hostile["inputs"][0]["name"] = HOSTILE
    figures = {HOSTILE: go.Figure(go.Bar(x=[HOSTILE], y=[1]))}
    path = write_report_html(tmp_path / "hostile.html", hostile, figures, title=HOSTILE)
    text = path.read_text(encoding="utf-8").replace(get_plotlyjs(), "")
    assert HOSTILE not in text
    assert "<img" not in text
    assert text.count(ESCAPED) >= 8  # title x2, input, graph, timeline x2, layer row, figure
    assert HOSTILE in [row[0] for row in _tables(text)[-1]]  # the layer row, unescaped by parsing


def test_written_atomically(payload: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    path.write_text("old report", encoding="utf-8")
    write_report_html(path, payload, {}, title="no figures")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "Plotly" not in text
    assert sorted(os.listdir(tmp_path)) == ["report.html"]  # no temporary file left
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    class Broken:
        """Not a figure: plotly refuses it while the report is rendered."""

    with pytest.raises(ValueError):
        write_report_html(path, payload, {"broken": Broken()}, title="broken")
    assert path.read_text(encoding="utf-8") == text  # the previous report is untouched
    assert sorted(os.listdir(tmp_path)) == ["report.html"]
