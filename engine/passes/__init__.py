"""The graph optimizer: passes over onnx-ir whose every rewrite is recorded and explained.

Entry points: :func:`optimize` (a copy of a model at O0..O3, with Steps and "why not" reasons)
and :func:`replay` (re-apply recorded Steps). See pipelines.py for what each level runs,
rewrite.py for rule-based passes, manager.py for the pass manager and the step recorder.
"""

from engine.passes.events import Instrument, PassContext, RewriteEvent, WhyNot
from engine.passes.manager import PassFailedError, PassManager, StepRecorder
from engine.passes.pipelines import LEVELS, OptimizationResult, optimize, pipeline, replay
from engine.passes.step import STEP_SCHEMA_VERSION, Step

__all__ = [
    "LEVELS",
    "STEP_SCHEMA_VERSION",
    "Instrument",
    "OptimizationResult",
    "PassContext",
    "PassFailedError",
    "PassManager",
    "RewriteEvent",
    "Step",
    "StepRecorder",
    "WhyNot",
    "optimize",
    "pipeline",
    "replay",
]
