"""The extension's TypeScript unit tests (vitest, jsdom) on fixtures written from real sessions.

The fixtures: the zoo ResNet's session payload after ``run()``, ``build()`` and a short
profile; what the Python side says is visible / removed / added at every position and the
fill colour of every node under each overlay (studio.graph_svg); a session whose first node
and title carry an HTML-injection name; and the palette (studio.colors.palette_json) with
sampled scale colours. The sources, tests and benchmark are type-checked first (tsc, strict);
the suite reads the fixtures from ``GIE_EXTENSION_FIXTURES``, and this test fails if any
fixture-based test was skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine import zoo
from engine.config import BuilderConfig
from engine.onnx_io import load
from studio.colors import ERROR_SCALE, LATENCY_SCALE, palette_json, scale_color
from studio.graph_svg import _node_colors, visible
from studio.schema import OVERLAYS, validate_payload
from studio.session import Session

EXTENSION = Path(__file__).resolve().parent.parent / "extension"
HOSTILE = "<img src=x onerror=alert(1)>"
FAST = BuilderConfig(tactic_sources=frozenset({"reference"}))
SAMPLES = (0.0, 0.1, 0.25, 0.4, 0.5, 0.77, 1.0, 1.5, -0.2)


def _expected(payload: dict[str, Any]) -> dict[str, Any]:
    """Visibility, ghosts and overlay fills as the Python side computes them."""
    positions = range(len(payload["steps"]) + 1)
    nodes = payload["nodes"]
    last = len(payload["steps"])
    shown = [node for node in nodes if visible(node, last)]
    fills = {}
    for overlay in OVERLAYS:
        colors, legend = _node_colors(shown, payload["layers"], overlay)
        fills[overlay] = {"fills": colors, "legend": [list(item) for item in legend]}
    return {
        "visible": {k: [n["id"] for n in nodes if visible(n, k)] for k in positions},
        # at position k the current step is k - 1 (none at 0): its ghosts and its additions
        "removed": {k: [n["id"] for n in nodes if k and n["died"] == k - 1] for k in positions},
        "added": {k: [n["id"] for n in nodes if k and n["born"] == k - 1] for k in positions},
        "overlays_at_last_step": fills,
    }


def _write(folder: Path, name: str, data: Any) -> None:
    (folder / name).write_text(json.dumps(data, indent=1), encoding="utf-8")


def _write_fixtures(folder: Path) -> None:
    with Session(zoo.build("resnet"), FAST) as session:
        session.run()
        session.build()
        session.profile(iterations=2, warmup=0)
        payload = session.payload()
    validate_payload(payload)
    assert any(len(step["added"]) == 1 and len(step["removed"]) > 1 for step in payload["steps"])
    _write(folder, "resnet.json", payload)
    _write(folder, "resnet_expected.json", _expected(payload))

    model = load(zoo.build("resnet"))
    model.graph.name = HOSTILE
    next(iter(model.graph)).name = HOSTILE
    with Session(model, FAST) as session:
        session.run()
        hostile = session.payload()
    validate_payload(hostile)
    assert any(node["id"] == HOSTILE for node in hostile["nodes"])
    _write(folder, "hostile.json", hostile)

    palette = palette_json()
    palette["samples"] = {
        "latency": [[t, scale_color(LATENCY_SCALE, t)] for t in SAMPLES],
        "error": [[t, scale_color(ERROR_SCALE, t)] for t in SAMPLES],
    }
    _write(folder, "palette.json", palette)


def test_typescript_unit_tests_pass_on_fixtures_from_real_sessions(tmp_path: Path) -> None:
    """Sources, tests and benchmark type-check (strict), then vitest passes with no skips."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the extension's TypeScript tests need Node.js 20+")
    vitest = EXTENSION / "node_modules" / "vitest" / "vitest.mjs"
    assert vitest.exists(), f"{vitest} is missing: run `make setup` (installs the node deps)"
    typecheck = subprocess.run(
        [node, "node_modules/typescript/bin/tsc", "-p", "tsconfig.test.json"],
        cwd=EXTENSION,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert typecheck.returncode == 0, "TypeScript (strict) errors:\n" + typecheck.stdout[-6000:]
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    _write_fixtures(fixtures)
    report = tmp_path / "vitest.json"
    result = subprocess.run(
        [
            node,
            str(vitest),
            "run",
            "--reporter=default",
            "--reporter=json",
            f"--outputFile.json={report}",
        ],
        cwd=EXTENSION,
        env={**os.environ, "GIE_EXTENSION_FIXTURES": str(fixtures), "CI": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = json.loads(report.read_text(encoding="utf-8"))
    assert summary["numFailedTests"] == 0
    assert summary["numPendingTests"] == 0 and summary["numTodoTests"] == 0, (
        "some TypeScript tests were skipped: " + result.stdout[-3000:]
    )
    assert summary["numPassedTests"] >= 20
