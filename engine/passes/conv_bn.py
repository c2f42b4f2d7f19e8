"""TODO: filled by the optimizer issue."""

from engine.passes.manager import GraphPass

CONV_BN_PASSES: list[GraphPass] = []
