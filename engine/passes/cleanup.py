"""TODO: filled by the optimizer issue."""

from engine.passes.manager import GraphPass

CLEANUP_PASSES: list[GraphPass] = []
