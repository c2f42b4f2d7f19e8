"""TODO: filled by the optimizer issue."""

from engine.passes.manager import GraphPass

FOLD_PASSES: list[GraphPass] = []
