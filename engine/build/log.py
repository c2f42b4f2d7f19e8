"""The build log: every decision the builder takes, with its reason (the studio lists them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LogEntry:
    """One decision: the build stage, the layer it concerns ('' for the whole build), the text."""

    stage: str
    layer: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"stage": self.stage, "layer": self.layer, "message": self.message}


@dataclass
class BuildLog:
    """Ordered decisions of one build."""

    entries: list[LogEntry] = field(default_factory=list)

    def add(self, stage: str, message: str, layer: str = "") -> None:
        self.entries.append(LogEntry(stage, layer, message))

    def for_layer(self, layer: str) -> list[LogEntry]:
        return [e for e in self.entries if e.layer == layer]

    def lines(self) -> list[str]:
        return [f"[{e.stage}] {e.layer + ': ' if e.layer else ''}{e.message}" for e in self.entries]

    def to_json(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.entries]

    @staticmethod
    def from_json(data: list[dict[str, Any]]) -> BuildLog:
        return BuildLog([LogEntry(d["stage"], d.get("layer", ""), d["message"]) for d in data])
