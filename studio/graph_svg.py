"""The session graph at one step as a static SVG (the HTML fallback and the offline report).

:func:`layout` is a small deterministic layered (Sugiyama-style) layout: cycles are broken
in input order, every node goes on the layer of its longest path from a source (so every edge
points down), and a few barycenter sweeps order the nodes within each layer to shorten edges.
:func:`graph_svg` draws the nodes visible at a step of a session payload (studio.schema) as
boxes labelled with the op and the shortened node name, coloured by the payload's overlay
(op family, layer precision, measured latency or error vs fp32, palette from studio.colors),
and the edges as curves with arrowheads. Every text that comes from the model is escaped.
Graphs above :data:`MAX_NODES` visible nodes are cut to their first nodes, and the SVG says so.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from studio.colors import (
    ERROR_SCALE,
    LATENCY_SCALE,
    NEUTRAL_COLOR,
    family_color,
    precision_color,
    scale_color,
)

#: At most this many visible nodes are drawn; the SVG notes how many were left out.
MAX_NODES = 2000
#: Node box size and the gaps between boxes, in SVG pixels.
NODE_WIDTH, NODE_HEIGHT = 168.0, 40.0
GAP_X, GAP_Y = 24.0, 36.0
MARGIN = 16.0
#: Node names longer than this are shortened to their last characters.
NAME_CHARS = 24
#: Barycenter sweeps (each one down and one up) when ordering the layers.
SWEEPS = 4
#: Cosine similarity vs fp32 mapped to the far end of the error scale.
WORST_COSINE = 0.9
OVERLAYS = ("family", "precision", "latency", "error")

Point = tuple[float, float]


def _node_id(node: str | Mapping[str, Any]) -> str:
    return node if isinstance(node, str) else str(node["id"])


def layers_of(ids: Sequence[str], edges: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Longest-path layer of every node: 0 for sources, else 1 + the deepest predecessor.

    Edges to unknown nodes and self-loops are ignored; a cycle is broken by releasing the
    first remaining node in ``ids`` order (its unresolved in-edges then do not count).
    """
    known = set(ids)
    order = {node: index for index, node in enumerate(ids)}
    successors: dict[str, list[str]] = {node: [] for node in ids}
    waiting = dict.fromkeys(ids, 0)
    for source, target in edges:
        if source in known and target in known and source != target:
            successors[source].append(target)
            waiting[target] += 1
    layer = dict.fromkeys(ids, 0)
    ready = [node for node in ids if waiting[node] == 0]
    done: set[str] = set()
    while len(done) < len(ids):
        if not ready:  # a cycle: release the earliest waiting node
            ready = [min((n for n in ids if n not in done), key=order.__getitem__)]
        ready.sort(key=order.__getitem__)
        next_ready: list[str] = []
        for node in ready:
            if node in done:
                continue
            done.add(node)
            for target in successors[node]:
                if target in done:
                    continue  # the back edge of a broken cycle
                layer[target] = max(layer[target], layer[node] + 1)
                waiting[target] -= 1
                if waiting[target] == 0:
                    next_ready.append(target)
        ready = next_ready
    return layer


def _order_layers(
    ids: Sequence[str], layer: Mapping[str, int], edges: Sequence[tuple[str, str]]
) -> list[list[str]]:
    """Nodes per layer, ordered by barycenter sweeps (start: input order; ties keep order)."""
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for node in ids:
        rows[layer[node]].append(node)
    predecessors: dict[str, list[str]] = {node: [] for node in ids}
    successors: dict[str, list[str]] = {node: [] for node in ids}
    for source, target in edges:
        if source != target and source in layer and target in layer:
            predecessors[target].append(source)
            successors[source].append(target)
    position = {node: float(i) for row in rows for i, node in enumerate(row)}

    def sweep(row_indices: Iterable[int], neighbours: Mapping[str, list[str]]) -> None:
        for index in row_indices:
            row = rows[index]

            def key(item: tuple[int, str]) -> tuple[float, int]:
                slot, node = item
                linked = neighbours[node]
                if not linked:
                    return (float(slot), slot)
                centre = sum(position[other] for other in linked) / len(linked)
                return (centre, slot)

            row[:] = [node for _, node in sorted(enumerate(row), key=key)]
            for slot, node in enumerate(row):
                position[node] = float(slot)

    for _ in range(SWEEPS):
        sweep(range(1, len(rows)), predecessors)
        sweep(range(len(rows) - 2, -1, -1), successors)
    return rows


def layout(
    nodes: Sequence[str | Mapping[str, Any]], edges: Sequence[Mapping[str, Any] | tuple[str, str]]
) -> dict[str, Point]:
    """Centre ``(x, y)`` in SVG pixels of every node, top to bottom by layer.

    ``nodes`` are ids or payload node dicts; ``edges`` are ``(source, target)`` pairs or
    payload edge dicts. Deterministic: the same input gives the same positions. Each layer is
    centred on the widest one; ``y`` grows with the layer.
    """
    ids = list(dict.fromkeys(_node_id(node) for node in nodes))
    pairs = [
        (str(edge[0]), str(edge[1]))
        if isinstance(edge, tuple)
        else (str(edge["source"]), str(edge["target"]))
        for edge in edges
    ]
    layer = layers_of(ids, pairs)
    rows = _order_layers(ids, layer, pairs)
    pitch_x, pitch_y = NODE_WIDTH + GAP_X, NODE_HEIGHT + GAP_Y
    widest = max((len(row) for row in rows), default=0)
    positions: dict[str, Point] = {}
    for depth, row in enumerate(rows):
        offset = (widest - len(row)) * pitch_x / 2
        for slot, node in enumerate(row):
            x = MARGIN + offset + slot * pitch_x + NODE_WIDTH / 2
            y = MARGIN + depth * pitch_y + NODE_HEIGHT / 2
            positions[node] = (x, y)
    return positions


def visible(item: Mapping[str, Any], step: int) -> bool:
    """Whether a payload node or edge exists after ``step`` steps."""
    born, died = int(item["born"]), item.get("died")
    return born < step and (died is None or int(died) >= step)


def shorten(name: str, limit: int = NAME_CHARS) -> str:
    """``name`` cut to its last ``limit`` characters (the informative end of ONNX paths)."""
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _text_color(fill: str) -> str:
    """Black or white, whichever reads better on ``fill`` (``#RRGGBB``)."""
    try:
        red, green, blue = (int(fill[i : i + 2], 16) for i in (1, 3, 5))
    except ValueError:
        return "#000000"
    luminance = 0.299 * red + 0.587 * green + 0.114 * blue
    return "#000000" if luminance > 140 else "#FFFFFF"


def _node_colors(
    nodes: Sequence[Mapping[str, Any]], layers: Mapping[str, Any], overlay: str
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Fill colour per node id and the legend (label, colour) for ``overlay``."""
    fills: dict[str, str] = {}
    legend: dict[str, str] = {}
    if overlay == "family":
        for node in nodes:
            family = str(node.get("family", ""))
            fills[node["id"]] = legend[family] = family_color(family)
    elif overlay == "precision":
        for node in nodes:
            facts = layers.get(node["id"])
            if facts is None:
                fills[node["id"]] = NEUTRAL_COLOR
                continue
            label = "reformat" if facts.get("role") == "reformat" else str(facts.get("precision"))
            fills[node["id"]] = legend[label] = precision_color(label)
    else:  # latency or error: a continuous scale
        key = "latency_ms" if overlay == "latency" else "cosine"
        values = {
            node["id"]: float(layers[node["id"]][key])
            for node in nodes
            if node["id"] in layers and _finite(layers[node["id"]].get(key))
        }
        slowest = max(values.values(), default=0.0)
        for node in nodes:
            value = values.get(node["id"])
            if value is None:
                fills[node["id"]] = NEUTRAL_COLOR
            elif overlay == "latency":
                fills[node["id"]] = scale_color(LATENCY_SCALE, value / slowest if slowest else 0)
            else:
                fills[node["id"]] = scale_color(ERROR_SCALE, (1 - value) / (1 - WORST_COSINE))
        if overlay == "latency":
            legend = {"fastest": LATENCY_SCALE[0][1], f"{slowest:.3g} ms": LATENCY_SCALE[-1][1]}
        else:
            legend = {"cosine 1": ERROR_SCALE[0][1], f"cosine ≤ {WORST_COSINE}": ERROR_SCALE[-1][1]}
    if overlay != "family" and any(color == NEUTRAL_COLOR for color in fills.values()):
        legend.setdefault("no data", NEUTRAL_COLOR)
    return fills, sorted(legend.items())


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _edge_path(start: Point, end: Point) -> str:
    """A vertical cubic curve from the bottom of the source box to the top of the target."""
    x1, y1 = start[0], start[1] + NODE_HEIGHT / 2
    x2, y2 = end[0], end[1] - NODE_HEIGHT / 2
    middle = (y1 + y2) / 2
    return f"M{x1:.1f},{y1:.1f} C{x1:.1f},{middle:.1f} {x2:.1f},{middle:.1f} {x2:.1f},{y2:.1f}"


def _node_svg(node: Mapping[str, Any], centre: Point, fill: str, facts: Any) -> str:
    node_id = str(node["id"])
    op = str(node.get("op", ""))
    tooltip = [f"{node_id} ({op}, {node.get('family', '')})"]
    if facts:
        tooltip.append(
            f"precision {facts.get('precision')}, tactic {facts.get('tactic')}, "
            f"latency {facts.get('latency_ms')} ms"
        )
    if node.get("rule"):
        tooltip.append(f"rule {node['rule']}")
    x, y = centre[0] - NODE_WIDTH / 2, centre[1] - NODE_HEIGHT / 2
    ink = _text_color(fill)
    return (
        f'<g class="node" data-id="{html.escape(node_id)}">'
        f"<title>{html.escape(chr(10).join(tooltip))}</title>"
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{NODE_WIDTH:.0f}" height="{NODE_HEIGHT:.0f}" '
        f'rx="5" fill="{html.escape(fill)}" stroke="#333333" stroke-width="0.8"/>'
        f'<text x="{centre[0]:.1f}" y="{centre[1] - 4:.1f}" fill="{ink}" font-weight="bold" '
        f'text-anchor="middle">{html.escape(shorten(op, NAME_CHARS))}</text>'
        f'<text x="{centre[0]:.1f}" y="{centre[1] + 11:.1f}" fill="{ink}" font-size="10" '
        f'text-anchor="middle">{html.escape(shorten(node_id))}</text></g>'
    )


def graph_svg(payload: Mapping[str, Any], step: int | None = None, overlay: str = "family") -> str:
    """The graph of ``payload`` after ``step`` steps (default: its ``current_step``) as an
    ``<svg>`` element, nodes coloured by ``overlay`` (one of :data:`OVERLAYS`)."""
    if overlay not in OVERLAYS:
        raise ValueError(f"overlay {overlay!r} is not one of {OVERLAYS}")
    step = int(payload.get("current_step", 0)) if step is None else int(step)
    shown = [node for node in payload["nodes"] if visible(node, step)]
    total = len(shown)
    shown = shown[:MAX_NODES]
    ids = {str(node["id"]) for node in shown}
    edges = [
        edge
        for edge in payload["edges"]
        if visible(edge, step) and edge["source"] in ids and edge["target"] in ids
    ]
    positions = layout(shown, edges)
    layers = payload.get("layers") or {}
    fills, legend = _node_colors(shown, layers, overlay)

    legend_height = 22.0
    top = legend_height + (18.0 if total > len(shown) else 0.0)
    width = max((x for x, _ in positions.values()), default=0.0) + NODE_WIDTH / 2 + MARGIN
    height = max((y for _, y in positions.values()), default=0.0) + NODE_HEIGHT / 2 + MARGIN
    legend_width = MARGIN + sum(28 + 7 * len(label) for label, _ in legend)
    width, height = max(width, legend_width, 360.0), height + top

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="gie-graph" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
        'font-family="sans-serif" font-size="11" role="img">',
        f"<title>{html.escape(f'{total} nodes after step {step}, coloured by {overlay}')}</title>",
        '<defs><marker id="gie-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#555555"/></marker></defs>',
    ]
    x = MARGIN
    for label, color in legend:
        parts.append(
            f'<rect x="{x:.0f}" y="6" width="12" height="12" fill="{html.escape(color)}" '
            f'stroke="#333333" stroke-width="0.5"/><text x="{x + 16:.0f}" y="16">'
            f"{html.escape(label)}</text>"
        )
        x += 28 + 7 * len(label)
    if total > len(shown):
        parts.append(
            f'<text class="truncated" x="{MARGIN:.0f}" y="{legend_height + 12:.0f}" '
            f'fill="#B2182B">showing the first {len(shown)} of {total} nodes</text>'
        )
    parts.append(f'<g transform="translate(0,{top:.0f})">')
    for edge in edges:
        source, target = positions[edge["source"]], positions[edge["target"]]
        parts.append(
            f'<path class="edge" d="{_edge_path(source, target)}" fill="none" '
            'stroke="#555555" stroke-width="1" marker-end="url(#gie-arrow)">'
            f"<title>{html.escape(str(edge.get('value', '')))}</title></path>"
        )
    for node in shown:
        node_id = str(node["id"])
        parts.append(_node_svg(node, positions[node_id], fills[node_id], layers.get(node_id)))
    parts.append("</g></svg>")
    return "".join(parts)


__all__ = ["MAX_NODES", "OVERLAYS", "graph_svg", "layers_of", "layout", "shorten", "visible"]
