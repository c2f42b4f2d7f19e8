"""GIE Studio engine: ONNX import, reference backend, (later) optimizer, builder and runtime."""

from engine.backends.numpy_ref import ReferenceInterpreter, run_model
from engine.onnx_io import ModelLoadError, load, unsupported_ops

__all__ = ["ModelLoadError", "ReferenceInterpreter", "load", "run_model", "unsupported_ops"]
