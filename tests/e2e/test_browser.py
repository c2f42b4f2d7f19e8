"""The gie-studio extension in a real ``jupyter lab`` and Debian's Chromium (Playwright).

Few and decisive: the notebooks are written with nbformat at test time and run by the lab's own
kernel; every expectation (visible nodes, a fusion step's added/removed nodes, the layer a click
changes) is computed in this process from the same session the kernel builds. Each test ends
with the guard's checks (conftest.py): no request left 127.0.0.1, no JavaScript dialog opened,
no uncaught page error. One lab server serves the whole module; the tests share one xdist group
so they never run beside another browser test.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import onnx
import pytest
from lab_harness import (
    LabServer,
    cell,
    kernel_environment,
    open_lab,
    open_notebook,
    run_all_cells,
    run_cell,
)
from onnx import TensorProto, helper

from engine import zoo
from engine.config import BuilderConfig
from studio.session import Session

pytestmark = pytest.mark.xdist_group("browser")
expect = pytest.importorskip("playwright.sync_api", reason="Python playwright is missing").expect

FAST = BuilderConfig(tactic_sources=frozenset({"reference"}))
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_2 = '"><svg onload=alert(2)>'
#: A kernelspec no machine has: opening the saved notebook asks for a kernel; we pick none.
ABSENT_KERNEL = "gie-e2e-no-such-kernel"
RENDER_TIMEOUT_MS = 60_000

RESNET_CELLS = [
    """\
    import json

    import studio
    from engine import zoo
    from engine.config import BuilderConfig
    from studio.widgets import GraphView

    s = studio.Session(zoo.build("resnet"), BuilderConfig(tactic_sources=frozenset({"reference"})))
    s.run()
    s.build()""",
    "s",
    "view = GraphView(s)\nview",
    """\
    print("E2E-STATE " + json.dumps({
        "selected": view.selected,
        "precision": s.precision_of(view.selected) if view.selected else None,
        "last_delta": view.last_delta,
    }))""",
]
MIME_CELL, WIDGET_CELL, STATE_CELL = 1, 2, 3


def write_notebook(folder: Path, name: str, sources: list[str], kernel: str = "python3") -> str:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(textwrap.dedent(s)) for s in sources]
    notebook.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    nbformat.write(notebook, folder / name)
    return name


def visible_ids(payload: dict[str, Any], k: int) -> set[str]:
    """Nodes drawn (not ghosted) after ``k`` steps (studio.schema)."""
    return {
        n["id"] for n in payload["nodes"] if n["born"] < k and (n["died"] is None or n["died"] >= k)
    }


def ghosted_ids(payload: dict[str, Any], k: int) -> set[str]:
    """Nodes the step at position ``k`` removed (drawn ghosted)."""
    return {n["id"] for n in payload["nodes"] if k > 0 and n["died"] == k - 1}


def node_ids(root: Any, selector: str = "g.gie-node") -> list[str]:
    return root.locator(selector).evaluate_all("(nodes) => nodes.map(n => n.dataset.id)")


def wait_for_graph(root: Any, count: int) -> None:
    """Wait until ``root`` (a .gie-studio locator) draws ``count`` undimmed nodes."""
    root.locator("svg.gie-graph-svg").wait_for(timeout=RENDER_TIMEOUT_MS)
    expect(root.locator("g.gie-node:not(.gie-removed)")).to_have_count(
        count, timeout=RENDER_TIMEOUT_MS
    )


def scrub_to(slider: Any, k: int) -> None:
    """Move a range input to ``k`` with the keyboard, as a user scrubbing would."""
    slider.focus()
    current = int(slider.input_value())
    key = "ArrowLeft" if k < current else "ArrowRight"
    for _ in range(abs(current - k)):
        slider.press(key)
    assert int(slider.input_value()) == k


def save_screenshot(page: Any, artifacts: Path, name: str, element: Any = None) -> Path:
    path = artifacts / f"{name}.png"
    (element or page).screenshot(path=str(path))
    return path


@dataclass(frozen=True)
class Resnet:
    """The resnet notebook open and run in one lab page, and the same session's payload."""

    page: Any
    path: str
    payload: dict[str, Any]
    layers: list[str]

    @property
    def mime(self) -> Any:
        return cell(self.page, self.path, MIME_CELL).locator(".gie-studio")

    @property
    def widget(self) -> Any:
        return cell(self.page, self.path, WIDGET_CELL).locator(".gie-studio")


@pytest.fixture(scope="module")
def resnet_session() -> Iterator[Session]:
    with Session(zoo.build("resnet"), FAST) as session:
        session.run()
        session.build()
        yield session


@pytest.fixture(scope="module")
def resnet(
    lab: LabServer, module_context: Any, module_guard: Any, resnet_session: Session
) -> Resnet:
    """Opened and run once; the tests below read it in order (scrubbing the MIME view only, so
    the widget's session stays at the last step)."""
    path = write_notebook(lab.root_dir, "resnet.ipynb", RESNET_CELLS)
    page = module_guard.watch(module_context.new_page())
    open_lab(page, lab)
    assert open_notebook(page, path) == "python3"
    run_all_cells(page, path)
    return Resnet(page, path, resnet_session.payload(), resnet_session.layer_names())


def test_resnet_graph_and_timeline_render(resnet: Resnet, artifacts: Path) -> None:
    payload = resnet.payload
    steps = len(payload["steps"])
    k = payload["current_step"]
    assert k == steps
    expected = visible_ids(payload, k)
    for root in (resnet.mime, resnet.widget):
        wait_for_graph(root, len(expected))
        assert root.get_attribute("data-schema-version") == "1"
        assert root.locator("g.gie-node").count() == len(expected) + len(ghosted_ids(payload, k))
        drawn = node_ids(root, "g.gie-node:not(.gie-removed)")
        assert sorted(drawn) == sorted(expected)
        slider = root.locator("div.gie-timeline input.gie-timeline-slider")
        assert slider.get_attribute("type") == "range"
        assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("0", str(steps))
        assert slider.input_value() == str(k)
        assert root.locator("ol.gie-steps li.gie-step").count() == steps
        assert root.locator("path.gie-edge").count() > 0

    # the screenshot: graph, timeline and the node panel of a clicked fused layer
    layer = next(name for name in resnet.layers if name in expected)
    mime = resnet.mime
    mime.locator(f"g.gie-node[data-id='{layer}']").click()
    mime.locator("div.gie-panel h3.gie-panel-title").filter(has_text=layer).wait_for()
    shot = save_screenshot(resnet.page, artifacts, "test_resnet_graph_and_timeline_render", mime)
    save_screenshot(resnet.page, artifacts, "test_resnet_graph_and_timeline_render_page")
    assert shot.stat().st_size > 10_000


def test_scrub_to_fusion_step(resnet: Resnet) -> None:
    payload = resnet.payload
    index, step = next(
        (i, s)
        for i, s in enumerate(payload["steps"])
        if s["pass"] == "fuse_epilogue" and len(s["removed"]) >= 2 and s["added"]
    )
    k = index + 1
    root = resnet.mime
    wait_for_graph(root, len(visible_ids(payload, payload["current_step"])))
    scrub_to(root.locator("input.gie-timeline-slider"), k)
    wait_for_graph(root, len(visible_ids(payload, k)))
    assert sorted(node_ids(root, "g.gie-node.gie-added")) == sorted(step["added"])
    assert sorted(node_ids(root, "g.gie-node.gie-removed")) == sorted(step["removed"])
    assert sorted(node_ids(root, "g.gie-node:not(.gie-removed)")) == sorted(visible_ids(payload, k))
    assert root.locator("li.gie-step.gie-step-current").get_attribute("data-index") == str(index)
    label = root.locator("span.gie-timeline-label").text_content() or ""
    assert f"{k} / {len(payload['steps'])}" in label and step["rule"] in label
    provenance = root.locator("div.gie-provenance").text_content() or ""
    assert step["rule"] in provenance and "fused from" in provenance, provenance
    assert any(name in provenance for name in step["added"]), provenance


def test_widget_precision_click_reaches_kernel(resnet: Resnet) -> None:
    payload = resnet.payload
    expected = visible_ids(payload, payload["current_step"])
    root = resnet.widget
    wait_for_graph(root, len(expected))
    layer = next(
        name
        for name in resnet.layers
        if name in expected and payload["layers"][name]["precision"] == "fp32"
    )
    root.locator(f"g.gie-node[data-id='{layer}']").click()
    root.locator("div.gie-panel h3.gie-panel-title").filter(has_text=layer).wait_for()
    delta = root.locator("div.gie-delta")
    before = delta.text_content() or ""
    root.locator("select.gie-precision").select_option("fp16")
    change = f"{layer} -> fp16"
    expect(delta).to_contain_text(change, timeout=RENDER_TIMEOUT_MS)
    shown = (delta.text_content() or "").strip()
    assert shown != before.strip()
    text = run_cell(resnet.page, resnet.path, STATE_CELL)
    state = json.loads(text.split("E2E-STATE ", 1)[1])
    assert state["selected"] == layer
    assert state["precision"] == "fp16"
    assert change in state["last_delta"]
    assert state["last_delta"].strip() == shown
    # the refreshed payload comes back to the view: the node now carries its new precision
    node = root.locator(f"g.gie-node[data-id='{layer}']")
    expect(node).to_have_attribute("data-precision", "fp16", timeout=RENDER_TIMEOUT_MS)


def hostile_model() -> onnx.ModelProto:
    """Two nodes whose names (and the graph's) are HTML that would run script if parsed."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["<b>t</b>"], name=HOSTILE),
            helper.make_node("Sigmoid", ["<b>t</b>"], ["y"], name=HOSTILE_2),
        ],
        HOSTILE,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hostile_names_render_as_text(lab: LabServer, context: Any, guard: Any) -> None:
    model_path = lab.root_dir / "hostile.onnx"
    onnx.save(hostile_model(), model_path)
    path = write_notebook(
        lab.root_dir,
        "hostile.ipynb",
        [
            "import studio\nfrom studio.widgets import GraphView\n"
            "s = studio.Session('hostile.onnx')\ns.build()",
            "s",
            "GraphView(s)",
        ],
    )
    with Session(hostile_model()) as session:
        expected = visible_ids(session.payload(), 0)
    requests: list[str] = []
    page = guard.watch(context.new_page())
    page.on("request", lambda request: requests.append(request.url))
    open_lab(page, lab)
    open_notebook(page, path)
    run_all_cells(page, path)
    for index in (1, 2):
        root = cell(page, path, index).locator(".gie-studio")
        wait_for_graph(root, len(expected))
        assert HOSTILE in (root.text_content() or "")
        node = root.locator("g.gie-node").filter(has_text=HOSTILE).first
        node.click()
        title = root.locator("div.gie-panel h3.gie-panel-title")
        title.filter(has_text=HOSTILE).wait_for()
        assert title.text_content() == HOSTILE
        assert root.locator("img, script, iframe, [onerror], [onload]").count() == 0
    page.wait_for_timeout(500)  # an injected <img> would have loaded (and alerted) by now
    assert page.locator("img[src='x']").count() == 0
    assert page.locator("svg[onload]").count() == 0
    assert [url for url in requests if url.rstrip("/").endswith("/x")] == []
    assert guard.dialogs == []


def test_saved_outputs_render_without_kernel(
    lab: LabServer,
    context: Any,
    guard: Any,
    resnet_session: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(textwrap.dedent(source)) for source in RESNET_CELLS[:2]
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    monkeypatch.setenv("PYTHONPATH", kernel_environment()["PYTHONPATH"])
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(lab.root_dir)}},
    ).execute()
    # a notebook someone else saved: not trusted here, and its kernel is not installed
    notebook.metadata["kernelspec"] = {"name": ABSENT_KERNEL, "display_name": ABSENT_KERNEL}
    del notebook.metadata["language_info"]  # else the lab picks a kernel by language
    nbformat.write(notebook, lab.root_dir / "saved.ipynb")
    lab.shutdown_kernels()

    page = guard.watch(context.new_page())
    open_lab(page, lab)
    open_notebook(page, "saved.ipynb", kernel=False)
    dialog = page.locator(".jp-Dialog")
    dialog.wait_for(timeout=RENDER_TIMEOUT_MS)
    dialog.get_by_role("button", name="No Kernel").click()
    dialog.wait_for(state="detached")

    payload = resnet_session.payload()
    k = payload["current_step"]
    root = cell(page, "saved.ipynb", MIME_CELL).locator(".gie-studio")
    wait_for_graph(root, len(visible_ids(payload, k)))
    assert sorted(node_ids(root, "g.gie-node:not(.gie-removed)")) == sorted(visible_ids(payload, k))
    slider = root.locator("input.gie-timeline-slider")
    assert slider.input_value() == str(k)
    scrub_to(slider, k - 1)  # the timeline works from the saved output alone
    wait_for_graph(root, len(visible_ids(payload, k - 1)))
    assert lab.api("GET", "/api/kernels") == []
    kernel = page.evaluate("() => window.gieE2E['saved.ipynb'].sessionContext.kernelDisplayName")
    assert kernel == "No Kernel"
