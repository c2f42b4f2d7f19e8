"""TODO: filled by the optimizer issue."""

from engine.passes.manager import GraphPass

LAYOUT_PASSES: list[GraphPass] = []
