"""studio.timeline: node and edge lifetimes agree with the recorded steps."""

from __future__ import annotations

import pytest

from engine import zoo
from engine.onnx_io import load
from studio.timeline import record_timeline


@pytest.mark.parametrize("name", ["resnet", "bert_opset17"])
def test_lifetimes_match_every_step_s_removed_and_added_nodes(name: str) -> None:
    timeline = record_timeline(load(zoo.build(name)), "O3")
    assert timeline.steps
    by_name = lambda ids: {i.split("#", 1)[0] for i in ids}  # noqa: E731 - ids may carry "#n"
    for step in timeline.steps:
        born = by_name(n.id for n in timeline.nodes.values() if n.born == step.index)
        died = by_name(n.id for n in timeline.nodes.values() if n.died == step.index)
        assert born == set(step.added)
        assert died == set(step.removed)
    final = {n.id for n in timeline.visible_nodes(len(timeline.steps))}
    graph = {node.name for node in timeline.result.model.graph}
    assert {i for i in final if not i.startswith(("input:", "output:"))} == graph


def test_edges_connect_visible_nodes_at_every_position() -> None:
    timeline = record_timeline(load(zoo.build("resnet")), "O3")
    for position in range(len(timeline.steps) + 1):
        visible = {n.id for n in timeline.visible_nodes(position)}
        for edge in timeline.edges:
            if edge.born < position and (edge.died is None or edge.died >= position):
                assert edge.source in visible and edge.target in visible, (position, edge)
