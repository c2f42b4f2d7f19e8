"""TODO: filled by the optimizer issue."""

from engine.passes.manager import GraphPass

EPILOGUE_PASSES: list[GraphPass] = []
