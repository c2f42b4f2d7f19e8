"""Op registry: one module per op family, each exporting ``OPS`` (see registry.py)."""

from engine.ops.registry import OpCost, OpRegistry, OpSpec, TensorSpec, default_registry

__all__ = ["OpCost", "OpRegistry", "OpSpec", "TensorSpec", "default_registry"]
