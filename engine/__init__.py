"""GIE Studio engine: ONNX import, optimizer, builder, engines and the reference backend.

The public API; everything else is reachable through the submodules named in ARCHITECTURE.md.
"""

from engine.backends.numpy_ref import ReferenceInterpreter, run_model
from engine.builder import BuildError, build
from engine.config import BuilderConfig, Precision, PrecisionMode, ShapeProfile, SparsityMode
from engine.onnx_io import ModelLoadError, load, unsupported_ops
from engine.passes import OptimizationResult, optimize, replay
from engine.recipe import export_recipe, refit
from engine.runtime import Engine
from engine.serialize import EngineFileError, load_engine, save_engine

__all__ = [
    "BuildError",
    "BuilderConfig",
    "Engine",
    "EngineFileError",
    "ModelLoadError",
    "OptimizationResult",
    "Precision",
    "PrecisionMode",
    "ReferenceInterpreter",
    "ShapeProfile",
    "SparsityMode",
    "build",
    "export_recipe",
    "load",
    "load_engine",
    "optimize",
    "refit",
    "replay",
    "run_model",
    "save_engine",
    "unsupported_ops",
]
