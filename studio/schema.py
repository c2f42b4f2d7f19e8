"""The session payload: what ``application/vnd.gie.session+json`` carries (schema version 1).

One JSON document holds everything the extension draws: the timeline's nodes and edges with
their lifetimes (studio.timeline), the recorded steps (engine.passes.step), the position the
session is at, the engine's per-layer facts (precision and why, tactic and every candidate,
measured latency, error vs fp32) and which overlay to show. :data:`JSON_SCHEMA` is the JSON
Schema of it; ``studio/session.schema.json`` is the same document on disk for the extension's
TypeScript side (a test keeps them equal). A node is visible after ``k`` steps when
``born < k`` and (``died`` is null or ``died >= k``); ``born == -1`` means the original graph.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.quantize.accuracy import LayerError, first_divergent
from engine.report import ProfileReport
from engine.runtime import Engine
from studio.timeline import Timeline

MIME_TYPE = "application/vnd.gie.session+json"
SCHEMA_VERSION = 1
OVERLAYS = ("family", "precision", "latency", "error")
SCHEMA_PATH = Path(__file__).with_name("session.schema.json")

_LIFETIME = {
    "born": {"type": "integer", "minimum": -1},
    "died": {"type": ["integer", "null"], "minimum": 0},
}
_TENSOR = {
    "type": "object",
    "required": ["name", "dtype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "dtype": {"type": "string"},
        "shape": {"type": ["array", "null"], "items": {"type": ["integer", "string"]}},
    },
}
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "GIE Studio session payload",
    "type": "object",
    "required": ["schema", "version", "title", "nodes", "edges", "steps", "current_step"],
    "properties": {
        "schema": {"const": "gie.session"},
        "version": {"const": SCHEMA_VERSION},
        "title": {"type": "string"},
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {"type": "array", "items": _TENSOR},
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "op", "domain", "family", "born", "died", "origins"],
                "properties": {
                    "id": {"type": "string"},
                    "op": {"type": "string"},
                    "domain": {"type": "string"},
                    "family": {"type": "string"},
                    **_LIFETIME,
                    "origins": {"type": "array", "items": {"type": "string"}},
                    "rule": {"type": ["string", "null"]},
                    "attributes": {"type": "object", "additionalProperties": {"type": "string"}},
                    "outputs": {"type": "array", "items": {"type": "string"}},
                    "why_not": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "edges": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["source", "target", "value", "born", "died"],
                "properties": {
                    "source": {"type": "string"},
                    "target": {"type": "string"},
                    "value": {"type": "string"},
                    **_LIFETIME,
                },
            },
        },
        "steps": {"type": "array", "items": {"type": "object"}},
        "current_step": {"type": "integer", "minimum": 0},
        "layers": {"type": "object", "additionalProperties": {"type": "object"}},
        "engine": {"type": ["object", "null"]},
        "overlay": {"enum": list(OVERLAYS)},
    },
}


class PayloadError(ValueError):
    """A payload that does not follow the schema (the message gives the JSON path)."""


def _number(value: float | None) -> float | None:
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None  # JSON has no NaN/inf
    return float(value)


def layer_facts(
    engine: Engine,
    profile: ProfileReport | None = None,
    errors: Sequence[LayerError] = (),
) -> dict[str, dict[str, Any]]:
    """Per-layer facts of an engine keyed by layer name (the payload's ``layers``)."""
    latency = {row.layer: row.latency_ms_median for row in profile.layers} if profile else {}
    error = {e.layer: e for e in errors}
    facts: dict[str, dict[str, Any]] = {}
    for layer in engine.plan.layers:
        found = error.get(layer.name)
        facts[layer.name] = {
            "op": layer.qualified_op,
            "precision": layer.precision.value,
            "precision_reason": layer.precision_reason,
            "role": layer.role,
            "tactic": layer.tactic,
            "origins": list(layer.origins),
            "latency_ms": _number(latency.get(layer.name)),
            "candidates": [
                {
                    "tactic": c.tactic,
                    "median_ms": _number(c.median_ms),
                    "samples": c.samples,
                    "aborted": c.aborted,
                }
                for c in layer.candidates
            ],
            "cosine": _number(found.cosine) if found else None,
            "sqnr_db": _number(found.sqnr_db) if found else None,
        }
    return facts


def engine_summary(
    engine: Engine, profile: ProfileReport | None, errors: Sequence[LayerError]
) -> dict[str, Any]:
    """Totals of an engine for the payload's ``engine`` field."""
    divergent = first_divergent(errors) if errors else None
    precisions = Counter(
        layer.precision.value for layer in engine.plan.layers if layer.role == "compute"
    )
    return {
        "latency_ms": _number(profile.end_to_end.median_ms) if profile else None,
        "arena_bytes": int(engine.memory.arena_bytes),
        "naive_bytes": int(engine.memory.naive_bytes),
        "precisions": dict(precisions),
        "first_divergent": divergent.layer if divergent else None,
    }


def session_payload(
    timeline: Timeline,
    position: int,
    title: str,
    io: Mapping[str, list[dict[str, Any]]],
    engine: Engine | None = None,
    profile: ProfileReport | None = None,
    errors: Sequence[LayerError] = (),
    overlay: str = "family",
) -> dict[str, Any]:
    """The payload of a session at ``position`` (see the module docstring)."""
    if overlay not in OVERLAYS:
        raise PayloadError(f"overlay {overlay!r} is not one of {OVERLAYS}")
    nodes = [
        {
            "id": n.id,
            "op": n.op,
            "domain": n.domain,
            "family": n.family,
            "born": n.born,
            "died": n.died,
            "origins": n.origins,
            "rule": n.rule,
            "attributes": n.attributes,
            "outputs": n.outputs,
            "why_not": n.why_not,
        }
        for n in timeline.nodes.values()
    ]
    edges = [
        {"source": e.source, "target": e.target, "value": e.value, "born": e.born, "died": e.died}
        for e in timeline.edges
    ]
    return {
        "schema": "gie.session",
        "version": SCHEMA_VERSION,
        "title": title,
        "inputs": list(io.get("inputs", [])),
        "outputs": list(io.get("outputs", [])),
        "nodes": nodes,
        "edges": edges,
        "steps": [step.to_json() for step in timeline.steps],
        "current_step": position,
        "layers": layer_facts(engine, profile, errors) if engine is not None else {},
        "engine": engine_summary(engine, profile, errors) if engine is not None else None,
        "overlay": overlay,
    }


def validate_payload(payload: Mapping[str, Any]) -> None:
    """Check ``payload`` against :data:`JSON_SCHEMA` and the cross references (edges name
    existing nodes, ``current_step`` within the steps); :class:`PayloadError` names the path."""
    import jsonschema

    try:
        jsonschema.validate(payload, JSON_SCHEMA)
    except jsonschema.ValidationError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise PayloadError(f"payload {where}: {error.message}") from None
    ids = {node["id"] for node in payload["nodes"]}
    if len(ids) != len(payload["nodes"]):
        raise PayloadError("payload nodes: ids are not unique")
    for index, edge in enumerate(payload["edges"]):
        for end in ("source", "target"):
            if edge[end] not in ids:
                raise PayloadError(f"payload edges/{index}/{end}: no node {edge[end]!r}")
    if payload["current_step"] > len(payload["steps"]):
        raise PayloadError(
            f"payload current_step: {payload['current_step']} > {len(payload['steps'])} steps"
        )


def schema_json() -> str:
    """:data:`JSON_SCHEMA` as the text of ``studio/session.schema.json``."""
    return json.dumps(JSON_SCHEMA, indent=2, sort_keys=True) + "\n"


__all__ = [
    "JSON_SCHEMA",
    "MIME_TYPE",
    "OVERLAYS",
    "SCHEMA_VERSION",
    "PayloadError",
    "layer_facts",
    "schema_json",
    "session_payload",
    "validate_payload",
]
