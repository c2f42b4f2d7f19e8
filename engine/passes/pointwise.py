"""TODO: filled by the optimizer issue."""

from engine.passes.manager import GraphPass

POINTWISE_PASSES: list[GraphPass] = []
