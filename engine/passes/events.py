"""What passes report while they run, and the instruments that listen.

Passes never print, time or record anything themselves: they call the :class:`PassContext`
they are given, which forwards to the instruments (printing, timing, step recording, numeric
checks). A :class:`RewriteEvent` describes one change to the graph: one rule application, or
the whole effect of a pass that is not rule-based.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from engine.ops.registry import OpRegistry


@dataclass(frozen=True)
class WhyNot:
    """A rule that nearly matched at a node but did not fire, and the user-facing reason."""

    rule: str
    node: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "node": self.node, "reason": self.reason}


@dataclass
class RewriteEvent:
    """One change to the graph.

    ``removed``/``added`` are the node objects taken out and put in (removed nodes are
    detached from the graph but keep their names, ops and metadata); ``initializers_*`` name
    the constants the change dropped or created (folding, dead-code elimination, BN folding).
    ``anchor`` is the node a rule matched at (its name), so a replay can apply the same rule at
    the same place.
    """

    pass_name: str
    rule: str | None
    rule_source: str
    anchor: str | None
    removed: list[ir.Node]
    added: list[ir.Node]
    seconds: float = 0.0
    initializers_removed: tuple[str, ...] = ()
    initializers_added: tuple[str, ...] = ()


class Instrument:
    """Base class of pass-manager instruments; every hook is optional (a no-op here)."""

    def before_pipeline(self, model: ir.Model, pass_names: Sequence[str]) -> None:
        """Called once before the first pass."""

    def before_pass(self, pass_name: str, model: ir.Model) -> None:
        """Called before each pass."""

    def after_pass(self, pass_name: str, model: ir.Model, changed: bool, seconds: float) -> None:
        """Called after each pass with whether it changed the graph and its wall time."""

    def after_rewrite(self, event: RewriteEvent, model: ir.Model) -> None:
        """Called after each change, with the graph as it is right after it."""

    def on_why_not(self, why: WhyNot) -> None:
        """Called when a rule refuses a near match."""

    def after_pipeline(self, model: ir.Model) -> None:
        """Called once after the last pass."""


@dataclass
class PassContext:
    """What a pass may use: the op registry, the disabled rule names and the reporting hooks."""

    registry: OpRegistry
    instruments: list[Instrument] = field(default_factory=list)
    disabled_rules: frozenset[str] = frozenset()
    pass_name: str = ""

    def rewrite(self, event: RewriteEvent, model: ir.Model) -> None:
        """Report one change (the pass has already made it)."""
        for instrument in self.instruments:
            instrument.after_rewrite(event, model)

    def why_not(self, why: WhyNot) -> None:
        """Report a rule that nearly matched."""
        for instrument in self.instruments:
            instrument.on_why_not(why)

    def rule_enabled(self, rule_name: str) -> bool:
        return rule_name not in self.disabled_rules
