"""The Step record: one recorded rewrite of the graph, as the studio and the extension read it.

JSON schema (``STEP_SCHEMA_VERSION`` = 1), one object per step::

    {
      "schema_version": 1,
      "index": 0,                      # position in the timeline, from 0
      "pass": "conv_bn",               # pass name
      "rule": "fold_batchnorm_into_conv" | null,   # null for non-rule passes (DCE, folding...)
      "rule_source": "engine/passes/conv_bn.py:41",  # where the rule/pass is defined
      "anchor": "Conv_3" | null,       # node the rule matched at (replay applies it there)
      "removed": ["Conv_3", "BatchNormalization_4"],   # node names taken out
      "added": ["Conv_3/Conv"],        # node names put in
      "initializers_removed": [],      # constants dropped (dead code, folding)
      "initializers_added": ["w_fused"],  # constants created (folding, BN folding)
      "provenance": {"Conv_3/Conv": ["Conv_3", "BatchNormalization_4"]},  # added -> originals
      "before": {"node_count": .., "flops": .., "bytes": .., "latency_ms": .., "unknown_nodes": ..},
      "after":  {same keys},           # estimated with engine.cost_model (GPU fp32 roofline)
      "seconds": 0.0012,               # wall time of the rewrite itself
      "numeric_check": {"max_abs": 1e-7, "max_rel": 3e-7} | null   # vs the previous step
    }

Provenance lists original ONNX node names and is transitive across steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.cost_model import GraphCost

STEP_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class NumericCheck:
    """Largest absolute and relative output difference against the previous step."""

    max_abs: float
    max_rel: float

    def to_json(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel}


@dataclass(frozen=True)
class Step:
    """One recorded change of the graph (see the module docstring for the JSON form)."""

    index: int
    pass_name: str
    rule: str | None
    rule_source: str
    anchor: str | None
    removed: tuple[str, ...]
    added: tuple[str, ...]
    provenance: dict[str, tuple[str, ...]]
    before: GraphCost
    after: GraphCost
    seconds: float
    numeric_check: NumericCheck | None = None
    initializers_removed: tuple[str, ...] = ()
    initializers_added: tuple[str, ...] = ()
    schema_version: int = field(default=STEP_SCHEMA_VERSION)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "index": self.index,
            "pass": self.pass_name,
            "rule": self.rule,
            "rule_source": self.rule_source,
            "anchor": self.anchor,
            "removed": list(self.removed),
            "added": list(self.added),
            "initializers_removed": list(self.initializers_removed),
            "initializers_added": list(self.initializers_added),
            "provenance": {name: list(origins) for name, origins in self.provenance.items()},
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "seconds": self.seconds,
            "numeric_check": None if self.numeric_check is None else self.numeric_check.to_json(),
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Step:
        version = data.get("schema_version")
        if version != STEP_SCHEMA_VERSION:
            raise ValueError(
                f"step schema version {version} is not supported (expected {STEP_SCHEMA_VERSION})"
            )
        check = data.get("numeric_check")
        return Step(
            index=int(data["index"]),
            pass_name=str(data["pass"]),
            rule=data.get("rule"),
            rule_source=str(data.get("rule_source", "")),
            anchor=data.get("anchor"),
            removed=tuple(data["removed"]),
            added=tuple(data["added"]),
            provenance={k: tuple(v) for k, v in data.get("provenance", {}).items()},
            before=_cost(data["before"]),
            after=_cost(data["after"]),
            seconds=float(data.get("seconds", 0.0)),
            numeric_check=None if check is None else NumericCheck(**check),
            initializers_removed=tuple(data.get("initializers_removed", ())),
            initializers_added=tuple(data.get("initializers_added", ())),
        )

    def summary(self) -> str:
        """One timeline line: index, pass/rule, nodes removed/added, node count, est. latency."""
        label = self.pass_name + (f"/{self.rule}" if self.rule else "")
        line = (
            f"#{self.index:<4} {label:<60} -{len(self.removed):<3} +{len(self.added):<3} "
            f"nodes {self.after.node_count:<5} est {self.after.latency_ms:.3f} ms"
        )
        if not self.removed and not self.added:
            dropped, created = len(self.initializers_removed), len(self.initializers_added)
            line += f"  (constants -{dropped} +{created})"
        return line


def _cost(data: dict[str, Any]) -> GraphCost:
    return GraphCost(
        int(data["node_count"]),
        int(data["flops"]),
        int(data["bytes"]),
        float(data["latency_ms"]),
        int(data.get("unknown_nodes", 0)),
    )
