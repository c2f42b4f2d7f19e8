"""TODO: filled by the optimizer issue."""

from engine.passes.manager import GraphPass

TRANSFORMER_PASSES: list[GraphPass] = []
