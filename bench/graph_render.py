"""How long the gie-studio MIME renderer takes to draw a big graph in a real browser.

Starts a ``jupyter lab`` on 127.0.0.1 (the harness of the browser tests, tests/e2e/lab_harness.py)
and Debian's Chromium, opens a notebook without a kernel, and renders a synthetic payload of
``--nodes`` nodes (default 5,000: a chain with a residual edge every few nodes, every op family
of the palette) through the lab's own render-mime registry, ``--repeats`` times with a fresh
renderer each time, attached as a Lumino widget the way an output area attaches it. Timed in
the page with ``performance.now()``: from the call of ``renderModel`` until it resolves, until
every node is in the DOM, and until two animation frames later (painted). Not a test: it
prints, and asserts nothing about the time.

    .venv/bin/python bench/graph_render.py
    .venv/bin/python bench/graph_render.py --nodes 20000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import nbformat  # noqa: E402
from lab_harness import (  # noqa: E402
    LabServer,
    chromium_path,
    installed_extension,
    launch_browser,
    new_context,
    open_lab,
    open_notebook,
)

from studio.colors import FAMILY_COLORS  # noqa: E402
from studio.schema import MIME_TYPE, validate_payload  # noqa: E402

OPS = {
    "conv": "Conv",
    "linalg": "MatMul",
    "elementwise": "Add",
    "activation": "Relu",
    "normalization": "LayerNormalization",
    "pool": "MaxPool",
    "reduce": "ReduceMean",
}

_RENDER = """async ({payload, mime, visible}) => {
  const panel = window.gieE2E['bench.ipynb'];
  const rendermime = panel.content.rendermime;
  const host = document.createElement('div');
  host.style.cssText = 'position:fixed;left:0;top:0;width:1400px;height:900px;z-index:10000;'
    + 'background:white;overflow:hidden';
  document.body.appendChild(host);
  const renderer = rendermime.createRenderer(mime);
  // attach as a Lumino widget (the renderer's base class), as an output area does
  const Widget = Object.getPrototypeOf(Object.getPrototypeOf(renderer)).constructor;
  Widget.attach(renderer, host);
  const model = {data: {[mime]: payload}, metadata: {}, trusted: true, setData() {}};
  const frame = () => new Promise(resolve => requestAnimationFrame(() => resolve()));
  const start = performance.now();
  await renderer.renderModel(model);
  const resolved = performance.now();
  while (renderer.node.querySelectorAll('g.gie-node').length < visible) {
    await frame();
    if (performance.now() - start > 300000) { throw new Error('nodes never all drawn'); }
  }
  const drawn = performance.now();
  await frame();
  await frame();
  const painted = performance.now();
  const nodes = renderer.node.querySelectorAll('g.gie-node').length;
  const edges = renderer.node.querySelectorAll('path.gie-edge').length;
  Widget.detach(renderer);
  renderer.dispose();
  host.remove();
  return {resolved: resolved - start, drawn: drawn - start, painted: painted - start, nodes, edges};
}"""


def synthetic_payload(count: int, residual_every: int = 4) -> dict[str, Any]:
    """A valid schema-1 payload of ``count`` nodes (all visible; no steps)."""
    families = [f for f in FAMILY_COLORS if f in OPS]
    nodes = []
    edges = []
    for index in range(count):
        family = families[index % len(families)]
        node_id = f"/block{index // 16}/{OPS[family].lower()}_{index}"
        nodes.append(
            {
                "id": node_id,
                "op": OPS[family],
                "domain": "",
                "family": family,
                "born": -1,
                "died": None,
                "origins": [node_id],
                "rule": None,
                "attributes": {},
                "outputs": [f"{node_id}_output_0"],
                "why_not": [],
            }
        )
        sources = [index - 1] if index else []
        if index >= residual_every and index % residual_every == 0:
            sources.append(index - residual_every)
        for source in sources:
            edges.append(
                {
                    "source": nodes[source]["id"],
                    "target": node_id,
                    "value": nodes[source]["outputs"][0],
                    "born": -1,
                    "died": None,
                }
            )
    payload = {
        "schema": "gie.session",
        "version": 1,
        "title": f"synthetic {count}-node graph",
        "inputs": [],
        "outputs": [],
        "nodes": nodes,
        "edges": edges,
        "steps": [],
        "current_step": 0,
        "layers": {},
        "engine": None,
        "overlay": "family",
    }
    validate_payload(payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if chromium_path() is None:
        print("chromium is not installed (apt-get install -y chromium)", file=sys.stderr)
        return 2
    if installed_extension() is None:
        print("the gie-studio labextension is not installed", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    payload = synthetic_payload(args.nodes)
    blocked: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gie-bench-") as folder:
        root = Path(folder) / "root"
        root.mkdir()
        notebook = nbformat.v4.new_notebook()
        notebook.metadata["kernelspec"] = {"name": "gie-bench-no-kernel", "display_name": "none"}
        nbformat.write(notebook, root / "bench.ipynb")
        with LabServer(root, Path(folder) / "state") as lab, sync_playwright() as playwright:
            browser = launch_browser(playwright)
            page = new_context(browser, blocked).new_page()
            open_lab(page, lab)
            open_notebook(page, "bench.ipynb", kernel=False)
            dialog = page.locator(".jp-Dialog")
            dialog.wait_for()
            dialog.get_by_role("button", name="No Kernel").click()
            runs = []
            for repeat in range(args.repeats):
                started = time.perf_counter()
                result = page.evaluate(
                    _RENDER, {"payload": payload, "mime": MIME_TYPE, "visible": args.nodes}
                )
                wall = time.perf_counter() - started
                runs.append(result)
                print(
                    f"run {repeat + 1}: renderModel resolved {result['resolved']:.0f} ms, "
                    f"all {result['nodes']} nodes drawn {result['drawn']:.0f} ms, "
                    f"painted {result['painted']:.0f} ms ({result['edges']} edges; "
                    f"{wall:.1f} s with the payload transfer)"
                )
            browser.close()
    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "edges": len(payload["edges"]),
                "median_painted_ms": round(statistics.median(r["painted"] for r in runs), 1),
                "median_resolved_ms": round(statistics.median(r["resolved"] for r in runs), 1),
                "browser": "chromium (headless, --disable-gpu)",
            }
        )
    )
    if blocked:
        print(f"requests outside 127.0.0.1 (aborted): {blocked}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
