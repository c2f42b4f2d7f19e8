"""studio.graph_svg: deterministic layered layout and an escaped SVG of one step."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from studio.graph_svg import MAX_NODES, graph_svg, layers_of, layout, visible

HOSTILE = "<img src=x onerror=alert(1)>"
SVG = "{http://www.w3.org/2000/svg}"


def _node(node_id: str, op: str = "Conv", family: str = "conv", born: int = -1, died=None):
    return {
        "id": node_id,
        "op": op,
        "domain": "",
        "family": family,
        "born": born,
        "died": died,
        "origins": [],
        "rule": None,
        "attributes": {},
        "outputs": [],
        "why_not": [],
    }


def _edge(source: str, target: str, born: int = -1, died=None) -> dict[str, Any]:
    return {
        "source": source,
        "target": target,
        "value": f"{source}_out",
        "born": born,
        "died": died,
    }


def _payload(nodes, edges, current_step: int = 0, layers=None) -> dict[str, Any]:
    return {
        "schema": "gie.session",
        "version": 1,
        "title": "t",
        "inputs": [],
        "outputs": [],
        "nodes": nodes,
        "edges": edges,
        "steps": [{}] * 2,
        "current_step": current_step,
        "layers": layers or {},
        "engine": None,
        "overlay": "family",
    }


def _diamond_timeline() -> dict[str, Any]:
    """in -> a -> {b, c} -> d -> out; step 0 fuses b and d into bd (born 0), removes b, d."""
    nodes = [
        _node("input:x", "Input", "io"),
        _node("a"),
        _node("b", "Relu", "activation", died=0),
        _node("c", "Sigmoid", "activation"),
        _node("d", "Add", "elementwise", died=0),
        _node("bd", "Pointwise", "fused", born=0),
        _node("output:y", "Output", "io"),
    ]
    edges = [
        _edge("input:x", "a"),
        _edge("a", "b", died=0),
        _edge("a", "c"),
        _edge("b", "d", died=0),
        _edge("c", "d", died=0),
        _edge("d", "output:y", died=0),
        _edge("a", "bd", born=0),
        _edge("c", "bd", born=0),
        _edge("bd", "output:y", born=0),
    ]
    return _payload(nodes, edges)


def _svg_nodes(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == "node"]


def test_layout_is_deterministic() -> None:
    payload = _diamond_timeline()
    first = layout(payload["nodes"], payload["edges"])
    assert layout(payload["nodes"], payload["edges"]) == first
    assert graph_svg(payload, step=1) == graph_svg(payload, step=1)
    assert graph_svg(payload, step=0, overlay="precision") == graph_svg(
        payload, step=0, overlay="precision"
    )


def test_every_edge_points_down_on_a_dag() -> None:
    ids = [f"n{i}" for i in range(30)]
    # a DAG with long and short edges, listed in a scrambled order
    pairs = [(ids[i], ids[j]) for i in range(30) for j in (i + 1, i + 3, i * 2) if i < j < 30]
    pairs = pairs[::-1]
    layer = layers_of(ids[::-1], pairs)
    assert all(layer[source] < layer[target] for source, target in pairs)
    positions = layout(ids[::-1], pairs)
    assert all(positions[s][1] < positions[t][1] for s, t in pairs)
    # longest path: n0 -> n1 -> ... -> n29 puts n29 on layer 29
    assert layer["n0"] == 0 and layer["n29"] == 29


def test_cycles_and_unknown_nodes_do_not_break_the_layout() -> None:
    positions = layout(["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "a"), ("a", "ghost")])
    assert set(positions) == {"a", "b", "c"}
    assert positions["a"][1] < positions["b"][1] < positions["c"][1]
    assert layout([], []) == {}


def test_nodes_of_one_layer_do_not_overlap() -> None:
    payload = _diamond_timeline()
    positions = layout([n for n in payload["nodes"] if visible(n, 0)], payload["edges"])
    assert positions["b"][1] == positions["c"][1]
    assert positions["b"][0] != positions["c"][0]
    assert len(set(positions.values())) == len(positions)


@pytest.mark.parametrize("step", [0, 1])
def test_svg_draws_exactly_the_visible_nodes(step: int) -> None:
    payload = _diamond_timeline()
    expected = {n["id"] for n in payload["nodes"] if visible(n, step)}
    drawn = {g.get("data-id") for g in _svg_nodes(graph_svg(payload, step=step))}
    assert drawn == expected
    root = ET.fromstring(graph_svg(payload, step=step))
    edges = [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]
    assert len(edges) == sum(visible(e, step) for e in payload["edges"])


def test_step_defaults_to_the_current_step() -> None:
    payload = _diamond_timeline()
    payload["current_step"] = 1
    assert graph_svg(payload) == graph_svg(payload, step=1)


def test_hostile_node_name_appears_only_escaped() -> None:
    payload = _payload(
        [_node("input:x", "Input", "io"), _node(HOSTILE, op=HOSTILE, family=HOSTILE)],
        [{**_edge("input:x", HOSTILE), "value": HOSTILE}],
        layers={HOSTILE: {"precision": HOSTILE, "tactic": HOSTILE, "latency_ms": 1.0}},
    )
    for overlay in ("family", "precision", "latency", "error"):
        svg = graph_svg(payload, overlay=overlay)
        assert "<img" not in svg
        assert "&lt;img src=x onerror=alert(1)&gt;" in svg
        ET.fromstring(svg)  # still well-formed XML
        assert [g.get("data-id") for g in _svg_nodes(svg)] == ["input:x", HOSTILE]


def test_precision_overlay_colours_by_layer_precision() -> None:
    payload = _payload(
        [_node("a"), _node("b")],
        [_edge("a", "b")],
        layers={"a": {"precision": "int8", "role": "compute"}, "b": {"precision": "fp16"}},
    )
    fills = {
        g.get("data-id"): g.find(f"{SVG}rect").get("fill")
        for g in _svg_nodes(graph_svg(payload, overlay="precision"))
    }
    assert fills["a"] != fills["b"]
    with pytest.raises(ValueError, match="overlay"):
        graph_svg(payload, overlay="rainbow")


def test_large_graphs_are_capped_and_say_so() -> None:
    count = MAX_NODES + 5
    nodes = [_node(f"n{i}", "Relu", "activation") for i in range(count)]
    edges = [_edge(f"n{i}", f"n{i + 1}") for i in range(count - 1)]
    svg = graph_svg(_payload(nodes, edges))
    assert len(re.findall(r'<g class="node"', svg)) == MAX_NODES
    assert f"showing the first {MAX_NODES} of {count} nodes" in svg
