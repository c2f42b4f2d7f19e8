"""TODO."""

from engine.ops.registry import OpSpec

OPS: list[OpSpec] = []
