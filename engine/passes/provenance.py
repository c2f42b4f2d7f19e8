"""Provenance: which original ONNX nodes each node of an optimized graph came from.

Stored in the node's ``metadata_props`` under ``gie.provenance`` as a JSON list of original node
names, so it survives export to ONNX (Netron shows it) and replays. An original node's
provenance is its own name; a node made by a rewrite inherits the union of the provenance of
the nodes the rewrite removed, so it stays transitive across any number of steps.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import onnx_ir as ir

from engine.onnx_io import name_unnamed_nodes

__all__ = [
    "PROVENANCE_KEY",
    "RULE_KEY",
    "inherit_provenance",
    "name_unnamed_nodes",
    "provenance",
    "set_provenance",
    "stamp_originals",
]

PROVENANCE_KEY = "gie.provenance"
RULE_KEY = "gie.rule"


def provenance(node: ir.Node) -> list[str]:
    """The original node names ``node`` came from (its own name when never rewritten)."""
    raw = node.metadata_props.get(PROVENANCE_KEY)
    if raw is None:
        return [node.name] if node.name else []
    return list(json.loads(raw))


def set_provenance(node: ir.Node, origins: Iterable[str]) -> None:
    """Record ``origins`` (deduplicated, order kept) as the node's provenance."""
    unique = list(dict.fromkeys(origins))
    node.metadata_props[PROVENANCE_KEY] = json.dumps(unique)


def inherit_provenance(new_nodes: Iterable[ir.Node], removed: Iterable[ir.Node], rule: str) -> None:
    """Stamp nodes made by ``rule`` with the union of the removed nodes' provenance."""
    origins: list[str] = []
    for node in removed:
        origins.extend(provenance(node))
    for node in new_nodes:
        if PROVENANCE_KEY not in node.metadata_props:
            set_provenance(node, origins)
        node.metadata_props[RULE_KEY] = rule


def stamp_originals(graph: ir.Graph) -> None:
    """Mark every node of an unoptimized graph as its own origin (idempotent)."""
    for node in graph:
        if PROVENANCE_KEY not in node.metadata_props:
            set_provenance(node, [node.name])
